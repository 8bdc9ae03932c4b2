"""The `hf` backend: a local Hugging Face model (text or vision-language) answering greedily through
the adapters code (`vlrlcd.adapters.loader.load_base`, no LoRA: the plain frozen model in eval mode), so any
checkpoint a student can be, a teacher can be too."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from vlrlcd.datasets.records import Record
from vlrlcd.teacher.base import TeacherAnswer, TeacherCallError, judge_messages_text, parse_grade, user_text
from vlrlcd.teacher.config import TeacherConfig


@dataclass
class _Query:
    prompt: str
    image: str | None


class HfTeacher:
    """Greedy decoding with at most `cfg.max_tokens` new tokens; one generation at a time (a lock)."""

    def __init__(self, cfg: TeacherConfig) -> None:
        from vlrlcd.adapters.base import StudentAdapter
        from vlrlcd.adapters.config import StudentConfig
        from vlrlcd.adapters.loader import load_base

        self.cfg = cfg
        model, processor, tokenizer, family = load_base(StudentConfig(name_or_path=cfg.model, quantization=cfg.quantization))
        model.eval()
        model.requires_grad_(False)
        self.adapter = StudentAdapter(model, processor, tokenizer, family, cfg.model)
        self._lock = threading.Lock()
        self.calls = 0

    def _generate(self, prompt: str, image: str | None) -> str:
        with self._lock:
            self.calls += 1
            text = self.adapter.generate([_Query(prompt, image)], self.cfg.max_tokens)[0].strip()
        if not text:
            raise TeacherCallError("empty", "the local teacher generated nothing")
        return text

    def answer(self, record: Record) -> TeacherAnswer:
        text = self._generate(user_text(record), record.image)
        return TeacherAnswer(text, completion_tokens=len(self.adapter.encode_response(text, add_eos=False)))

    def judge(self, record: Record, candidate: str, reference: str | None = None) -> float:
        ref = reference if reference is not None else record.reference
        system, text = judge_messages_text(record, candidate, ref)
        return parse_grade(self._generate(system + "\n" + text, record.image))
