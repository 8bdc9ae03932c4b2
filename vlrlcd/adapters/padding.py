"""Padding rows of token ids (or token types, or labels) into one batch: the one place every batched path pads."""

from __future__ import annotations

from typing import Sequence

import torch


def pad_rows(rows: Sequence[Sequence[int] | torch.Tensor], value: int, length: int | None = None, left: bool = False,
             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` as one long [N, L] tensor (L = `length`, or the longest row), filled with `value` on the right (or on
    the `left`), and the long [N, L] mask, 1 on real entries. A row longer than `length` is an error."""
    rows = [r if torch.is_tensor(r) else torch.tensor(list(r), dtype=torch.long) for r in rows]
    L = max((len(r) for r in rows), default=0) if length is None else length
    ids = torch.full((len(rows), L), value, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), L, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        if len(r) > L:
            raise ValueError(f"row {i} has {len(r)} entries, more than the padded length {L}")
        start = L - len(r) if left else 0
        ids[i, start:start + len(r)] = r
        mask[i, start:start + len(r)] = 1
    return ids, mask
