"""Stage-II methods: one module each implementing `base.Method`, and this, the one registry.

Adding an objective is one new module and one line here (`"name": "vlrlcd.methods.module:Class"`; a test
may put a class itself). A method is imported when first asked for, so that reading a config — which checks
`train.objective` against `names()` — stays free of torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from vlrlcd.errors import VlrlcdError

if TYPE_CHECKING:
    from vlrlcd.methods.base import Method

REGISTRY: dict[str, str | type] = {
    "sft2": "vlrlcd.methods.sft2:Sft2",
    "ldl_grpo": "vlrlcd.methods.ldl_grpo:LdlGrpo",
    "single_pair_dpo": "vlrlcd.methods.dpo:SinglePairDpo",
    "anchor_rank_dpo": "vlrlcd.methods.dpo:AnchorRankDpo",
    "anchor_grpo": "vlrlcd.methods.grpo:AnchorGrpo",
    "self_ppo": "vlrlcd.methods.self_ppo:SelfPpo",
    "judge_grpo": "vlrlcd.methods.grpo:JudgeGrpo",
    "tvkd_dpo": "vlrlcd.methods.tvkd_dpo:TvkdDpo",
    "rlsd": "vlrlcd.methods.rlsd:Rlsd",
}


def names() -> tuple[str, ...]:
    """Every registered stage-II method, in registry order."""
    return tuple(REGISTRY)


def get_method(name: str) -> "Method":
    """A fresh instance of the method registered as `name`."""
    entry = REGISTRY.get(name)
    if entry is None:
        raise VlrlcdError(f"train.objective '{name}' has no RL method; available: {', '.join(REGISTRY)}")
    if isinstance(entry, str):
        module, attr = entry.split(":")
        entry = getattr(importlib.import_module(module), attr)
    method = entry()
    method.name = name
    return method
