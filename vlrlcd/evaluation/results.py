"""Write an evaluation's results in the run-directory layout the report reads:
RUN/<method>/eval.json {"metric", "value", "n"} and RUN/<method>/predictions.jsonl
{"id", "prompt", "prediction", "reference", "correct"}."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from vlrlcd.datasets.records import Record
from vlrlcd.evaluation.metrics import resolve_metric, score_records


def summary_metric_name(names: set[str]) -> str:
    """"accuracy" for exact match / multiple choice, "caption_attributes" for captions, else "mean_score"."""
    if names <= {"exact_match", "choice"}:
        return "accuracy"
    if names == {"caption_attributes"}:
        return "caption_attributes"
    return "mean_score"


def write_eval_results(out_dir: str | Path, records: Sequence[Record], predictions: Sequence[str],
                       metric: str = "auto") -> dict:
    """Score `predictions` against `records` and write eval.json and predictions.jsonl into
    `out_dir`; returns the eval.json dict. "correct" is a bool for exact match / multiple choice and
    the score in [0, 1] for the caption attribute metric."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = score_records(records, predictions, metric)
    names = [resolve_metric(r, metric) for r in records]
    result = {
        "metric": summary_metric_name(set(names)),
        "value": sum(scores) / len(scores) if scores else 0.0,
        "n": len(scores),
    }
    tmp = out_dir / "predictions.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r, p, s, name in zip(records, predictions, scores, names):
            correct = bool(s == 1.0) if name in ("exact_match", "choice") else s
            row = {"id": r.id, "prompt": r.prompt, "prediction": p, "reference": r.reference, "correct": correct}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(out_dir / "predictions.jsonl")
    (out_dir / "eval.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result
