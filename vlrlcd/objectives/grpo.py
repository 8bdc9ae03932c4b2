"""GRPO (arXiv 2402.03300) as TRL's GRPOTrainer computes it: group advantages, clipped surrogate, k3 KL.

Also the loss behind `anchor_grpo` (reward = the frozen SFT model's anchor-conditioned score) and
`judge_grpo` (reward = the teacher's judgement): only the rewards differ.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlrlcd.objectives.common import (
    aggregate_tokens,
    clipped_surrogate,
    flat_tokens,
    masked_mean,
    per_token_kl,
)


def group_advantages(rewards: Tensor, scale: bool = True) -> Tensor:
    """A_k = (R_k − mean_j R_j) / (std_j R_j + 1e-4) within each group, [B, K] -> [B, K].

    std is the unbiased (Bessel) standard deviation and 1e-4 the guard TRL uses; scale=False keeps
    only the mean-centring (Dr. GRPO, arXiv 2503.20783). A group of one gets advantage 0.
    """
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    if not scale:
        return centred
    if rewards.shape[-1] < 2:
        return torch.zeros_like(rewards)
    return centred / (rewards.std(dim=-1, keepdim=True) + 1e-4)


def grpo_loss(token_logp: Tensor, old_token_logp: Tensor | None, ref_token_logp: Tensor | None, mask: Tensor,
              advantages: Tensor, beta: float, eps_low: float = 0.2, eps_high: float = 0.2,
              loss_type: str = "dapo", max_completion_length: int | None = None,
              num_items: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """Per token: −min(ρ_t A, clip(ρ_t, 1−ε_low, 1+ε_high) A) + β·KL_t, ρ_t = π_θ(y_t)/π_old(y_t).

    token_logp / old / ref / mask: [B, K, T] (any leading dims); advantages: [B, K] (one per sequence) or
    [B, K, T] (per token, as RLSD builds). old_token_logp=None means on-policy (ρ = 1 in value, gradient
    A·∇log π), as TRL does with one update per generation. KL_t is the k3 estimator
    exp(ref − logp) − (ref − logp) − 1. Tokens are aggregated by `loss_type` (see
    common.aggregate_tokens); TRL's default is "dapo". Equals TRL 1.16's GRPOTrainer._compute_loss
    (token-level importance sampling, no entropy bonus, no vLLM correction, one process).
    """
    lp = flat_tokens(token_logp)
    m = flat_tokens(mask).to(lp.dtype)
    old = lp.detach() if old_token_logp is None else flat_tokens(old_token_logp).detach()
    adv = advantages.detach().to(lp.dtype)
    adv = adv.reshape(-1, 1) if adv.dim() == token_logp.dim() - 1 else flat_tokens(adv)
    log_ratio = lp - old
    per_token = clipped_surrogate(log_ratio, adv, eps_low, eps_high)
    kl = None
    if ref_token_logp is not None:
        kl = per_token_kl(lp, flat_tokens(ref_token_logp))
        if beta != 0.0:
            per_token = per_token + beta * kl
    elif beta != 0.0:
        raise ValueError("grpo_loss needs ref_token_logp when beta != 0")
    loss = aggregate_tokens(per_token, m, loss_type, max_completion_length, num_items)

    with torch.no_grad():
        ratio = torch.exp(log_ratio)
        adv_b = adv.expand_as(ratio)
        low = ((ratio < 1 - eps_low) & (adv_b < 0)).to(lp.dtype)
        high = ((ratio > 1 + eps_high) & (adv_b > 0)).to(lp.dtype)
        metrics = {
            "loss": float(loss.detach()),
            "kl_ref": float(masked_mean(kl, m)) if kl is not None else 0.0,
            "clip_ratio_low": float(masked_mean(low, m)),
            "clip_ratio_high": float(masked_mean(high, m)),
            "clip_ratio": float(masked_mean(low + high, m)),
            "ratio_mean": float(masked_mean(ratio, m)),
            "advantage_abs_mean": float(masked_mean(adv_b.abs(), m)),
            "tokens": float(m.sum()),
        }
    return loss, metrics
