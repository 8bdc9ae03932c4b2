"""Sharing prompt prefixes' key/value caches across their candidates, and passing a cache to the model under
the name the installed transformers uses."""

from __future__ import annotations

from typing import Any

import torch

from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers 5.2x renamed the models' `past_key_values` argument and output field to `cache` (the old name
# warns on every forward and goes in 5.40); earlier releases know only `past_key_values`.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_kwargs(cache: DynamicCache) -> dict[str, Any]:
    """The model keyword argument that feeds `cache` (and asks for it back): `model(..., **cache_kwargs(c))`."""
    return {CACHE_NAME: cache, "use_cache": True}


def output_cache(out) -> DynamicCache:
    """The key/value cache a forward with `use_cache=True` returned."""
    return getattr(out, CACHE_NAME)


def repeat_cache(cache: DynamicCache, counts: int | torch.Tensor) -> DynamicCache:
    """A cache whose batch is every row of `cache` repeated in place: `counts` times each (row i -> rows i·k ..
    i·k+k-1), or counts[i] times row i when `counts` is a tensor of per-row counts.

    A batch-1 prefix cache is expanded, several rows repeat_interleaved (the two ways the single and batched
    paths always took, so their numbers stay as they were); the new cache holds its own rows. Gradients flow back
    into the prefix keys/values, so the prefix is computed once per prompt and its cost and gradient are shared
    by its candidates."""
    layers = []
    for layer in cache.layers:
        keys, values = layer.keys, layer.values
        if keys.shape[0] == 1 and not torch.is_tensor(counts):
            layers.append((keys.expand(counts, -1, -1, -1), values.expand(counts, -1, -1, -1)))
        else:
            layers.append((keys.repeat_interleave(counts, dim=0), values.repeat_interleave(counts, dim=0)))
    return DynamicCache(ddp_cache_data=layers)
