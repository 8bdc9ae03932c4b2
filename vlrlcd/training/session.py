"""The bookkeeping around a training loop, shared by SFT and RL: resume, checkpoints every
`train.save_every` steps and at the end, Ctrl-C (save, then exit), non-finite steps (skip, report,
stop after `train.max_bad_steps` in a row), the metrics JSONL, TensorBoard and the progress bar.

The loop itself stays in sft.py / rl.py:

    with Session("rl", out, cfg, dist, student, params, opt, sched, total, ...) as s:
        for step in range(s.start_step, total):
            ... compute, step ...
            s.log(step + 1, metrics, ok=..., reason=..., tokens=...)
            s.end_step(step + 1, lambda: {"ctx_state": ctx.state})
        s.finish(lambda: {...})
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from vlrlcd.errors import VlrlcdError
from vlrlcd.files import atomic_write
from vlrlcd.training import checkpoint as ckpt
from vlrlcd.training.config import TrainConfig
from vlrlcd.training.distributed import Dist
from vlrlcd.training.metrics_log import MetricsLog

DUPLICATE_SIGNAL_S = 3.0   # torchrun forwards the terminal's Ctrl-C: a second copy within this is the same one


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM: a checkpoint was saved at `step`; `vlrlcd train CONFIG --resume` continues."""

    def __init__(self, stage: str, step: int, checkpoint: Path | None):
        super().__init__(f"{stage}: interrupted after step {step}; checkpoint {checkpoint}")
        self.stage, self.step, self.checkpoint = stage, step, checkpoint


class Session:
    """Resume / checkpoint / log / interrupt handling for one training stage writing into `out_dir`."""

    def __init__(self, stage: str, out_dir: str | Path, cfg: TrainConfig, dist: Dist, student, params, opt, sched,
                 total_steps: int, resume: bool = False, progress: bool = True, data_digest: str = "",
                 postfix_keys: tuple[str, ...] = ("loss",)):
        self.stage, self.out, self.cfg, self.dist = stage, Path(out_dir), cfg, dist
        self.student, self.params, self.opt, self.sched = student, params, opt, sched
        self.total, self.resume, self.progress = total_steps, resume, progress
        self.data_digest, self.postfix_keys = data_digest, postfix_keys
        self.rows: list[dict] = []
        self.bad = 0
        self.start_step = 0
        self.loop_state: dict[str, Any] = {}
        self.resumed_from: Path | None = None
        self.start_digest = ""
        self.last_saved: Path | None = None
        self._elapsed0 = 0.0
        self._t0 = time.time()
        self._stop = False
        self._first_signal = 0.0
        self._old_handlers: dict[int, Any] = {}
        self.log_file = MetricsLog(self.out / "metrics.jsonl", append=True)
        self.tb = None
        self.bar = None

    # ------------------------------------------------------------------ start / stop
    def __enter__(self) -> "Session":
        self._restore_or_start()
        if self.dist.is_main:
            self.tb = _tensorboard(self.out / "tb", self.start_step) if self.cfg.tensorboard else None
        self.bar = tqdm(total=self.total, initial=self.start_step, desc=self.stage,
                        disable=not (self.progress and self.dist.is_main), leave=False)
        self._install_signals()
        self._t0 = time.time()
        return self

    def __exit__(self, *exc) -> None:
        self._restore_signals()
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()

    def _restore_or_start(self) -> None:
        latest = ckpt.latest_checkpoint(self.out) if self.resume else None
        if latest is None:
            if self.dist.is_main:
                ckpt.clear_checkpoints(self.out)
                self.log_file.path.unlink(missing_ok=True)
                shutil.rmtree(self.out / "tb", ignore_errors=True)
            self.dist.barrier()
            self.dist.broadcast_parameters(self.params)
            self.start_digest = _digest(self.params)
            return
        self.start_digest = _digest(self.params)
        state = ckpt.load_checkpoint(latest, self.student, self.opt, self.sched)
        if state.get("data_digest", "") != self.data_digest:
            raise VlrlcdError(f"{latest}: the training data or its order changed since this checkpoint (another "
                              "data / seed / batch setting?); start again without --resume")
        if state.get("start_digest", self.start_digest) != self.start_digest:
            raise VlrlcdError(f"{latest}: this stage now starts from other weights than the run that wrote the "
                              "checkpoint (was the previous stage trained again?); start again without --resume")
        self.start_digest = state.get("start_digest", self.start_digest)
        try:
            rngs = state["rng"]
            ckpt.set_rng_state(rngs[self.dist.rank] if self.dist.rank < len(rngs) else rngs[0])
            self.start_step = int(state["step"])
            self.rows = [dict(r) for r in state["rows"]]
            self.bad = int(state.get("bad", 0))
            self._elapsed0 = float(state.get("elapsed", 0.0))
            loops = state.get("loop") or [{}]  # one per process
            self.loop_state = dict(loops[self.dist.rank] if self.dist.rank < len(loops) else loops[0])
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise ckpt.bad_checkpoint(latest, f"{ckpt.STATE} is not a training state this version wrote "
                                              f"({type(e).__name__}: {ckpt._first_line(e)})") from None
        if not 0 <= self.start_step <= self.total:
            raise ckpt.bad_checkpoint(latest, f"its step {self.start_step} lies outside this stage's {self.total} steps")
        self.resumed_from = latest
        if self.dist.is_main:  # the log holds exactly the checkpoint's steps; later ones are redone
            atomic_write(self.log_file.path, "".join(json.dumps(_clean(r)) + "\n" for r in self.rows))
            print(f"{self.stage}: resuming after step {self.start_step} from {latest}", file=sys.stderr, flush=True)
        self.dist.barrier()

    # ------------------------------------------------------------------ per step
    def lr_used(self, stepped: bool) -> float:
        """The learning rate the step just logged ran at (get_last_lr() is already the next step's: the
        schedule advanced after a taken step, and a skipped step leaves it where it was)."""
        lambdas = getattr(self.sched, "lr_lambdas", None)
        if not lambdas:
            return self.sched.get_last_lr()[0]
        return self.sched.base_lrs[0] * lambdas[0](max(0, self.sched.last_epoch - (1 if stepped else 0)))

    def log(self, step: int, metrics: dict[str, Any], ok: bool, reason: str | None = None,
            tokens: float = 0.0, step_seconds: float | None = None, count_bad: bool = True) -> dict:
        """Record step `step` (1-based): one metrics row (JSONL, TensorBoard, bar); counts bad steps in a row
        (a skipped step with `count_bad=False`, an fp16 overflow, neither counts nor resets)."""
        seconds = self.elapsed()
        dt = step_seconds if step_seconds is not None else seconds - (self.rows[-1]["seconds"] if self.rows else self._elapsed0)
        if ok:
            self.bad = 0
        elif count_bad:
            self.bad += 1
        row = {"stage": self.stage, "step": step, **metrics, "skipped": not ok,
               "lr": self.lr_used(ok), "tokens_per_s": tokens / max(dt, 1e-9),
               "seconds_per_step": round(dt, 4), "seconds": round(seconds, 3)}
        if not ok:
            row["skip_reason"] = reason or "non-finite loss or gradient"
            row["bad_steps_in_a_row"] = self.bad
        self.rows.append(row)
        if self.dist.is_main:
            self.log_file.write(row)
            if self.tb is not None:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "step":
                        self.tb.add_scalar(f"{self.stage}/{k}", v, step)
            if not ok:
                tqdm.write(f"{self.stage} step {step}: skipped ({row['skip_reason']}); {self.bad} in a row "
                           f"(stop at train.max_bad_steps={self.cfg.max_bad_steps})", file=sys.stderr)
        if self.bar is not None:
            self.bar.update(1)
            post = {k: f"{row[k]:.3f}" for k in self.postfix_keys if isinstance(row.get(k), (int, float))}
            post["s/step"] = f"{dt:.2f}"
            if tokens:
                post["tok/s"] = f"{row['tokens_per_s']:.0f}"
            self.bar.set_postfix(post)
        if self.bad >= self.cfg.max_bad_steps:
            raise VlrlcdError(
                f"{self.stage}: {self.bad} steps in a row had a non-finite loss or gradient (last at step {step}: "
                f"{row['skip_reason']}); lower train.lr / train.sft_lr, check the data, or raise train.max_bad_steps. "
                f"Rows are in {self.log_file.path}"
            )
        return row

    def end_step(self, step: int, loop_state: Callable[[], dict]) -> None:
        """After step `step`: checkpoint when due; on Ctrl-C / SIGTERM checkpoint and raise TrainingInterrupted."""
        stop = any(self.dist.all_gather(self._stop)) if self.dist.multi else self._stop
        due = self.cfg.save_every > 0 and step % self.cfg.save_every == 0 and step < self.total
        if due or stop:
            self.save(step, loop_state())
        if stop:
            raise TrainingInterrupted(self.stage, step, self.last_saved)

    def finish(self, loop_state: Callable[[], dict]) -> None:
        """The final checkpoint (at the last step), unless this run resumed from it."""
        if self.resumed_from is not None and self.start_step >= self.total:
            self.last_saved = self.resumed_from
            return
        self.save(self.total, loop_state())

    def elapsed(self) -> float:
        return self._elapsed0 + time.time() - self._t0

    def save(self, step: int, loop_state: dict) -> Path | None:
        """Checkpoint after `step` steps (process 0 writes; every process contributes its RNG state)."""
        rngs = self.dist.all_gather(ckpt.rng_state())
        loops = self.dist.all_gather(_json_values(loop_state, f"{self.stage}: the loop state"))
        digests = self.dist.all_gather(_digest(self.params)) if self.dist.multi else []
        if len(set(digests)) > 1:
            raise VlrlcdError(f"{self.stage}: the processes' weights differ at step {step} ({digests}); gradients were "
                              "not averaged the same on every process — please report this")
        path = None
        if self.dist.is_main:
            state = {"step": step, "rows": _json_values(self.rows, f"{self.stage}: a metrics row"), "bad": self.bad, "elapsed": self.elapsed(), "rng": rngs,
                     "data_digest": self.data_digest,
                     "start_digest": self.start_digest, "loop": loops, "world": self.dist.world}
            meta = {"stage": self.stage, "world": self.dist.world, "elapsed": round(self.elapsed(), 3),
                    "rank_digests": digests,
                    "resumed_from": str(self.resumed_from) if self.resumed_from else None}
            path = ckpt.save_checkpoint(self.out, step, self.student, self.opt, self.sched, state,
                                        self.cfg.keep_checkpoints, meta)
        self.dist.barrier()
        self.last_saved = path or ckpt.checkpoints_dir(self.out) / f"{ckpt.PREFIX}{step:08d}"
        return path

    # ------------------------------------------------------------------ signals
    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signals(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()

    def _on_signal(self, signum, frame) -> None:
        now = time.time()
        if self._stop and now - self._first_signal > DUPLICATE_SIGNAL_S:
            self._restore_signals()
            raise KeyboardInterrupt
        if not self._stop:
            self._stop, self._first_signal = True, now
            if self.dist.is_main:
                print(f"\n{self.stage}: {signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                      "(again to stop at once)", file=sys.stderr, flush=True)


def _digest(params: list[torch.nn.Parameter]) -> str:
    """A hash of the exact bits of `params` (to check every process holds the same weights)."""
    import hashlib

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


def _clean(row: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def _tensorboard(log_dir: Path, start_step: int):
    """A SummaryWriter when tensorboard is installed (optional extra), else None; on resume, events after
    the resumed step are purged so each step appears once."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None)
