"""Per-objective losses for one rolled-out group: each maps (student, group, cfg) to (loss, metrics).

The RL loop (rl.py) samples and ranks; these turn a ranked group into a loss through the student's
log-probs and the pure objective functions in vlrlcd/objectives/.
"""

from __future__ import annotations

import torch

from vlrlcd.adapters.base import StudentAdapter
from vlrlcd.objectives.ldl_grpo import ldl_grpo_loss
from vlrlcd.training.config import TrainConfig


def ldl_grpo_group_loss(student: StudentAdapter, group, cfg: TrainConfig) -> tuple[torch.Tensor, dict]:
    """KL(D_x ‖ q_θ) + β·KL(π_θ ‖ π_sft) for one group; the reference is an adapter switch."""
    policy = student.token_logprobs(group.prefix, group.candidates)
    ref = None
    if cfg.beta != 0:
        with torch.no_grad(), student.reference():
            ref = student.token_logprobs(group.prefix, group.candidates).logp[None]
    return ldl_grpo_loss(policy.logp[None], ref, policy.mask[None], group.target[None], cfg.beta,
                         cfg.length_normalize)


GROUP_LOSSES = {"ldl_grpo": ldl_grpo_group_loss}
