"""What the method registry (vlrlcd/methods/) says a step rolls out and which passes it runs, for the plan.

`vlrlcd plan` imports torch anyway (parameters are counted on a meta-device model), so reading the registry
costs only the methods' modules; they are imported when first asked for, keeping `import vlrlcd.plan` light.
A plan is taken in lockstep on a record without a verifier: the record-independent worst case (rlsd ranks
every group).
"""

from __future__ import annotations

from functools import lru_cache


def _rollout(train, ranking):
    from vlrlcd.datasets.records import Record
    from vlrlcd.methods import get_method

    return get_method(train.objective).plan(train, ranking, Record(id="plan", prompt=""), True)


def rollout_shape(cfg) -> tuple[int, bool]:
    """(samples per prompt, whether the student scores them) of the root config's method."""
    rp = _rollout(cfg.train, cfg.ranking)
    return rp.k, rp.score != "none"


@lru_cache(maxsize=None)  # `largest` plans hundreds of steps of one method
def scores_plain(objective: str) -> bool:
    """Whether the method scores its candidates without the anchor (no anchor in the prompt, no anchor row)."""
    from vlrlcd.ranking.config import RankingConfig
    from vlrlcd.training.config import TrainConfig

    return _rollout(TrainConfig(objective=objective), RankingConfig()).score == "plain"


@lru_cache(maxsize=None)
def method_passes(objective: str, beta: float) -> tuple[str, ...]:
    """The passes over all K candidates the method reads; () for one that runs its own passes on subsets."""
    from vlrlcd.methods import get_method
    from vlrlcd.training.config import TrainConfig

    return get_method(objective).passes(TrainConfig(objective=objective, beta=beta))
