"""The anchors' own score on a run's training prompts (summary.json's `anchor_train_score`, as the demo computes
it: every training record scored by its prompt's stored anchor against its reference), for run directories
made before the demo logged it.

    python -m bench.anchor_score RUN [RUN ...]
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import yaml


def anchor_train_score(run: Path) -> tuple[int, float | None]:
    from vlrlcd.config import REMOVED_KEYS, from_dict
    from vlrlcd.datasets.records import read_jsonl
    from vlrlcd.evaluation.chance import anchor_score
    from vlrlcd.teacher.config import TeacherConfig
    from vlrlcd.teacher.store import anchor_key

    raw = dict((yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}).get("teacher") or {})
    for key in REMOVED_KEYS:   # keys older versions wrote into config.yaml
        if key.startswith("teacher."):
            raw.pop(key.split(".", 1)[1], None)
    cfg = from_dict(TeacherConfig, raw, "teacher.")
    records = list(read_jsonl(run / "data" / "train.jsonl"))
    with sqlite3.connect(f"file:{run / 'anchors.sqlite'}?mode=ro", uri=True) as db:
        text = dict(db.execute("SELECT key, text FROM anchors WHERE status = 'ok'").fetchall())
    anchors = {r.id: text[k] for r in records if (k := anchor_key(cfg, r)) in text}
    return len(anchors), anchor_score(records, anchors)


def main(argv: list[str] | None = None) -> int:
    for run in map(Path, argv if argv is not None else sys.argv[1:]):
        n, score = anchor_train_score(run)
        print(f"{run}: {n} anchored training records, anchor score {score:.3f}" if score is not None
              else f"{run}: no anchored training record with a reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
