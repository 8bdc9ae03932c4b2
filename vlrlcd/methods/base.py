"""The `Method` protocol every stage-II method implements, and the helpers the methods share.

A method says what it needs rolled out for a record (`plan`), which log-prob passes over all of a group's
candidates it reads (`passes`: the step runs them batched across groups and hands each group its slice), how
a group becomes a loss (`group_loss`, calling the pure functions in vlrlcd/objectives/), what it opens for a
stage (`setup`: a judge, a check) and what it does once per step (`step_end`). Under lockstep (FSDP / ZeRO-3:
every process must make the same forward and backward calls) a method's plan must not depend on the record,
and a group with nothing to learn from still runs its passes with weight 0 (`skipped_loss`).

The reference policy is always the frozen SFT adapter switched in on the same weights
(`student.reference()`), never a second model. Every loss returned is attached to the graph.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable

import torch

from vlrlcd.adapters.base import StudentAdapter, TokenLogprobs
from vlrlcd.datasets.records import Record
from vlrlcd.ranking.config import RankingConfig
from vlrlcd.training.rollout import Group, RolloutPlan

if TYPE_CHECKING:
    from vlrlcd.training.config import TrainConfig
    from vlrlcd.training.steps import StepContext

LossOut = tuple[torch.Tensor, dict]   # (loss attached to the graph, metrics)
Passes = dict[str, TokenLogprobs]      # pass kind -> this group's token log-probs of its K candidates
PASS_KINDS = ("policy", "reference", "privileged")


class Method:
    """One stage-II method (registered in vlrlcd/methods/__init__.py). The defaults are those of a method that
    ranks K candidates against the anchor and reads the policy (and, with β > 0, reference) log-probs."""

    name: str = ""                      # set by the registry
    sections: tuple[str, ...] = ()      # the `train.<section>` keys it reads (resume digest)
    reads_ranking: bool = True          # its rollout ranks (the `ranking:` keys change its result)
    reads_teacher: bool = False         # it asks the teacher during the stage (judge_grpo)

    def plan(self, cfg: TrainConfig, rcfg: RankingConfig, record: Record, lockstep: bool) -> RolloutPlan:
        """What the rollout samples and scores for this record."""
        return RolloutPlan(cfg.k, "anchor", rcfg.score_with)

    def passes(self, cfg: TrainConfig) -> tuple[str, ...]:
        """The passes over all K candidates `group_loss` reads (in the order it runs them); () for a method that
        reads subsets of candidates and runs its own passes."""
        return ("policy",) + (("reference",) if cfg.beta != 0 else ())

    def setup(self, ctx: StepContext, cfg: Any, tcfg: TrainConfig, run_dir: Any) -> None:
        """Open what the stage needs (root config `cfg`, this stage's train section `tcfg`) into `ctx`."""

    def group_loss(self, student: StudentAdapter, group: Group, passes: Passes, cfg: TrainConfig,
                   ctx: StepContext) -> LossOut:
        raise NotImplementedError

    def step_end(self, ctx: StepContext, cfg: TrainConfig, means: dict[str, float]) -> None:
        """After each step, with the step's metrics averaged over every group of every process."""


# ------------------------------------------------------------------ passes
@contextlib.contextmanager
def pass_context(student: StudentAdapter, kind: str):
    """The adapter and grad mode of a pass over candidates: "policy" as is (grad when enabled), "reference"
    under the frozen SFT adapter and "privileged" (the policy with the anchor in context) without grad."""
    if kind not in PASS_KINDS:
        raise ValueError(f"unknown pass '{kind}'")
    if kind == "policy":
        yield
        return
    with torch.no_grad(), (student.reference() if kind == "reference" else contextlib.nullcontext()):
        yield


def pass_prefix(student: StudentAdapter, group: Group, kind: str):
    """The prefix a pass reads: the prompt's, or for the "privileged" pass the scoring prompt (the anchor in
    context) with the prompt's image features reused."""
    if kind != "privileged":
        return group.prefix
    return anchored_prefix(student, group)


def anchored_prefix(student: StudentAdapter, group: Group):
    """The scoring prompt (the anchor in context) on the group's image features."""
    from vlrlcd.ranking.scorers import scoring_prompt

    return student.prefix(scoring_prompt(group.record.prompt, group.anchor), group.record.image,
                          features=group.prefix.image_features)


def reference_logp(student: StudentAdapter, prefix, responses: list[list[int]]) -> torch.Tensor:
    """Token log-probs [K, T] under the frozen SFT adapter (no gradient)."""
    with pass_context(student, "reference"):
        return student.token_logprobs(prefix, responses).logp


def reference_or_none(passes: Passes, cfg: TrainConfig) -> torch.Tensor | None:
    """[1, K, T] reference log-probs when the KL term is on (β ≠ 0), else None."""
    return passes["reference"].logp[None] if cfg.beta != 0 else None


# ------------------------------------------------------------------ losses
def skipped_loss(student: StudentAdapter, passes: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A zero loss that backward() accepts, for a group that gives nothing to learn from: a leaf, or in lockstep
    (FSDP / ZeRO-3) 0 · the loss `passes()` computes, so every process still makes the same forwards and backward."""
    if student.lockstep is not None:
        return 0.0 * passes()
    return torch.zeros((), device=student.device, requires_grad=True)


def with_reward_stats(metrics: dict, rewards: torch.Tensor) -> dict:
    rewards = rewards.float()
    return {**metrics, "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0}
