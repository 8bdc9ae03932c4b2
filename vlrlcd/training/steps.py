"""What a step hands a method's group loss (vlrlcd/methods/): the StepContext, and the log-prob passes over
every group's candidates, batched across the groups of a chunk.

`batched_passes` runs ONE `token_logprobs_batch` per pass kind the method names (`Method.passes`) over all
the groups it is given and returns each group's slice; `group_loss` is the same for a single group (a batch
of one), for callers that hold one group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from vlrlcd.adapters.base import StudentAdapter
from vlrlcd.methods import get_method
from vlrlcd.methods.base import LossOut, Method, Passes, pass_context, pass_prefix
from vlrlcd.ranking.config import RankingConfig
from vlrlcd.training.config import TrainConfig
from vlrlcd.training.rollout import Group


@dataclass
class StepContext:
    """What a group loss may need beyond the group: the step (schedules), the ranking settings, a teacher
    judge for judge_grpo, `state` that persists across steps (baselines, call counts; checkpointed) and
    `cache`, a per-process memo that is not checkpointed (the tvkd teacher and its token values)."""

    step: int
    total_steps: int
    ranking: RankingConfig
    judge: Callable | None = None
    state: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def teacher_calls(self) -> int:
        """Teacher requests made by this stage (judge_grpo's judgements; retries included)."""
        return int(getattr(self.judge, "calls", 0)) if self.judge is not None else 0

    def call_counts(self) -> dict[str, int]:
        """Stage-II teacher cost: remote judge calls and local (tvkd) teacher forward passes."""
        return {"stage2_teacher_calls": self.teacher_calls,
                "local_teacher_passes": int(self.state.get("tvkd_teacher_passes", 0))}

    def close(self) -> None:
        """Release what `make_context` opened (the anchor store behind the judge)."""
        while self.closers:
            self.closers.pop()()


def make_context(cfg, tcfg: TrainConfig | None = None, run_dir: str | Path | None = None) -> StepContext:
    """The StepContext for `tcfg.objective` (default cfg.train) of root config `cfg`, with what its method
    opens (`Method.setup`: judge_grpo's stored judge over RUN/anchors.sqlite; tvkd_dpo's teacher check).
    Call `ctx.close()` when the stage ends."""
    tcfg = tcfg or cfg.train
    ctx = StepContext(step=0, total_steps=tcfg.rl_steps, ranking=cfg.ranking)
    get_method(tcfg.objective).setup(ctx, cfg, tcfg, run_dir)
    return ctx


def batched_passes(student: StudentAdapter, groups: list[Group], kinds: tuple[str, ...]) -> list[Passes]:
    """Each group's passes of `kinds` (`Method.passes`) over its K candidates, from ONE `token_logprobs_batch`
    per kind over all `groups` (two forwards each instead of two per group): policy with gradient (when grad
    is on), the reference under the SFT adapter and the privileged context (anchor in context) without. A
    group alone gives the same values as in any batch (up to ~1e-6)."""
    out: list[Passes] = [{} for _ in groups]
    for kind in kinds if groups else ():
        with pass_context(student, kind):
            tls = student.token_logprobs_batch([pass_prefix(student, g, kind) for g in groups],
                                               [g.candidates for g in groups])
        for passes, tl in zip(out, tls):
            passes[kind] = tl
    return out


def group_loss(student: StudentAdapter, group: Group, cfg: TrainConfig, ctx: StepContext,
               method: Method | None = None) -> LossOut:
    """One group's loss under `method` (default `cfg.objective`'s), its passes run for it alone."""
    method = method or get_method(cfg.objective)
    (passes,) = batched_passes(student, [group], method.passes(cfg))
    return method.group_loss(student, group, passes, cfg, ctx)
