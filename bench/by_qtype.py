"""Held-out score per question type and method of a shapes-VQA run, beside the share of the type's most
frequent predicted answer: `python -m bench.by_qtype RUN_DIR [RUN_DIR ...]` (markdown out).

A method whose gain sits on types where it answers one constant is moving its guesses, not what it sees.
Question types come from RUN/data/eval.jsonl (meta.qtype).
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path


def qtypes(run: Path) -> dict[str, str]:
    out = {}
    for line in (run / "data" / "eval.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        out[r["id"]] = (r.get("meta") or {}).get("qtype", "?")
    return out


def method_rows(run: Path, method: str, types: dict[str, str]) -> dict[str, tuple[float, float, int]]:
    """qtype -> (mean score, share of the most frequent prediction, n)."""
    by: dict[str, list[dict]] = defaultdict(list)
    for line in (run / method / "predictions.jsonl").read_text(encoding="utf-8").splitlines():
        p = json.loads(line)
        by[types.get(p["id"], "?")].append(p)
    out = {}
    for qt, rows in sorted(by.items()):
        top = Counter(r["prediction"] for r in rows).most_common(1)[0][1]
        out[qt] = (sum(float(r["correct"]) for r in rows) / len(rows), top / len(rows), len(rows))
    return out


def table(runs: list[Path]) -> str:
    lines = []
    for run in runs:
        types = qtypes(run)
        methods = [m for m in ("sft", "sft2", "single_pair_dpo", "anchor_rank_dpo", "ldl_grpo")
                   if (run / m / "predictions.jsonl").exists()]
        per = {m: method_rows(run, m, types) for m in methods}
        kinds = sorted({k for v in per.values() for k in v})
        lines.append(f"{run}: held-out score (share of the most frequent answer)")
        lines.append("| method | " + " | ".join(kinds) + " |")
        lines.append("|---|" + "---|" * len(kinds))
        for m in methods:
            cells = [f"{per[m][k][0]:.3f} ({per[m][k][1]:.2f})" if k in per[m] else "-" for k in kinds]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    runs = [Path(a) for a in (argv if argv is not None else sys.argv[1:])]
    if not runs:
        print("usage: python -m bench.by_qtype RUN_DIR [RUN_DIR ...]", file=sys.stderr)
        return 2
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
