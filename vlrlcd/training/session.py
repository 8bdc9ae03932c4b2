"""The bookkeeping around a training loop, shared by SFT and RL, as three parts with one job each:
the checkpointer (checkpointer.py: resume, checkpoints every `train.save_every` steps and at the end),
the step log (metrics_log.py: JSONL, TensorBoard, progress bar, non-finite steps in a row) and the
interrupt guard (interrupts.py: Ctrl-C / SIGTERM -> save, then exit). `Session` only wires them up.

The loop itself stays in sft.py / rl.py:

    with Session("rl", out, cfg, dist, Trainables(student, params, opt, sched), total, resume=...) as s:
        for step in range(s.start_step, total):
            ... compute, step ...
            s.log(step + 1, metrics, ok=..., reason=..., tokens=...)
            s.end_step(step + 1, lambda: {"ctx_state": ctx.state})
        s.finish(lambda: {...})
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from vlrlcd.training.checkpointer import Checkpointer, Trainables, _json_values  # noqa: F401 (_json_values: tests)
from vlrlcd.training.config import TrainConfig
from vlrlcd.training.distributed import Dist
from vlrlcd.training.interrupts import InterruptGuard, TrainingInterrupted
from vlrlcd.training.metrics_log import StepLog, lr_used

__all__ = ["Session", "Trainables", "TrainingInterrupted"]


class Session:
    """One training stage writing into `out_dir`: its checkpointer, step log and interrupt guard."""

    def __init__(self, stage: str, out_dir: str | Path, cfg: TrainConfig, dist: Dist, train: Trainables,
                 total_steps: int, *, resume: bool = False, progress: bool = True, data_digest: str = "",
                 postfix_keys: tuple[str, ...] = ("loss",)):
        self.stage, self.cfg, self.train, self.total = stage, cfg, train, total_steps
        self.resume, self.progress = resume, progress
        self.steps = StepLog(stage, out_dir, dist, cfg.max_bad_steps, postfix_keys)
        self.checkpointer = Checkpointer(stage, out_dir, dist, train, total_steps, cfg.save_every,
                                         cfg.keep_checkpoints, data_digest)
        self.guard = InterruptGuard(stage, dist)
        self.start_step = 0
        self.loop_state: dict[str, Any] = {}

    @property
    def rows(self) -> list[dict]:
        return self.steps.rows

    def __enter__(self) -> "Session":
        self.start_step, self.loop_state = self.checkpointer.start(self.resume, self.steps)
        self.steps.open(self.total, self.start_step, self.progress, self.cfg.tensorboard)
        self.guard.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.guard.__exit__(*exc)
        self.steps.close()

    def log(self, step: int, metrics: dict[str, Any], ok: bool, reason: str | None = None, tokens: float = 0.0,
            step_seconds: float | None = None, count_bad: bool = True) -> dict:
        """Record step `step` (1-based) at the learning rate it ran with (StepLog.log)."""
        return self.steps.log(step, metrics, ok, lr_used(self.train.sched, ok), reason, tokens, step_seconds,
                              count_bad)

    def end_step(self, step: int, loop_state: Callable[[], dict]) -> None:
        """After step `step`: checkpoint when due; on Ctrl-C / SIGTERM checkpoint and raise TrainingInterrupted."""
        stop = self.guard.requested()
        if self.checkpointer.due(step) or stop:
            self.checkpointer.save(step, loop_state(), self.steps)
        if stop:
            raise TrainingInterrupted(self.stage, step, self.checkpointer.last_saved)

    def finish(self, loop_state: Callable[[], dict]) -> None:
        """The final checkpoint (at the last step), unless this run resumed from it."""
        self.checkpointer.finish(loop_state, self.steps, self.start_step)
