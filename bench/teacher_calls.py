"""Teacher calls for N prompts, counted at the teacher: LDL-GRPO (one anchor per prompt, stored) vs the
teacher-as-judge baseline `judge_grpo` (the teacher judges each of the K candidates: N·K).

Both run vlrlcd's own code end to end on a tiny text student: `fill_anchors` into an AnchorStore, then one
epoch of `train_rl` over the N prompts, with the oracle teacher wrapped in a counter. The judge baseline's
judgements go through `CachedJudge` (stored, never paid twice), which only ever lowers its count.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

from bench.models import build
from bench.step_time import student_config


class CountingTeacher:
    """Wraps a Teacher and counts what reaches it: `answer` (anchors) and `judge` (judgements) requests."""

    def __init__(self, inner):
        self.inner = inner
        self.answers = 0
        self.judgements = 0
        self._lock = threading.Lock()

    def answer(self, record):
        with self._lock:
            self.answers += 1
        return self.inner.answer(record)

    def judge(self, record, candidate, reference=None):
        with self._lock:
            self.judgements += 1
        return self.inner.judge(record, candidate, reference)

    @property
    def total(self) -> int:
        return self.answers + self.judgements

    def __getattr__(self, name):
        return getattr(self.inner, name)


def count_calls(n_prompts: int = 8, k: int = 4, batch: int = 4, max_new_tokens: int = 8, seed: int = 0,
                work_dir: str | Path | None = None) -> dict:
    """Teacher requests for one epoch over n_prompts prompts with each method (fresh store each)."""
    from vlrlcd.adapters.loader import load_student
    from vlrlcd.ranking.config import RankingConfig
    from vlrlcd.teacher import TeacherConfig, build_teacher
    from vlrlcd.teacher.runner import CachedJudge, fill_anchors
    from vlrlcd.teacher.store import AnchorStore
    from vlrlcd.training.config import TrainConfig
    from vlrlcd.training.rl import train_rl
    from vlrlcd.training.steps import StepContext

    if n_prompts % batch:
        raise ValueError("n_prompts must be a multiple of batch (one epoch = n_prompts / batch steps)")
    tcfg = TeacherConfig(backend="oracle", seed=seed)
    out: dict = {"n_prompts": n_prompts, "k": k}
    with tempfile.TemporaryDirectory(dir=work_dir) as d:
        w = build("text", d, n_prompts, seed=seed)
        for method in ("ldl_grpo", "judge_grpo"):
            teacher = CountingTeacher(build_teacher(tcfg))
            run = Path(d) / method
            with AnchorStore(run / "anchors.sqlite") as store:
                fill_anchors(tcfg, w.records, store, progress=False, teacher=teacher)
                anchors = store.anchors_for(w.records, tcfg)
                refill = CountingTeacher(build_teacher(tcfg))
                fill_anchors(tcfg, w.records, store, progress=False, teacher=refill)   # a re-run: all stored
                cfg = TrainConfig(objective=method, k=k, batch_size=batch, rl_steps=n_prompts // batch, lr=1e-4)
                ctx = StepContext(step=0, total_steps=cfg.rl_steps, ranking=RankingConfig())
                if method == "judge_grpo":
                    ctx.judge = CachedJudge(tcfg, store, teacher=teacher)
                student = load_student(student_config(w))
                anchor_calls = teacher.total
                train_rl(student, w.records, anchors, cfg, RankingConfig(), max_new_tokens, run / "rl", seed=seed,
                         progress=False, ctx=ctx)
            out[method] = {"anchor_calls": anchor_calls, "rl_calls": teacher.total - anchor_calls,
                           "total": teacher.total, "rerun_anchor_calls": refill.total}
    out["expected"] = {"ldl_grpo": n_prompts, "judge_grpo_judgements": n_prompts * k}
    # The baseline's cost is its N·K judgements (vlrlcd's judge_grpo also stores N anchors to judge against).
    out["ratio"] = out["ldl_grpo"]["total"] / max(1, out["judge_grpo"]["rl_calls"])
    return out
