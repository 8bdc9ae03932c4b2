"""The teacher interface, the error every backend raises for one failed call, and answer matching."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from vlrlcd.datasets.records import Record
from vlrlcd.errors import VlrlcdError
from vlrlcd.evaluation.metrics import normalize_answer  # one normalisation: judges agree with exact_match


@dataclass
class TeacherAnswer:
    """One anchor from the teacher, with the token usage the endpoint reported (0 when unknown)."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


@runtime_checkable
class Teacher(Protocol):
    """What every backend offers: one anchor per prompt, and a score in [0, 1] for a candidate."""

    def answer(self, record: Record) -> TeacherAnswer: ...

    def judge(self, record: Record, candidate: str, reference: str | None = None) -> float: ...


class TeacherCallError(Exception):
    """One teacher call failed.

    kind: a short label for the summary (rate_limit, server_error, timeout, connection, malformed,
    empty, client_error, auth, not_found, missing_id, no_reference, unparseable, ...).
    retryable: worth another attempt in this run (with backoff; `retry_after` seconds if the server said so).
    fatal: every later call would fail the same way (bad key, wrong URL): the run stops.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        retryable: bool = False,
        retry_after: float | None = None,
        fatal: bool = False,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable
        self.retry_after = retry_after
        self.fatal = fatal


def token_f1(candidate: str, reference: str) -> float:
    """Token-overlap F1 of the normalised strings: 2PR / (P + R) with multiset overlap."""
    c, r = normalize_answer(candidate).split(), normalize_answer(reference).split()
    if not c or not r:
        return float(c == r)
    common = sum((Counter(c) & Counter(r)).values())
    if common == 0:
        return 0.0
    p, rec = common / len(c), common / len(r)
    return 2 * p * rec / (p + rec)


def reference_score(candidate: str, reference: str) -> float:
    """1.0 for a normalised exact match, else token-overlap F1 (partial credit for captions)."""
    if normalize_answer(candidate) == normalize_answer(reference):
        return 1.0
    return token_f1(candidate, reference)


def resolve_reference(record: Record, reference: str | None) -> str:
    """The given reference, else the record's; a judge with neither is a user error."""
    ref = reference if reference is not None else record.reference
    if ref is None:
        raise VlrlcdError(f"record '{record.id}': no reference to judge against; pass one or add 'reference'")
    return ref


def user_text(record: Record) -> str:
    """The question as the teacher sees it: the prompt, and the choices when the record has them."""
    if record.choices:
        return record.prompt + "\nChoices: " + ", ".join(record.choices)
    return record.prompt


JUDGE_INSTRUCTIONS = (
    "You grade answers. Given a question{ref_clause} and a candidate answer, reply with one integer "
    "from 0 (wrong) to 10 (fully correct) and nothing else."
)


def judge_messages_text(record: Record, candidate: str, reference: str | None) -> tuple[str, str]:
    """(system, user) texts asking a model for a 0-10 grade of `candidate`."""
    system = JUDGE_INSTRUCTIONS.format(ref_clause=", a reference answer" if reference is not None else "")
    user = f"Question: {user_text(record)}\n"
    if reference is not None:
        user += f"Reference answer: {reference}\n"
    user += f"Candidate answer: {candidate}\nGrade (0-10):"
    return system, user


_FIRST_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_grade(text: str) -> float:
    """The first number in a judge's reply as a score in [0, 1]: grades are out of 10."""
    m = _FIRST_NUMBER.search(text or "")
    if m is None:
        raise TeacherCallError("unparseable", f"judge reply has no grade: {text[:80]!r}")
    value = float(m.group())
    if not 0.0 <= value <= 10.0:
        raise TeacherCallError("unparseable", f"judge grade {value} is outside 0-10")
    return value / 10.0
