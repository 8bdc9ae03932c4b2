"""The `train:` section: the keys every stage reads, and the stage-II methods' own sections
(`train.<section>.*`, defined in vlrlcd/methods/config.py)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import ClassVar

from vlrlcd import methods
from vlrlcd.errors import VlrlcdError
from vlrlcd.methods.config import DpoConfig, GrpoConfig, LdlConfig, RlsdConfig, SelfPpoConfig, TvkdDpoConfig
from vlrlcd.ranges import check_ranges

def objectives() -> tuple[str, ...]:
    """`train.objective`'s choices: "sft" (stage I only) and every registered stage-II method."""
    return ("sft",) + methods.names()


OBJECTIVES = objectives()   # the built-in ones (a method a test registers later is in objectives() only)


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
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 0              # linear warm-up steps (0: step 1 runs at the peak lr)
    save_every: int = 0                # 0: only at the end
    keep_checkpoints: int = 2
    max_bad_steps: int = 5
    # infrastructure (vlrlcd/training/distributed.py, checkpoint.py)
    grad_accum: int = 1                # micro-batches per SFT step on each process (an RL group is always its own)
    mixed_precision: str = "no"        # no | bf16 | fp16: autocast (fp16 adds a dynamic loss scaler)
    gradient_checkpointing: bool = False  # recompute activations in backward (SFT and the RL passes)
    group_chunk: int = 0               # RL groups per batched policy / reference pass and backward (0: all of a process's prompts; lower bounds memory)
    tensorboard: bool = True           # RUN/<stage>/tb event files when tensorboard is installed
    # the methods' own sections, train.<section>.* (vlrlcd/methods/config.py)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    ldl_grpo: LdlConfig = field(default_factory=LdlConfig)
    self_ppo: SelfPpoConfig = field(default_factory=SelfPpoConfig)
    rlsd: RlsdConfig = field(default_factory=RlsdConfig)
    tvkd_dpo: TvkdDpoConfig = field(default_factory=TvkdDpoConfig)

    RANGES: ClassVar[dict[str, str]] = {   # vlrlcd/ranges.py
        "sft_epochs": "(0, inf)", "sft_lr": "(0, inf)", "sft_batch_size": "[1, inf)", "sft_copy_pairs": "[0, inf)",
        "rl_steps": "[1, inf) train.objective=sft skips stage II", "lr": "(0, inf)", "batch_size": "[1, inf)",
        "k": "[2, inf) a group to rank", "temperature": "(0, inf)", "beta": "[0, inf)",
        "grad_clip": "[0, inf) 0: no clipping", "weight_decay": "[0, inf)", "warmup_steps": "[0, inf)",
        "save_every": "[0, inf) 0: only at the end", "keep_checkpoints": "[0, inf) 0: keep all",
        "max_bad_steps": "[1, inf)", "grad_accum": "[1, inf)",
        "group_chunk": "[0, inf) 0: all of a step's prompts in one pass",
    }
    # flat keys of earlier versions -> their section key (vlrlcd/config.py names the new key for an old one)
    RENAMED: ClassVar[dict[str, str]] = {
        "dpo_beta": "dpo.beta", "grpo_loss_type": "grpo.loss_type", "eps_low": "grpo.eps_low",
        "eps_high": "grpo.eps_high", "scale_rewards": "grpo.scale_rewards", "ppo_eps": "self_ppo.eps",
        "ppo_baseline_momentum": "self_ppo.baseline_momentum", "rlsd_lambda0": "rlsd.lambda0",
        "rlsd_decay_steps": "rlsd.decay_steps", "rlsd_eps_w": "rlsd.eps_w", "tvkd_teacher": "tvkd_dpo.teacher",
        "tvkd_teacher_quantization": "tvkd_dpo.teacher_quantization", "tvkd_alpha": "tvkd_dpo.alpha",
        "tvkd_beta_t": "tvkd_dpo.beta_t", "tvkd_gamma_s": "tvkd_dpo.gamma_s", "tvkd_topk": "tvkd_dpo.topk",
    }

    def validate(self) -> None:
        check_ranges(self, "train.")
        if self.objective not in objectives():
            raise VlrlcdError(f"train.objective '{self.objective}' is not one of {', '.join(objectives())}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise VlrlcdError(f"train.mixed_precision must be no, bf16 or fp16, got '{self.mixed_precision}'")
        for name in METHOD_SECTIONS:
            getattr(self, name).validate()
        own = getattr(self, self.objective, None) if self.objective in METHOD_SECTIONS else None
        if hasattr(own, "require"):  # what the chosen method cannot run without (e.g. tvkd_dpo's teacher)
            own.require()


# TrainConfig's method sections (train.<section>.*), in field order
METHOD_SECTIONS = tuple(n for n, t in typing.get_type_hints(TrainConfig).items() if dataclasses.is_dataclass(t))
