"""Every objective trains the tiny text student and the tiny LLaVA student for two steps of `rl_step`: the loss is
finite, the policy's LoRA weights move, the frozen SFT (reference) adapter does not."""

from __future__ import annotations

import math

import pytest
import torch

from test_steps_common import build, policy_and_reference, records, sft_adapter, train_steps
from vlrlcd.adapters.config import StudentConfig
from vlrlcd.adapters.loader import load_student
from vlrlcd.ranking.config import RankingConfig
from vlrlcd.teacher.config import TeacherConfig
from vlrlcd.teacher.runner import CachedJudge
from vlrlcd.teacher.store import AnchorStore
from vlrlcd.methods import get_method, names
from vlrlcd.methods.base import Method
from vlrlcd.methods.config import TvkdDpoConfig
from vlrlcd.training.config import OBJECTIVES, TrainConfig
from vlrlcd.training.steps import StepContext

RL_OBJECTIVES = [o for o in OBJECTIVES if o != "sft"]


class VariedJudge:
    """A teacher whose judge gives distinct, deterministic scores (the oracle gives random text 0 everywhere)."""

    def judge(self, record, candidate, reference=None):
        return (sum(map(ord, candidate)) % 7) / 6.0


@pytest.fixture(scope="module", params=["text", "llava"])
def setup(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    base = build(family, root / "student", seed=0)
    teacher = build(family, root / "teacher", seed=1)   # same corpus -> same tokenizer, other weights
    adapter = sft_adapter(base, root / "sft", seed=0)
    recs, anchors = records(family, root / "images")
    return {"family": family, "root": root, "base": base, "teacher": teacher, "adapter": adapter,
            "records": recs, "anchors": anchors}


def test_every_rl_objective_has_a_method():
    assert set(names()) == set(RL_OBJECTIVES)
    assert all(isinstance(get_method(n), Method) and type(get_method(n)).group_loss is not Method.group_loss
               for n in RL_OBJECTIVES)


@pytest.mark.parametrize("objective", RL_OBJECTIVES)
def test_objective_trains_tiny_student(setup, objective, tmp_path):
    student = load_student(StudentConfig(name_or_path=str(setup["base"])), adapter=setup["adapter"],
                           reference=setup["adapter"])
    tcfg = TrainConfig(objective=objective, k=3, beta=0.05,
                       tvkd_dpo=TvkdDpoConfig(teacher=str(setup["teacher"]), topk=8))
    rcfg = RankingConfig(pairs="best_worst")
    ctx = StepContext(step=0, total_steps=2, ranking=rcfg)
    store = None
    if objective == "judge_grpo":
        store = AnchorStore(tmp_path / "anchors.sqlite")
        ctx.judge = CachedJudge(TeacherConfig(), store, teacher=VariedJudge())
    before, ref_before = policy_and_reference(student)
    assert ref_before, "the SFT reference adapter must be loaded beside the policy"
    rows = train_steps(student, setup["records"], setup["anchors"], tcfg, rcfg, ctx, steps=2)
    after, ref_after = policy_and_reference(student)

    assert all(math.isfinite(r["loss"]) for r in rows)
    moved = max(float((after[n] - before[n]).abs().max()) for n in before)
    assert moved > 1e-6, f"{objective}: no LoRA weight moved"
    assert all(torch.equal(ref_before[n], ref_after[n]) for n in ref_before), "the reference adapter moved"

    groups = [r["group"] for r in rows]
    if objective == "sft2":
        assert all(g.candidates == [] for g in groups)
    elif objective in ("single_pair_dpo", "self_ppo"):
        assert all(len(g.candidates) == 1 for g in groups)
    else:
        assert all(len(g.candidates) == 3 for g in groups)
    if objective == "judge_grpo":
        distinct = {(g.record.id, t) for g in groups for t in g.texts}
        assert ctx.judge.calls == len(distinct)
        store.close()
    if objective == "tvkd_dpo":
        assert ctx.state["tvkd_teacher_passes"] >= 1
        assert any(r.get("shaping_chosen", 0.0) != 0.0 for r in rows if r.get("pairs"))
