"""`vlrlcd anchors CONFIG`: fill the anchor store, one teacher call per distinct prompt, ever.

`cfg.concurrency` worker threads take prompts from a shared list; each answer is committed by the
worker that received it before it takes the next prompt, so a killed run has paid for at most
`concurrency` answers it did not keep. Run as `python -m vlrlcd.teacher.runner CONFIG [key=value ...]`.
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

from vlrlcd.datasets.records import Record
from vlrlcd.errors import VlrlcdError
from vlrlcd.teacher import build_teacher
from vlrlcd.teacher.base import Teacher, TeacherCallError
from vlrlcd.teacher.config import TeacherConfig
from vlrlcd.teacher.retry import Budget, OutOfBudget, Stopped, call_with_retries
from vlrlcd.teacher.store import AnchorStore, anchor_key

log = logging.getLogger(__name__)

STORE_NAME = "anchors.sqlite"


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

    @property
    def failed(self) -> int:
        return sum(self.failures_by_kind.values())

    @property
    def budget_exhausted(self) -> bool:
        return self.remaining > 0 and self.max_calls is not None and self.calls >= self.max_calls

    def lines(self) -> list[str]:
        out = [
            f"teacher calls: {self.calls} ({self.retries} retries) in {self.seconds:.1f}s",
            f"answers stored: {self.stored} new, {self.already_stored} already stored, "
            f"of {self.prompts} distinct prompts",
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
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _distinct_prompts(records: list[Record], cfg: TeacherConfig) -> dict[str, Record]:
    """key -> the first record with that prompt, in record order."""
    out: dict[str, Record] = {}
    for r in records:
        out.setdefault(anchor_key(cfg, r), r)
    return out


def fill_anchors(
    cfg: TeacherConfig,
    records: list[Record],
    store: AnchorStore,
    progress: bool = True,
    teacher: Teacher | None = None,
) -> AnchorSummary:
    """Ask the teacher for every distinct prompt without a stored answer; commit each as it arrives.

    `cfg.max_calls` bounds the requests (retries included) of this call; a fatal error (bad key,
    wrong URL) stops the run and raises VlrlcdError after the answers already received are stored.
    """
    from tqdm import tqdm

    start = time.monotonic()
    prompts = _distinct_prompts(records, cfg)
    status = store.statuses(prompts)
    todo = [(k, r) for k, r in prompts.items() if status.get(k) != "ok"]
    summary = AnchorSummary(prompts=len(prompts), already_stored=len(prompts) - len(todo), max_calls=cfg.max_calls)
    if not todo:
        summary.seconds = time.monotonic() - start
        return summary
    teacher = teacher if teacher is not None else build_teacher(cfg)

    budget = Budget(cfg.max_calls)
    stop = threading.Event()
    lock = threading.Lock()
    queue = iter(todo)
    failures: Counter = Counter()
    fatal: list[TeacherCallError] = []
    bar = tqdm(total=len(todo), desc="anchors", unit="prompt", disable=not progress, file=sys.stderr)

    def count(attr: str, n: int = 1) -> None:
        with lock:
            setattr(summary, attr, getattr(summary, attr) + n)

    def fail(key: str, record: Record, kind: str, message: str) -> None:
        store.put_failure(key, record, cfg, kind, message)
        with lock:
            failures[kind] += 1
            summary.failure_examples.setdefault(kind, message[:200])

    def worker() -> None:
        rng = random.Random()
        while True:
            with lock:
                item = next(queue, None)
            if item is None:
                return
            key, record = item
            if stop.is_set():
                count("remaining")
                continue
            try:
                answer = call_with_retries(
                    lambda: teacher.answer(record), cfg, budget, stop, rng,
                    on_attempt=lambda: count("calls"), on_retry=lambda e: count("retries"),
                )
            except (OutOfBudget, Stopped):
                count("remaining")
                continue
            except TeacherCallError as e:
                if e.fatal:
                    with lock:
                        fatal.append(e)
                    stop.set()
                    count("remaining")
                    continue
                fail(key, record, e.kind, str(e))
            except Exception as e:  # a backend bug must not lose the run: recorded, shown in the summary
                log.exception("teacher call for record '%s' raised", record.id)
                fail(key, record, "error", f"{type(e).__name__}: {e}")
            else:
                store.put_answer(key, record, cfg, answer)
                with lock:
                    summary.stored += 1
                    summary.prompt_tokens += answer.prompt_tokens
                    summary.completion_tokens += answer.completion_tokens
            bar.update(1)

    pool = ThreadPoolExecutor(max_workers=min(cfg.concurrency, len(todo)), thread_name_prefix="teacher")
    futures = [pool.submit(worker) for _ in range(min(cfg.concurrency, len(todo)))]
    try:
        while wait(futures, timeout=0.5).not_done:  # short waits keep Ctrl-C responsive
            pass
    except KeyboardInterrupt:
        stop.set()
        pool.shutdown(wait=True)
        bar.close()
        raise
    pool.shutdown(wait=True)
    bar.close()
    for f in futures:
        f.result()
    summary.failures_by_kind = dict(failures)
    summary.seconds = time.monotonic() - start
    if fatal:
        raise VlrlcdError(
            f"teacher stopped: {fatal[0]} ({summary.stored} answers stored this run, {summary.remaining} prompts left)"
        )
    return summary


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


def run_anchors(cfg) -> AnchorSummary:
    """Fill `<run_dir>/anchors.sqlite` for the training split and print the summary."""
    from vlrlcd.datasets.load import load_splits

    records = load_splits(cfg).train
    with AnchorStore(Path(cfg.run_dir) / STORE_NAME) as store:
        summary = fill_anchors(cfg.teacher, records, store)
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
        run_anchors(load_config(argv[0], argv[1:]))
    except VlrlcdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
