"""The `teacher:` section."""

from __future__ import annotations

import re
from dataclasses import dataclass

from vlrlcd.errors import VlrlcdError

BACKENDS = ("oracle", "openai", "hf", "jsonl")


@dataclass
class TeacherConfig:
    backend: str = "oracle"
    model: str = "oracle"              # model name sent to the endpoint / local path for hf
    base_url: str | None = None        # openai: e.g. http://127.0.0.1:8000/v1
    api_key_env: str = "OPENAI_API_KEY"  # name of the environment variable holding the key
    jsonl_path: str | None = None      # jsonl: answers produced elsewhere, matched by record id
    temperature: float = 0.0
    max_tokens: int = 64
    system_prompt: str = "Answer the question briefly."
    concurrency: int = 4
    max_calls: int | None = None       # hard budget on teacher calls for one run
    timeout_s: float = 60.0
    max_retries: int = 5               # retries after the first attempt (429 / 5xx / timeouts / malformed)
    backoff_s: float = 0.5             # first backoff; doubles per retry, with jitter
    max_backoff_s: float = 60.0        # cap on one wait; a longer Retry-After fails the prompt for this run
    quantization: str = "none"         # hf: none | 8bit | 4bit
    call_in_training: bool = False     # not supported yet: training skips (and counts) prompts without an anchor
    error_rate: float = 0.0            # oracle: probability an anchor is wrong
    paraphrase_rate: float = 0.0       # oracle: probability an anchor is paraphrased
    seed: int = 0

    def validate(self) -> None:
        if self.call_in_training:
            raise VlrlcdError("teacher.call_in_training is not supported yet: run `vlrlcd anchors CONFIG` (or "
                              "`vlrlcd train`, which fills the store first) so every prompt has its anchor")
        if self.backend not in BACKENDS:
            raise VlrlcdError(f"teacher.backend '{self.backend}' is not one of {', '.join(BACKENDS)}")
        if self.concurrency < 1:
            raise VlrlcdError("teacher.concurrency must be >= 1")
        if self.max_calls is not None and self.max_calls < 0:
            raise VlrlcdError("teacher.max_calls must be >= 0 (or null for no budget)")
        if self.max_retries < 0 or self.timeout_s <= 0 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise VlrlcdError("teacher.max_retries, backoff_s and max_backoff_s must be >= 0 and timeout_s > 0")
        if self.quantization not in ("none", "8bit", "4bit"):
            raise VlrlcdError(f"teacher.quantization must be none, 8bit or 4bit, got '{self.quantization}'")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env or ""):
            raise VlrlcdError(
                "teacher.api_key_env must be the NAME of an environment variable holding the key "
                "(e.g. OPENAI_API_KEY), not the key itself"
            )
        for k in ("error_rate", "paraphrase_rate"):
            v = getattr(self, k)
            if not 0.0 <= v <= 1.0:
                raise VlrlcdError(f"teacher.{k} must lie in [0, 1], got {v}")
