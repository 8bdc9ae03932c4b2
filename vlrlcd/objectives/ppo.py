"""`self_ppo`: PPO-clip (arXiv 1707.06347) on one sample per prompt against a running-mean baseline."""

from __future__ import annotations

import torch
from torch import Tensor

from vlrlcd.objectives.grpo import grpo_loss


def update_baseline(baseline: float | None, rewards: Tensor, momentum: float = 0.9) -> float:
    """b ← m·b + (1 − m)·mean(R); the first call (baseline None) starts at mean(R)."""
    mean = float(rewards.detach().float().mean())
    return mean if baseline is None else momentum * baseline + (1.0 - momentum) * mean


def ppo_clip_loss(token_logp: Tensor, old_token_logp: Tensor | None, mask: Tensor, rewards: Tensor,
                  baseline: float, eps: float = 0.2, ref_token_logp: Tensor | None = None,
                  beta: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """L = (1/N_tok) Σ_t −min(ρ_t A, clip(ρ_t, 1−ε, 1+ε) A) + β·KL_t, A = R − b for each sequence.

    token_logp / old / mask: [B, T] (or [B, 1, T]); rewards: [B] (or [B, 1]), the student's own score
    without the anchor; `baseline` b is the running mean from `update_baseline` BEFORE this batch
    (so A is not centred on the batch itself). Tokens are averaged over all real tokens (bnpo).
    """
    advantages = rewards.detach().reshape(token_logp.shape[:-1]) - baseline
    loss, metrics = grpo_loss(token_logp, old_token_logp, ref_token_logp, mask, advantages, beta,
                              eps_low=eps, eps_high=eps, loss_type="bnpo")
    with torch.no_grad():
        metrics["reward_mean"] = float(rewards.float().mean())
        metrics["advantage_mean"] = float(advantages.float().mean())
        metrics["baseline"] = float(baseline)
    return loss, metrics
