"""The `teacher:` section."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from vlrlcd.errors import VlrlcdError
from vlrlcd.ranges import check_ranges

BACKENDS = ("oracle", "openai", "hf", "jsonl")

# Prefixes of API keys / tokens that providers hand out (OpenAI, Anthropic, Groq, xAI, Hugging Face, Google,
# GitHub, GitLab, NVIDIA, Replicate, Perplexity, Together, AWS access keys, ...).
_KEY_PREFIXES = ("sk-", "sk_", "gsk_", "xai-", "hf_", "AIza", "ghp_", "gho_", "ghs_", "github_pat_", "glpat-",
                 "nvapi-", "r8_", "pplx-", "tgp_", "AKIA", "ASIA", "key-", "pk-", "pk_", "rk_", "sess-")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def looks_like_a_key(value: str) -> bool:
    """True for a value that is probably a secret rather than an environment variable's name: a known key
    prefix on a long value, or a long token of mixed letters and digits."""
    if len(value) >= 16 and (value.startswith(_KEY_PREFIXES) or value.lower().startswith(("sk-", "sk_", "bearer "))):
        return True
    # names are words joined by '_' (OPENAI_API_KEY_2); tokens are long runs of mixed letters and digits
    has_digit, has_lower, has_upper = (any(f(c) for c in value) for f in (str.isdigit, str.islower, str.isupper))
    return len(value) >= 24 and has_digit and has_lower and (has_upper or value.count("_") == 0) \
        and value.count("_") < 2


@dataclass
class TeacherConfig:
    backend: str = "oracle"
    model: str = "oracle"              # model name sent to the endpoint / local path for hf
    base_url: str | None = None        # openai: e.g. http://127.0.0.1:8000/v1
    api_key_env: str = "OPENAI_API_KEY"  # name of the environment variable holding the key
    jsonl_path: str | None = None      # jsonl: answers produced elsewhere, matched by record id
    store: str | None = None           # an anchor store shared by runs (a .sqlite file); None: RUN/anchors.sqlite only
    temperature: float = 0.0
    max_tokens: int = 64
    system_prompt: str = "Answer the question briefly."
    concurrency: int = 4
    max_calls: int | None = None       # hard budget on teacher calls for one run
    timeout_s: float = 60.0            # per request; a timed-out request may still be billed by the server
    max_retries: int = 5               # retries after the first attempt (429 / 5xx / timeouts / malformed / empty)
    backoff_s: float = 0.5             # first backoff; doubles per retry, with jitter
    max_backoff_s: float = 60.0        # cap on one wait; a longer Retry-After fails the prompt for this run
    quantization: str = "none"         # hf: none | 8bit | 4bit
    error_rate: float = 0.0            # oracle: probability an anchor is wrong
    paraphrase_rate: float = 0.0       # oracle: probability an anchor is paraphrased
    seed: int = 0

    RANGES: ClassVar[dict[str, str]] = {
        "temperature": "[0, inf)", "max_tokens": "[1, inf)", "concurrency": "[1, 1024]",
        "max_calls": "[0, inf) null: no budget", "timeout_s": "(0, inf) seconds", "max_retries": "[0, 100]",
        "backoff_s": "[0, inf) seconds", "max_backoff_s": "[0, inf) seconds", "error_rate": "[0, 1]",
        "paraphrase_rate": "[0, 1]", "seed": "[0, 2147483647]",
    }

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise VlrlcdError(f"teacher.backend '{self.backend}' is not one of {', '.join(BACKENDS)}")
        check_ranges(self, "teacher.")
        if self.quantization not in ("none", "8bit", "4bit"):
            raise VlrlcdError(f"teacher.quantization must be none, 8bit or 4bit, got '{self.quantization}'")
        if looks_like_a_key(self.api_key_env or "") or not _ENV_NAME.fullmatch(self.api_key_env or ""):
            # never echo the value: it may be the secret itself
            raise VlrlcdError(
                "teacher.api_key_env must be the NAME of an environment variable holding the key (e.g. "
                "OPENAI_API_KEY), and the value given looks like a key or is not a variable name (not shown): "
                "export the key as a variable and set teacher.api_key_env to that variable's name"
            )
        if self.store is not None and not str(self.store).strip():
            raise VlrlcdError("teacher.store is empty: give a path such as ~/.cache/vlrlcd/anchors.sqlite, or null")
