"""The `eval:` section."""

from __future__ import annotations

from dataclasses import dataclass

from vlrlcd.errors import VlrlcdError


@dataclass
class EvalConfig:
    metric: str = "auto"          # auto | exact_match | choice | caption_attributes
    max_new_tokens: int = 12
    batch_size: int = 16          # held-out prompts per batched greedy decode (1: one at a time)
    train_prompts: int = 128      # also score greedy answers on the first N training prompts (0: off; one process only)

    def validate(self) -> None:
        from vlrlcd.evaluation.metrics import METRICS

        if self.metric not in METRICS:
            raise VlrlcdError(f"eval.metric '{self.metric}' is not one of {', '.join(METRICS)}")
        if self.max_new_tokens < 1:
            raise VlrlcdError(f"eval.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.train_prompts < 0:
            raise VlrlcdError(f"eval.train_prompts must be >= 0 (0: off), got {self.train_prompts}")
        if self.batch_size < 1:
            raise VlrlcdError(f"eval.batch_size must be >= 1 (1: one prompt at a time), got {self.batch_size}")
