"""One orchestration for `vlrlcd train`, `demo` and `compare`:

    prepare (data, anchors) -> build the student's base -> SFT -> each stage-II method from the SFT
    adapter -> RUN/summary.json (summary.py)

Under torchrun / accelerate every process calls `run_methods`; process 0 writes the files.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from vlrlcd import pipeline
from vlrlcd.config import Config
from vlrlcd.errors import VlrlcdError
from vlrlcd.student_base import build_student_base
from vlrlcd.summary import Summary

if TYPE_CHECKING:
    from vlrlcd.training.distributed import Dist

OnMethod = Callable[[str, Summary], None]


def stage_names(methods: list[str]) -> list[str]:
    """The stages a run trains: sft first, then each other method once, in order."""
    return ["sft"] + [m for i, m in enumerate(methods) if m != "sft" and m not in methods[:i]]


def run_methods(cfg: Config, methods: list[str], dist: "Dist | None" = None, resume: bool = False,
                progress: bool = True, restart: str | None = None, keep_going: bool = False,
                on_method: OnMethod | None = None, task: str | None = None, quick: bool | None = None,
                jobs: int = 1) -> Summary:
    """Train and evaluate SFT and then each method in `methods` from the SFT adapter; writes RUN/summary.json.

    `resume` (implied by `restart`, a stage to train again) reuses finished stages and continues unfinished
    ones. With `keep_going`, a method that fails with a user error (VlrlcdError) is recorded in
    `Summary.errors` and the others still run. `on_method(name, summary)` runs after each method (sft first);
    the summary's metrics are filled on process 0 only. `task` / `quick` label a demo's summary. With `jobs` > 1
    (one process, no torchrun / accelerate launch) up to `jobs` stage-II methods train at once, each in a worker
    process (stage_pool.py), with the numbers of a sequential run; `on_method` then runs as each finishes."""
    stages = stage_names(methods)
    for name in stages[1:]:  # fail before any work: e.g. tvkd_dpo without a teacher
        replace(cfg.train, objective=name).validate()
    t0, main = time.time(), dist is None or dist.is_main
    resume = resume or restart is not None
    pipeline.begin_stages(cfg, stages, resume, restart, main=main)  # before anything is written
    prep = pipeline.prepare(cfg, progress=progress and main, dist=dist)
    build_base(prep, dist, fresh=not (resume and pipeline.stage_record(Path(cfg.run_dir) / "sft") is not None))
    summary = new_summary(prep, dist)
    summary.task, summary.quick = task, quick
    sft_adapter, summary.methods["sft"] = pipeline.run_sft(prep, progress=progress, resume=resume, dist=dist)
    _done("sft", summary, t0, on_method)
    if jobs > 1 and len(stages) > 2 and (dist is None or not dist.multi):
        _stage_two_parallel(prep, sft_adapter, stages[1:], summary, jobs, progress, resume, keep_going, t0, on_method)
    else:
        for name in stages[1:]:
            try:
                _, summary.methods[name] = pipeline.run_rl(prep, sft_adapter, name, progress=progress,
                                                           resume=resume, dist=dist)
            except VlrlcdError as e:
                if not keep_going:
                    raise
                summary.errors[name] = str(e)
            _done(name, summary, t0, on_method)
    if main:
        summary.write(cfg.run_dir)
    return summary


def _stage_two_parallel(prep: pipeline.Prepared, sft_adapter: Path, names: list[str], summary: Summary, jobs: int,
                        progress: bool, resume: bool, keep_going: bool, t0: float,
                        on_method: OnMethod | None) -> None:
    """The stage-II methods `jobs` at a time in worker processes (stage_pool.py); the summary lists them in
    `names`' order. A user error stops the run (after the methods already running) unless `keep_going`; an
    interrupt raises TrainingInterrupted once every running method has saved its checkpoint."""
    from vlrlcd.stage_pool import train_parallel
    from vlrlcd.training.interrupts import TrainingInterrupted

    failed, stopped = None, None
    results = train_parallel(prep, sft_adapter, names, min(jobs, len(names)), progress, resume)
    for res in results:
        if res.interrupted is not None:
            stopped = stopped or res.interrupted
            continue
        if res.skipped:
            continue
        if res.error is not None:
            summary.errors[res.name] = res.error
            failed = failed or (None if keep_going else res.error)
        else:
            summary.methods[res.name] = res.metrics
        _done(res.name, summary, t0, on_method)
    order = {n: i for i, n in enumerate(["sft", *names])}
    summary.methods = dict(sorted(summary.methods.items(), key=lambda kv: order.get(kv[0], len(order))))
    if stopped is not None:
        stage, step, checkpoint = stopped
        raise TrainingInterrupted(stage, step, None if checkpoint is None else Path(checkpoint))
    if failed is not None:
        raise VlrlcdError(failed)


def _done(name: str, summary: Summary, t0: float, on_method: OnMethod | None) -> None:
    summary.seconds = round(time.time() - t0, 1)
    if on_method is not None:
        on_method(name, summary)


def build_base(prep: pipeline.Prepared, dist: "Dist | None", fresh: bool) -> None:
    """The named step before stage I: a tiny student's base is built once, by process 0 (the others wait);
    with `fresh` (stage I is not being continued) a base built from other settings or data is built again."""
    with (dist.main_first() if dist is not None else nullcontext()):
        if dist is None or dist.is_main:
            build_student_base(prep, rebuild_stale=fresh)


def new_summary(prep: pipeline.Prepared, dist: "Dist | None") -> Summary:
    """The run-level part of the summary (no method yet)."""
    from vlrlcd.evaluation.chance import anchor_score, chance_level
    from vlrlcd.teacher.store import anchor_key

    cfg = prep.cfg
    chance = round(chance_level(prep.train, prep.eval, cfg.eval.metric), 4) if prep.eval else None
    score = anchor_score(prep.train, prep.anchors, cfg.eval.metric)
    return Summary(methods={}, teacher_calls=prep.teacher_calls, anchors_stored=prep.anchors_stored,
                   anchor_calls=len({anchor_key(cfg.teacher, r) for r in prep.train if r.id in prep.anchors}),
                   train_prompts=len(prep.train), distinct_train_prompts=prep.distinct_prompts,
                   eval_prompts=len(prep.eval), chance=chance,
                   anchor_train_score=None if score is None else round(score, 4), seed=cfg.seed,
                   processes=1 if dist is None else dist.world)
