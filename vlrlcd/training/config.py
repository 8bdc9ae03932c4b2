"""The `train:` section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlrlcd.errors import VlrlcdError
from vlrlcd.ranges import check_ranges

OBJECTIVES = ("sft", "sft2", "ldl_grpo", "single_pair_dpo", "anchor_rank_dpo", "anchor_grpo",
              "self_ppo", "judge_grpo", "tvkd_dpo", "rlsd")
GRPO_LOSS_TYPES = ("dapo", "bnpo", "grpo", "dr_grpo")   # objectives.common.LOSS_TYPES


@dataclass
class TrainConfig:
    objective: str = "ldl_grpo"
    sft_epochs: float = 3.0            # stage I passes over the anchors
    sft_lr: float = 1e-3               # stage I peak lr: warm-up over max(warmup_steps, 5% of steps), cosine to 10%
    sft_batch_size: int = 16
    sft_copy_pairs: int = 0            # extra scoring-format pairs per record that teach reading the reference
    rl_steps: int = 40                 # stage II optimizer steps
    lr: float = 2e-4                   # stage II peak lr: warm-up over warmup_steps, then cosine to 10% at rl_steps
    batch_size: int = 8                # prompts per RL step
    k: int = 8                         # candidates per prompt
    temperature: float = 1.0
    beta: float = 0.05                 # weight of KL(π_θ ‖ π_sft)
    length_normalize: bool = True      # s_θ = mean (True) or sum (False) token log-prob
    dpo_beta: float = 0.1
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 0              # linear warm-up steps (0: step 1 runs at the peak lr)
    save_every: int = 0                # 0: only at the end
    keep_checkpoints: int = 2
    max_bad_steps: int = 5
    log_every: int = 1
    # infrastructure (vlrlcd/training/distributed.py, checkpoint.py)
    grad_accum: int = 1                # micro-batches per SFT step on each process (an RL group is always its own)
    mixed_precision: str = "no"        # no | bf16 | fp16: autocast (fp16 adds a dynamic loss scaler)
    gradient_checkpointing: bool = False  # recompute activations in backward (SFT; the RL prefix cache forbids it)
    group_chunk: int = 0               # RL groups per batched policy / reference pass and backward (0: all of a process's prompts; lower bounds memory)
    tensorboard: bool = True           # RUN/<stage>/tb event files when tensorboard is installed
    # GRPO family (anchor_grpo, judge_grpo, rlsd)
    grpo_loss_type: str = "dapo"       # dapo | bnpo | grpo | dr_grpo: token aggregation (as TRL names it)
    eps_low: float = 0.2               # clip(ρ, 1 − eps_low, 1 + eps_high)
    eps_high: float = 0.2
    scale_rewards: bool = True         # divide group advantages by the group's std (False: Dr. GRPO)
    # self_ppo
    ppo_eps: float = 0.2
    ppo_baseline_momentum: float = 0.9  # running-mean reward baseline b ← m·b + (1 − m)·R
    # rlsd (arXiv 2604.03128)
    rlsd_lambda0: float = 1.0          # weight of the self-distillation magnitude at step 0
    rlsd_decay_steps: int | None = None  # λ decays linearly to 0 over this many steps; null: over rl_steps; 0: constant
    rlsd_eps_w: float = 0.2            # w_t clipped to [1 − eps_w, 1 + eps_w]
    # tvkd_dpo (arXiv 2509.16965)
    tvkd_teacher: str | None = None    # a local HF model directory sharing the student's tokenizer
    tvkd_teacher_quantization: str = "none"  # none | 8bit | 4bit
    tvkd_alpha: float = 1.0            # V_T(s) = α·β_T·logsumexp(log π_T(·|s) / β_T)
    tvkd_beta_t: float = 0.5           # β_T = 1 makes V_T = 0 exactly (no shaping)
    tvkd_gamma_s: float = 0.9          # R(y) = β·[log-ratio] − (1 − γ_s)·Σ_t V_T(s_{t+1})
    tvkd_topk: int = 50                # teacher log-probs kept per position (plus one bucket for the rest)

    RANGES: ClassVar[dict[str, str]] = {   # vlrlcd/ranges.py
        "sft_epochs": "(0, inf)", "sft_lr": "(0, inf)", "sft_batch_size": "[1, inf)", "sft_copy_pairs": "[0, inf)",
        "rl_steps": "[1, inf) train.objective=sft skips stage II", "lr": "(0, inf)", "batch_size": "[1, inf)",
        "k": "[2, inf) a group to rank", "temperature": "(0, inf)", "beta": "[0, inf)", "dpo_beta": "(0, inf)",
        "grad_clip": "[0, inf) 0: no clipping", "weight_decay": "[0, inf)", "warmup_steps": "[0, inf)",
        "save_every": "[0, inf) 0: only at the end", "keep_checkpoints": "[0, inf) 0: keep all",
        "max_bad_steps": "[1, inf)", "log_every": "[1, inf)", "grad_accum": "[1, inf)",
        "group_chunk": "[0, inf) 0: all of a step's prompts in one pass",
        "eps_low": "[0, 1)", "eps_high": "[0, 1)", "ppo_eps": "[0, 1)", "ppo_baseline_momentum": "[0, 1)",
        "rlsd_lambda0": "[0, 1]", "rlsd_decay_steps": "[0, inf) or null: over train.rl_steps", "rlsd_eps_w": "[0, 1)",
        "tvkd_alpha": "[0, inf)", "tvkd_beta_t": "(0, inf)", "tvkd_gamma_s": "[0, 1]", "tvkd_topk": "[1, inf)",
    }

    def validate(self) -> None:
        check_ranges(self, "train.")
        if self.objective not in OBJECTIVES:
            raise VlrlcdError(f"train.objective '{self.objective}' is not one of {', '.join(OBJECTIVES)}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise VlrlcdError(f"train.mixed_precision must be no, bf16 or fp16, got '{self.mixed_precision}'")
        if self.grpo_loss_type not in GRPO_LOSS_TYPES:
            raise VlrlcdError(f"train.grpo_loss_type '{self.grpo_loss_type}' is not one of {', '.join(GRPO_LOSS_TYPES)}")
        if self.tvkd_teacher_quantization not in ("none", "8bit", "4bit"):
            raise VlrlcdError(f"train.tvkd_teacher_quantization must be none, 8bit or 4bit, got '{self.tvkd_teacher_quantization}'")
        if self.objective == "tvkd_dpo":
            self.require_tvkd_teacher()

    def require_tvkd_teacher(self) -> str:
        """The tvkd teacher path, or a VlrlcdError saying what to set."""
        if not self.tvkd_teacher:
            raise VlrlcdError(
                "train.objective=tvkd_dpo needs a local white-box teacher: set train.tvkd_teacher to a Hugging "
                "Face model directory that shares the student's tokenizer (e.g. a larger model of the same family)"
            )
        return self.tvkd_teacher
