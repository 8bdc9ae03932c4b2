"""The rule-based teacher for synthetic tasks: it knows the generator's answer (`record.reference`).

Noise for realism, decided per (seed, record id) by a hash-seeded RNG, so the anchor does not depend
on call order or concurrency: with probability `error_rate` a wrong answer of the same kind, with
probability `paraphrase_rate` the answer wrapped in a phrase ("it is red", "The answer is red").
"""

from __future__ import annotations

import hashlib
import random
import re
import threading

from vlrlcd.datasets.records import Record
from vlrlcd.teacher.base import (
    TeacherAnswer,
    TeacherCallError,
    normalize_answer,
    reference_score,
    resolve_reference,
)
from vlrlcd.teacher.config import TeacherConfig

PARAPHRASES = ("it is {a}", "{a}.", "The answer is {a}", "I think it is {a}.", "{A}!")
# The frames above as the judge strips them again before comparing (after normalisation).
_FRAMES = re.compile(r"^(?:i think )?(?:it is |answer is |its )?(.*)$")


def record_rng(seed: int, record_id: str) -> random.Random:
    """An RNG that depends only on (seed, record id)."""
    digest = hashlib.sha256(f"oracle:{seed}:{record_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def wrong_answer(record: Record, reference: str, rng: random.Random) -> str:
    """A wrong answer of the same kind: a listed distractor, another choice, a nearby number, shuffled words."""
    pool = [d for d in record.meta.get("distractors") or [] if str(d) != reference]
    if not pool and record.choices:
        pool = [c for c in record.choices if c != reference]
    if pool:
        return str(rng.choice(pool))
    if re.fullmatch(r"-?\d+", reference.strip()):
        return str(int(reference) + rng.choice([-3, -2, -1, 1, 2, 3]))
    words = reference.split()
    if len(set(words)) > 1:
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        return " ".join(shuffled)
    return "not " + reference


def paraphrase(answer: str, rng: random.Random) -> str:
    template = rng.choice(PARAPHRASES)
    return template.format(a=answer, A=answer[:1].upper() + answer[1:])


def strip_frames(normalized: str) -> str:
    """Undo the paraphrase frames on an already normalised answer."""
    return _FRAMES.match(normalized).group(1)


class OracleTeacher:
    """Answers with the reference, noised per `error_rate` / `paraphrase_rate`; counts its calls."""

    def __init__(self, cfg: TeacherConfig) -> None:
        self.cfg = cfg
        self.calls = 0
        self._lock = threading.Lock()

    def answer(self, record: Record) -> TeacherAnswer:
        with self._lock:
            self.calls += 1
        if record.reference is None:
            raise TeacherCallError("no_reference", f"record '{record.id}' has no reference for the oracle teacher")
        rng = record_rng(self.cfg.seed, record.id)
        u_error, u_para = rng.random(), rng.random()  # always both: each decision independent of the other rate
        text = wrong_answer(record, record.reference, rng) if u_error < self.cfg.error_rate else record.reference
        if u_para < self.cfg.paraphrase_rate:
            text = paraphrase(text, rng)
        return TeacherAnswer(text=text, prompt_tokens=len(record.prompt.split()), completion_tokens=len(text.split()))

    def judge(self, record: Record, candidate: str, reference: str | None = None) -> float:
        """Normalised exact match (paraphrase frames ignored) -> 1.0, else token-overlap F1."""
        ref = resolve_reference(record, reference)
        c, r = strip_frames(normalize_answer(candidate)), strip_frames(normalize_answer(ref))
        return reference_score(c, r)
