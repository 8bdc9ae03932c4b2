"""The order a training loop visits its items in: reshuffled epochs, a function of the seed only."""

from __future__ import annotations

import random
from typing import Sequence, TypeVar

T = TypeVar("T")


def epoch_order(items: Sequence[T], n: int, seed: int) -> list[T]:
    """The first `n` items of back-to-back passes over `items`, each pass shuffled by random.Random(seed)."""
    if not items:
        return []
    rng = random.Random(seed)
    order: list[T] = []
    while len(order) < n:
        epoch = list(items)
        rng.shuffle(epoch)
        order.extend(epoch)
    return order[:n]
