"""Teacher backends behind one call (`answer`, `judge`), the anchor store, budget and retries."""

from __future__ import annotations

from vlrlcd.teacher.base import Teacher, TeacherAnswer, TeacherCallError
from vlrlcd.teacher.config import TeacherConfig


def build_teacher(cfg: TeacherConfig) -> Teacher:
    """The backend named by `cfg.backend` (heavy libraries imported only for the one chosen)."""
    if cfg.backend == "oracle":
        from vlrlcd.teacher.oracle import OracleTeacher

        return OracleTeacher(cfg)
    if cfg.backend == "openai":
        from vlrlcd.teacher.openai_chat import OpenAITeacher

        return OpenAITeacher(cfg)
    if cfg.backend == "jsonl":
        from vlrlcd.teacher.jsonl_teacher import JsonlTeacher

        return JsonlTeacher(cfg)
    if cfg.backend == "hf":
        from vlrlcd.teacher.hf_teacher import HfTeacher

        return HfTeacher(cfg)
    cfg.validate()  # names the valid backends
    raise AssertionError(cfg.backend)


__all__ = ["Teacher", "TeacherAnswer", "TeacherCallError", "TeacherConfig", "build_teacher"]
