"""Ranking diagnostics on the training prompts: how well the margins r_k separate candidates that are right
from those that are wrong, by the task's own metric against the training record's reference.

These are for understanding a run only (metrics.jsonl, curves, report): nothing here ever feeds the loss,
the ranking or the sampler, and the held-out split is never read.
"""

from __future__ import annotations

from typing import Sequence

import torch

from vlrlcd.datasets.records import Record


def candidate_correctness(record: Record, texts: Sequence[str]) -> list[float] | None:
    """Each candidate's score in [0, 1] by the record's metric (exact match, caption attributes...), or None
    when the record cannot be checked (no reference, choices or scene objects)."""
    from vlrlcd.errors import VlrlcdError
    from vlrlcd.evaluation.metrics import score_record

    try:
        return [float(score_record(record, t)) for t in texts]
    except VlrlcdError:
        return None


def within_group_auroc(scores: Sequence[float], correct: Sequence[float], threshold: float = 0.5) -> float | None:
    """P(r_right > r_wrong) over the group's (right, wrong) candidate pairs, ties counting 1/2 (the
    Mann-Whitney AUROC); None when the group has no right or no wrong candidate. Right: correct > threshold."""
    right = [s for s, c in zip(scores, correct) if c > threshold]
    wrong = [s for s, c in zip(scores, correct) if c <= threshold]
    if not right or not wrong:
        return None
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in right for b in wrong)
    return wins / (len(right) * len(wrong))


def group_diagnostics(record: Record, texts: Sequence[str], margins: torch.Tensor,
                      target: torch.Tensor) -> dict[str, float]:
    """Per-group diagnostics: `diag_right` (mean candidate score), and for a ranked group `diag_d_right`
    (Σ_k D_k · correct_k, D's mass on right answers) and `diag_auroc` (when the group mixes right and wrong)."""
    correct = candidate_correctness(record, texts) if texts else None
    if correct is None:
        return {}
    out = {"diag_right": sum(correct) / len(correct)}
    if margins.numel() == len(correct) and target.numel() == len(correct):
        out["diag_d_right"] = float(sum(float(d) * c for d, c in zip(target.tolist(), correct)))
        auc = within_group_auroc(margins.tolist(), correct)
        if auc is not None:
            out["diag_auroc"] = auc
    return out
