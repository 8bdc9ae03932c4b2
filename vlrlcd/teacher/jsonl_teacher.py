"""The `jsonl` backend: answers produced elsewhere, one JSON line per record id."""

from __future__ import annotations

from pathlib import Path

from vlrlcd.datasets.records import Record
from vlrlcd.datasets.records import iter_json_lines
from vlrlcd.errors import VlrlcdError
from vlrlcd.teacher.base import TeacherAnswer, TeacherCallError, reference_score, resolve_reference
from vlrlcd.teacher.config import TeacherConfig

ANSWER_FIELDS = ("answer", "anchor", "response", "text")


def read_answers(path: str | Path) -> dict[str, str]:
    """id -> answer from lines like {"id": "q1", "answer": "red"} (or "anchor" / "response" / "text")."""
    path = Path(path)
    answers: dict[str, str] = {}
    for lineno, d in iter_json_lines(path, "teacher.jsonl_path "):
        field = next((k for k in ANSWER_FIELDS if isinstance(d, dict) and k in d), None)
        if not isinstance(d, dict) or "id" not in d or field is None:
            raise VlrlcdError(f"{path}:{lineno}: expected {{\"id\": ..., \"answer\": ...}}")
        answers[str(d["id"])] = str(d[field])
    return answers


class JsonlTeacher:
    """Looks answers up by record id; a missing id is a non-retryable failure that names the file and id."""

    def __init__(self, cfg: TeacherConfig) -> None:
        if not cfg.jsonl_path:
            raise VlrlcdError("teacher.backend=jsonl needs teacher.jsonl_path (a JSONL file of {id, answer})")
        self.path = cfg.jsonl_path
        self.answers = read_answers(cfg.jsonl_path)
        self.calls = 0

    def answer(self, record: Record) -> TeacherAnswer:
        self.calls += 1
        if record.id not in self.answers:
            raise TeacherCallError(
                "missing_id",
                f"{self.path} has no answer for record id '{record.id}'; add a line "
                f'{{"id": "{record.id}", "answer": ...}}',
            )
        return TeacherAnswer(self.answers[record.id])

    def judge(self, record: Record, candidate: str, reference: str | None = None) -> float:
        """Against the given reference, else the record's, else the stored answer for its id."""
        if reference is None and record.reference is None and record.id in self.answers:
            reference = self.answers[record.id]
        return reference_score(candidate, resolve_reference(record, reference))
