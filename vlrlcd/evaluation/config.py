"""The `eval:` section."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvalConfig:
    metric: str = "auto"          # auto | exact_match | caption_attributes
    max_new_tokens: int = 12
    batch_size: int = 16
