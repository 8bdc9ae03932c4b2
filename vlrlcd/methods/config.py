"""The stage-II methods' own config sections, `train.<section>.*` (one per method module that has keys).

They live here, beside the methods and free of torch, so that reading a config stays light (as every
section's config.py). A method names the sections it reads in `Method.sections`; a section named after an
objective (`train.tvkd_dpo`) is that method's own; where it has a `require()`, that says what the method
cannot run without (TrainConfig.validate calls it for the chosen objective).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlrlcd.errors import VlrlcdError
from vlrlcd.ranges import check_ranges

GRPO_LOSS_TYPES = ("dapo", "bnpo", "grpo", "dr_grpo")   # objectives.common.LOSS_TYPES
LDL_FORMS = ("forward", "reverse")                      # objectives.ldl_grpo.LDL_FORMS


@dataclass
class DpoConfig:
    """`train.dpo`: the DPO family (single_pair_dpo, anchor_rank_dpo, tvkd_dpo)."""

    beta: float = 0.1                  # DPO's β on the policy / reference log-ratio

    RANGES: ClassVar[dict[str, str]] = {"beta": "(0, inf)"}

    def validate(self) -> None:
        check_ranges(self, "train.dpo.")


@dataclass
class GrpoConfig:
    """`train.grpo`: the GRPO family's clipping and token aggregation (anchor_grpo, judge_grpo, rlsd)."""

    loss_type: str = "dapo"            # dapo | bnpo | grpo | dr_grpo: token aggregation (as TRL names it)
    eps_low: float = 0.2               # clip(ρ, 1 − eps_low, 1 + eps_high)
    eps_high: float = 0.2
    scale_rewards: bool = True         # divide group advantages by the group's std (False: Dr. GRPO)

    RANGES: ClassVar[dict[str, str]] = {"eps_low": "[0, 1)", "eps_high": "[0, 1)"}

    def validate(self) -> None:
        check_ranges(self, "train.grpo.")
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise VlrlcdError(f"train.grpo.loss_type '{self.loss_type}' is not one of {', '.join(GRPO_LOSS_TYPES)}")


@dataclass
class LdlConfig:
    """`train.ldl_grpo`: the main method's own keys."""

    nll: float = 0.0                   # α: + α·Σ_k D_x(k)·NLL_θ(y_k) (mean token NLL), an RPO-style likelihood
                                       # term (arXiv 2404.19733) that keeps the agreeing candidates' absolute
                                       # likelihood up while q_θ is matched to D_x; 0: the listwise KL alone

    form: str = "forward"              # forward: KL(D_x ‖ q_θ) over the K candidates (the paper's listwise form);
                                       # reverse: H(π_θ, D_x) − η·H(π_θ) over answers, estimated on the K samples
                                       # (policy gradient on log D_x; objectives/ldl_grpo.py: reverse_kl_surrogate)
    entropy: float = 0.0               # η of form=reverse: 1 = KL(π_θ ‖ D_x); 0 = the cross-entropy alone

    RANGES: ClassVar[dict[str, str]] = {"nll": "[0, inf) 0: the listwise KL alone", "entropy": "[0, 1]"}

    def validate(self) -> None:
        check_ranges(self, "train.ldl_grpo.")
        if self.form not in LDL_FORMS:
            raise VlrlcdError(f"train.ldl_grpo.form '{self.form}' is not one of {', '.join(LDL_FORMS)}")


@dataclass
class SelfPpoConfig:
    """`train.self_ppo`."""

    eps: float = 0.2                   # PPO clip range
    baseline_momentum: float = 0.9     # running-mean reward baseline b ← m·b + (1 − m)·R
    scorer: str = "self_likelihood"    # its reward g(x, ∅, y), scored without the anchor (not ranking.scorer: the
                                       # demo's anchor_match reads only the anchor and would give every sample 0)

    RANGES: ClassVar[dict[str, str]] = {"eps": "[0, 1)", "baseline_momentum": "[0, 1)"}

    def validate(self) -> None:
        from vlrlcd.ranking.scorers import ANCHOR_ONLY, SCORERS

        check_ranges(self, "train.self_ppo.")
        if self.scorer not in SCORERS:
            raise VlrlcdError(f"train.self_ppo.scorer '{self.scorer}' is not available; available: {', '.join(SCORERS)}")
        if self.scorer in ANCHOR_ONLY:
            raise VlrlcdError(f"train.self_ppo.scorer '{self.scorer}' reads only the anchor, and self_ppo scores "
                              f"without one (every reward would be 0); use self_likelihood or self_judge")


@dataclass
class RlsdConfig:
    """`train.rlsd` (arXiv 2604.03128)."""

    lambda0: float = 1.0               # weight of the self-distillation magnitude at step 0
    decay_steps: int | None = None     # λ decays linearly to 0 over this many steps; null: over rl_steps; 0: constant
    eps_w: float = 0.2                 # w_t clipped to [1 − eps_w, 1 + eps_w]

    RANGES: ClassVar[dict[str, str]] = {"lambda0": "[0, 1]", "decay_steps": "[0, inf) or null: over train.rl_steps",
                                        "eps_w": "[0, 1)"}

    def validate(self) -> None:
        check_ranges(self, "train.rlsd.")


@dataclass
class TvkdDpoConfig:
    """`train.tvkd_dpo` (arXiv 2509.16965): the white-box teacher and its token values."""

    teacher: str | None = None         # a local HF model directory sharing the student's tokenizer
    teacher_quantization: str = "none"  # none | 8bit | 4bit
    alpha: float = 1.0                 # V_T(s) = α·β_T·logsumexp(log π_T(·|s) / β_T)
    beta_t: float = 0.5                # β_T = 1 makes V_T = 0 exactly (no shaping)
    gamma_s: float = 0.9               # R(y) = β·[log-ratio] − (1 − γ_s)·Σ_t V_T(s_{t+1})
    topk: int = 50                     # teacher log-probs kept per position (plus one bucket for the rest)

    RANGES: ClassVar[dict[str, str]] = {"alpha": "[0, inf)", "beta_t": "(0, inf)", "gamma_s": "[0, 1]",
                                        "topk": "[1, inf)"}

    def validate(self) -> None:
        check_ranges(self, "train.tvkd_dpo.")
        if self.teacher_quantization not in ("none", "8bit", "4bit"):
            raise VlrlcdError(f"train.tvkd_dpo.teacher_quantization must be none, 8bit or 4bit, "
                              f"got '{self.teacher_quantization}'")

    def require(self) -> str:
        """The teacher path, or a VlrlcdError saying what to set."""
        if not self.teacher:
            raise VlrlcdError(
                "train.objective=tvkd_dpo needs a local white-box teacher: set train.tvkd_dpo.teacher to a Hugging "
                "Face model directory that shares the student's tokenizer (e.g. a larger model of the same family)"
            )
        return self.teacher
