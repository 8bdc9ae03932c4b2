"""Per-objective losses for one rolled-out group: each maps (student, group, cfg) to (loss, metrics).

The RL loop (rl.py) samples and ranks; these turn a ranked group into a loss through the student's
log-probs and the pure objective functions in vlrlcd/objectives/.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from vlrlcd.adapters.base import StudentAdapter
from vlrlcd.objectives.ldl_grpo import ldl_grpo_loss
from vlrlcd.ranking.config import RankingConfig
from vlrlcd.training.config import TrainConfig


@dataclass
class StepContext:
    """What a group loss may need beyond the group: the step (schedules), the ranking settings, a teacher
    judge for judge_grpo, and `state` that persists across steps (baselines) and is checkpointed."""

    step: int
    total_steps: int
    ranking: RankingConfig
    judge: Callable | None = None
    state: dict[str, Any] = field(default_factory=dict)


def ldl_grpo_group_loss(student: StudentAdapter, group, cfg: TrainConfig, ctx: StepContext) -> tuple[torch.Tensor, dict]:
    """KL(D_x ‖ q_θ) + β·KL(π_θ ‖ π_sft) for one group; the reference is an adapter switch."""
    policy = student.token_logprobs(group.prefix, group.candidates)
    ref = None
    if cfg.beta != 0:
        with torch.no_grad(), student.reference():
            ref = student.token_logprobs(group.prefix, group.candidates).logp[None]
    return ldl_grpo_loss(policy.logp[None], ref, policy.mask[None], group.target[None], cfg.beta,
                         cfg.length_normalize)


GROUP_LOSSES = {"ldl_grpo": ldl_grpo_group_loss}
