"""The `ranking:` section."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from vlrlcd.errors import VlrlcdError
from vlrlcd.ranges import check_ranges

SCORER_NAMES = ("self_likelihood", "self_judge", "clip", "anchor_match", "composite")
PAIR_MODES = ("best_worst", "all", "anchor")


@dataclass
class RankingConfig:
    scorer: str = "self_likelihood"    # self_likelihood | self_judge | clip | anchor_match | composite
    gamma: float = 1.0                 # D_x(k) ∝ sigmoid(γ r_k) · exp(r_k / τ)
    tau: float = 0.5
    score_with: str = "policy"         # policy | sft: which adapter the scorer runs under
    pairs: str = "best_worst"          # best_worst | all | anchor: DPO pairs from the ranking
    pair_margin: float = 0.0           # a pair needs r_chosen − r_rejected > pair_margin
    distinct: bool = False             # D_x and q_θ over the group's distinct candidates (repeats get D = 0, no q)
    anchor_in_group: bool = False      # the anchor joins the K candidates as one more (r = 0) member of the group
    anchor_suffix: bool = False        # anchor_match: a candidate equal to the anchor's last words agrees with it
    # clip: an open_clip architecture name (or a model-config .json) and its weights: a local checkpoint
    # file, or a pretrained tag already in the local open_clip cache; "random" = untrained (tests only)
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = ""
    clip_text_weight: float = 1.0      # g = w_t·cos(T(y), T(a)) + w_i·[cos(I, T(y)) − cos(I, T(a))]
    clip_image_weight: float = 1.0
    # composite: g = Σ_s w_s · g_s over the named scorers, e.g. {self_likelihood: 1.0, clip: 0.5}
    composite: dict[str, float] = field(default_factory=dict)

    RANGES: ClassVar[dict[str, str]] = {   # vlrlcd/ranges.py
        "gamma": "[0, inf)", "tau": "(0, inf)", "pair_margin": "[0, inf)",
        "clip_text_weight": "(-inf, inf)", "clip_image_weight": "(-inf, inf)",
    }

    def validate(self) -> None:
        check_ranges(self, "ranking.")
        if self.scorer not in SCORER_NAMES:
            raise VlrlcdError(f"ranking.scorer '{self.scorer}' is not one of {', '.join(SCORER_NAMES)}")
        if self.score_with not in ("policy", "sft"):
            raise VlrlcdError(f"ranking.score_with must be policy or sft, got '{self.score_with}'")
        if self.pairs not in PAIR_MODES:
            raise VlrlcdError(f"ranking.pairs '{self.pairs}' is not one of {', '.join(PAIR_MODES)}")
        if self.scorer == "clip" and not self.clip_pretrained:
            raise VlrlcdError(
                "ranking.scorer=clip needs ranking.clip_pretrained: a local open_clip checkpoint file "
                "(e.g. ranking.clip_pretrained=/models/open_clip_vit_b32.bin) or a pretrained tag already "
                "in the local cache"
            )
        self.validate_composite(required=self.scorer == "composite")

    def validate_composite(self, required: bool) -> None:
        parts = {k: v for k, v in (self.composite or {}).items()}
        if required and not parts:
            raise VlrlcdError("ranking.scorer=composite needs weights, e.g. "
                              "ranking.composite='{self_likelihood: 1.0, clip: 0.5}'")
        for name, w in parts.items():
            if name not in SCORER_NAMES or name == "composite":
                valid = ", ".join(s for s in SCORER_NAMES if s != "composite")
                raise VlrlcdError(f"ranking.composite: '{name}' is not a scorer; use {valid}")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(float(w)):
                raise VlrlcdError(f"ranking.composite.{name}: weight must be a finite number, got {w!r}")
        if required and "clip" in parts and not self.clip_pretrained:
            raise VlrlcdError("ranking.composite uses clip: set ranking.clip_pretrained to a local open_clip "
                              "checkpoint file")
