"""Sharing one prompt prefix's key/value cache across K candidates, and passing a cache to the model under
the name the installed transformers uses."""

from __future__ import annotations

from typing import Any

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


def expand_cache(cache: DynamicCache, k: int) -> DynamicCache:
    """A new cache whose batch is `k` views of the batch-1 prefix cache (no copy until appended to).

    Gradients flow back into the prefix keys/values, so the prefix is computed once per prompt and its
    cost and gradient are shared by the K candidates."""
    layers = []
    for layer in cache.layers:
        keys, values = layer.keys, layer.values
        if keys.shape[0] != 1:
            raise ValueError("expand_cache takes a batch-1 prefix cache")
        layers.append((keys.expand(k, -1, -1, -1), values.expand(k, -1, -1, -1)))
    return DynamicCache(ddp_cache_data=layers)
