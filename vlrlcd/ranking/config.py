"""The `ranking:` section."""

from __future__ import annotations

from dataclasses import dataclass

from vlrlcd.errors import VlrlcdError


@dataclass
class RankingConfig:
    scorer: str = "self_likelihood"    # self_likelihood | self_judge | clip | composite
    gamma: float = 1.0                 # D_x(k) ∝ sigmoid(γ r_k) · exp(r_k / τ)
    tau: float = 0.5
    score_with: str = "policy"         # policy | sft: which adapter the scorer runs under
    pairs: str = "best_worst"          # best_worst | all | anchor: DPO pairs from the ranking
    pair_margin: float = 0.0

    def validate(self) -> None:
        if self.tau <= 0:
            raise VlrlcdError(f"ranking.tau must be > 0, got {self.tau}")
        if self.gamma < 0:
            raise VlrlcdError(f"ranking.gamma must be >= 0, got {self.gamma}")
        if self.score_with not in ("policy", "sft"):
            raise VlrlcdError(f"ranking.score_with must be policy or sft, got '{self.score_with}'")
