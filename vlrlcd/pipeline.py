"""The stages a run goes through, as functions the CLI sub-commands and the demo call:
data -> anchors (teacher, once, stored) -> student -> SFT -> RL objective -> evaluation.

Run directory layout (what `vlrlcd report` reads):
  RUN/config.yaml, RUN/data/, RUN/anchors.sqlite, RUN/student_base/ (tiny students only),
  RUN/<method>/{adapter/, metrics.jsonl, rollouts.jsonl, eval.json, predictions.jsonl}, RUN/summary.json
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from vlrlcd.adapters.config import StudentConfig
from vlrlcd.config import Config, save_config
from vlrlcd.datasets.records import Record
from vlrlcd.errors import VlrlcdError

TINY_STUDENTS = ("tiny-llava", "tiny-text")


@dataclass
class Prepared:
    """Everything a training stage needs that is not the student."""

    cfg: Config
    train: list[Record]
    eval: list[Record]
    anchors: dict[str, str]
    teacher_calls: int          # calls made by this run
    anchors_stored: int


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


def prepare(cfg: Config, progress: bool = True) -> Prepared:
    """Load / generate the data and fill the anchor store (the teacher is asked only for new prompts)."""
    from vlrlcd.datasets.load import load_splits
    from vlrlcd.teacher.runner import STORE_NAME, fill_anchors
    from vlrlcd.teacher.store import AnchorStore

    run = ensure_run_dir(cfg)
    splits = load_splits(cfg)
    with AnchorStore(run / STORE_NAME) as store:
        summary = fill_anchors(cfg.teacher, splits.train, store, progress=progress)
        anchors = store.anchors_for(splits.train, cfg.teacher)
    if summary.failed or summary.remaining:
        print(summary, flush=True)
    return Prepared(cfg, splits.train, splits.eval, anchors, summary.calls, len(anchors))


def student_config(prep: Prepared) -> StudentConfig:
    """The student section with a tiny student built (once) into the run directory when asked for."""
    scfg = prep.cfg.student
    if scfg.name_or_path not in TINY_STUDENTS:
        return scfg
    from vlrlcd.adapters.tiny import build_tiny_llava, build_tiny_text

    base = Path(prep.cfg.run_dir) / f"student_base-{scfg.name_or_path}"
    if not (base / "config.json").exists():
        corpus = [r.prompt for r in prep.train + prep.eval] + list(prep.anchors.values())
        corpus += [r.reference for r in prep.train + prep.eval if r.reference]
        build = build_tiny_llava if scfg.name_or_path == "tiny-llava" else build_tiny_text
        tmp = base.with_name(base.name + ".tmp")
        build(tmp, corpus, scfg.tiny, seed=prep.cfg.seed)
        tmp.rename(base)
    return replace(scfg, name_or_path=str(base))


def _eval(student, prep: Prepared, out: Path, progress: bool) -> dict:
    from vlrlcd.evaluation.evaluate import evaluate

    if not prep.eval:
        return {}
    res = evaluate(student, prep.eval, prep.cfg.eval.max_new_tokens, prep.cfg.eval.metric, out, progress)
    return {res.metric: res.value, "n": res.n}


def run_sft(prep: Prepared, name: str = "sft", epochs: float | None = None, init_adapter: Path | None = None,
            progress: bool = True) -> tuple[Path, dict]:
    """Stage I (or `sft2`'s second stage from `init_adapter`); returns (adapter dir, held-out metrics)."""
    from vlrlcd.adapters.loader import load_student
    from vlrlcd.training.sft import sft_items, train_sft

    out = Path(prep.cfg.run_dir) / name
    t0 = time.time()
    student = load_student(student_config(prep), adapter=init_adapter)
    train_sft(student, sft_items(prep.train, prep.anchors), prep.cfg.train, out, prep.cfg.seed, epochs, progress)
    adapter = student.save(out / "adapter")
    metrics = {**_eval(student, prep, out, progress), "seconds": round(time.time() - t0, 1)}
    return adapter, metrics


def run_rl(prep: Prepared, sft_adapter: Path | None, objective: str | None = None,
           progress: bool = True) -> tuple[Path, dict]:
    """Stage II from the SFT adapter (the policy starts from it; the frozen copy is the reference)."""
    from vlrlcd.adapters.loader import load_student
    from vlrlcd.training.rl import train_rl

    cfg = prep.cfg
    tcfg = replace(cfg.train, objective=objective or cfg.train.objective)
    out = Path(cfg.run_dir) / tcfg.objective
    t0 = time.time()
    student = load_student(student_config(prep), adapter=sft_adapter, reference=sft_adapter)
    train_rl(student, prep.train, prep.anchors, tcfg, cfg.ranking, cfg.student.max_new_tokens, out, cfg.seed,
             prep.teacher_calls, progress)
    adapter = student.save(out / "adapter")
    metrics = {**_eval(student, prep, out, progress), "seconds": round(time.time() - t0, 1)}
    return adapter, metrics


def write_summary(run_dir: str | Path, summary: dict) -> Path:
    path = Path(run_dir) / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    tmp.replace(path)
    return path


def format_table(summary: dict) -> str:
    """The summary as a small text table: one row per method."""
    methods = summary.get("methods", {})
    metric_names = sorted({k for m in methods.values() for k in m if k not in ("n", "seconds")})
    header = ["method"] + metric_names + ["seconds"]
    rows = [[name] + [f"{m.get(k, float('nan')):.3f}" if isinstance(m.get(k), (int, float)) else "-" for k in metric_names]
            + [f"{m.get('seconds', 0):.0f}"] for name, m in methods.items()]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out.append(f"teacher calls this run: {summary.get('teacher_calls')}  |  train prompts: "
               f"{summary.get('train_prompts')}  |  held-out prompts: {summary.get('eval_prompts')}  |  "
               f"{summary.get('seconds', 0):.0f}s")
    return "\n".join(out)
