"""`vlrlcd anchors CONFIG`: fill the anchor store, one teacher call per distinct prompt, ever.

`cfg.concurrency` worker threads take prompts from a shared list; each answer is committed by the
worker that received it before it takes the next prompt, so a killed run has paid for at most
`concurrency` answers it did not keep. One fill per store at a time (`lock.fill_lock`); with
`teacher.store` the answers are paid into that shared store and copied into the run's own.
Run as `python -m vlrlcd.teacher.runner CONFIG [key=value ...]`.
"""

from __future__ import annotations

import logging
import random
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from vlrlcd.datasets.records import Record
from vlrlcd.errors import VlrlcdError
from vlrlcd.teacher import build_teacher
from vlrlcd.teacher.base import Teacher, TeacherAnswer, TeacherCallError
from vlrlcd.teacher.config import TeacherConfig
from vlrlcd.teacher.lock import fill_lock
from vlrlcd.teacher.retry import Budget, OutOfBudget, Stopped, call_with_retries
from vlrlcd.teacher.store import AnchorStore, anchor_key

log = logging.getLogger(__name__)

STORE_NAME = "anchors.sqlite"
UNREACHABLE_AFTER = 3   # connection failures, before any request reached a server, that stop a fill
EXIT_INCOMPLETE = 3     # `vlrlcd anchors` exit status when prompts are left without an anchor


@dataclass
class AnchorSummary:
    """What one fill did; counts are distinct prompts except `calls` / `retries` (requests)."""

    prompts: int = 0
    calls: int = 0
    stored: int = 0
    already_stored: int = 0
    failures_by_kind: dict[str, int] = field(default_factory=dict)
    failure_examples: dict[str, str] = field(default_factory=dict)
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    remaining: int = 0
    max_calls: int | None = None
    seconds: float = 0.0
    shared_store: str | None = None   # teacher.store, when the answers were paid into a shared store
    copied: int = 0                   # answers copied from the shared store into the run's store
    fatal: str | None = None          # why the fill stopped early (bad key, no server), when it did

    @property
    def failed(self) -> int:
        return sum(self.failures_by_kind.values())

    @property
    def missing(self) -> int:
        """Distinct prompts left without an anchor: failed, or never asked (budget, stop)."""
        return self.failed + self.remaining

    @property
    def complete(self) -> bool:
        return self.missing == 0

    @property
    def budget_exhausted(self) -> bool:
        return self.remaining > 0 and self.max_calls is not None and self.calls >= self.max_calls

    def lines(self) -> list[str]:
        where = f" in the shared store {self.shared_store} ({self.copied} copied into the run's)" \
            if self.shared_store else ""
        out = [
            f"teacher calls: {self.calls} ({self.retries} retries) in {self.seconds:.1f}s",
            f"answers stored: {self.stored} new, {self.already_stored} already stored, "
            f"of {self.prompts} distinct prompts{where}",
            f"tokens: prompt {self.prompt_tokens}, completion {self.completion_tokens}",
        ]
        if self.failures_by_kind:
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.failures_by_kind.items()))
            out.append(f"failures (retried by the next run): {kinds}")
            out += [f"  e.g. {k}: {m}" for k, m in sorted(self.failure_examples.items())]
        else:
            out.append("failures: none")
        if self.budget_exhausted:
            out.append(
                f"budget exhausted (teacher.max_calls={self.max_calls}): {self.remaining} prompts left; "
                "run again with a larger teacher.max_calls to finish them"
            )
        elif self.remaining:
            out.append(f"stopped early: {self.remaining} prompts left; run again to finish them")
        if self.missing:
            why = [f"{n} failed" for n in [self.failed] if n] + \
                  [f"{n} not asked{', budget spent' if self.budget_exhausted else ''}" for n in [self.remaining] if n]
            out.append(f"incomplete: {self.missing} of {self.prompts} prompts have no anchor ({', '.join(why)})")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _distinct_prompts(records: list[Record], cfg: TeacherConfig) -> dict[str, Record]:
    """key -> the first record with that prompt, in record order."""
    out: dict[str, Record] = {}
    for r in records:
        out.setdefault(anchor_key(cfg, r), r)
    return out


def shared_store_path(cfg: TeacherConfig, run_store: Path) -> Path | None:
    """`teacher.store` as a file path (a directory gets anchors.sqlite), or None when unset or the run's own."""
    if not cfg.store:
        return None
    p = Path(cfg.store).expanduser()
    if p.is_dir() or str(cfg.store).endswith(("/", "\\")):
        p = p / STORE_NAME
    if p.resolve() == Path(run_store).resolve():
        return None
    return p


class _Activity:
    """What the workers are doing, for the progress bar: requests in flight (since when), backoff waits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[int, float] = {}
        self._waiting: set[int] = set()

    def calling(self) -> None:
        with self._lock:
            self._waiting.discard(threading.get_ident())
            self._calls[threading.get_ident()] = time.monotonic()

    def returned(self) -> None:
        with self._lock:
            self._calls.pop(threading.get_ident(), None)

    def backing_off(self) -> None:
        with self._lock:
            self._waiting.add(threading.get_ident())

    def idle(self) -> None:
        with self._lock:
            self._calls.pop(threading.get_ident(), None)
            self._waiting.discard(threading.get_ident())

    def describe(self) -> str:
        with self._lock:
            oldest = time.monotonic() - min(self._calls.values()) if self._calls else 0.0
            return f"in flight {len(self._calls)}, retrying {len(self._waiting)}, oldest {oldest:.0f}s"


class _Reachability:
    """A fill whose first requests all fail to connect (wrong teacher.base_url, no server) stops at once;
    once any request has reached a server, a connection error is an ordinary retryable failure."""

    def __init__(self, limit: int = UNREACHABLE_AFTER) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._reached = False
        self._failures = 0

    def reached(self) -> None:
        with self._lock:
            self._reached = True

    def check(self, e: TeacherCallError) -> TeacherCallError:
        """`e`, or a fatal error naming the endpoint when connections have failed from the start."""
        with self._lock:
            if e.kind != "connection":
                self._reached = True
                return e
            if self._reached:
                return e
            self._failures += 1
            if self._failures < self.limit:
                return e
        return TeacherCallError(
            "unreachable", f"cannot reach the teacher: {e}, on each of the first {self.limit} requests; start the "
            "server or fix teacher.base_url", fatal=True)


def fill_anchors(
    cfg: TeacherConfig,
    records: list[Record],
    store: AnchorStore,
    progress: bool = True,
    teacher: Teacher | None = None,
) -> AnchorSummary:
    """Ask the teacher for every distinct prompt without a stored answer; commit each as it arrives.

    Holds the store's fill lock throughout (a second fill waits, then pays for nothing). With
    `cfg.store` the answers are paid into that shared store and copied into `store`. `cfg.max_calls`
    bounds the requests (retries included) of this call. Raises VlrlcdError, after storing the answers
    received, when the fill stopped (bad key, no server) or when no prompt has an anchor at all.
    """
    start = time.monotonic()
    prompts = _distinct_prompts(records, cfg)
    shared = shared_store_path(cfg, store.path)
    if shared is None:
        with fill_lock(store.path):
            summary = _fill(cfg, prompts, store, progress, teacher)
    else:
        with AnchorStore(shared) as paid, fill_lock(shared):
            summary = _fill(cfg, prompts, paid, progress, teacher)
            summary.shared_store = str(shared)
            summary.copied = store.copy_answers(paid, prompts)
    summary.seconds = time.monotonic() - start
    if summary.fatal:
        raise VlrlcdError(f"teacher stopped: {summary.fatal} ({summary.stored} answers stored this run, "
                          f"{summary.missing} prompts left)")
    if prompts and summary.stored + summary.already_stored == 0:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(summary.failures_by_kind.items())) or "none asked"
        example = next(iter(sorted(summary.failure_examples.items())), None)
        eg = f" (e.g. {example[0]}: {example[1]})" if example else ""
        budget = f"; teacher.max_calls={cfg.max_calls}" if summary.budget_exhausted else ""
        raise VlrlcdError(
            f"no prompt has an anchor: {len(prompts)} prompts, failures: {kinds}{eg}{budget}; fix the teacher and "
            "run `vlrlcd anchors CONFIG` (training needs at least one anchor)"
        )
    return summary


def _fill(cfg: TeacherConfig, prompts: dict[str, Record], store: AnchorStore, progress: bool,
          teacher: Teacher | None) -> AnchorSummary:
    """The fill itself, under the lock: the statuses are read only once the lock is held."""
    status = store.statuses(prompts)
    todo = [(k, r) for k, r in prompts.items() if status.get(k) != "ok"]
    summary = AnchorSummary(prompts=len(prompts), already_stored=len(prompts) - len(todo), max_calls=cfg.max_calls)
    if not todo:
        return summary
    return _Fill(cfg, store, teacher if teacher is not None else build_teacher(cfg), summary).run(todo, progress)


class _Fill:
    """One fill's workers: each takes the next prompt, asks the teacher with retries under the budget, and
    stores the answer or the failure; a fatal error (bad key, dead endpoint) stops them all."""

    def __init__(self, cfg: TeacherConfig, store: AnchorStore, teacher: Teacher, summary: AnchorSummary) -> None:
        self.cfg, self.store, self.teacher, self.summary = cfg, store, teacher, summary
        self.budget = Budget(cfg.max_calls)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.failures: Counter = Counter()
        self.fatal: list[TeacherCallError] = []
        self.activity, self.reach = _Activity(), _Reachability()
        self.queue: Iterator[tuple[str, Record]] = iter(())
        self.bar = None

    def count(self, attr: str, n: int = 1) -> None:
        with self.lock:
            setattr(self.summary, attr, getattr(self.summary, attr) + n)

    def fail(self, key: str, record: Record, kind: str, message: str, attempts: int) -> None:
        self.store.put_failure(key, record, self.cfg, kind, message, attempts)
        with self.lock:
            self.failures[kind] += 1
            self.summary.failure_examples.setdefault(kind, message[:200])

    def ask(self, record: Record) -> TeacherAnswer:
        self.activity.calling()
        try:
            answer = self.teacher.answer(record)
        except TeacherCallError as e:
            raise self.reach.check(e) from None
        finally:
            self.activity.returned()
        self.reach.reached()
        return answer

    def store_answer(self, key: str, record: Record, answer: TeacherAnswer, attempts: int) -> None:
        if self.store.put_answer(key, record, self.cfg, answer, attempts):  # only rows actually written count
            with self.lock:
                self.summary.stored += 1
                self.summary.prompt_tokens += answer.prompt_tokens
                self.summary.completion_tokens += answer.completion_tokens
        else:
            self.count("already_stored")

    def one(self, key: str, record: Record, rng: random.Random) -> None:
        attempts = [0]

        def attempted() -> None:
            attempts[0] += 1
            self.count("calls")

        def retrying(e: TeacherCallError) -> None:
            self.activity.backing_off()
            self.count("retries")

        try:
            answer = call_with_retries(lambda: self.ask(record), self.cfg, self.budget, self.stop, rng,
                                       on_attempt=attempted, on_retry=retrying)
        except (OutOfBudget, Stopped):
            self.count("remaining")
            return
        except TeacherCallError as e:
            if e.fatal:
                with self.lock:
                    self.fatal.append(e)
                self.stop.set()
                self.count("remaining")
                return
            self.fail(key, record, e.kind, str(e), attempts[0])
        except Exception as e:  # a backend bug must not lose the run: recorded, shown in the summary
            log.exception("teacher call for record '%s' raised", record.id)
            self.fail(key, record, "error", f"{type(e).__name__}: {e}", attempts[0])
        else:
            self.store_answer(key, record, answer, attempts[0])
        finally:
            self.activity.idle()
        self.bar.update(1)

    def worker(self) -> None:
        rng = random.Random()
        try:
            while True:
                with self.lock:
                    item = next(self.queue, None)
                if item is None:
                    return
                if self.stop.is_set():
                    self.count("remaining")
                    continue
                self.one(*item, rng)
        except BaseException:  # a damaged store: stop the others, re-raised below
            self.stop.set()
            raise

    def run(self, todo: list[tuple[str, Record]], progress: bool) -> AnchorSummary:
        from tqdm import tqdm

        self.queue = iter(todo)
        self.bar = tqdm(total=len(todo), desc="anchors", unit="prompt", disable=not progress, file=sys.stderr)
        n_workers = min(self.cfg.concurrency, len(todo))
        pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="teacher")
        futures = [pool.submit(self.worker) for _ in range(n_workers)]
        try:
            while wait(futures, timeout=0.5).not_done:  # short waits keep Ctrl-C responsive and the bar current
                self.bar.set_postfix_str(self.activity.describe())
        except KeyboardInterrupt:
            self.stop.set()
            pool.shutdown(wait=True)
            self.bar.close()
            raise
        pool.shutdown(wait=True)
        self.bar.close()
        for f in futures:
            f.result()
        self.summary.failures_by_kind = dict(self.failures)
        if self.fatal:
            self.summary.fatal = str(self.fatal[0])
        return self.summary


class CachedJudge:
    """`judge(record, candidate, reference)` through the store: a judgement is never paid twice.

    `calls` counts the requests made (retries included); a failure after the retries raises TeacherCallError.
    """

    def __init__(self, cfg: TeacherConfig, store: AnchorStore, teacher: Teacher | None = None) -> None:
        self.cfg, self.store = cfg, store
        self.teacher = teacher if teacher is not None else build_teacher(cfg)
        self.calls = 0
        self._budget = Budget(cfg.max_calls)
        self._lock = threading.Lock()

    def _count(self) -> None:
        with self._lock:
            self.calls += 1

    def __call__(self, record: Record, candidate: str, reference: str | None = None) -> float:
        cached = self.store.get_judgement(self.cfg, record, candidate, reference)
        if cached is not None:
            return cached
        try:
            score = call_with_retries(
                lambda: self.teacher.judge(record, candidate, reference), self.cfg, self._budget, on_attempt=self._count
            )
        except OutOfBudget:
            raise TeacherCallError("budget", f"teacher.max_calls={self.cfg.max_calls} judge calls spent") from None
        score = min(1.0, max(0.0, float(score)))
        self.store.put_judgement(self.cfg, record, candidate, reference, score)
        return score


def run_anchors(cfg, progress: bool = True) -> AnchorSummary:
    """Fill `<run_dir>/anchors.sqlite` for the training split (writing RUN/config.yaml as train does) and
    print the summary."""
    from vlrlcd.datasets.load import load_splits
    from vlrlcd.pipeline import ensure_run_dir

    run = ensure_run_dir(cfg)
    records = load_splits(cfg).train
    with AnchorStore(run / STORE_NAME) as store:
        summary = fill_anchors(cfg.teacher, records, store, progress=progress)
    print(summary, flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    from vlrlcd.config import load_config

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print("usage: python -m vlrlcd.teacher.runner CONFIG [key=value ...]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = run_anchors(load_config(argv[0], argv[1:]))
    except VlrlcdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0 if summary.complete else EXIT_INCOMPLETE


if __name__ == "__main__":
    sys.exit(main())
