"""Preference pairs for DPO from the anchor-conditioned ranking r[B, K]."""

from __future__ import annotations

from torch import Tensor

from vlrlcd.errors import VlrlcdError

PAIR_MODES = ("best_worst", "all", "anchor")
ANCHOR = -1  # stands for the anchor in a (b, chosen, rejected) triple


def preference_pairs(r: Tensor, mode: str, margin: float = 0.0) -> list[tuple[int, int, int]]:
    """(b, chosen k, rejected k) triples from margins r[B, K]; a pair needs r_chosen − r_rejected > margin.

    - best_worst: per prompt, the highest- against the lowest-ranked candidate (first index on ties);
    - all: every ordered pair whose margin difference exceeds `margin`;
    - anchor: the anchor (k = ANCHOR = −1, margin 0 by definition) against each candidate it beats,
      i.e. 0 − r_k > margin; callers substitute the anchor's log-probs for k = −1.
    A group where everything ties (within `margin`) gives no pair. Output is ordered by b, then k.
    """
    if mode not in PAIR_MODES:
        raise VlrlcdError(f"ranking.pairs '{mode}' is not one of {', '.join(PAIR_MODES)}")
    if margin < 0:
        raise VlrlcdError(f"ranking.pair_margin must be >= 0, got {margin}")
    if r.dim() != 2:
        raise ValueError(f"preference_pairs expects r [B, K], got shape {tuple(r.shape)}")
    rows = r.detach().cpu().tolist()
    pairs: list[tuple[int, int, int]] = []
    for b, row in enumerate(rows):
        if mode == "best_worst":
            best = max(range(len(row)), key=lambda k: (row[k], -k))
            worst = min(range(len(row)), key=lambda k: (row[k], k))
            if row[best] - row[worst] > margin:
                pairs.append((b, best, worst))
        elif mode == "all":
            pairs.extend((b, i, j) for i in range(len(row)) for j in range(len(row))
                         if row[i] - row[j] > margin)
        else:
            pairs.extend((b, ANCHOR, k) for k in range(len(row)) if -row[k] > margin)
    return pairs
