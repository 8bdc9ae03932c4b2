"""The processor's output for prompts seen before: token ids and pixel inputs, kept by (prompts, image files).

Training sees every prompt many times (epochs of SFT, the policy and the scoring prompt of stage II) and the
processor's work (chat template, tokenizer, image resize and normalisation) gives the same tensors each time;
on the tiny demo students it was a fifth of an SFT step. Entries are keyed by the prompt texts and the image
*paths* of one `_build` call (an in-memory PIL image is never cached: it has no stable name), kept least
recently used first and bounded in bytes. A build's image features are kept beside it only while nothing in
the vision path trains (`StudentAdapter.features_frozen`): a trained projector or vision LoRA always gets a
new vision pass with its current weights.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Hashable

import torch

DEFAULT_BYTES = 256 << 20   # 256 MiB: ~190 LLaVA-1.5 images at 336 px, or every tiny demo prompt many times over


def inputs_key(prompts: list[str], images: list) -> Hashable | None:
    """The cache key of one build, or None when an image is not a file path (nothing stable to name it by)."""
    names = []
    for image in images:
        if image is None:
            names.append(None)
        elif isinstance(image, (str, Path)):
            names.append(str(image))
        else:
            return None
    return tuple(prompts), tuple(names)


def _nbytes(value: Any) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class InputsCache:
    """A least-recently-used map from `inputs_key` to a build's (rows, pixel inputs), at most `max_bytes` of
    tensors (0 turns it off). Callers must not modify what `get` returns in place."""

    def __init__(self, max_bytes: int = DEFAULT_BYTES):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable | None) -> Any | None:
        if key is None or key not in self._items:
            self.misses += key is not None
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return self._items[key][0]

    def put(self, key: Hashable | None, value: Any) -> None:
        size = _nbytes(value)
        if key is None or size > self.max_bytes or key in self._items:
            return
        self._items[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._items.popitem(last=False)
            self.bytes -= dropped

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0
