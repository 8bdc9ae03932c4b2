"""The anchors' own score on a run's training prompts (summary.json's `anchor_train_score`, as the demo computes
it: every training record scored by its prompt's stored anchor against its reference), for run directories
made before the demo logged it.

    python -m bench.anchor_score RUN [RUN ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml


def anchor_train_score(run: Path) -> tuple[int, float | None]:
    """(anchored training records, their anchors' mean score) from RUN/config.yaml's teacher section, RUN's data
    and its anchor store (only the teacher section is read: older runs' other sections may use renamed keys)."""
    from vlrlcd.config import from_dict
    from vlrlcd.datasets.records import read_jsonl
    from vlrlcd.evaluation.chance import anchor_score
    from vlrlcd.teacher.config import TeacherConfig
    from vlrlcd.teacher.store import AnchorStore

    raw = (yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}).get("teacher") or {}
    cfg = from_dict(TeacherConfig, raw, "teacher.")   # removed keys at their old values are skipped with a note
    records = list(read_jsonl(run / "data" / "train.jsonl"))
    store = AnchorStore(run / "anchors.sqlite")
    try:
        anchors = store.anchors_for(records, cfg)
    finally:
        store.close()
    return len(anchors), anchor_score(records, anchors)


def main(argv: list[str] | None = None) -> int:
    for run in map(Path, argv if argv is not None else sys.argv[1:]):
        n, score = anchor_train_score(run)
        print(f"{run}: {n} anchored training records, anchor score {score:.3f}" if score is not None
              else f"{run}: no anchored training record with a reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
