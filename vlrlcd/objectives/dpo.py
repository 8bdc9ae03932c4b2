"""Sigmoid DPO (arXiv 2305.18290) on sequence log-probs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def preference_loss(chosen_reward: Tensor, rejected_reward: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Mean −log σ(R_w − R_l) over pairs; 0 (still attached to the graph) when there is no pair."""
    if chosen_reward.numel() == 0:
        loss = chosen_reward.sum() * 0.0 + rejected_reward.sum() * 0.0
        return loss, {"loss": 0.0, "reward_accuracy": 0.0, "reward_margin": 0.0,
                      "chosen_reward": 0.0, "rejected_reward": 0.0, "pairs": 0.0}
    diff = chosen_reward - rejected_reward
    loss = -F.logsigmoid(diff).mean()
    with torch.no_grad():
        metrics = {
            "loss": float(loss.detach()),
            "reward_accuracy": float((chosen_reward > rejected_reward).float().mean()),
            "reward_margin": float(diff.mean()),
            "chosen_reward": float(chosen_reward.mean()),
            "rejected_reward": float(rejected_reward.mean()),
            "pairs": float(chosen_reward.numel()),
        }
    return loss, metrics


def dpo_loss(chosen_logp: Tensor, rejected_logp: Tensor, ref_chosen_logp: Tensor, ref_rejected_logp: Tensor,
             beta: float) -> tuple[Tensor, dict[str, float]]:
    """L = mean −log σ(β[(log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l))]).

    All inputs are [P] sequence log-probs summed over tokens; the reference is a constant. Metrics follow
    TRL's names: the implicit rewards β·(log π_θ − log π_ref), their accuracy (chosen > rejected) and margin.
    """
    chosen_reward = beta * (chosen_logp - ref_chosen_logp.detach())
    rejected_reward = beta * (rejected_logp - ref_rejected_logp.detach())
    return preference_loss(chosen_reward, rejected_reward)
