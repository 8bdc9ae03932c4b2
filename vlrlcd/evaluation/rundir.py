"""Tolerant readers for a run directory: a report must work on a half-written or unfinished run.

Layout (written by the training code):
  RUN/summary.json                 {"methods": {name: {metric: value}}, "teacher_calls": .., ...}
  RUN/data/{train,eval}.jsonl      Record JSONL
  RUN/<method>/metrics.jsonl       one line per optimizer step {"stage", "step", "loss", ...}
  RUN/<method>/rollouts.jsonl      {"step", "id", "prompt", "image", "anchor", "candidates", "margins", "target"}
  RUN/<method>/eval.json           {"metric", "value", "n"}
  RUN/<method>/predictions.jsonl   {"id", "prompt", "prediction", "reference", "correct"}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vlrlcd.datasets.records import Record, read_jsonl
from vlrlcd.errors import VlrlcdError
from vlrlcd.files import json_lines

METHOD_FILES = ("metrics.jsonl", "rollouts.jsonl", "eval.json", "predictions.jsonl")


@dataclass
class Rows:
    """Rows of a JSONL file; `skipped` counts lines that were not a JSON object (e.g. a line cut off
    by a run still writing)."""

    rows: list[dict] = field(default_factory=list)
    skipped: int = 0
    exists: bool = False


def read_json(path: Path) -> tuple[dict | None, str | None]:
    """(object, None), or (None, a note saying why not)."""
    if not path.exists():
        return None, f"{path.name} not found"
    try:
        d = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as e:
        return None, f"{path.name} is not valid JSON ({e.msg}, line {e.lineno})"
    if not isinstance(d, dict):
        return None, f"{path.name} does not hold a JSON object"
    return d, None


def read_rows(path: Path) -> Rows:
    """JSON-object lines of a JSONL file; bad lines are counted, not raised."""
    out = Rows(exists=path.exists())
    if not out.exists:
        return out
    for line in json_lines(path):
        if isinstance(line.value, dict):
            out.rows.append(line.value)
        else:
            out.skipped += 1
    return out


def method_names(run_dir: Path, summary: dict | None) -> list[str]:
    """Methods in summary order, then any other sub-folder holding one of the per-method files."""
    names: list[str] = []
    methods = (summary or {}).get("methods")
    if isinstance(methods, dict):
        names += [str(m) for m in methods]
    if run_dir.is_dir():
        for d in sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name != "data"):
            if d.name not in names and any((d / f).exists() for f in METHOD_FILES):
                names.append(d.name)
    return names


def read_records(path: Path) -> tuple[dict[str, Record], str | None]:
    """Records by id from a Record JSONL (image paths resolved), or ({}, a note)."""
    if not path.exists():
        return {}, None
    try:
        return {r.id: r for r in read_jsonl(path)}, None
    except VlrlcdError as e:
        return {}, str(e)


def resolve_image(run_dir: Path, image: str | None) -> Path | None:
    """A rollout's image path: absolute, relative to RUN, to RUN/data, or to the working directory."""
    if not image:
        return None
    p = Path(image)
    if p.is_absolute():
        return p
    for cand in (run_dir / p, run_dir / "data" / p, p):
        if cand.exists():
            return cand
    return run_dir / p
