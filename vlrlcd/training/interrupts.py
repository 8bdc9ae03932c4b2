"""Ctrl-C / SIGTERM during training: the first signal asks the loop to finish its step and save a
checkpoint; a second one (not torchrun's forwarded copy of the first) stops at once."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from vlrlcd.training.distributed import Dist

DUPLICATE_SIGNAL_S = 3.0   # torchrun forwards the terminal's Ctrl-C: a second copy within this is the same one


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM: a checkpoint was saved at `step`; `vlrlcd train CONFIG --resume` continues."""

    def __init__(self, stage: str, step: int, checkpoint: Path | None):
        super().__init__(f"{stage}: interrupted after step {step}; checkpoint {checkpoint}")
        self.stage, self.step, self.checkpoint = stage, step, checkpoint


class InterruptGuard:
    """While entered (main thread only), SIGINT / SIGTERM set a stop request instead of killing the loop."""

    def __init__(self, stage: str, dist: Dist):
        self.stage, self.dist = stage, dist
        self._stop = False
        self._first_signal = 0.0
        self._old_handlers: dict[int, Any] = {}

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def requested(self) -> bool:
        """Whether any process was asked to stop (every process must call this at the same step)."""
        return any(self.dist.all_gather(self._stop)) if self.dist.multi else self._stop

    def _restore(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()

    def _on_signal(self, signum, frame) -> None:
        now = time.time()
        if self._stop and now - self._first_signal > DUPLICATE_SIGNAL_S:
            self._restore()
            raise KeyboardInterrupt
        if not self._stop:
            self._stop, self._first_signal = True, now
            if self.dist.is_main:
                print(f"\n{self.stage}: {signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                      "(again to stop at once)", file=sys.stderr, flush=True)
