"""The step log of a training stage: one row per optimizer step, into STAGE/metrics.jsonl (flushed as
written), TensorBoard (when installed and `train.tensorboard`) and the progress bar; it counts non-finite
steps in a row and stops the stage after `train.max_bad_steps`."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vlrlcd.errors import VlrlcdError
from vlrlcd.files import atomic_write
from vlrlcd.progress import bar as progress_bar
from vlrlcd.training.distributed import Dist


def finite_row(row: dict) -> dict:
    """`row` with NaN / inf floats as None (JSON has no such numbers)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


class MetricsLog:
    """STAGE/metrics.jsonl: one JSON line per row, appended and flushed as written."""

    def __init__(self, path: str | Path, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not append and self.path.exists():
            self.path.unlink()

    def write(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(finite_row(row)) + "\n")

    def replace_all(self, rows: list[dict]) -> None:
        """The file holding exactly `rows` (written beside it, synced, then renamed: vlrlcd/files.py)."""
        atomic_write(self.path, "".join(json.dumps(finite_row(r)) + "\n" for r in rows))


def lr_used(sched, stepped: bool) -> float:
    """The learning rate the step just logged ran at (get_last_lr() is already the next step's: the
    schedule advanced after a taken step, and a skipped step leaves it where it was)."""
    lambdas = getattr(sched, "lr_lambdas", None)
    if not lambdas:
        return sched.get_last_lr()[0]
    return sched.base_lrs[0] * lambdas[0](max(0, sched.last_epoch - (1 if stepped else 0)))


class StepLog:
    """The rows of one stage so far (what a checkpoint keeps), the bad-step count and the elapsed time."""

    def __init__(self, stage: str, out_dir: str | Path, dist: Dist, max_bad_steps: int,
                 postfix_keys: tuple[str, ...] = ("loss",)):
        self.stage, self.dist, self.max_bad_steps, self.postfix_keys = stage, dist, max_bad_steps, postfix_keys
        self.file = MetricsLog(Path(out_dir) / "metrics.jsonl", append=True)
        self.tb_dir = Path(out_dir) / "tb"
        self.rows: list[dict] = []
        self.bad = 0
        self.elapsed0 = 0.0
        self._t0 = time.time()
        self.tb = None
        self.bar = None

    def clear(self) -> None:
        """Forget an earlier run's log and TensorBoard events (process 0; a stage that starts over)."""
        self.file.path.unlink(missing_ok=True)
        shutil.rmtree(self.tb_dir, ignore_errors=True)

    def restore(self, rows: list[dict], bad: int, elapsed: float) -> None:
        """Continue from a checkpoint's rows: the file then holds exactly those steps (later ones are redone)."""
        self.rows, self.bad, self.elapsed0 = [dict(r) for r in rows], int(bad), float(elapsed)
        if self.dist.is_main:
            self.file.replace_all(self.rows)

    def open(self, total: int, start_step: int, progress: bool, tensorboard: bool) -> None:
        """Start the clock, TensorBoard (process 0) and the progress bar."""
        if self.dist.is_main:
            self.tb = _tensorboard(self.tb_dir, start_step) if tensorboard else None
        self.bar = progress_bar(total=total, initial=start_step, desc=self.stage,
                                 disable=not (progress and self.dist.is_main), leave=False)
        self._t0 = time.time()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()

    def elapsed(self) -> float:
        return self.elapsed0 + time.time() - self._t0

    def log(self, step: int, metrics: dict[str, Any], ok: bool, lr: float, reason: str | None = None,
            tokens: float = 0.0, step_seconds: float | None = None, count_bad: bool = True) -> dict:
        """Record step `step` (1-based); counts bad steps in a row (a skipped step with `count_bad=False`,
        an fp16 overflow, neither counts nor resets) and raises VlrlcdError at `max_bad_steps`."""
        seconds = self.elapsed()
        dt = step_seconds if step_seconds is not None else seconds - (self.rows[-1]["seconds"] if self.rows else self.elapsed0)
        if ok:
            self.bad = 0
        elif count_bad:
            self.bad += 1
        row = {"stage": self.stage, "step": step, **metrics, "skipped": not ok, "lr": lr,
               "tokens_per_s": tokens / max(dt, 1e-9), "seconds_per_step": round(dt, 4), "seconds": round(seconds, 3)}
        if not ok:
            row["skip_reason"] = reason or "non-finite loss or gradient"
            row["bad_steps_in_a_row"] = self.bad
        self.rows.append(row)
        if self.dist.is_main:
            self._write(step, row, ok)
        self._show(row, dt, tokens)
        if self.bad >= self.max_bad_steps:
            raise VlrlcdError(
                f"{self.stage}: {self.bad} steps in a row had a non-finite loss or gradient (last at step {step}: "
                f"{row['skip_reason']}); lower train.lr / train.sft_lr, check the data, or raise train.max_bad_steps. "
                f"Rows are in {self.file.path}"
            )
        return row

    def _write(self, step: int, row: dict, ok: bool) -> None:
        self.file.write(row)
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "step":
                    self.tb.add_scalar(f"{self.stage}/{k}", v, step)
        if not ok:
            tqdm.write(f"{self.stage} step {step}: skipped ({row['skip_reason']}); {self.bad} in a row "
                       f"(stop at train.max_bad_steps={self.max_bad_steps})", file=sys.stderr)

    def _show(self, row: dict, dt: float, tokens: float) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        post = {k: f"{row[k]:.3f}" for k in self.postfix_keys if isinstance(row.get(k), (int, float))}
        post["s/step"] = f"{dt:.2f}"
        if tokens:
            post["tok/s"] = f"{row['tokens_per_s']:.0f}"
        self.bar.set_postfix(post)


def _tensorboard(log_dir: Path, start_step: int):
    """A SummaryWriter when tensorboard is installed (optional extra), else None; on resume, events after
    the resumed step are purged so each step appears once."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None)
