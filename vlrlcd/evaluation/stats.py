"""Paired bootstrap of a method's held-out score difference against a reference method (SFT).

Both methods answered the same prompts, so the difference is resampled by prompt: each resample draws
n prompt indices with replacement and takes the mean of (b - a) over them; the interval is the
percentile interval of those means (Efron & Tibshirani, An Introduction to the Bootstrap, ch. 13).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from vlrlcd.evaluation.rundir import read_rows

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95
REFERENCE = "sft"
DIFF_KEYS = ("diff_vs_sft", "diff_low", "diff_high", "diff_n")   # a method's summary entry keys


@dataclass(frozen=True)
class PairedDiff:
    """mean(b - a) over n paired prompts and its bootstrap interval [low, high] at `level`."""

    diff: float
    low: float
    high: float
    n: int
    level: float = LEVEL

    def format(self) -> str:
        """'+0.031 [+0.008, +0.055]'."""
        return format_diff(self.diff, self.low, self.high)


def paired_bootstrap(scores_a: Sequence[float], scores_b: Sequence[float], resamples: int = RESAMPLES,
                     seed: int = SEED, level: float = LEVEL) -> PairedDiff:
    """Percentile bootstrap interval of mean(b - a), resampling prompt indices (fixed `seed`)."""
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired scores need two flat lists of the same length, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("no paired prompts: both methods must have scored at least one shared prompt")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired scores must be finite numbers")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    d = b - a
    n = d.size
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    means = d[idx].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return PairedDiff(float(d.mean()), float(low), float(high), int(n), level)


def format_diff(diff: float, low: float, high: float) -> str:
    """'+0.031 [+0.008, +0.055]' (signed, three decimals)."""
    return f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]"


def prediction_scores(path: Path) -> dict[str, float]:
    """id -> `correct` score of a predictions.jsonl (unreadable lines and non-numeric scores skipped)."""
    out: dict[str, float] = {}
    for row in read_rows(Path(path)).rows:
        v = row.get("correct")
        if "id" in row and isinstance(v, (int, float)) and math.isfinite(float(v)):
            out[str(row["id"])] = float(v)
    return out


def diff_from_predictions(reference: Path, method: Path, resamples: int = RESAMPLES,
                          seed: int = SEED, level: float = LEVEL) -> PairedDiff | None:
    """The paired bootstrap of `method`'s scores minus `reference`'s on the ids both predictions.jsonl files
    share (in the reference's order); None when a file is missing or no id is shared."""
    if not Path(reference).exists() or not Path(method).exists():
        return None
    ref, got = prediction_scores(reference), prediction_scores(method)
    shared = [i for i in ref if i in got]
    if not shared:
        return None
    return paired_bootstrap([ref[i] for i in shared], [got[i] for i in shared], resamples, seed, level)


def diff_vs_reference(run_dir: str | Path, method: str, reference: str = REFERENCE) -> PairedDiff | None:
    """RUN/<method>/predictions.jsonl against RUN/<reference>/predictions.jsonl (see diff_from_predictions)."""
    run = Path(run_dir)
    if method == reference:
        return None
    return diff_from_predictions(run / reference / "predictions.jsonl", run / method / "predictions.jsonl")


def diff_entry(d: PairedDiff) -> dict:
    """The summary keys a method's entry gets (DIFF_KEYS)."""
    return {"diff_vs_sft": d.diff, "diff_low": d.low, "diff_high": d.high, "diff_n": d.n}


def entry_diff(entry: dict) -> str | None:
    """The formatted difference of a summary / table entry holding DIFF_KEYS, else None."""
    vals = [entry.get(k) for k in DIFF_KEYS[:3]]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
        return None
    return format_diff(*vals)
