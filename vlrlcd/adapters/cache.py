"""Sharing one prompt prefix's key/value cache across K candidates."""

from __future__ import annotations

from transformers import DynamicCache


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
