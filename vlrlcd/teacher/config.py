"""The `teacher:` section."""

from __future__ import annotations

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
    max_retries: int = 5
    backoff_s: float = 0.5
    error_rate: float = 0.0            # oracle: probability an anchor is wrong
    paraphrase_rate: float = 0.0       # oracle: probability an anchor is paraphrased
    seed: int = 0

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise VlrlcdError(f"teacher.backend '{self.backend}' is not one of {', '.join(BACKENDS)}")
        if self.concurrency < 1:
            raise VlrlcdError("teacher.concurrency must be >= 1")
        for k in ("error_rate", "paraphrase_rate"):
            v = getattr(self, k)
            if not 0.0 <= v <= 1.0:
                raise VlrlcdError(f"teacher.{k} must lie in [0, 1], got {v}")
