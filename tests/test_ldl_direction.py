"""LDL-GRPO moves the policy toward D_x: one optimizer step on a fixed group raises the log-probability of
the high-D candidates relative to the low-D ones, for both forms of q_θ (mean-token and summed) and with the
KL to the SFT policy on and off, and for both directions of the match (train.ldl_grpo.form)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from test_steps_common import build, sft_adapter
from vlrlcd.adapters.config import StudentConfig
from vlrlcd.adapters.loader import load_student
from vlrlcd.ranking.config import RankingConfig
from vlrlcd.ranking.scorers import Scores
from vlrlcd.datasets.records import Record
from vlrlcd.training.config import TrainConfig
from vlrlcd.training.rollout import Group
from vlrlcd.training.steps import StepContext, group_loss


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("ldl_dir")
    base = build("text", root / "base")
    return base, sft_adapter(base, root / "sft")


@pytest.mark.parametrize("form", ["forward", "reverse"])
@pytest.mark.parametrize("length_normalize", [True, False])
@pytest.mark.parametrize("beta", [0.0, 0.2])
def test_one_step_raises_high_d_candidates(paths, length_normalize, beta, form):
    base, adapter = paths
    torch.manual_seed(0)
    student = load_student(StudentConfig(name_or_path=str(base)), adapter=adapter, reference=adapter)
    rec = Record(id="q", prompt="What is 3 + 4?", reference="7")
    prefix = student.prefix(rec.prompt)
    cands = [student.encode_response(t) for t in ("7", "8", "it is 7", "red")]
    r = torch.tensor([0.0, -2.0, -0.5, -3.0])
    target = torch.softmax(r / 0.2, 0)
    group = Group(rec, "7", prefix, cands, ["7", "8", "it is 7", "red"], Scores(r, torch.tensor(0.0)), r, target)
    base_cfg = TrainConfig()
    cfg = dataclasses.replace(base_cfg, beta=beta, length_normalize=length_normalize,
                              ldl_grpo=dataclasses.replace(base_cfg.ldl_grpo, form=form))
    ctx = StepContext(step=0, total_steps=1, ranking=RankingConfig())

    def seq_logp() -> torch.Tensor:
        with torch.no_grad():
            return student.token_logprobs(prefix, cands).sequence(length_normalize=False)

    before = seq_logp()
    opt = torch.optim.SGD(student.trainable_parameters(), lr=0.5)
    student.model.train()
    loss, _ = group_loss(student, group, cfg, ctx)
    loss.backward()
    opt.step()
    student.model.eval()
    delta = seq_logp() - before
    top, low = target.argmax(), target.argmin()
    assert delta[top] > delta[low]                       # the high-D candidate gains on the low-D one
    # and D-weighted: the expected change of log π under D beats the change under the policy's own q
    assert float((target * delta).sum()) > float(delta.mean())


def test_anchor_in_group_adds_the_anchor_with_margin_zero(paths):
    from vlrlcd.training.rollout import RolloutPlan, rank_group

    base, adapter = paths
    student = load_student(StudentConfig(name_or_path=str(base)), adapter=adapter, reference=adapter)
    rec = Record(id="q", prompt="What is 3 + 4?", reference="7")
    cands = [student.encode_response(t) for t in ("8", "9")]
    scores = Scores(torch.tensor([-1.0, -2.0]), torch.tensor(-0.5))
    plan = RolloutPlan(2, "anchor", "sft")
    plain = rank_group(student, rec, "7", plan, student.prefix(rec.prompt), cands, RankingConfig(), scores)
    witha = rank_group(student, rec, "7", plan, student.prefix(rec.prompt), cands,
                       RankingConfig(anchor_in_group=True), scores)
    assert plain.texts == ["8", "9"] and witha.texts == ["8", "9", "7"]
    assert torch.allclose(witha.margins, torch.tensor([-0.5, -1.5, 0.0]))
    assert witha.target.argmax() == 2 and abs(float(witha.target.sum()) - 1) < 1e-6


def test_distinct_mask_marks_first_occurrences():
    from vlrlcd.training.rollout import distinct_mask

    assert distinct_mask([[1, 2], [3], [1, 2], [3], [4]]).tolist() == [True, True, False, False, True]
    assert distinct_mask([]).tolist() == []


def test_distinct_target_does_not_count_how_often_an_answer_was_sampled(paths):
    """Two samples of "blue" (r = -0.05) and one "green" (the anchor, r = 0): over the multiset D gives blue
    2·e^-0.25 / (1 + 2·e^-0.25) = 0.609 of its mass; over the candidate set green gets 1 / (1 + e^-0.25) = 0.562."""
    import math

    from vlrlcd.training.rollout import RolloutPlan, rank_group

    base, adapter = paths
    student = load_student(StudentConfig(name_or_path=str(base)), adapter=adapter, reference=adapter)
    rec = Record(id="q", prompt="What color is the square?", reference="green")
    cands = [student.encode_response(t) for t in ("blue", "blue", "green")]
    scores = Scores(torch.tensor([-0.05, -0.05, 0.0]), torch.tensor(0.0))
    plan = RolloutPlan(3, "anchor", "sft")
    rcfg = RankingConfig(gamma=0.0, tau=0.2)
    multi = rank_group(student, rec, "green", plan, student.prefix(rec.prompt), cands, rcfg, scores)
    dist = rank_group(student, rec, "green", plan, student.prefix(rec.prompt), cands,
                      dataclasses.replace(rcfg, distinct=True), scores)
    e = math.exp(-0.25)
    assert abs(float(multi.target[:2].sum()) - 2 * e / (1 + 2 * e)) < 1e-5
    assert abs(float(dist.target[2]) - 1 / (1 + e)) < 1e-5 and float(dist.target[1]) == 0.0


def test_distinct_loss_ignores_repeats(paths):
    """With ranking.distinct the loss is that of the group without its repeats (same D, same q)."""
    base, adapter = paths
    student = load_student(StudentConfig(name_or_path=str(base)), adapter=adapter, reference=adapter)
    rec = Record(id="q", prompt="What is 3 + 4?", reference="7")
    prefix = student.prefix(rec.prompt)
    texts = ["7", "8", "7"]
    cands = [student.encode_response(t) for t in texts]
    cfg, ctx = TrainConfig(beta=0.2), StepContext(0, 1, RankingConfig(distinct=True))
    with_rep = Group(rec, "7", prefix, cands, texts, None, torch.tensor([0.0, -1.0, 0.0]), torch.tensor([0.7, 0.3, 0.0]))
    without = Group(rec, "7", prefix, cands[:2], texts[:2], None, torch.tensor([0.0, -1.0]), torch.tensor([0.7, 0.3]))
    with torch.no_grad():
        a, _ = group_loss(student, with_rep, cfg, ctx)
        b, _ = group_loss(student, without, cfg, ctx)
    assert abs(float(a) - float(b)) < 1e-5


def test_anchor_match_scores_normalised_agreement(paths):
    from vlrlcd.ranking.scorers import anchor_match, get_scorer

    base, adapter = paths
    student = load_student(StudentConfig(name_or_path=str(base)), adapter=adapter, reference=adapter)
    cands = [student.encode_response(t) for t in ("Red.", "blue", "a red one")]
    s = anchor_match(student, "What color is it?", None, "red", cands)
    # "Red." normalises to "red": 1; "blue": no shared token: 0; "a red one" -> {"red", "one"} vs {"red"}:
    # precision 1/2, recall 1, F1 = 2/3
    assert torch.allclose(s.candidates, torch.tensor([1.0, 0.0, 2 / 3])) and float(s.anchor) == 1.0
    assert get_scorer("anchor_match").func is anchor_match   # bound to the ranking settings it reads
    assert float(anchor_match(student, "q", None, None, cands).candidates.abs().sum()) == 0.0


def test_anchor_suffix_counts_the_answer_of_a_sentence_anchor_as_agreement(paths):
    """ranking.anchor_suffix: against "I think it is 47." the bare "47" agrees (1), a wrong sentence keeps its
    token F1 (4 of 5 words shared: 0.8), a word inside the frame ("think") is not a suffix; off, "47" gets
    F1 1/3 and ranks below the wrong sentence."""
    from vlrlcd.ranking.scorers import get_scorer

    base, adapter = paths
    student = load_student(StudentConfig(name_or_path=str(base)), adapter=adapter, reference=adapter)
    cands = [student.encode_response(t) for t in ("47", "I think it is 46.", "think", "I think it is 47.")]
    anchor = "I think it is 47."
    on = get_scorer("anchor_match", RankingConfig(anchor_suffix=True))(student, "q", None, anchor, cands)
    off = get_scorer("anchor_match", RankingConfig())(student, "q", None, anchor, cands)
    assert torch.allclose(on.candidates, torch.tensor([1.0, 0.8, 2 * 0.2 / 1.2, 1.0]))
    assert torch.allclose(off.candidates, torch.tensor([2 * 0.2 / 1.2, 0.8, 2 * 0.2 / 1.2, 1.0]))
    bare = get_scorer("anchor_match", RankingConfig(anchor_suffix=True))(student, "q", None, "47", cands)
    assert float(bare.candidates[0]) == 1.0 and float(bare.candidates[3]) < 1.0   # a bare anchor: unchanged
