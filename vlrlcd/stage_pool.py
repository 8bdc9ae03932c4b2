"""Stage-II methods side by side, one worker process each (`run.run_methods(jobs=N)`).

Every stage-II method starts from the same SFT adapter and reads nothing another one writes, so on a CPU with
free cores they can train at once. Each worker computes with the parent's thread count and runs exactly what
the sequential loop runs (`pipeline.run_rl` in a fresh process), so its numbers are a sequential run's to the
digit (tests/test_stage_pool.py holds them equal). Ctrl-C / SIGTERM reach the workers, which finish their step
and save a checkpoint as in a sequential run; methods not yet started are dropped, and `--resume` continues.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from vlrlcd.pipeline import Prepared
    from vlrlcd.training.distributed import Dist


@dataclass
class MethodResult:
    """One stage-II method's outcome in a worker: its held-out metrics, or the user error that stopped it, or
    where an interrupt left it."""

    name: str
    metrics: dict | None = None
    error: str | None = None
    interrupted: tuple[str, int, str | None] | None = None   # (stage, step, checkpoint)
    skipped: bool = False                                    # not started: a stop was asked first


def free_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


def auto_jobs(methods: int, dist: "Dist | None" = None) -> int:
    """How many stage-II methods train at once by default: one under torchrun / accelerate (the processes are
    the launch's) or with a CUDA device (the methods would share one card's memory); otherwise as many as the
    free cores hold at torch's thread count each, at most one per method."""
    import torch

    if methods < 2 or (dist is not None and dist.multi) or torch.cuda.is_available():
        return 1
    return max(1, min(methods, free_cores() // max(1, torch.get_num_threads())))


_slot = 0        # this worker's number (its progress bars' line)
_stop = None     # set by the parent when a stop is asked: a method not yet started is skipped


def start_order(cfg, names: list[str]) -> list[str]:
    """`names` in the order to start them: most expected work per prompt first (candidates sampled, scored and
    passed over: K · (1 + scored + passes)), so that the longest method does not start last and leave the
    other workers idle; ties keep their order. Only the starting order: results are listed in `names`' order."""
    from dataclasses import replace

    from vlrlcd.planning.methods import method_passes, rollout_shape

    def work(name: str) -> int:
        k, scored = rollout_shape(replace(cfg, train=replace(cfg.train, objective=name)))
        return k * (1 + scored + len(method_passes(name, cfg.train.beta)))
    return sorted(names, key=lambda n: -work(n))


def _init_worker(threads: int, counter, stop) -> None:
    """A worker computes with the parent's thread count, takes the next progress line, and ignores Ctrl-C /
    SIGTERM between methods (the parent decides); a training loop's own guard takes them while it runs."""
    import torch

    global _slot, _stop
    _stop = stop
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    torch.set_num_threads(threads)
    with counter.get_lock():
        _slot, counter.value = counter.value, counter.value + 1


def _train_method(prep: "Prepared", sft_adapter: Path | None, name: str, progress: bool,
                  resume: bool) -> MethodResult:
    """One stage-II method in a worker: `pipeline.run_rl` as the sequential loop calls it."""
    from vlrlcd import pipeline
    from vlrlcd.errors import VlrlcdError
    from vlrlcd.progress import set_line
    from vlrlcd.training.interrupts import TrainingInterrupted

    if _stop is not None and _stop.is_set():
        return MethodResult(name, skipped=True)
    set_line(_slot, name)
    try:
        _, metrics = pipeline.run_rl(prep, sft_adapter, name, progress=progress, resume=resume)
        return MethodResult(name, metrics=metrics)
    except VlrlcdError as e:
        return MethodResult(name, error=str(e))
    except TrainingInterrupted as e:  # its own args do not survive pickling: send the parts
        return MethodResult(name, interrupted=(e.stage, e.step, None if e.checkpoint is None else str(e.checkpoint)))


def train_parallel(prep: "Prepared", sft_adapter: Path | None, names: list[str], jobs: int, progress: bool,
                   resume: bool) -> Iterator[MethodResult]:
    """Train `names` from `sft_adapter`, `jobs` at a time (started in `start_order`); yields each result as
    its method finishes. A Ctrl-C while waiting stops the running methods at their step's end (they save a
    checkpoint) and starts no other; a second one stops at once."""
    import torch

    ctx = multiprocessing.get_context("spawn")  # torch and fork do not mix; every worker starts clean
    stop_event = ctx.Event()
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                               initargs=(torch.get_num_threads(), ctx.Value("i", 0), stop_event))
    in_main = _main_thread()
    old = {sig: signal.getsignal(sig) for sig in _SIGNALS} if in_main else {}

    def on_signal(signum, frame):
        again = stop_event.is_set()
        stop_event.set()
        for f in pending:
            f.cancel()
        for pid in list(getattr(pool, "_processes", None) or {}):  # also a signal sent to this process alone
            try:
                os.kill(pid, signum)
            except OSError:
                pass
        if again:
            raise KeyboardInterrupt

    pending: set[Future] = set()
    try:
        for sig in old:
            signal.signal(sig, on_signal)
        pending = {pool.submit(_train_method, prep, sft_adapter, name, progress, resume)
                   for name in start_order(prep.cfg, names)}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                if not f.cancelled():
                    yield f.result()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    pool.shutdown(wait=True)


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
