"""Helpers the objectives share: masked reductions, sequence scores, the per-token KL estimator,
the clipped policy-gradient surrogate and its token aggregation.

Conventions: token tensors are [..., T] (usually [B, K, T]), right-padded; `mask` is 1 (or True) on real
response tokens, float or bool.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOSS_TYPES = ("dapo", "bnpo", "grpo", "dr_grpo")


def masked_sum(x: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Σ x over `dim` where mask is set."""
    return (x * mask.to(x.dtype)).sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x where mask is set, over `dim` (None: over everything); 0 where nothing is set."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1.0)
    return (x * m).sum(dim=dim) / m.sum(dim=dim).clamp(min=1.0)


def sequence_scores(token_logp: Tensor, mask: Tensor, length_normalize: bool) -> Tensor:
    """s(y) = mean (length_normalize) or sum of the token log-probs of each sequence, [..., T] -> [...]."""
    if length_normalize:
        return masked_mean(token_logp, mask, dim=-1)
    return masked_sum(token_logp, mask, dim=-1)


def per_token_kl(token_logp: Tensor, ref_token_logp: Tensor) -> Tensor:
    """k3 estimator of KL(π_θ ‖ π_ref) per sampled token: exp(ref − logp) − (ref − logp) − 1 ≥ 0.

    Unbiased for tokens sampled from π_θ, never negative (Schulman, "Approximating KL divergence", 2020;
    the form TRL's GRPOTrainer uses). The reference is a constant: no gradient flows into it.
    """
    d = ref_token_logp.detach() - token_logp
    return torch.exp(d) - d - 1.0


def clipped_surrogate(log_ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float) -> Tensor:
    """Per-token PPO loss −min(ρ A, clip(ρ, 1−ε_low, 1+ε_high) A), ρ = exp(log_ratio) (arXiv 1707.06347)."""
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    return -torch.min(ratio * advantages, clipped * advantages)


def aggregate_tokens(per_token_loss: Tensor, mask: Tensor, loss_type: str,
                     max_completion_length: int | None = None, num_items: float | None = None) -> Tensor:
    """Reduce a per-token loss [N, T] to a scalar the way TRL's GRPOTrainer names it.

    - dapo: Σ over all real tokens / `num_items` (default: the real tokens here; pass the count over the
      whole accumulated batch when accumulating gradients) (arXiv 2503.14476);
    - bnpo: Σ over all real tokens / real tokens here;
    - grpo: mean over sequences of each sequence's token mean (arXiv 2402.03300);
    - dr_grpo: Σ over all real tokens / (N · max_completion_length, default T) (arXiv 2503.20783).
    """
    m = mask.to(per_token_loss.dtype)
    total = (per_token_loss * m).sum()
    if loss_type == "dapo":
        denom = m.sum() if num_items is None else torch.as_tensor(float(num_items))
        return total / denom.clamp(min=1.0)
    if loss_type == "bnpo":
        return total / m.sum().clamp(min=1.0)
    if loss_type == "grpo":
        return ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dr_grpo":
        length = per_token_loss.shape[-1] if max_completion_length is None else max_completion_length
        return total / (per_token_loss.shape[0] * length)
    raise ValueError(f"unknown loss_type '{loss_type}'; expected one of {', '.join(LOSS_TYPES)}")


def flat_tokens(x: Tensor) -> Tensor:
    """[..., T] -> [N, T]."""
    return x.reshape(-1, x.shape[-1])
