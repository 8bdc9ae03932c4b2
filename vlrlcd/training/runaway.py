"""A warning when stage II's candidates stop ending: the sign of a collapsing policy.

A collapse measured on the text demo (train.lr=1e-3 without warm-up, or summed q) turns every sample into
byte noise that runs to max_new_tokens; the ranking then has nothing to pull back to. The share of
candidates that end without an EOS needs no reference answer, so it can be watched during training (it is
logged as `unfinished` and only ever printed, never a training signal or a stop).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


def unfinished_share(candidates: Sequence[Sequence[int]], eos_ids: Sequence[int]) -> float:
    """Share of the candidates whose last token is not an EOS (cut at max_new_tokens), 0.0 for none."""
    if not candidates:
        return 0.0
    eos = set(eos_ids)
    return sum(1 for c in candidates if not c or c[-1] not in eos) / len(candidates)


@dataclass
class RunawayWatch:
    """Warns once when the mean `unfinished` share of the last `window` steps is ≥ `threshold` and at least
    `rise` above the mean of the first `window` steps (answers that are long from the start stay quiet)."""

    window: int = 10
    threshold: float = 0.5
    rise: float = 0.4
    first: list[float] = field(default_factory=list)
    recent: list[float] = field(default_factory=list)
    warned: bool = False

    def update(self, step: int, share: float | None, lr: float) -> str | None:
        """Feed step `step`'s share (`lr`: the peak train.lr); the warning text the first time the rule fires."""
        if share is None or self.warned:
            return None
        if len(self.first) < self.window:
            self.first.append(share)
            return None
        self.recent = (self.recent + [share])[-self.window:]
        if len(self.recent) < self.window:
            return None
        start, now = sum(self.first) / len(self.first), sum(self.recent) / len(self.recent)
        if now < self.threshold or now - start < self.rise:
            return None
        self.warned = True
        return (f"stage II step {step}: {now:.0%} of the last {self.window} steps' candidates ran to "
                f"student.max_new_tokens without ending ({start:.0%} in the first {self.window}): the policy may "
                f"be collapsing into noise; lower train.lr (now {lr:g}) or set train.warmup_steps, and check "
                f"the `unfinished` column of metrics.jsonl")
