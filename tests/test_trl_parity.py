"""Parity with TRL (test-only dependency) as the reference implementation.

TRL computes its losses inside trainer methods (DPOTrainer._compute_loss, GRPOTrainer._compute_loss) that
run a model forward first. Rather than building trainers, each method is called unbound with a
SimpleNamespace `self` holding exactly the attributes it reads, and a stand-in model / log-prob function
that returns our fixed log-probs; TRL's own code then does all the loss arithmetic.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

from vlrlcd.objectives.dpo import dpo_loss  # noqa: E402
from vlrlcd.objectives.grpo import group_advantages, grpo_loss  # noqa: E402

TOL = 1e-6


class _Accelerator:
    device = torch.device("cpu")
    num_processes = 1

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def reduce(x, reduction="sum"):
        return x


def _metrics():
    return defaultdict(lambda: defaultdict(list))


# --- DPO -----------------------------------------------------------------------------------------

class _FakeCausalLM:
    """Returns fixed per-token log-probs in the shape TRL's fused LM head gives (one per shifted label)."""

    training = True

    def __init__(self, log_probs: torch.Tensor):
        self.log_probs = log_probs

    def __call__(self, **kwargs):
        lp = self.log_probs
        return SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp), mean_logits=torch.zeros_like(lp),
                               is_top1=torch.zeros_like(lp, dtype=torch.bool))


def _trl_dpo(chosen_tok, rejected_tok, chosen_mask, rejected_mask, ref_c, ref_r, beta):
    """TRL's sigmoid DPO loss and logged metrics for per-token log-probs [P, T] of chosen / rejected."""
    P, T = chosen_tok.shape
    prompt_len = 3
    # completion_mask over prompt + completion; log_probs[:, i] scores token i + 1 and is 0 off the completion
    comp = torch.cat([chosen_mask, rejected_mask]).long()
    completion_mask = torch.cat([torch.zeros(2 * P, prompt_len, dtype=torch.long), comp], dim=1)
    tok = torch.cat([chosen_tok, rejected_tok]) * comp
    log_probs = torch.cat([torch.zeros(2 * P, prompt_len - 1, dtype=tok.dtype), tok], dim=1)
    model = _FakeCausalLM(log_probs)
    self = SimpleNamespace(
        model=model, accelerator=_Accelerator(), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0], beta=beta,
        use_weighting=False, _metrics=_metrics(), _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(),
    )
    inputs = {
        "input_ids": torch.ones(2 * P, prompt_len + T, dtype=torch.long),
        "attention_mask": torch.ones(2 * P, prompt_len + T, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_c,
        "ref_rejected_logps": ref_r,
    }
    loss = trl_dpo.DPOTrainer._compute_loss(self, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in self._metrics["train"].items()}


def test_dpo_loss_matches_trl_sigmoid_dpo():
    g = torch.Generator().manual_seed(0)
    P, T = 5, 6
    chosen_tok = (-3 * torch.rand(P, T, generator=g)).requires_grad_()
    rejected_tok = (-3 * torch.rand(P, T, generator=g)).requires_grad_()
    chosen_mask = (torch.arange(T) < torch.randint(1, T + 1, (P, 1), generator=g)).float()
    rejected_mask = (torch.arange(T) < torch.randint(1, T + 1, (P, 1), generator=g)).float()
    ref_c = -3 * T * torch.rand(P, generator=g) / 2
    ref_r = -3 * T * torch.rand(P, generator=g) / 2
    beta = 0.3

    trl_loss, trl_metrics = _trl_dpo(chosen_tok, rejected_tok, chosen_mask, rejected_mask, ref_c, ref_r, beta)
    trl_grads = torch.autograd.grad(trl_loss, [chosen_tok, rejected_tok])

    ours, metrics = dpo_loss((chosen_tok * chosen_mask).sum(-1), (rejected_tok * rejected_mask).sum(-1),
                             ref_c, ref_r, beta)
    our_grads = torch.autograd.grad(ours, [chosen_tok, rejected_tok])

    assert abs(ours.item() - trl_loss.item()) < TOL
    for a, b in zip(our_grads, trl_grads):
        assert torch.allclose(a, b, atol=TOL)
    assert metrics["reward_accuracy"] == pytest.approx(trl_metrics["rewards/accuracies"], abs=TOL)
    assert metrics["reward_margin"] == pytest.approx(trl_metrics["rewards/margins"], abs=TOL)
    assert metrics["chosen_reward"] == pytest.approx(trl_metrics["rewards/chosen"], abs=TOL)
    assert 0.0 < metrics["reward_accuracy"] < 1.0  # the fixture has pairs on both sides


# --- GRPO ----------------------------------------------------------------------------------------

def _trl_grpo(token_logp, old, ref, mask, advantages, beta, loss_type, eps_low, eps_high):
    """TRL's GRPOTrainer._compute_loss on flat [N, T] log-probs; N = B·K in group order."""
    N, T = token_logp.shape
    self = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (token_logp, torch.zeros_like(token_logp), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=eps_low,
        epsilon_high=eps_high, use_vllm=False, vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, accelerator=_Accelerator(),
        _entropy_bonus_enabled=False, _metrics=_metrics(), max_completion_length=T,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
    )
    inputs = {
        "prompt_ids": torch.ones(N, 2, dtype=torch.long), "prompt_mask": torch.ones(N, 2, dtype=torch.long),
        "completion_ids": torch.ones(N, T, dtype=torch.long), "completion_mask": mask.long(),
        "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    loss = trl_grpo.GRPOTrainer._compute_loss(self, None, inputs)
    return loss, {k: v[-1] for k, v in self._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta,eps_high", [(0.0, 0.2), (0.04, 0.28)])
def test_grpo_loss_matches_trl(loss_type, beta, eps_high):
    g = torch.Generator().manual_seed(1)
    B, K, T = 2, 4, 5
    lp = (-2 * torch.rand(B, K, T, generator=g)).requires_grad_()
    old = lp.detach() + 0.3 * torch.randn(B, K, T, generator=g)      # some ratios leave [0.8, 1.2]
    ref = lp.detach() + 0.2 * torch.randn(B, K, T, generator=g)
    mask = (torch.arange(T) < torch.randint(1, T + 1, (B, K, 1), generator=g)).float()
    adv = group_advantages(torch.randn(B, K, generator=g))

    trl_loss, trl_metrics = _trl_grpo(lp.reshape(B * K, T), old.reshape(B * K, T), ref.reshape(B * K, T),
                                      mask.reshape(B * K, T), adv.reshape(-1), beta, loss_type, 0.2, eps_high)
    (trl_grad,) = torch.autograd.grad(trl_loss, lp)

    ours, metrics = grpo_loss(lp, old, ref, mask, adv, beta, eps_low=0.2, eps_high=eps_high,
                              loss_type=loss_type)
    (our_grad,) = torch.autograd.grad(ours, lp)

    assert abs(ours.item() - trl_loss.item()) < TOL
    assert torch.allclose(our_grad, trl_grad, atol=TOL)
    assert metrics["clip_ratio"] == pytest.approx(trl_metrics["clip_ratio/region_mean"], abs=TOL)
    assert metrics["clip_ratio"] > 0  # the fixture does exercise the clip
    if beta:
        assert metrics["kl_ref"] == pytest.approx(trl_metrics["kl"], abs=TOL)


def test_grpo_on_policy_matches_trl_without_old_logps():
    g = torch.Generator().manual_seed(2)
    lp = (-2 * torch.rand(3, 4, generator=g)).requires_grad_()
    mask = torch.ones(3, 4)
    adv = torch.tensor([1.0, -0.5, 0.25])
    trl_loss, _ = _trl_grpo(lp, None, None, mask, adv, 0.0, "dapo", 0.2, 0.2)
    ours, _ = grpo_loss(lp, None, None, mask, adv, 0.0)
    assert abs(ours.item() - trl_loss.item()) < TOL
    assert torch.allclose(torch.autograd.grad(ours, lp)[0], torch.autograd.grad(trl_loss, lp)[0], atol=TOL)


def test_group_advantages_match_trls_formula():
    # TRL (sum_then_normalize, scale_rewards="group"): (R − mean) / (nanstd + 1e-4), nanstd with Bessel
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(3, 6, generator=g)
    std = trl_grpo.nanstd(rewards, dim=1).unsqueeze(1)
    expected = (rewards - rewards.mean(1, keepdim=True)) / (std + 1e-4)
    assert torch.allclose(group_advantages(rewards), expected, atol=TOL)
