"""Reference points for a task's scores: the chance level (what an input-blind student scores) and the
anchors' own score on the training prompts (`anchor_score`).

The student may see the question type (it is in the prompt: "What color ...", "What is a + b?") but
not the image or the operands, so for each question type (`meta["qtype"]`; one group when absent) it
gives one constant answer, chosen on the TRAINING split: the training reference with the highest mean
training score under the task's metric (for exact match, the most common training answer; for
captions, the training caption that names most of the training scenes' objects). The chance level is
that answer's mean score on the held-out split.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Sequence

from vlrlcd.datasets.records import Record
from vlrlcd.errors import VlrlcdError
from vlrlcd.evaluation.metrics import score_record


def question_type(record: Record) -> str | None:
    """The group a constant answer is chosen for: `meta["qtype"]`, or None (one group)."""
    q = (record.meta or {}).get("qtype")
    return None if q is None else str(q)


def _signature(record: Record) -> str:
    """What a record's score of a fixed answer depends on: its reference, choices and scene objects."""
    meta = record.meta or {}
    return json.dumps([record.reference, record.choices, meta.get("objects"), meta.get("task"),
                       meta.get("answer_index", meta.get("correct_index"))], sort_keys=True)


def best_constant(train: Sequence[Record], metric: str = "auto") -> str:
    """The training reference with the highest mean score over `train` (ties: the more frequent
    reference, then the alphabetically first)."""
    refs = Counter(r.reference for r in train if r.reference is not None)
    if not refs:
        raise VlrlcdError("no training record has a reference to take a constant answer from")
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in train:
        groups[_signature(r)].append(r)
    reps = [(rs[0], len(rs)) for rs in groups.values()]   # each distinct record once, with its count

    def mean_score(answer: str) -> float:
        return sum(n * score_record(r, answer, metric) for r, n in reps) / len(train)

    return max(sorted(refs), key=lambda a: (mean_score(a), refs[a]))   # max keeps the first of ties


def constant_answers(train: Sequence[Record], metric: str = "auto") -> dict[str | None, str]:
    """The best constant answer per question type of the training split; key None: over all of it
    (the answer for a held-out question type that training never asked)."""
    by_type: dict[str | None, list[Record]] = defaultdict(list)
    for r in train:
        by_type[question_type(r)].append(r)
    answers = {q: best_constant(rs, metric) for q, rs in by_type.items()}
    if None not in answers:
        answers[None] = best_constant(train, metric)
    return answers


def chance_level(train: Sequence[Record], held_out: Sequence[Record], metric: str = "auto") -> float:
    """Mean held-out score of answering every question with its type's best constant training answer."""
    if not held_out:
        raise VlrlcdError("no held-out records to compute a chance level on")
    answers = constant_answers(train, metric)
    scores = [score_record(r, answers.get(question_type(r), answers[None]), metric) for r in held_out]
    return sum(scores) / len(scores)


def anchor_score(train: Sequence[Record], anchors: dict[str, str], metric: str = "auto") -> float | None:
    """Mean score of the teacher's anchors against the training references: the ceiling of any stage II whose
    only signal is agreement with the anchor, to set beside the student's greedy score on the same prompts.
    A diagnostic read after training (like the per-step ranking diagnostics), never a training signal;
    None when no anchored training record has a reference."""
    scores = [score_record(r, anchors[r.id], metric) for r in train if r.id in anchors and r.reference is not None]
    return sum(scores) / len(scores) if scores else None
