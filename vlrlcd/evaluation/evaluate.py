"""Held-out evaluation of a student: greedy answers, scored with the records' metric."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from vlrlcd.adapters.base import StudentAdapter
from vlrlcd.datasets.records import Record
from vlrlcd.errors import VlrlcdError
from vlrlcd.evaluation.config import EvalConfig
from vlrlcd.evaluation.metrics import resolve_metric, score_record
from vlrlcd.files import atomic_open, write_json
from vlrlcd.progress import bar as progress_bar


@dataclass
class EvalResult:
    metric: str
    value: float
    n: int
    predictions: list[dict]

    def to_json(self) -> dict:
        return {"metric": self.metric, "value": self.value, "n": self.n}


def chunks(items: list, size: int) -> list[list]:
    """`items` in consecutive chunks of at most `size` (>= 1)."""
    if size < 1:
        raise VlrlcdError(f"eval.batch_size must be >= 1, got {size}")
    return [items[i:i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def greedy_answers(student: StudentAdapter, records: list[Record], max_new_tokens: int, batch_size: int,
                   progress: bool = True) -> list[str]:
    """Greedy answers, `batch_size` records per batched decode, with a progress bar over records."""
    answers: list[str] = []
    with progress_bar(total=len(records), desc="eval", unit="prompt", disable=not progress, leave=False) as bar:
        for chunk in chunks(records, batch_size):
            answers += student.generate(chunk, max_new_tokens, batch_size=len(chunk))
            bar.update(len(chunk))
    return answers


@torch.no_grad()
def evaluate(student: StudentAdapter, records: list[Record], max_new_tokens: int, metric: str = "auto",
             out_dir: str | Path | None = None, progress: bool = True,
             answers: list[str] | None = None, batch_size: int = EvalConfig.batch_size) -> EvalResult:
    """Greedy-decode every record, `batch_size` at a time (unless its `answers` are given), and score it; writes
    OUT/eval.json and OUT/predictions.jsonl."""
    student.model.eval()
    if answers is not None and len(answers) != len(records):
        raise ValueError(f"{len(answers)} answers for {len(records)} records")
    names = {resolve_metric(r, metric) for r in records}  # an unscorable record fails before any decoding
    if answers is None:
        answers = greedy_answers(student, records, max_new_tokens, batch_size, progress)
    preds, scores = [], []
    for r, answer in zip(records, answers):
        s = score_record(r, answer, metric)
        scores.append(s)
        preds.append({"id": r.id, "prompt": r.prompt, "prediction": answer, "reference": r.reference,
                      "correct": s})
    name = "accuracy" if names <= {"exact_match", "choice"} else "/".join(sorted(names))
    result = EvalResult(name, sum(scores) / max(1, len(scores)), len(scores), preds)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_open(out / "predictions.jsonl") as f:   # predictions first: eval.json marks them complete
            for p in preds:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
        write_json(out / "eval.json", result.to_json(), indent=2)
    return result


@torch.no_grad()
def generate_sharded(student: StudentAdapter, records: list[Record], max_new_tokens: int, dist,
                     batch_size: int = EvalConfig.batch_size) -> list[str] | None:
    """Greedy answers to `records`, each process decoding records i ≡ rank (mod world), `batch_size` per
    batched decode, in lockstep (every process makes the same number of calls of the same sizes: short shards
    repeat their first record); every answer on process 0, None on the others."""
    student.model.eval()
    n, per = len(records), -(-len(records) // dist.world)
    mine = dist.shard(n)
    slots = mine + [mine[0] if mine else 0] * (per - len(mine))
    answers: list[str] = []
    for chunk in chunks(slots, batch_size):
        answers += student.generate([records[i] for i in chunk], max_new_tokens, batch_size=len(chunk))
    parts = dist.all_gather(list(zip(mine, answers[: len(mine)])))
    if not dist.is_main:
        return None
    by_index = dict(pair for part in parts for pair in part)
    return [by_index[i] for i in range(n)]
