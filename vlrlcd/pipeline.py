"""The stages a run goes through, as functions `run.run_methods` calls in order:
data -> anchors (teacher, once, stored) -> student base (student_base.py) -> SFT -> RL objective -> evaluation.

Run directory layout (what `vlrlcd report` reads):
  RUN/config.yaml, RUN/data/, RUN/anchors.sqlite, RUN/student_base/ (tiny students only),
  RUN/<method>/{adapter/, metrics.jsonl, rollouts.jsonl, eval.json, predictions.jsonl}, RUN/summary.json
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from vlrlcd.config import Config, save_config
from vlrlcd.datasets.records import Record
from vlrlcd.errors import VlrlcdError
from vlrlcd.files import write_json
from vlrlcd.student_base import built_student_config, student_identity

if TYPE_CHECKING:
    from vlrlcd.training.distributed import Dist

STAGE_FILE = "stage.json"   # RUN/<stage>/stage.json: written last, when the stage (training + eval) is done
INPUTS_FILE = "inputs.json"  # RUN/<stage>/inputs.json: what the stage is trained from, written when it starts


@dataclass
class Prepared:
    """Everything a training stage needs that is not the student."""

    cfg: Config
    train: list[Record]
    eval: list[Record]
    anchors: dict[str, str]
    teacher_calls: int          # calls made by this run
    anchors_stored: int
    distinct_prompts: int       # distinct (prompt, image) pairs in the training split: the most calls ever needed
    progress: bool = True       # show progress bars (e.g. while a tiny base is pretrained)


def ensure_run_dir(cfg: Config) -> Path:
    run = Path(cfg.run_dir)
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise VlrlcdError(f"cannot write to run directory {run}: {e.strerror or e}; choose another --out / run_dir") from None
    save_config(cfg, run / "config.yaml")
    return run


def prepare(cfg: Config, progress: bool = True, dist: Dist | None = None) -> Prepared:
    """Load / generate the data and fill the anchor store (the teacher is asked only for new prompts).

    With several processes, process 0 does the work first; the others then read the cached data and the
    stored anchors (they never call the teacher)."""
    from vlrlcd.datasets.load import load_splits
    from vlrlcd.teacher.runner import STORE_NAME, fill_anchors
    from vlrlcd.teacher.store import AnchorStore, anchor_key

    main = dist is None or dist.is_main
    with (dist.main_first() if dist is not None else nullcontext()):
        run = ensure_run_dir(cfg) if main else Path(cfg.run_dir)
        splits = load_splits(cfg)
        with AnchorStore(run / STORE_NAME) as store:
            summary = fill_anchors(cfg.teacher, splits.train, store, progress=progress) if main else None
            anchors = store.anchors_for(splits.train, cfg.teacher)
    if summary is not None and (summary.failed or summary.remaining):
        print(summary, flush=True)
    for note in getattr(splits, "notes", []) if main else []:
        print(note, flush=True)
    distinct = len({anchor_key(cfg.teacher, r) for r in splits.train})
    return Prepared(cfg, splits.train, splits.eval, anchors, summary.calls if summary else 0, len(anchors), distinct,
                    progress and main)


def _eval(student, prep: Prepared, out: Path, progress: bool, answers: list[str] | None = None) -> dict:
    from vlrlcd.evaluation.evaluate import evaluate

    if not prep.eval:
        return {}
    ecfg = prep.cfg.eval
    res = evaluate(student, prep.eval, ecfg.max_new_tokens, ecfg.metric, out, progress, answers,
                   batch_size=ecfg.batch_size)
    metrics = {res.metric: res.value, "n": res.n}
    if ecfg.train_prompts and answers is None:  # the same greedy score on training prompts: fit vs generalisation
        seen = evaluate(student, prep.train[: ecfg.train_prompts], ecfg.max_new_tokens, ecfg.metric, None, progress,
                        batch_size=ecfg.batch_size)
        metrics[f"train_{seen.metric}"] = seen.value
    return metrics


def start_key(init_adapter: Path | None, seed: int) -> str:
    """What a stage starts from: a fresh (seeded) adapter, or the exact bytes of an earlier stage's adapter."""
    if init_adapter is None:
        return f"fresh-seed-{seed}"
    weights = Path(init_adapter) / "adapter_model.safetensors"
    if not weights.exists():
        return str(init_adapter)
    return hashlib.sha1(weights.read_bytes()).hexdigest()[:16]


def finished_stage(stage_dir: Path, start: str | None = None) -> dict | None:
    """The record of a stage an earlier run finished (adapter saved and evaluated) from the same start
    (`start_key`), else None."""
    path = stage_dir / STAGE_FILE
    if not path.exists() or not (stage_dir / "adapter" / "adapter_config.json").exists():
        return None
    done = _read_json(path)
    if done is None or not done.get("done", True):
        return None
    return done if start is None or done.get("start") == start else None


def _read_json(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def stage_record(stage_dir: Path) -> dict | None:
    """What an earlier run recorded for this stage: stage.json when it finished, else inputs.json (written when
    it started) if a checkpoint followed; None when nothing was kept. A record this version cannot check
    (unreadable, or from an older vlrlcd) comes back as {} — as do checkpoints with no record beside them."""
    from vlrlcd.training.checkpoint import latest_checkpoint

    progress = latest_checkpoint(stage_dir) is not None
    for name in (STAGE_FILE, INPUTS_FILE):
        path = stage_dir / name
        if path.exists() and (name == STAGE_FILE or progress):
            rec = _read_json(path)
            return rec if rec is not None and isinstance(rec.get("inputs"), dict) else {}
    return {} if progress else None


def stage_config_inputs(cfg: Config, name: str) -> dict:
    """The config keys stage `name` reads: "sft" is stage I, anything else the stage-II objective of that name."""
    from vlrlcd.training.digest import rl_inputs, sft_inputs

    return sft_inputs(cfg) if name == "sft" else rl_inputs(cfg, name)


def check_stage(stage_dir: Path, inputs: dict, derived: bool = True) -> dict | None:
    """On resume: the stage's record when its recorded inputs equal `inputs` (continue or reuse it), None when
    it never started; otherwise a VlrlcdError naming the keys that changed. `derived=False` compares the config
    keys only (before the data and anchors are loaded)."""
    from vlrlcd.training.digest import changed_keys, describe_changes

    rec = stage_record(stage_dir)
    if rec is None:
        return None
    name, run = stage_dir.name, stage_dir.parent
    again = (f"rerun with --restart-stage {name} to train it{' and the stages after it' if name == 'sft' else ''} "
             f"again, or use a new run_dir")
    if not rec:
        raise VlrlcdError(f"{stage_dir}: no record of the settings this stage was trained with (an older vlrlcd, or "
                          f"a damaged {STAGE_FILE}), so --resume cannot tell whether it still fits; {again}")
    keys = changed_keys(rec["inputs"], inputs, derived=derived)
    if keys:
        raise VlrlcdError(f"{name}: the settings changed since an earlier run trained this stage in {run} "
                          f"({describe_changes(rec['inputs'], inputs, keys)}); {again}")
    return rec


def restart_stages(stages: list[str], restart: str | None) -> list[str]:
    """The stages `--restart-stage NAME` trains again: NAME, and every stage when NAME is the first (stage I,
    which all the others start from)."""
    if restart is None:
        return []
    if restart not in stages:
        raise VlrlcdError(f"--restart-stage {restart}: not a stage of this run; its stages are {', '.join(stages)}")
    return list(stages) if restart == stages[0] else [restart]


def begin_stages(cfg: Config, stages: list[str], resume: bool, restart: str | None = None,
                 main: bool = True) -> None:
    """Before any data is loaded or file written: with `resume` (implied by `restart`), check each stage that
    will be continued or reused against this config (a VlrlcdError names the changed keys); then forget the
    stages that start over (process 0): every stage without resume, else `restart_stages(stages, restart)`."""
    resume = resume or restart is not None
    again = restart_stages(stages, restart) if resume else list(stages)
    for name in stages:
        if name not in again:
            check_stage(Path(cfg.run_dir) / name, stage_config_inputs(cfg, name), derived=False)
    if main:
        reset_stages(cfg, again)


def reset_stages(cfg: Config, names: list[str]) -> None:
    """Forget earlier runs' progress in these stages (records, checkpoints): a run started without
    --resume must never be resumed into an older run's stages later."""
    from vlrlcd.training.checkpoint import clear_checkpoints

    for name in names:
        stage = Path(cfg.run_dir) / name
        (stage / STAGE_FILE).unlink(missing_ok=True)
        (stage / INPUTS_FILE).unlink(missing_ok=True)
        clear_checkpoints(stage)


def _prior_seconds(stage_dir: Path, resume: bool) -> float:
    """Training seconds spent by earlier runs up to the checkpoint a resumed stage continues from."""
    from vlrlcd.training.checkpoint import latest_checkpoint, read_meta

    latest = latest_checkpoint(stage_dir) if resume else None
    try:
        return float(read_meta(latest).get("elapsed", 0.0)) if latest else 0.0
    except (OSError, ValueError, TypeError, AttributeError):  # a damaged meta.json: the resume itself says so
        return 0.0


def _stage_inputs(prep: Prepared, name: str, start: str) -> tuple[dict, dict]:
    """(training inputs, evaluation inputs) of stage `name` in this run: its config keys, the student's base,
    the training records and anchors and the start; the eval section and the held-out records."""
    from vlrlcd.training.digest import anchors_digest, eval_inputs, records_digest

    cfg, run = prep.cfg, prep.cfg.run_dir
    train = {**stage_config_inputs(cfg, name), "student.base": student_identity(cfg),
             "data.train_records": records_digest(prep.train, run), "anchors": anchors_digest(prep.anchors),
             "start": start}
    return train, {**eval_inputs(cfg), "data.eval_records": records_digest(prep.eval, run)}


def _evaluate_stage(student, prep: Prepared, out: Path, dist: "Dist | None", progress: bool) -> dict:
    """Held-out metrics of `student` (process 0; every process generates when the base is sharded)."""
    answers = None
    if dist is not None and dist.sharded and prep.eval:  # sharded: every process takes part in the evaluation
        from vlrlcd.evaluation.evaluate import generate_sharded

        answers = generate_sharded(student, prep.eval, prep.cfg.eval.max_new_tokens, dist, prep.cfg.eval.batch_size)
    return _eval(student, prep, out, progress, answers) if dist is None or dist.is_main else {}


def _run_stage(prep: Prepared, out: Path, train, load, resume: bool, dist: "Dist | None",
               progress: bool, inputs: dict, evals: dict) -> tuple[Path, dict]:
    """Load the student, train it (`train(student, continuing)`), save and evaluate on process 0, mark the
    stage done. With `resume`, a stage recorded with the same `inputs` is reused when finished (evaluated again
    when `evals` changed) and continued from its newest checkpoint when not; other inputs are an error."""
    from vlrlcd.adapters.loader import load_student
    from vlrlcd.training.digest import changed_keys, describe_changes, digest_of

    main = dist is None or dist.is_main
    rec = check_stage(out, inputs) if resume else None
    if dist is not None:
        dist.barrier()  # every process has read the record before process 0 writes a new one
    record = {"start": inputs["start"], "digest": digest_of(inputs), "inputs": inputs}
    if rec is not None and rec.get("done") and (out / "adapter" / "adapter_config.json").exists():
        metrics = rec.get("metrics", {})
        if rec.get("eval_digest") == digest_of(evals):
            if main:
                print(f"{out.name}: finished by an earlier run; using {out / 'adapter'}", flush=True)
            return out / "adapter", metrics
        if main:
            old = rec.get("eval_inputs") or {}
            print(f"{out.name}: finished by an earlier run; evaluating {out / 'adapter'} again "
                  f"({describe_changes(old, evals, changed_keys(old, evals))})", flush=True)
        student = load_student(built_student_config(prep.cfg), adapter=out / "adapter", **_placement(dist))
        if dist is not None:
            dist.prepare_student(student)
        metrics = {**_evaluate_stage(student, prep, out, dist, progress), "seconds": metrics.get("seconds")}
        if main:
            write_json(out / STAGE_FILE, {"done": True, **record, "eval_digest": digest_of(evals),
                                           "eval_inputs": evals, "metrics": metrics})
        if dist is not None:
            dist.barrier()
        return out / "adapter", metrics if main else {}
    continuing = rec is not None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / STAGE_FILE).unlink(missing_ok=True)
        write_json(out / INPUTS_FILE, record)
    t0, prior = time.time(), _prior_seconds(out, continuing)
    student = load()
    if dist is not None:
        dist.prepare_student(student)  # FSDP: shard the frozen base, decode in lockstep
    train(student, continuing)
    adapter, metrics = out / "adapter", {}
    if main:
        student.save(adapter)
    metrics = _evaluate_stage(student, prep, out, dist, progress)
    if main:
        metrics = {**metrics, "seconds": round(time.time() - t0 + prior, 1)}
        write_json(out / STAGE_FILE, {"done": True, **record, "eval_digest": digest_of(evals), "eval_inputs": evals,
                                       "metrics": metrics})
    if dist is not None:
        dist.barrier()
    return adapter, metrics


def _placement(dist: "Dist | None") -> dict:
    """load_student arguments for a sharded launch: load on CPU, let the Dist partition the base (ZeRO-3)."""
    if dist is None or not dist.sharded:
        return {}
    return {"on_cpu": True, "prepare_base": dist.prepare_base}


def run_sft(prep: Prepared, name: str = "sft", epochs: float | None = None, init_adapter: Path | None = None,
            progress: bool = True, resume: bool = False, dist: "Dist | None" = None) -> tuple[Path, dict]:
    """Stage I (or `sft2`'s second stage from `init_adapter`); returns (adapter dir, held-out metrics;
    empty on processes other than 0)."""
    from vlrlcd.adapters.loader import load_student
    from vlrlcd.training.common import seed_everything
    from vlrlcd.training.sft import sft_items, train_sft

    cfg = prep.cfg
    out = Path(cfg.run_dir) / name
    inputs, evals = _stage_inputs(prep, name, start_key(init_adapter, cfg.seed))
    if epochs is not None:
        inputs["train.sft_epochs"] = float(epochs)

    def load():
        seed_everything(cfg.seed)  # a fresh adapter's initialisation must not depend on what ran before
        return load_student(built_student_config(prep.cfg), adapter=init_adapter, **_placement(dist))

    def train(student, continuing: bool):
        items = sft_items(prep.train, prep.anchors, copy_pairs=cfg.train.sft_copy_pairs, seed=cfg.seed)
        train_sft(student, items, cfg.train, out, cfg.seed, epochs, progress, resume=continuing, dist=dist)

    return _run_stage(prep, out, train, load, resume, dist, progress, inputs, evals)


def run_rl(prep: Prepared, sft_adapter: Path | None, objective: str | None = None,
           progress: bool = True, resume: bool = False, dist: "Dist | None" = None) -> tuple[Path, dict]:
    """Stage II from the SFT adapter (the policy starts from it; the frozen copy is the reference)."""
    from vlrlcd.adapters.loader import load_student
    from vlrlcd.training.rl import train_rl
    from vlrlcd.training.steps import make_context

    cfg = prep.cfg
    tcfg = replace(cfg.train, objective=objective or cfg.train.objective)
    out = Path(cfg.run_dir) / tcfg.objective

    def load():
        return load_student(built_student_config(prep.cfg), adapter=sft_adapter, reference=sft_adapter, **_placement(dist))

    def train(student, continuing: bool):
        ctx = make_context(cfg, tcfg)  # a stored judge for judge_grpo
        try:
            train_rl(student, prep.train, prep.anchors, tcfg, cfg.ranking, cfg.student.max_new_tokens, out,
                     cfg.seed, prep.teacher_calls, progress, resume=continuing, dist=dist, ctx=ctx)
        finally:
            ctx.close()

    inputs, evals = _stage_inputs(prep, tcfg.objective, start_key(sft_adapter, cfg.seed))
    return _run_stage(prep, out, train, load, resume, dist, progress, inputs, evals)
