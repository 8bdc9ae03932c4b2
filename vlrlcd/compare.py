"""`vlrlcd compare CONFIG --objectives a,b,c`: several stage-II objectives from one SFT start at one
teacher budget, as one table of held-out metric, teacher calls and wall time per method.

The data and the anchors are prepared once (the teacher is asked once per prompt), stage I (SFT) runs
once, and every objective starts from that SFT adapter (`run.run_methods`). Writes RUN/compare.csv and
RUN/compare.json after every method (a long run that stops keeps the rows it finished); RUN/summary.json
is the one summary schema (summary.py) that `vlrlcd report` reads.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING

from vlrlcd.errors import VlrlcdError
from vlrlcd.files import atomic_open, write_json
from vlrlcd.summary import Summary
from vlrlcd.training.config import OBJECTIVES

if TYPE_CHECKING:
    from vlrlcd.training.distributed import Dist

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


def compare_result(summary: Summary, names: list[str], run_dir: Path) -> dict:
    """The table so far: {"rows": [sft, then each of `names` that finished or failed, in order],
    "anchor_calls", "teacher_calls_this_run", ...}."""
    rows = []
    for name in ["sft"] + [n for n in names if n != "sft"]:
        if name in summary.errors:
            row = {**{k: None for k in COLUMNS}, "method": name, "error": summary.errors[name]}
        elif name in summary.methods:
            row = method_row(name, summary.methods[name], summary.anchor_calls, run_dir / name)
        else:
            continue
        rows.append(with_diff(row, run_dir))
    return {"rows": rows, "objectives": names, "anchor_calls": summary.anchor_calls,
            "teacher_calls_this_run": summary.teacher_calls, "train_prompts": summary.train_prompts,
            "eval_prompts": summary.eval_prompts, "seed": summary.seed, "seconds": summary.seconds}


def run_compare(cfg, objectives: str | list[str], progress: bool = True, resume: bool = False,
                restart: str | None = None, dist: "Dist | None" = None, jobs: int = 1) -> dict:
    """Prepare once, SFT once, then each objective from the SFT adapter (`run.run_methods`); returns the
    table (`compare_result`), written to RUN/compare.csv and RUN/compare.json after every method.

    With `resume` (implied by `restart`), stages an earlier run finished are reused and an unfinished one
    continues from its newest checkpoint, so an interrupted comparison picks up where it stopped.
    An objective that fails with a user error (VlrlcdError) gets a row with `error` and the others still
    run; anything else propagates. Up to `jobs` objectives train at once (`run.run_methods`).
    """
    from vlrlcd.run import run_methods

    names, run = parse_objectives(objectives), Path(cfg.run_dir)
    result: dict = {}

    def record(name: str, summary: Summary) -> None:
        if dist is None or dist.is_main:
            result.clear()
            result.update(compare_result(summary, names, run))
            write_tables(run, result)

    run_methods(cfg, names, dist, resume, progress, restart=restart, keep_going=True, on_method=record, jobs=jobs)
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
