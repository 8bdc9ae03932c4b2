"""The checkpointer of a training stage: start fresh or restore the newest checkpoint (checked against
the stage's data order and start weights), save every `train.save_every` steps and at the end.

What a checkpoint holds and how it is written / read safely is checkpoint.py; this decides when, and
what training state goes in (the step log's rows, RNG states of every process, the loop's own state)."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from vlrlcd.errors import VlrlcdError
from vlrlcd.training import checkpoint as ckpt
from vlrlcd.training.distributed import Dist
from vlrlcd.training.metrics_log import StepLog


@dataclass
class Trainables:
    """What a stage trains and restores: the student, its trainable parameters, optimizer and schedule."""

    student: Any
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    sched: Any


class Checkpointer:
    """Checkpoints of one stage in `out_dir` (process 0 writes; every process adds its RNG state)."""

    def __init__(self, stage: str, out_dir: str | Path, dist: Dist, train: Trainables, total_steps: int,
                 save_every: int, keep: int, data_digest: str = ""):
        self.stage, self.out, self.dist, self.train = stage, Path(out_dir), dist, train
        self.total, self.save_every, self.keep, self.data_digest = total_steps, save_every, keep, data_digest
        self.start_digest = ""
        self.resumed_from: Path | None = None
        self.last_saved: Path | None = None

    def start(self, resume: bool, log: StepLog) -> tuple[int, dict]:
        """(steps already done, the loop state saved with them): (0, {}) after clearing an earlier run's
        checkpoints and log, unless `resume` finds a checkpoint to continue from."""
        latest = ckpt.latest_checkpoint(self.out) if resume else None
        if latest is None:
            if self.dist.is_main:
                ckpt.clear_checkpoints(self.out)
                log.clear()
            self.dist.barrier()
            self.dist.broadcast_parameters(self.train.params)
            self.start_digest = weights_digest(self.train.params)
            return 0, {}
        start_step, loop_state = self._restore(latest, log)
        self.resumed_from = latest
        if self.dist.is_main:
            print(f"{self.stage}: resuming after step {start_step} from {latest}", file=sys.stderr, flush=True)
        self.dist.barrier()
        return start_step, loop_state

    def _restore(self, latest: Path, log: StepLog) -> tuple[int, dict]:
        self.start_digest = weights_digest(self.train.params)
        t = self.train
        state = ckpt.load_checkpoint(latest, t.student, t.opt, t.sched)
        if state.get("data_digest", "") != self.data_digest:
            raise VlrlcdError(f"{latest}: the training data or its order changed since this checkpoint (another "
                              "data / seed / batch setting?); start again without --resume")
        if state.get("start_digest", self.start_digest) != self.start_digest:
            raise VlrlcdError(f"{latest}: this stage now starts from other weights than the run that wrote the "
                              "checkpoint (was the previous stage trained again?); start again without --resume")
        rank = self.dist.rank
        try:
            rngs = state["rng"]
            ckpt.set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
            start_step = int(state["step"])
            rows, bad, elapsed = [dict(r) for r in state["rows"]], int(state.get("bad", 0)), float(state.get("elapsed", 0.0))
            loops = state.get("loop") or [{}]  # one per process
            loop_state = dict(loops[rank] if rank < len(loops) else loops[0])
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise ckpt.bad_checkpoint(latest, f"{ckpt.STATE} is not a training state this version wrote "
                                              f"({type(e).__name__}: {ckpt._first_line(e)})") from None
        if not 0 <= start_step <= self.total:
            raise ckpt.bad_checkpoint(latest, f"its step {start_step} lies outside this stage's {self.total} steps")
        log.restore(rows, bad, elapsed)
        return start_step, loop_state

    def due(self, step: int) -> bool:
        """Whether the periodic checkpoint falls after step `step` (the last step's is `finish`)."""
        return self.save_every > 0 and step % self.save_every == 0 and step < self.total

    def finish(self, loop_state: Callable[[], dict], log: StepLog, start_step: int) -> None:
        """The final checkpoint (at the last step), unless this run resumed from it."""
        if self.resumed_from is not None and start_step >= self.total:
            self.last_saved = self.resumed_from
            return
        self.save(self.total, loop_state(), log)

    def save(self, step: int, loop_state: dict, log: StepLog) -> Path | None:
        """Checkpoint after `step` steps; every process must call it (it gathers RNG states and digests)."""
        rngs = self.dist.all_gather(ckpt.rng_state())
        loops = self.dist.all_gather(_json_values(loop_state, f"{self.stage}: the loop state"))
        digests = self.dist.all_gather(weights_digest(self.train.params)) if self.dist.multi else []
        if len(set(digests)) > 1:
            raise VlrlcdError(f"{self.stage}: the processes' weights differ at step {step} ({digests}); gradients were "
                              "not averaged the same on every process — please report this")
        path = None
        if self.dist.is_main:
            elapsed = log.elapsed()
            state = {"step": step, "rows": _json_values(log.rows, f"{self.stage}: a metrics row"), "bad": log.bad,
                     "elapsed": elapsed, "rng": rngs, "data_digest": self.data_digest,
                     "start_digest": self.start_digest, "loop": loops, "world": self.dist.world}
            meta = {"stage": self.stage, "world": self.dist.world, "elapsed": round(log.elapsed(), 3),
                    "rank_digests": digests, "resumed_from": str(self.resumed_from) if self.resumed_from else None}
            t = self.train
            path = ckpt.save_checkpoint(self.out, step, t.student, t.opt, t.sched, state, self.keep, meta)
        self.dist.barrier()
        self.last_saved = path or ckpt.checkpoints_dir(self.out) / f"{ckpt.PREFIX}{step:08d}"
        return path


def weights_digest(params: list[torch.nn.Parameter]) -> str:
    """A hash of the exact bits of `params` (to check every process holds the same weights)."""
    h = hashlib.sha1()
    for p in params:
        h.update(p.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _json_values(value: Any, what: str) -> Any:
    """`value` as plain JSON values (dicts, lists, str, numbers, bools, None): what a checkpoint may hold
    besides tensors, so that it loads with weights_only=True."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise VlrlcdError(f"{what} cannot go into a checkpoint: {e} (only JSON values and tensors are saved)") from None
