"""Adding an objective is one class and one registry line: a toy method registered from inside the test trains
through `rl_step` (and the loop around it), with its own plan, passes, loss and step-end hook."""

from __future__ import annotations

import json
import math

import pytest
import torch

from test_steps_common import MAX_NEW, build, policy_and_reference, records, sft_adapter, train_steps
from vlrlcd import methods
from vlrlcd.adapters.config import StudentConfig
from vlrlcd.adapters.loader import load_student
from vlrlcd.config import load_config
from vlrlcd.errors import VlrlcdError
from vlrlcd.methods.base import Method
from vlrlcd.ranking.config import RankingConfig
from vlrlcd.training.config import TrainConfig, objectives
from vlrlcd.training.rl import train_rl
from vlrlcd.training.rollout import RolloutPlan
from vlrlcd.training.steps import StepContext


class BestOfK(Method):
    """Toy: raise the mean token log-prob of the group's best-ranked candidate (3 samples, policy pass only)."""

    def plan(self, cfg, rcfg, record, lockstep):
        return RolloutPlan(3, "anchor", rcfg.score_with)

    def passes(self, cfg):
        return ("policy",)

    def group_loss(self, student, group, passes, cfg, ctx):
        policy = passes["policy"]
        best = int(group.margins.argmax())
        loss = -policy.sequence(True)[best]
        return loss, {"loss": float(loss.detach()), "best": float(best), "tokens": float(policy.mask[best].sum())}

    def step_end(self, ctx, cfg, means):
        ctx.state["hook"] = ctx.state.get("hook", []) + [means["loss"]]


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(methods.REGISTRY, "best_of_k", BestOfK)   # the one registry line
    return "best_of_k"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    base = build("text", root / "student", seed=0)
    adapter = sft_adapter(base, root / "sft", seed=0)
    recs, anchors = records("text", root / "images")
    return base, adapter, recs, anchors


def student_of(setup):
    base, adapter, _, _ = setup
    return load_student(StudentConfig(name_or_path=str(base)), adapter=adapter, reference=adapter)


def test_a_registered_method_is_an_objective_of_the_config(toy):
    assert toy in objectives() and toy in methods.names()
    TrainConfig(objective=toy).validate()
    assert load_config(None, [f"train.objective={toy}"]).train.objective == toy
    with pytest.raises(VlrlcdError, match="is not one of"):
        TrainConfig(objective="no_such_method").validate()


def test_a_toy_method_trains_through_rl_step(toy, setup):
    _, _, recs, anchors = setup
    student = student_of(setup)
    rcfg = RankingConfig()
    ctx = StepContext(step=0, total_steps=2, ranking=rcfg)
    before, ref_before = policy_and_reference(student)
    rows = train_steps(student, recs, anchors, TrainConfig(objective=toy, k=5), rcfg, ctx, steps=2)
    after, ref_after = policy_and_reference(student)
    assert len(rows) == 4 and all(len(r["group"].candidates) == 3 for r in rows)   # its plan, not train.k
    assert all(math.isfinite(r["loss"]) and r["best"] == float(r["group"].margins.argmax()) for r in rows)
    assert max(float((after[n] - before[n]).abs().max()) for n in before) > 1e-6   # the policy moved
    assert all(torch.equal(ref_before[n], ref_after[n]) for n in ref_before)       # the reference did not
    # the step-end hook ran once per step with the step's mean over its groups
    assert ctx.state["hook"] == pytest.approx([(rows[0]["loss"] + rows[1]["loss"]) / 2,
                                               (rows[2]["loss"] + rows[3]["loss"]) / 2])


def test_a_toy_method_runs_in_the_loop(toy, setup, tmp_path):
    _, _, recs, anchors = setup
    cfg = TrainConfig(objective=toy, rl_steps=2, batch_size=2, lr=1e-2, tensorboard=False)
    rows = train_rl(student_of(setup), recs, anchors, cfg, RankingConfig(), MAX_NEW, tmp_path, progress=False)
    assert len(rows) == 2 and all(not r["skipped"] and "best" in r for r in rows)
    assert all(0.0 <= r["unfinished"] <= 1.0 for r in rows)   # the collapse watch's column (training/runaway.py)
    logged = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert len(logged) == 4 and all(len(x["candidates"]) == 3 for x in logged)
