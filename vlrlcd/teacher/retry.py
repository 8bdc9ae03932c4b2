"""One teacher call with bounded retries: exponential backoff with jitter, Retry-After honoured,
every attempt charged to a hard call budget."""

from __future__ import annotations

import logging
import random
import threading
from typing import Callable, TypeVar

from vlrlcd.teacher.base import TeacherCallError
from vlrlcd.teacher.config import TeacherConfig

log = logging.getLogger(__name__)
T = TypeVar("T")


class Budget:
    """At most `limit` calls (None: unlimited), shared by threads."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.limit is not None and self.used >= self.limit:
                return False
            self.used += 1
            return True

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.used >= self.limit


class OutOfBudget(Exception):
    """The call budget ran out before the call could be made (or retried)."""


class Stopped(Exception):
    """The run was asked to stop while waiting to retry."""


def retry_delay(error: TeacherCallError, attempt: int, cfg: TeacherConfig, rng: random.Random) -> float | None:
    """Seconds before retry number `attempt + 1`, or None when the server asks for more than max_backoff_s.

    Retry-After t: wait t plus up to 10% jitter. Otherwise equal jitter on a doubling backoff:
    U(0.5, 1) · min(max_backoff_s, backoff_s · 2^attempt).
    """
    if error.retry_after is not None:
        if error.retry_after > cfg.max_backoff_s:
            return None
        return error.retry_after * (1.0 + 0.1 * rng.random())
    return min(cfg.max_backoff_s, cfg.backoff_s * 2**attempt) * rng.uniform(0.5, 1.0)


def call_with_retries(
    fn: Callable[[], T],
    cfg: TeacherConfig,
    budget: Budget,
    stop: threading.Event | None = None,
    rng: random.Random | None = None,
    on_attempt: Callable[[], None] | None = None,
    on_retry: Callable[[TeacherCallError], None] | None = None,
) -> T:
    """fn() until it succeeds, a non-retryable TeacherCallError, or `cfg.max_retries` retries are spent.

    Raises OutOfBudget when the budget refuses an attempt, Stopped when `stop` is set during a wait,
    and the last TeacherCallError otherwise.
    """
    rng = rng or random.Random()
    attempt = 0
    while True:
        if not budget.take():
            raise OutOfBudget()
        if on_attempt is not None:
            on_attempt()
        try:
            return fn()
        except TeacherCallError as e:
            if e.fatal or not e.retryable or attempt >= cfg.max_retries:
                raise
            delay = retry_delay(e, attempt, cfg, rng)
            if delay is None:
                raise TeacherCallError(
                    e.kind, f"{e} (server asked to wait {e.retry_after:.0f}s > teacher.max_backoff_s={cfg.max_backoff_s})"
                ) from None
            log.info("teacher %s (%s); retry %d/%d in %.2fs", e.kind, e, attempt + 1, cfg.max_retries, delay)
            if on_retry is not None:
                on_retry(e)
            if stop is not None:
                if stop.wait(delay):
                    raise Stopped() from None
            else:
                threading.Event().wait(delay)
            attempt += 1
