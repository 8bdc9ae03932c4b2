"""`vlrlcd compare CONFIG --objectives a,b,c`: several stage-II objectives from one SFT start at one
teacher budget, as one table of held-out metric, teacher calls and wall time per method.

The data and the anchors are prepared once (the teacher is asked once per prompt), stage I (SFT) runs
once, and every objective starts from that SFT adapter (`pipeline.run_rl`). Writes RUN/compare.csv and
RUN/compare.json after every method (a long run that stops keeps the rows it finished), and merges
the methods into RUN/summary.json for `vlrlcd report`.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import replace
from pathlib import Path

from vlrlcd.errors import VlrlcdError
from vlrlcd.files import atomic_open, write_json
from vlrlcd.training.config import OBJECTIVES

COLUMNS = ("method", "metric", "value", "n", "teacher_calls", "stage2_teacher_calls", "local_teacher_passes",
           "train_seconds", "seconds", "error", "diff_vs_sft", "diff_low", "diff_high", "diff_n")
_NOT_METRICS = ("n", "seconds", "stage2_teacher_calls", "local_teacher_passes", "teacher_calls")


def parse_objectives(objectives: str | list[str]) -> list[str]:
    """'a,b,c' (or a list) -> distinct objective names in order; unknown names are a VlrlcdError."""
    items = objectives.split(",") if isinstance(objectives, str) else list(objectives)
    names: list[str] = []
    for raw in items:
        name = raw.strip()
        if not name or name in names:
            continue
        if name not in OBJECTIVES:
            raise VlrlcdError(f"--objectives: '{name}' is not an objective; choose from {', '.join(OBJECTIVES)}")
        names.append(name)
    if not names:
        raise VlrlcdError("--objectives is empty; give a comma-separated list, e.g. sft2,single_pair_dpo,ldl_grpo")
    return names


def _anchor_calls(prep) -> int:
    """Teacher calls the anchors cost: one per distinct prompt that has a stored anchor."""
    from vlrlcd.teacher.store import anchor_key

    return len({anchor_key(prep.cfg.teacher, r) for r in prep.train if r.id in prep.anchors})


def last_metrics_row(method_dir: Path) -> dict:
    """The last step row of RUN/<method>/metrics.jsonl ({} when there is none): its `seconds` is the
    training time, and the loop keeps cumulative stage-II teacher counters there."""
    from vlrlcd.evaluation.rundir import read_rows

    rows = read_rows(method_dir / "metrics.jsonl").rows
    return rows[-1] if rows else {}


def _count(metrics: dict, last: dict, key: str) -> int:
    v = metrics.get(key, last.get(key, 0))
    return int(v) if isinstance(v, (int, float)) and math.isfinite(v) else 0


def method_row(method: str, metrics: dict, anchor_calls: int, method_dir: Path) -> dict:
    """One table row from the metrics `run_sft` / `run_rl` return and the method's metrics log."""
    names = [k for k in metrics if k not in _NOT_METRICS]
    metric = names[0] if names else None
    last = last_metrics_row(method_dir)
    stage2 = _count(metrics, last, "stage2_teacher_calls")
    seconds = last.get("seconds")
    return {"method": method, "metric": metric, "value": metrics.get(metric) if metric else None,
            "n": metrics.get("n"), "teacher_calls": anchor_calls + stage2, "stage2_teacher_calls": stage2,
            "local_teacher_passes": _count(metrics, last, "local_teacher_passes"),
            "train_seconds": float(seconds) if isinstance(seconds, (int, float)) else None,
            "seconds": metrics.get("seconds"), "error": None}


def with_diff(row: dict, run_dir: Path) -> dict:
    """The row with its paired bootstrap difference against SFT (stats.diff_vs_reference, from the two
    predictions.jsonl files; None where there is none, e.g. for sft itself or a failed method)."""
    from vlrlcd.evaluation.stats import DIFF_KEYS, diff_entry, diff_vs_reference

    d = diff_vs_reference(run_dir, row["method"]) if row.get("error") is None else None
    return {**row, **(diff_entry(d) if d is not None else dict.fromkeys(DIFF_KEYS))}


def write_tables(run_dir: str | Path, result: dict) -> tuple[Path, Path]:
    """RUN/compare.json (the whole result) and RUN/compare.csv (one line per method), written atomically."""
    run = Path(run_dir)
    js, cs = run / "compare.json", run / "compare.csv"
    write_json(js, result, indent=2, fsync=False)
    with atomic_open(cs, newline="", fsync=False) as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        for row in result["rows"]:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
    return js, cs


def _merge_summary(run_dir: Path, result: dict) -> None:
    from vlrlcd.pipeline import write_summary

    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        summary = {}
    if not isinstance(summary, dict):
        summary = {}
    methods = summary.get("methods") if isinstance(summary.get("methods"), dict) else {}
    for row in result["rows"]:
        if row.get("error") is None:
            entry = {"n": row["n"], "seconds": row["seconds"]}   # the shape pipeline.format_table reads
            if row["metric"]:
                entry[row["metric"]] = row["value"]
            methods[row["method"]] = entry
    summary.update({"methods": methods, "teacher_calls": result["teacher_calls_this_run"],
                    "anchors": result["anchor_calls"], "train_prompts": result["train_prompts"],
                    "eval_prompts": result["eval_prompts"]})
    write_summary(run_dir, summary)


def run_compare(cfg, objectives: str | list[str], progress: bool = True, resume: bool = False) -> dict:
    """Prepare once, SFT once, then each objective from the SFT adapter; returns the table as
    {"rows": [one per method, sft first], "anchor_calls", "teacher_calls_this_run", ...}.

    With `resume`, stages an earlier run finished are reused and an unfinished one continues from its
    newest checkpoint (pipeline's resume), so an interrupted comparison picks up where it stopped.
    An objective that fails with a user error (VlrlcdError) gets a row with `error` and the others still
    run; anything else propagates.
    """
    from vlrlcd.pipeline import prepare, run_rl, run_sft

    names = parse_objectives(objectives)
    for name in names:  # fail before any training: e.g. tvkd_dpo without a teacher
        replace(cfg.train, objective=name).validate()
    t0 = time.time()
    prep = prepare(cfg, progress)
    run = Path(cfg.run_dir)
    anchors = _anchor_calls(prep)
    result = {"rows": [], "objectives": names, "anchor_calls": anchors, "teacher_calls_this_run": prep.teacher_calls,
              "train_prompts": len(prep.train), "eval_prompts": len(prep.eval), "seed": cfg.seed, "seconds": 0.0}
    sft_adapter, sft_metrics = run_sft(prep, progress=progress, resume=resume)
    result["rows"].append(with_diff(method_row("sft", sft_metrics, anchors, run / "sft"), run))
    result["seconds"] = round(time.time() - t0, 1)
    write_tables(run, result)
    for name in names:
        if name == "sft":
            continue
        try:
            _, metrics = run_rl(prep, sft_adapter, name, progress=progress, resume=resume)
            row = method_row(name, metrics, anchors, run / name)
        except VlrlcdError as e:
            row = {**{k: None for k in COLUMNS}, "method": name, "error": str(e)}
        result["rows"].append(with_diff(row, run))
        result["seconds"] = round(time.time() - t0, 1)
        write_tables(run, result)
    _merge_summary(run, result)
    return result


def format_compare(result: dict) -> str:
    """The comparison as a text table, one line per method."""
    from vlrlcd.evaluation.stats import entry_diff

    header = ["method", str(next((r["metric"] for r in result["rows"] if r.get("metric")), "metric")),
              "Δ vs SFT [95% CI]", "teacher calls", "stage II calls", "seconds"]

    def num(v, fmt):
        return fmt.format(v) if isinstance(v, (int, float)) and math.isfinite(v) else "-"

    rows = []
    for r in result["rows"]:
        if r.get("error"):
            rows.append([r["method"], "error: " + r["error"][:120], "", "", "", ""])
            continue
        stage2 = num(r["stage2_teacher_calls"], "{}")
        if r.get("local_teacher_passes"):
            stage2 += f" (+{r['local_teacher_passes']} local)"
        rows.append([r["method"], num(r.get("value"), "{:.3f}"), entry_diff(r) or "-", num(r.get("teacher_calls"), "{}"),
                     stage2, num(r.get("seconds"), "{:.0f}")])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    if any(entry_diff(r) for r in result["rows"]):
        out.append("Δ vs SFT: mean per-prompt score difference on the held-out prompts both answered, "
                   "paired bootstrap 95% interval")
    out.append(f"anchors: {result['anchor_calls']} teacher calls (shared by every method; {result['teacher_calls_this_run']} "
               f"made this run)  |  train prompts: {result['train_prompts']}  |  held-out prompts: "
               f"{result['eval_prompts']}  |  {result.get('seconds', 0):.0f}s")
    return "\n".join(out)
