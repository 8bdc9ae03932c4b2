"""Held-out evaluation of a student: greedy answers, scored with the records' metric."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from vlrlcd.adapters.base import StudentAdapter
from vlrlcd.datasets.records import Record
from vlrlcd.evaluation.metrics import resolve_metric, score_record


@dataclass
class EvalResult:
    metric: str
    value: float
    n: int
    predictions: list[dict]

    def to_json(self) -> dict:
        return {"metric": self.metric, "value": self.value, "n": self.n}


@torch.no_grad()
def evaluate(student: StudentAdapter, records: list[Record], max_new_tokens: int, metric: str = "auto",
             out_dir: str | Path | None = None, progress: bool = True) -> EvalResult:
    """Greedy-decode every record and score it; writes OUT/eval.json and OUT/predictions.jsonl."""
    student.model.eval()
    preds, scores = [], []
    for r in tqdm(records, desc="eval", disable=not progress, leave=False):
        answer = student.generate([r], max_new_tokens)[0]
        s = score_record(r, answer, metric)
        scores.append(s)
        preds.append({"id": r.id, "prompt": r.prompt, "prediction": answer, "reference": r.reference,
                      "correct": s})
    names = {resolve_metric(r, metric) for r in records}
    name = "accuracy" if names <= {"exact_match", "choice"} else "/".join(sorted(names))
    result = EvalResult(name, sum(scores) / max(1, len(scores)), len(scores), preds)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(result.to_json(), indent=2), encoding="utf-8")
        with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
            for p in preds:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
    return result
