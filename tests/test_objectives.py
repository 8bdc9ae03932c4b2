"""Every objective's loss on fixed small tensors against a value worked out by hand (math.log / math.exp
on explicit numbers), and where gradients may and may not flow."""

from __future__ import annotations

import math

import pytest
import torch

from vlrlcd.objectives.common import aggregate_tokens, per_token_kl, sequence_scores
from vlrlcd.objectives.dpo import dpo_loss
from vlrlcd.objectives.grpo import group_advantages, grpo_loss
from vlrlcd.objectives.ldl_grpo import ldl_grpo_loss
from vlrlcd.objectives.ppo import ppo_clip_loss, update_baseline
from vlrlcd.objectives.rlsd import rlsd_lambda, rlsd_loss, rlsd_token_advantages
from vlrlcd.objectives.sft import sft_loss
from vlrlcd.objectives.tvkd import rest_logp, topk_with_rest, tvkd_dpo_loss, tvkd_values

PAD = -77.0  # garbage on padding: any leak of it into a loss shows up at once


def k3(logp: float, ref: float) -> float:
    d = ref - logp
    return math.exp(d) - d - 1.0


def lsig(x: float) -> float:
    """log σ(x)."""
    return -math.log1p(math.exp(-x))


# --- common --------------------------------------------------------------------------------------

def test_sequence_scores_mean_and_sum():
    lp = torch.tensor([[-1.0, -2.0, PAD], [-4.0, PAD, PAD]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert torch.allclose(sequence_scores(lp, m, True), torch.tensor([-1.5, -4.0]))
    assert torch.allclose(sequence_scores(lp, m, False), torch.tensor([-3.0, -4.0]))


def test_per_token_kl_is_k3_and_zero_at_equality():
    lp = torch.tensor([-1.0, -2.0, -0.7])
    ref = torch.tensor([-2.0, -1.0, -0.7])
    expected = torch.tensor([math.exp(-1.0) + 1.0 - 1.0, math.exp(1.0) - 1.0 - 1.0, 0.0])
    assert torch.allclose(per_token_kl(lp, ref), expected)


def test_aggregate_tokens_by_loss_type():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, PAD, PAD]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate_tokens(x, m, "dapo").item() == pytest.approx(10.0 / 4)
    assert aggregate_tokens(x, m, "dapo", num_items=8).item() == pytest.approx(10.0 / 8)
    assert aggregate_tokens(x, m, "bnpo").item() == pytest.approx(10.0 / 4)
    assert aggregate_tokens(x, m, "grpo").item() == pytest.approx((6.0 / 3 + 4.0 / 1) / 2)
    assert aggregate_tokens(x, m, "dr_grpo").item() == pytest.approx(10.0 / (2 * 3))
    assert aggregate_tokens(x, m, "dr_grpo", max_completion_length=5).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="loss_type"):
        aggregate_tokens(x, m, "ppo")


# --- sft -----------------------------------------------------------------------------------------

def test_sft_loss_is_mean_token_nll_and_ignores_padding():
    lp = torch.tensor([[-1.0, -2.0, PAD], [-0.5, PAD, PAD]], requires_grad=True)
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss, metrics = sft_loss(lp, m)
    assert loss.item() == pytest.approx((1.0 + 2.0 + 0.5) / 3)
    assert metrics["tokens"] == 3.0 and metrics["loss"] == pytest.approx(3.5 / 3)
    loss.backward()
    assert torch.allclose(lp.grad, -m / 3)


# --- ldl_grpo ------------------------------------------------------------------------------------

def _ldl_inputs():
    # one prompt, K = 2: y_0 has tokens (−1, −2), y_1 has one token (−3)
    # float64: KL(D‖q) is ~1e-3 here, a difference of numbers ~0.5, too close for float32 at rel 1e-6
    f64 = torch.float64
    lp = torch.tensor([[[-1.0, -2.0], [-3.0, PAD]]], dtype=f64, requires_grad=True)
    ref = torch.tensor([[[-1.5, -2.0], [-2.5, PAD]]], dtype=f64, requires_grad=True)
    m = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]], dtype=f64)
    D = torch.tensor([[0.8, 0.2]], dtype=f64, requires_grad=True)
    return lp, ref, m, D


def test_ldl_grpo_length_normalised_hand_computed():
    lp, ref, m, D = _ldl_inputs()
    beta = 0.1
    loss, metrics = ldl_grpo_loss(lp, ref, m, D, beta, length_normalize=True)
    # s = [(−1 −2)/2, −3] = [−1.5, −3];  q_0 = e^−1.5 / (e^−1.5 + e^−3)
    q0 = math.exp(-1.5) / (math.exp(-1.5) + math.exp(-3.0))
    q1 = 1.0 - q0
    kl_target = 0.8 * math.log(0.8 / q0) + 0.2 * math.log(0.2 / q1)
    # k3 on the three real tokens: (logp, ref) = (−1, −1.5), (−2, −2), (−3, −2.5)
    kl_ref = (k3(-1.0, -1.5) + k3(-2.0, -2.0) + k3(-3.0, -2.5)) / 3
    assert metrics["kl_target"] == pytest.approx(kl_target, rel=1e-6)
    assert metrics["kl_ref"] == pytest.approx(kl_ref, rel=1e-6)
    assert loss.item() == pytest.approx(kl_target + beta * kl_ref, rel=1e-6)
    assert metrics["q_entropy"] == pytest.approx(-(q0 * math.log(q0) + q1 * math.log(q1)), rel=1e-6)
    assert metrics["target_entropy"] == pytest.approx(-(0.8 * math.log(0.8) + 0.2 * math.log(0.2)), rel=1e-6)
    assert metrics["tokens"] == 3.0


def test_ldl_grpo_nll_term_hand_computed():
    lp, ref, m, D = _ldl_inputs()
    base, _ = ldl_grpo_loss(lp, ref, m, D, 0.1, length_normalize=False)
    loss, metrics = ldl_grpo_loss(lp, ref, m, D, 0.1, length_normalize=False, nll_weight=0.5)
    # mean token NLL whatever q's form: [(1 + 2)/2, 3] = [1.5, 3]; Σ_k D_k NLL_k = 0.8·1.5 + 0.2·3 = 1.8
    assert metrics["nll"] == pytest.approx(1.8, rel=1e-9)
    assert loss.item() == pytest.approx(base.item() + 0.5 * 1.8, rel=1e-9)
    # the term's gradient on a candidate's tokens is −α·D_k / |y_k|
    lp.grad = None
    (loss - base).backward()
    expected = torch.tensor([[[-0.5 * 0.8 / 2, -0.5 * 0.8 / 2], [-0.5 * 0.2, 0.0]]], dtype=torch.float64)
    assert torch.allclose(lp.grad, expected)
    _, off = ldl_grpo_loss(lp, ref, m, D, 0.1)
    assert "nll" not in off


def test_ldl_grpo_sum_scores_hand_computed():
    lp, ref, m, D = _ldl_inputs()
    loss, metrics = ldl_grpo_loss(lp, ref, m, D, beta=0.0, length_normalize=False)
    # s = [−3, −3] -> q = [1/2, 1/2]
    expected = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_ldl_grpo_gradient_flows_through_the_policy_only():
    lp, ref, m, D = _ldl_inputs()
    loss, _ = ldl_grpo_loss(lp, ref, m, D, beta=0.0, length_normalize=True)
    loss.backward()
    assert ref.grad is None and D.grad is None
    # dKL/ds_k = q_k − D_k; s_0 is the mean of 2 tokens, s_1 of 1
    q0 = math.exp(-1.5) / (math.exp(-1.5) + math.exp(-3.0))
    expected = torch.tensor([[[(q0 - 0.8) / 2, (q0 - 0.8) / 2], [(1 - q0) - 0.2, 0.0]]], dtype=torch.float64)
    assert torch.allclose(lp.grad, expected, atol=1e-6)


def test_ldl_grpo_kl_gradient_pulls_towards_the_reference():
    lp, ref, m, D = _ldl_inputs()
    loss, _ = ldl_grpo_loss(lp, ref, m, torch.tensor([[0.5, 0.5]], dtype=torch.float64), beta=1.0,
                            length_normalize=False)
    # with sum scores q = [1/2, 1/2] = D, so only the KL term has a gradient:
    # d k3/d logp = 1 − exp(ref − logp), divided by the 3 real tokens
    loss.backward()
    g = [(1 - math.exp(-0.5)) / 3, 0.0, (1 - math.exp(0.5)) / 3]
    assert torch.allclose(lp.grad[0, :, 0], torch.tensor([g[0], g[2]], dtype=torch.float64), atol=1e-9)
    assert lp.grad[0, 0, 1].item() == pytest.approx(g[1], abs=1e-7)
    assert lp.grad[0, 1, 1].item() == 0.0


def test_ldl_grpo_is_zero_at_its_minimum():
    lp = torch.log(torch.tensor([[[0.2], [0.6], [0.2]]]))
    D = torch.tensor([[0.2, 0.6, 0.2]])
    loss, metrics = ldl_grpo_loss(lp, lp.clone(), torch.ones_like(lp), D, beta=0.5)
    assert abs(loss.item()) < 1e-6 and metrics["q_target_argmax_agree"] == 1.0


def test_ldl_grpo_invalid_candidates_leave_the_group():
    lp, ref, m, _ = _ldl_inputs()
    extra = torch.full((1, 1, 2), -0.01, dtype=lp.dtype)
    lp3 = torch.cat([lp.detach(), extra], dim=1)
    m3 = torch.cat([m, torch.ones_like(extra)], dim=1)
    ref3 = torch.cat([ref.detach(), torch.full_like(extra, PAD)], dim=1)
    valid = torch.tensor([[True, True, False]])
    loss3, _ = ldl_grpo_loss(lp3, ref3, m3, torch.tensor([[0.8, 0.2, 0.0]], dtype=lp.dtype), 0.1, valid=valid)
    loss2, _ = ldl_grpo_loss(lp.detach(), ref.detach(), m, torch.tensor([[0.8, 0.2]], dtype=lp.dtype), 0.1)
    assert loss3.item() == pytest.approx(loss2.item(), rel=1e-6)


def test_ldl_grpo_rare_wrong_answer_gradient_with_and_without_repeats():
    """One-token answers, 7 samples of the right "red" (p = 0.8) and 1 of the wrong "blue" (p = 0.1), D_x on red.
    Over the multiset q_blue = 0.1 / (7·0.8 + 0.1) = 0.01754 and ∂L/∂s_blue = q_blue − D_blue = 0.01754: a group
    the policy mostly gets right already looks like D_x. Over the distinct answers (ranking.distinct)
    q_blue = 0.1 / 0.9 = 0.1111, 6.3× the push away from the wrong answer."""
    logp = torch.tensor([[[math.log(0.8)]] * 7 + [[math.log(0.1)]]], dtype=torch.float64, requires_grad=True)
    mask = torch.ones_like(logp)
    multiset = torch.tensor([[1 / 7] * 7 + [0.0]], dtype=torch.float64)
    ldl_grpo_loss(logp, None, mask, multiset, 0.0)[0].backward()
    assert logp.grad[0, 7, 0].item() == pytest.approx(0.1 / 5.7, rel=1e-9)
    assert logp.grad[0, 0, 0].item() == pytest.approx(0.8 / 5.7 - 1 / 7, rel=1e-9)
    logp.grad = None
    valid = torch.tensor([[True] + [False] * 6 + [True]])
    distinct = torch.tensor([[1.0] + [0.0] * 7], dtype=torch.float64)
    ldl_grpo_loss(logp, None, mask, distinct, 0.0, valid=valid)[0].backward()
    assert logp.grad[0, 7, 0].item() == pytest.approx(0.1 / 0.9, rel=1e-9)
    assert logp.grad[0, 0, 0].item() == pytest.approx(0.8 / 0.9 - 1.0, rel=1e-9)
    assert torch.all(logp.grad[0, 1:7] == 0)                     # repeats leave the group


def test_ldl_grpo_reverse_form_pushes_a_rare_wrong_sample_with_full_weight():
    """The same samples as above (7× red at p 0.8, 1× blue at p 0.1), form="reverse", D_x = 0.142 on each red
    and 0.006 on blue. η = 0 (the cross-entropy): c_k = −log D_k, c_red = 1.95193, c_blue = 5.11600, mean c =
    (7·1.95193 + 5.11600)/8 = 2.34744; A_red = −0.39551, A_blue = +2.76856. The surrogate is Σ_k A_k s_k / K:
    ∂/∂s_blue = 2.76856 / 8 = 0.34607 (a push down; GRPO's standardised advantage for it is −2.65, 0.331 a
    sample), ∂/∂s_red = −0.04944 each (a push up); the forward form pushes blue by 0.018."""
    logp = torch.tensor([[[math.log(0.8)]] * 7 + [[math.log(0.1)]]], dtype=torch.float64, requires_grad=True)
    mask = torch.ones_like(logp)
    D = torch.tensor([[0.142] * 7 + [0.006]], dtype=torch.float64)
    loss, metrics = ldl_grpo_loss(logp, None, mask, D, 0.0, form="reverse")
    loss.backward()
    c_red, c_blue = -math.log(0.142), -math.log(0.006)
    mean_c = (7 * c_red + c_blue) / 8
    assert logp.grad[0, 7, 0].item() == pytest.approx((c_blue - mean_c) / 8, rel=1e-9)
    assert logp.grad[0, 7, 0].item() == pytest.approx(0.34607, abs=1e-5)
    assert logp.grad[0, 0, 0].item() == pytest.approx(-0.04944, abs=1e-5)
    assert metrics["reverse_adv_abs"] == pytest.approx((7 * abs(c_red - mean_c) + abs(c_blue - mean_c)) / 8, rel=1e-9)
    # kl_target still reports the forward KL(D ‖ q) over the multiset, as the forward form does
    q = torch.tensor([0.8] * 7 + [0.1], dtype=torch.float64) / 5.7
    assert metrics["kl_target"] == pytest.approx(float((D[0] * (D[0] / q).log()).sum()), rel=1e-9)
    # η = 1 (KL(π ‖ D)): c_k = log π(y_k) − log D_k, c_red = log(0.8/0.142) = 1.72874, c_blue = log(0.1/0.006) =
    # 2.81341: blue's rarity (log π = −2.30) offsets most of its low D, ∂/∂s_blue = 0.11864
    logp.grad = None
    ldl_grpo_loss(logp, None, mask, D, 0.0, form="reverse", entropy=1.0)[0].backward()
    c_red, c_blue = math.log(0.8 / 0.142), math.log(0.1 / 0.006)
    mean_c = (7 * c_red + c_blue) / 8
    assert logp.grad[0, 7, 0].item() == pytest.approx((c_blue - mean_c) / 8, rel=1e-9)
    assert logp.grad[0, 7, 0].item() == pytest.approx(0.11864, abs=1e-5)


def test_ldl_grpo_reverse_form_is_still_where_its_advantages_vanish():
    """η = 1 and π ∝ D on the group (log π − log D the same for every sample), or η = 0 and D uniform over
    the samples: every advantage and gradient is 0."""
    logp = torch.tensor([[[math.log(0.6)], [math.log(0.3)], [math.log(0.1)]]], dtype=torch.float64,
                        requires_grad=True)
    for D, eta in ((torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64), 1.0),
                   (torch.full((1, 3), 1 / 3, dtype=torch.float64), 0.0)):
        logp.grad = None
        loss, metrics = ldl_grpo_loss(logp, None, torch.ones_like(logp), D, 0.0, form="reverse", entropy=eta)
        loss.backward()
        assert torch.allclose(logp.grad, torch.zeros_like(logp), atol=1e-12)
        assert metrics["reverse_adv_abs"] == pytest.approx(0.0, abs=1e-12)


def test_ldl_grpo_reverse_form_uses_the_summed_log_prob_and_the_mean_score():
    """Two-token samples, η = 1: c_k reads log π(y_k) (the sum), the gradient flows through s_θ (the token mean
    under length_normalize), so each of y_k's two tokens gets A_k / (K · 2)."""
    logp = torch.tensor([[[-0.1, -0.2], [-1.0, -2.0]]], dtype=torch.float64, requires_grad=True)
    mask = torch.ones_like(logp)
    D = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    ldl_grpo_loss(logp, None, mask, D, 0.0, length_normalize=True, form="reverse", entropy=1.0)[0].backward()
    c = torch.tensor([-0.3, -3.0], dtype=torch.float64) - math.log(0.5)
    adv = c - c.mean()                                             # [+1.35, −1.35]
    expected = (adv / 2 / 2)[:, None].expand(2, 2)
    assert torch.allclose(logp.grad[0], expected, atol=1e-12)


def test_ldl_grpo_form_must_be_known():
    lp, _, m, D = _ldl_inputs()
    with pytest.raises(ValueError, match="form"):
        ldl_grpo_loss(lp, None, m, D, beta=0.0, form="sideways")


def test_ldl_grpo_needs_a_reference_for_a_kl_weight():
    lp, _, m, D = _ldl_inputs()
    with pytest.raises(ValueError, match="ref_token_logp"):
        ldl_grpo_loss(lp, None, m, D, beta=0.1)
    loss, metrics = ldl_grpo_loss(lp, None, m, D, beta=0.0)
    assert metrics["kl_ref"] == 0.0 and torch.isfinite(loss)


# --- dpo -----------------------------------------------------------------------------------------

def test_dpo_loss_hand_computed():
    c = torch.tensor([-1.0, -2.0], requires_grad=True)
    r = torch.tensor([-3.0, -1.0], requires_grad=True)
    rc = torch.tensor([-1.5, -2.0], requires_grad=True)
    rr = torch.tensor([-2.5, -1.5], requires_grad=True)
    beta = 0.1
    loss, metrics = dpo_loss(c, r, rc, rr, beta)
    # pair 0: β[(−1 + 1.5) − (−3 + 2.5)] = 0.1·1 = 0.1; pair 1: β[(0) − (−1 + 1.5)] = −0.05
    expected = (-lsig(0.1) - lsig(-0.05)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["reward_accuracy"] == 0.5           # chosen rewards [0.05, 0] vs rejected [−0.05, 0.05]
    assert metrics["reward_margin"] == pytest.approx((0.1 - 0.05) / 2, rel=1e-5)
    assert metrics["chosen_reward"] == pytest.approx(0.025, rel=1e-5)
    assert metrics["pairs"] == 2.0
    loss.backward()
    assert rc.grad is None and rr.grad is None
    # dL/dc_i = −β σ(−z_i) / P
    s = lambda z: 1 / (1 + math.exp(-z))
    assert torch.allclose(c.grad, torch.tensor([-0.1 * s(-0.1) / 2, -0.1 * s(0.05) / 2]), atol=1e-7)
    assert torch.allclose(r.grad, -c.grad)


def test_dpo_with_no_pairs_is_zero_and_still_backpropagates():
    lp = torch.zeros(2, 3, requires_grad=True)
    c = r = lp.reshape(-1)[:0]  # no pair: empty, still attached to the graph
    loss, metrics = dpo_loss(c, r, c.detach(), r.detach(), 0.1)
    assert loss.item() == 0.0 and metrics["pairs"] == 0.0
    loss.backward()
    assert torch.equal(lp.grad, torch.zeros(2, 3))


# --- grpo ----------------------------------------------------------------------------------------

def test_group_advantages_hand_computed():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    # mean 1/2, unbiased std sqrt(4·(1/4)/3) = sqrt(1/3)
    a = 0.5 / (math.sqrt(1.0 / 3.0) + 1e-4)
    expected = torch.tensor([[a, -a, -a, a], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(group_advantages(rewards), expected, atol=1e-6)
    assert torch.allclose(group_advantages(rewards, scale=False),
                          torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]))


def _grpo_inputs():
    # B = 1, K = 2, T = 2. Sequence 0 (A = +1): ratios e^0.4 ≈ 1.49 (clipped at 1.2) and e^0.1.
    # Sequence 1 (A = −1): ratios e^−0.7 ≈ 0.50 (clipped at 0.8) and a padding token.
    lp = torch.tensor([[[-1.0, -2.0], [-3.0, PAD]]], requires_grad=True)
    old = torch.tensor([[[-1.4, -2.1], [-2.3, PAD]]])
    ref = torch.tensor([[[-1.2, -2.0], [-2.5, PAD]]])
    m = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])
    adv = torch.tensor([[1.0, -1.0]])
    return lp, old, ref, m, adv


def _grpo_token_losses(beta: float) -> list[list[float]]:
    r00, r01, r10 = math.exp(0.4), math.exp(0.1), math.exp(-0.7)
    t00 = -min(r00 * 1.0, 1.2 * 1.0)                 # = −1.2 (clipped)
    t01 = -min(r01 * 1.0, min(r01, 1.2) * 1.0)       # = −e^0.1
    t10 = -min(r10 * -1.0, max(r10, 0.8) * -1.0)     # = +0.8 (clipped)
    return [[t00 + beta * k3(-1.0, -1.2), t01 + beta * k3(-2.0, -2.0)], [t10 + beta * k3(-3.0, -2.5)]]


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "grpo", "dr_grpo"])
def test_grpo_loss_hand_computed(loss_type):
    lp, old, ref, m, adv = _grpo_inputs()
    beta = 0.04
    loss, metrics = grpo_loss(lp, old, ref, m, adv, beta, loss_type=loss_type)
    (a, b), (c,) = _grpo_token_losses(beta)
    expected = {"dapo": (a + b + c) / 3, "bnpo": (a + b + c) / 3,
                "grpo": ((a + b) / 2 + c / 1) / 2, "dr_grpo": (a + b + c) / (2 * 2)}[loss_type]
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["clip_ratio_high"] == pytest.approx(1 / 3)
    assert metrics["clip_ratio_low"] == pytest.approx(1 / 3)
    assert metrics["kl_ref"] == pytest.approx((k3(-1.0, -1.2) + 0.0 + k3(-3.0, -2.5)) / 3, rel=1e-6)


def test_grpo_gradient_vanishes_on_clipped_tokens_only():
    lp, old, ref, m, adv = _grpo_inputs()
    loss, _ = grpo_loss(lp, old, None, m, adv, beta=0.0, loss_type="bnpo")
    loss.backward()
    # clipped tokens (0,0) and (1,0): no gradient; (0,1): d(−ρA)/dlogp = −ρ·A / 3 tokens; padding: 0
    expected = torch.tensor([[[0.0, -math.exp(0.1) / 3], [0.0, 0.0]]])
    assert torch.allclose(lp.grad, expected, atol=1e-6)


def test_grpo_on_policy_gradient_is_minus_advantage():
    lp, _, _, m, adv = _grpo_inputs()
    loss, metrics = grpo_loss(lp, None, None, m, adv, beta=0.0, loss_type="dapo")
    # ρ = 1 everywhere: loss = −Σ A / tokens = −(1 + 1 − 1)/3
    assert loss.item() == pytest.approx(-1.0 / 3)
    assert metrics["ratio_mean"] == pytest.approx(1.0)
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([[[-1 / 3, -1 / 3], [1 / 3, 0.0]]]))


def test_grpo_needs_a_reference_for_a_kl_weight():
    lp, old, _, m, adv = _grpo_inputs()
    with pytest.raises(ValueError, match="ref_token_logp"):
        grpo_loss(lp, old, None, m, adv, beta=0.1)


# --- ppo -----------------------------------------------------------------------------------------

def test_update_baseline_is_a_running_mean():
    assert update_baseline(None, torch.tensor([1.0, 3.0])) == pytest.approx(2.0)
    assert update_baseline(2.0, torch.tensor([4.0, 6.0]), momentum=0.75) == pytest.approx(0.75 * 2 + 0.25 * 5)


def test_ppo_clip_loss_hand_computed():
    # two prompts, one sample each; rewards [1, 0], baseline 0.4 -> A = [0.6, −0.4]
    lp = torch.tensor([[-1.0, -2.0], [-0.5, PAD]], requires_grad=True)
    old = torch.tensor([[-1.5, -2.0], [-0.2, PAD]])
    m = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, metrics = ppo_clip_loss(lp, old, m, torch.tensor([1.0, 0.0]), baseline=0.4, eps=0.2)
    t0 = -min(math.exp(0.5) * 0.6, 1.2 * 0.6)        # clipped: −0.72
    t1 = -(1.0 * 0.6)
    t2 = -min(math.exp(-0.3) * -0.4, 0.8 * -0.4)     # ρ = 0.741 < 0.8 -> clipped: 0.32
    assert loss.item() == pytest.approx((t0 + t1 + t2) / 3, rel=1e-6)
    assert metrics["advantage_mean"] == pytest.approx(0.1)
    assert metrics["reward_mean"] == pytest.approx(0.5)


# --- rlsd ----------------------------------------------------------------------------------------

def test_rlsd_lambda_decays_linearly_to_zero():
    assert rlsd_lambda(0, 0.8, 10) == pytest.approx(0.8)
    assert rlsd_lambda(5, 0.8, 10) == pytest.approx(0.4)
    assert rlsd_lambda(10, 0.8, 10) == 0.0
    assert rlsd_lambda(25, 0.8, 10) == 0.0
    assert rlsd_lambda(25, 0.8, 0) == pytest.approx(0.8)


def _rlsd_inputs():
    lp = torch.tensor([[[-1.0, -2.0], [-1.0, -0.5]]], requires_grad=True)
    m = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])
    adv = torch.tensor([[2.0, -1.0]])
    # Δ = privileged − plain: [[0.1, −0.5], [0.5, PAD]]
    priv = torch.tensor([[[-0.9, -2.5], [-0.5, PAD]]], requires_grad=True)
    return lp, m, adv, priv


def _rlsd_hand_advantages(lam: float, eps_w: float) -> list[float]:
    def w(sign, delta):
        return min(max(math.exp(sign * delta), 1 - eps_w), 1 + eps_w)
    w00 = w(+1, 0.1)        # e^0.1 = 1.105 (inside the clip)
    w01 = w(+1, -0.5)       # e^−0.5 = 0.607 -> 0.8
    w10 = w(-1, 0.5)        # e^−0.5 -> 0.8
    return [2.0 * ((1 - lam) + lam * w00), 2.0 * ((1 - lam) + lam * w01), -1.0 * ((1 - lam) + lam * w10)]


def test_rlsd_token_advantages_hand_computed():
    lp, m, adv, priv = _rlsd_inputs()
    a_t, w = rlsd_token_advantages(adv, priv, lp.detach(), m, lam=0.5, eps_w=0.2)
    h = _rlsd_hand_advantages(0.5, 0.2)
    assert torch.allclose(a_t[0, 0], torch.tensor(h[:2]), atol=1e-6)
    assert a_t[0, 1, 0].item() == pytest.approx(h[2], rel=1e-6)
    assert w[0, 1, 1].item() == 1.0  # padding: Δ = 0


def test_rlsd_loss_on_policy_hand_computed_and_gradient():
    lp, m, adv, priv = _rlsd_inputs()
    loss, metrics = rlsd_loss(lp, None, None, m, adv, priv, lam=0.5, eps_w=0.2)
    h = _rlsd_hand_advantages(0.5, 0.2)
    # on-policy ρ = 1: loss = −Σ_t Â_t / 3 real tokens (dapo)
    assert loss.item() == pytest.approx(-sum(h) / 3, rel=1e-6)
    assert metrics["rlsd_lambda"] == 0.5
    loss.backward()
    assert priv.grad is None
    expected = torch.tensor([[[-h[0] / 3, -h[1] / 3], [-h[2] / 3, 0.0]]])
    assert torch.allclose(lp.grad, expected, atol=1e-6)


def test_rlsd_with_lambda_zero_is_grpo():
    lp, m, adv, priv = _rlsd_inputs()
    old = lp.detach() + 0.05
    a, _ = rlsd_loss(lp, old, None, m, adv, priv, lam=0.0)
    b, _ = grpo_loss(lp, old, None, m, adv, beta=0.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-7)


# --- tvkd ----------------------------------------------------------------------------------------

def test_rest_bucket_and_values_hand_computed():
    top = torch.log(torch.tensor([[0.5, 0.3]]))
    rest = rest_logp(top)
    assert rest.item() == pytest.approx(math.log(0.2), rel=1e-6)
    # V = α β_T log Σ p^{1/β_T} = 2 · 0.5 · log(0.5² + 0.3² + 0.2²)
    v = tvkd_values(top, rest, alpha=2.0, beta_T=0.5)
    assert v.item() == pytest.approx(2.0 * 0.5 * math.log(0.25 + 0.09 + 0.04), rel=1e-6)
    # β_T = 1: the probabilities sum to one, V = 0
    assert abs(tvkd_values(top, rest, alpha=3.0, beta_T=1.0).item()) < 1e-6
    # everything in the top-k: the bucket is empty (−inf) and drops out
    # (up to rounding: e^rest is the float error of 1 − 0.25 − 0.75, or exactly 0 when it rounds above 1)
    full = torch.log(torch.tensor([[0.25, 0.75]]))
    assert math.exp(rest_logp(full).item()) < 1e-6
    assert rest_logp(torch.tensor([[0.0, -30.0]])).item() == float("-inf")
    assert tvkd_values(full, rest_logp(full), 1.0, 0.5).item() == pytest.approx(
        0.5 * math.log(0.0625 + 0.5625), rel=1e-6)


def test_topk_with_rest_from_logits():
    logits = torch.log(torch.tensor([[[0.1, 0.6, 0.3]]]))
    top, rest = topk_with_rest(logits, k=2)
    assert torch.allclose(top, torch.log(torch.tensor([[[0.6, 0.3]]])), atol=1e-6)
    assert rest.item() == pytest.approx(math.log(0.1), rel=1e-5)


def test_tvkd_dpo_loss_hand_computed():
    c = torch.tensor([-1.0], requires_grad=True)
    r = torch.tensor([-3.0], requires_grad=True)
    rc, rr = torch.tensor([-1.5]), torch.tensor([-2.5])
    vc = torch.tensor([[0.2, -0.1, 9.0]])      # last position is padding
    vr = torch.tensor([[0.5, 0.4, 0.3]])
    mc = torch.tensor([[1.0, 1.0, 0.0]])
    mr = torch.tensor([[1.0, 1.0, 1.0]])
    beta, gamma_s = 0.1, 0.9
    loss, metrics = tvkd_dpo_loss(c, r, rc, rr, vc, vr, mc, mr, beta, gamma_s)
    Rw = 0.1 * (-1.0 + 1.5) - (1 - 0.9) * (0.2 - 0.1)   # 0.05 − 0.01 = 0.04
    Rl = 0.1 * (-3.0 + 2.5) - (1 - 0.9) * (0.5 + 0.4 + 0.3)  # −0.05 − 0.12 = −0.17
    assert loss.item() == pytest.approx(-lsig(Rw - Rl), rel=1e-6)
    assert metrics["shaping_chosen"] == pytest.approx(0.1, rel=1e-6)
    assert metrics["shaping_rejected"] == pytest.approx(1.2, rel=1e-6)
    loss.backward()
    assert c.grad.item() == pytest.approx(-0.1 * (1 - 1 / (1 + math.exp(-(Rw - Rl)))), rel=1e-5)


def test_tvkd_with_gamma_one_is_plain_dpo():
    c, r = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-2.5, -1.5])
    v = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    m = torch.ones(2, 4)
    a, _ = tvkd_dpo_loss(c, r, rc, rr, v, v.flip(0), m, m, beta=0.1, gamma_s=1.0)
    b, _ = dpo_loss(c, r, rc, rr, beta=0.1)
    assert a.item() == pytest.approx(b.item(), rel=1e-7)
