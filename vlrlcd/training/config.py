"""The `train:` section."""

from __future__ import annotations

from dataclasses import dataclass

from vlrlcd.errors import VlrlcdError

OBJECTIVES = ("sft", "sft2", "ldl_grpo", "single_pair_dpo", "anchor_rank_dpo", "anchor_grpo",
              "self_ppo", "judge_grpo", "tvkd_dpo", "rlsd")


@dataclass
class TrainConfig:
    objective: str = "ldl_grpo"
    sft_epochs: float = 3.0            # stage I passes over the anchors
    sft_lr: float = 1e-3
    sft_batch_size: int = 16
    rl_steps: int = 40                 # stage II optimizer steps
    lr: float = 2e-4
    batch_size: int = 8                # prompts per RL step
    k: int = 8                         # candidates per prompt
    temperature: float = 1.0
    beta: float = 0.05                 # weight of KL(π_θ ‖ π_sft)
    length_normalize: bool = True      # s_θ = mean (True) or sum (False) token log-prob
    dpo_beta: float = 0.1
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    save_every: int = 0                # 0: only at the end
    keep_checkpoints: int = 2
    max_bad_steps: int = 5
    log_every: int = 1

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise VlrlcdError(f"train.objective '{self.objective}' is not one of {', '.join(OBJECTIVES)}")
        if self.k < 2:
            raise VlrlcdError(f"train.k must be >= 2 (a group to rank), got {self.k}")
        if self.temperature <= 0:
            raise VlrlcdError(f"train.temperature must be > 0, got {self.temperature}")
