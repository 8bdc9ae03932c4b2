"""The README's results table from several demo runs: `python -m bench.seeds_table RUN_DIR|SUMMARY.json ...`.

Reads each RUN/summary.json (`vlrlcd demo` or `vlrlcd compare`) and prints, per method, the held-out score
on every seed, its difference to SFT with the paired bootstrap 95% interval (from the summary), the mean
score and mean difference over the runs, and on how many runs the interval lies above 0. Markdown out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

_NOT_METRICS = {"n", "seconds", "diff_vs_sft", "diff_low", "diff_high", "diff_n", "stage2_teacher_calls",
                "local_teacher_passes", "teacher_calls"}


def held_out_metric(entry: dict) -> tuple[str, float] | None:
    """(name, value) of the held-out metric of a summary's method entry (not train_*, not bookkeeping)."""
    for k, v in entry.items():
        if k not in _NOT_METRICS and not k.startswith("train_") and isinstance(v, (int, float)):
            return k, float(v)
    return None


def load(run: Path) -> dict:
    """A run directory's summary.json, or a summary file given directly."""
    return json.loads((run if run.is_file() else run / "summary.json").read_text(encoding="utf-8"))


def _costs(run: Path) -> dict[str, str]:
    """method -> "total (stage II)" teacher calls from RUN/compare.json, when the run has one."""
    path = (run.parent if run.is_file() else run) / "compare.json"
    if not path.exists():
        return {}
    out = {}
    for row in json.loads(path.read_text(encoding="utf-8")).get("rows", []):
        extra = f" +{row['local_teacher_passes']} local" if row.get("local_teacher_passes") else ""
        out[row["method"]] = f"{row.get('teacher_calls')} ({row.get('stage2_teacher_calls')}{extra})"
    return out


def table(runs: list[Path]) -> str:
    summaries = [load(r) for r in runs]
    methods: list[str] = []
    for s in summaries:
        methods += [m for m in s.get("methods", {}) if m not in methods]
    seeds = [str(s.get("seed", r.name)) for s, r in zip(summaries, runs)]
    costs = [_costs(r) for r in runs]
    with_cost = any(costs)
    head = ["method"] + [f"seed {x}" for x in seeds] + ["mean", "mean Δ vs SFT", "runs with CI > 0"]
    head += ["teacher calls per run (stage II)"] if with_cost else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        cells, vals, diffs, above = [m], [], [], 0
        for s in summaries:
            e = s.get("methods", {}).get(m)
            hm = held_out_metric(e) if isinstance(e, dict) else None
            if hm is None:
                cells.append("-")
                continue
            vals.append(hm[1])
            if isinstance(e.get("diff_vs_sft"), (int, float)) and m != "sft":
                d, lo, hi = e["diff_vs_sft"], e["diff_low"], e["diff_high"]
                diffs.append(d)
                above += lo > 0
                cells.append(f"{hm[1]:.3f} ({d:+.3f} [{lo:+.3f}, {hi:+.3f}])")
            else:
                cells.append(f"{hm[1]:.3f}")
        cells.append(f"**{sum(vals) / len(vals):.3f}**" if vals else "-")
        cells.append(f"{sum(diffs) / len(diffs):+.3f}" if diffs else "")
        cells.append(f"{above}/{len(diffs)}" if diffs else "")
        if with_cost:
            cells.append(", ".join(c.get(m, "-") for c in costs))
        lines.append("| " + " | ".join(cells) + " |")
    chance = [s.get("chance") for s in summaries if isinstance(s.get("chance"), (int, float))]
    n = [s.get("eval_prompts") for s in summaries]
    lines.append("")
    lines.append(f"held-out prompts per run: {n}" + (f"; chance level: {[round(c, 3) for c in chance]}" if chance else ""))
    calls = [s.get("teacher_calls") for s in summaries]
    lines.append(f"teacher calls per run: {calls}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    runs = [Path(a) for a in (argv if argv is not None else sys.argv[1:])]
    if not runs:
        print("usage: python -m bench.seeds_table RUN_DIR [RUN_DIR ...]", file=sys.stderr)
        return 2
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
