"""RLSD, RLVR with self-distillation (arXiv 2604.03128): the reward sets each update's direction, the
student's own privileged-vs-plain log-prob gap sets its per-token magnitude."""

from __future__ import annotations

import torch
from torch import Tensor

from vlrlcd.objectives.grpo import grpo_loss


def rlsd_lambda(step: int, lambda0: float, decay_steps: int) -> float:
    """λ(step) = λ₀ · max(0, 1 − step / decay_steps): linear decay to 0; decay_steps ≤ 0 keeps λ₀."""
    if decay_steps <= 0:
        return float(lambda0)
    return float(lambda0) * max(0.0, 1.0 - step / decay_steps)


def rlsd_token_advantages(advantages: Tensor, privileged_token_logp: Tensor, plain_token_logp: Tensor,
                          mask: Tensor, lam: float, eps_w: float) -> tuple[Tensor, Tensor]:
    """Â_t = A·((1 − λ) + λ·w_t), w_t = clip(exp(sign(A)·Δ_t), 1 − ε_w, 1 + ε_w),
    Δ_t = sg(log p(y_t | x, anchor in context) − log p(y_t | x)). Returns (Â [B, K, T], w [B, K, T]).

    advantages: [B, K] sequence advantages (e.g. group_advantages of the rewards); w = 1 on padding.
    """
    delta = (privileged_token_logp - plain_token_logp).detach()
    delta = torch.where(mask.bool(), delta, torch.zeros_like(delta))
    a = advantages.detach().unsqueeze(-1)
    w = torch.clamp(torch.exp(torch.sign(a) * delta), 1.0 - eps_w, 1.0 + eps_w)
    return a * ((1.0 - lam) + lam * w), w


def rlsd_loss(token_logp: Tensor, old_token_logp: Tensor | None, ref_token_logp: Tensor | None, mask: Tensor,
              advantages: Tensor, privileged_token_logp: Tensor, plain_token_logp: Tensor | None = None,
              lam: float = 1.0, eps_w: float = 0.2, beta: float = 0.0, eps_low: float = 0.2,
              eps_high: float = 0.2, loss_type: str = "dapo") -> tuple[Tensor, dict[str, float]]:
    """GRPO's clipped surrogate (grpo.grpo_loss) with the token-level advantages Â_t of
    rlsd_token_advantages. All token tensors [B, K, T]; advantages [B, K].

    plain_token_logp defaults to the sampling policy's log-probs (old_token_logp, else token_logp
    detached): log p(y_t | x) without the anchor. The privileged log-probs are the same student's with
    the anchor in its context, computed without gradient.
    """
    if plain_token_logp is None:
        plain_token_logp = old_token_logp if old_token_logp is not None else token_logp.detach()
    adv_t, w = rlsd_token_advantages(advantages, privileged_token_logp, plain_token_logp, mask, lam, eps_w)
    loss, metrics = grpo_loss(token_logp, old_token_logp, ref_token_logp, mask, adv_t, beta,
                              eps_low=eps_low, eps_high=eps_high, loss_type=loss_type)
    with torch.no_grad():
        m = mask.to(w.dtype)
        n = m.sum().clamp(min=1.0)
        delta = (privileged_token_logp - plain_token_logp) * m
        metrics["rlsd_weight_mean"] = float((w * m).sum() / n)
        metrics["rlsd_delta_mean"] = float(torch.nan_to_num(delta).sum() / n)
        metrics["rlsd_lambda"] = float(lam)
    return loss, metrics
