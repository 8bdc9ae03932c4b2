"""The `eval:` section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from vlrlcd.errors import VlrlcdError
from vlrlcd.ranges import check_ranges


@dataclass
class EvalConfig:
    metric: str = "auto"          # auto | exact_match | choice | caption_attributes
    max_new_tokens: int = 12
    batch_size: int = 16          # held-out prompts per batched greedy decode (1: one at a time)
    train_prompts: int = 128      # also score greedy answers on the first N training prompts (0: off; one process only)

    RANGES: ClassVar[dict[str, str]] = {   # vlrlcd/ranges.py
        "max_new_tokens": "[1, inf)", "batch_size": "[1, inf) 1: one prompt at a time",
        "train_prompts": "[0, inf) 0: off",
    }

    def validate(self) -> None:
        from vlrlcd.evaluation.metrics import METRICS

        check_ranges(self, "eval.")
        if self.metric not in METRICS:
            raise VlrlcdError(f"eval.metric '{self.metric}' is not one of {', '.join(METRICS)}")
