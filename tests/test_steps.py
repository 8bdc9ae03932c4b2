"""Group losses and rollout plans in detail: which samples each objective draws, the teacher judge's
N·K stored calls, RLSD rewards and λ, the PPO baseline, DPO pair bookkeeping, TVKD teacher values
(position alignment, caching, tokenizer check), through the real RL loop for unranked groups."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from test_steps_common import MAX_NEW, build, sft_adapter
from vlrlcd.adapters.config import StudentConfig
from vlrlcd.adapters.loader import load_student
from vlrlcd.config import Config
from vlrlcd.datasets.records import Record
from vlrlcd.errors import VlrlcdError
from vlrlcd.methods import get_method
from vlrlcd.methods.config import DpoConfig, GrpoConfig, RlsdConfig, SelfPpoConfig, TvkdDpoConfig
from vlrlcd.methods.grpo import judge_rewards
from vlrlcd.methods.rlsd import rlsd_rewards
from vlrlcd.methods.tvkd_dpo import cached_token_values, load_tvkd_teacher, teacher_token_values
from vlrlcd.objectives.dpo import dpo_loss
from vlrlcd.objectives.tvkd import topk_with_rest, tvkd_values
from vlrlcd.ranking.config import RankingConfig
from vlrlcd.ranking.scorers import Scores, self_likelihood
from vlrlcd.teacher.store import AnchorStore
from vlrlcd.training.config import TrainConfig
from vlrlcd.training.rollout import Group, rollout, rollout_plan, sample_generator
from vlrlcd.training.steps import StepContext, group_loss, make_context

REC = Record(id="q", prompt="What is 3 + 4?", reference="7")
OPEN = Record(id="o", prompt="Name a colour.")


def hand_group(record: Record, texts: list[str], candidates=None, margins=None, prefix=None, anchor="7") -> Group:
    cands = candidates if candidates is not None else [[i + 1] for i in range(len(texts))]
    r = torch.tensor(margins, dtype=torch.float32) if margins is not None else torch.zeros(0)
    scores = Scores(r, torch.tensor(0.0)) if margins is not None else None
    return Group(record, anchor, prefix, cands, texts, scores, r, torch.softmax(r, 0) if margins is not None else r)


# ------------------------------------------------------------------ plans (no model)
def test_rollout_plan_per_objective():
    rcfg = RankingConfig(score_with="policy")
    plan = lambda o, rec=REC: rollout_plan(TrainConfig(objective=o, k=5), rcfg, rec)
    assert plan("ldl_grpo") == plan("anchor_rank_dpo") == plan("tvkd_dpo")
    assert (plan("ldl_grpo").k, plan("ldl_grpo").score, plan("ldl_grpo").score_with) == (5, "anchor", "policy")
    assert (plan("anchor_grpo").k, plan("anchor_grpo").score, plan("anchor_grpo").score_with) == (5, "anchor", "sft")
    assert (plan("sft2").k, plan("sft2").score) == (0, "none")
    assert (plan("single_pair_dpo").k, plan("single_pair_dpo").score) == (1, "none")
    assert (plan("self_ppo").k, plan("self_ppo").score) == (1, "plain")
    assert (plan("judge_grpo").k, plan("judge_grpo").score) == (5, "none")
    assert plan("rlsd").score == "none"                 # "7" is verifiable: no self-scoring needed
    assert plan("rlsd", OPEN).score == "anchor"         # no reference: the ranking margin is the reward


# ------------------------------------------------------------------ judge_grpo (oracle teacher, real store)
def test_judge_calls_are_n_times_k_stored_and_never_paid_twice(tmp_path):
    cfg = Config(run_dir=str(tmp_path))
    tcfg = dataclasses.replace(cfg.train, objective="judge_grpo")
    recs = [Record(id=f"r{i}", prompt=f"What is {i} + 1?", reference=str(i + 1)) for i in range(3)]
    texts = ["7", "it is 7", "7 apples", "8"]
    groups = [hand_group(r, texts) for r in recs]
    assert cfg.teacher.concurrency > 1   # the judgements of a group go out concurrently
    ctx = make_context(cfg, tcfg)
    try:
        rewards = [judge_rewards(g, ctx) for g in groups]
        assert ctx.teacher_calls == 3 * 4 and ctx.call_counts()["stage2_teacher_calls"] == 12
    finally:
        ctx.close()
    # oracle judge against the anchor "7": exact match 1, paraphrase frame stripped 1, F1 of
    # {"7","apples"} vs {"7"} = 2·(1/2)·1 / (1/2 + 1) = 2/3, wrong 0
    assert torch.allclose(rewards[0], torch.tensor([1.0, 1.0, 2 / 3, 0.0]))
    # a candidate repeated within a group is judged once
    again = make_context(cfg, tcfg)
    try:
        twice = judge_rewards(hand_group(Record(id="n", prompt="New?"), ["1", "2", "1"], anchor="1"), again)
        assert torch.equal(twice, torch.tensor([1.0, 0.0, 1.0])) and again.teacher_calls == 2
    finally:
        again.close()
    with AnchorStore(tmp_path / "anchors.sqlite") as store:
        assert all(store.get_judgement(cfg.teacher, r, t, "7") is not None for r in recs for t in texts)
    again = make_context(cfg, tcfg)
    try:
        assert all(torch.equal(judge_rewards(g, again), w) for g, w in zip(groups, rewards))
        assert again.teacher_calls == 0
    finally:
        again.close()


def test_judge_budget_and_missing_judge_are_user_errors(tmp_path):
    cfg = Config(run_dir=str(tmp_path))
    cfg.teacher.max_calls = 2
    ctx = make_context(cfg, dataclasses.replace(cfg.train, objective="judge_grpo"))
    try:
        with pytest.raises(VlrlcdError, match="max_calls"):
            judge_rewards(hand_group(REC, ["1", "2", "3"]), ctx)
    finally:
        ctx.close()
    with pytest.raises(VlrlcdError, match="make_context"):
        judge_rewards(hand_group(REC, ["1"]), StepContext(0, 1, RankingConfig()))


# ------------------------------------------------------------------ rlsd rewards (no model)
def test_rlsd_reward_is_the_verifier_when_there_is_a_reference_else_the_margin():
    assert torch.equal(rlsd_rewards(hand_group(REC, ["7", "8", "seven"])), torch.tensor([1.0, 0.0, 1.0]))
    mc = Record(id="m", prompt="Which?", choices=["red", "blue"], reference="blue")
    assert torch.equal(rlsd_rewards(hand_group(mc, ["B", "red"])), torch.tensor([1.0, 0.0]))
    assert torch.equal(rlsd_rewards(hand_group(OPEN, ["x", "y"], margins=[-0.5, 0.25])), torch.tensor([-0.5, 0.25]))
    with pytest.raises(VlrlcdError, match="no reference"):
        rlsd_rewards(hand_group(OPEN, ["x", "y"]))


# ------------------------------------------------------------------ config
def test_train_and_ranking_config_validation():
    with pytest.raises(VlrlcdError, match="train.tvkd_dpo.teacher"):
        TrainConfig(objective="tvkd_dpo").validate()
    TrainConfig(objective="tvkd_dpo", tvkd_dpo=TvkdDpoConfig(teacher="/some/dir")).validate()
    for bad in ({"grpo": GrpoConfig(loss_type="ppo")}, {"grpo": GrpoConfig(eps_low=1.0)},
                {"self_ppo": SelfPpoConfig(baseline_momentum=1.0)}, {"rlsd": RlsdConfig(lambda0=1.5)},
                {"rlsd": RlsdConfig(decay_steps=-1)}, {"tvkd_dpo": TvkdDpoConfig(beta_t=0.0)},
                {"tvkd_dpo": TvkdDpoConfig(topk=0)}, {"tvkd_dpo": TvkdDpoConfig(gamma_s=1.1)},
                {"dpo": DpoConfig(beta=0.0)}):
        with pytest.raises(VlrlcdError):
            TrainConfig(**bad).validate()
    assert TrainConfig().tvkd_dpo.beta_t != 1.0   # β_T = 1 would make V_T = 0: no shaping at all
    for bad in ({"pairs": "best"}, {"pair_margin": -0.1}, {"scorer": "bleu"}, {"scorer": "clip"},
                {"scorer": "composite"}, {"composite": {"bleu": 1.0}}, {"composite": {"clip": "x"}}):
        with pytest.raises(VlrlcdError):
            RankingConfig(**bad).validate()
    RankingConfig(scorer="composite", composite={"self_likelihood": 1.0, "self_judge": 0.5}).validate()
    from vlrlcd.ranking import config as rc, pairs, scorers

    assert rc.PAIR_MODES == pairs.PAIR_MODES and set(rc.SCORER_NAMES) == set(scorers.SCORERS)


def test_make_context_checks_tvkd_teacher(tmp_path):
    cfg = Config(run_dir=str(tmp_path))
    with pytest.raises(VlrlcdError, match="train.tvkd_dpo.teacher"):
        make_context(cfg, dataclasses.replace(cfg.train, objective="tvkd_dpo"))
    ctx = make_context(cfg, dataclasses.replace(cfg.train, objective="ldl_grpo", rl_steps=7))
    assert ctx.judge is None and ctx.total_steps == 7 and ctx.call_counts() == {
        "stage2_teacher_calls": 0, "local_teacher_passes": 0}


# ------------------------------------------------------------------ with a tiny text student
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("steps")
    base = build("text", root / "student", seed=0)
    adapter = sft_adapter(base, root / "sft", seed=3)
    student = load_student(StudentConfig(name_or_path=str(base)), adapter=adapter, reference=adapter)
    return {"root": root, "base": base, "adapter": adapter, "student": student,
            "teacher": build("text", root / "teacher", seed=1)}


def test_self_ppo_running_baseline(tiny):
    s = tiny["student"]
    tcfg, rcfg = TrainConfig(objective="self_ppo", beta=0.0, self_ppo=SelfPpoConfig(baseline_momentum=0.9)), RankingConfig()
    ctx = StepContext(0, 2, rcfg)
    g1 = rollout(s, REC, "7", tcfg, rcfg, MAX_NEW, sample_generator(0, 0, 0))
    g2 = rollout(s, OPEN, "red", tcfg, rcfg, MAX_NEW, sample_generator(0, 0, 1))
    r1, r2 = float(g1.scores.candidates[0]), float(g2.scores.candidates[0])
    # the reward is the student's own mean log-prob of its sample without the anchor
    prefix = s.prefix(REC.prompt)
    with torch.no_grad():
        own = float(s.token_logprobs(prefix, g1.candidates).sequence(True)[0])
    assert r1 == pytest.approx(own, abs=1e-5)
    # step 1: no baseline yet, each sample is its own (advantage 0); the baseline moves only at the step's end
    _, m1 = group_loss(s, g1, tcfg, ctx)
    assert m1["baseline"] == pytest.approx(r1) and m1["advantage_mean"] == pytest.approx(0.0, abs=1e-6)
    _, m2 = group_loss(s, g2, tcfg, ctx)
    assert m2["baseline"] == pytest.approx(r2) and "ppo_baseline" not in ctx.state
    get_method("self_ppo").step_end(ctx, tcfg, {"reward_mean": (r1 + r2) / 2})
    assert ctx.state["ppo_baseline"] == pytest.approx((r1 + r2) / 2, abs=1e-6)
    # step 2: both groups against the same baseline, whatever process or order they run in
    for g, r in ((g2, r2), (g1, r1)):
        _, m = group_loss(s, g, tcfg, ctx)
        assert m["baseline"] == pytest.approx((r1 + r2) / 2) and m["advantage_mean"] == pytest.approx(
            r - (r1 + r2) / 2, abs=1e-5)
    get_method("self_ppo").step_end(ctx, tcfg, {"reward_mean": 1.0})
    assert ctx.state["ppo_baseline"] == pytest.approx(0.9 * (r1 + r2) / 2 + 0.1, abs=1e-6)


def test_self_ppo_scores_with_its_own_scorer_whatever_ranking_scorer_is(tiny):
    """The demo recipes rank with anchor_match, which reads only the anchor: self_ppo (no anchor) would get
    reward 0 for every sample. Its reward comes from train.self_ppo.scorer (self_likelihood) instead."""
    s = tiny["student"]
    tcfg = TrainConfig(objective="self_ppo", beta=0.0)
    rcfg = RankingConfig(scorer="anchor_match")
    assert rollout_plan(tcfg, rcfg, REC).scorer == "self_likelihood"
    g = rollout(s, REC, "7", tcfg, rcfg, MAX_NEW, sample_generator(0, 0, 0))
    with torch.no_grad():
        own = float(s.token_logprobs(s.prefix(REC.prompt), g.candidates).sequence(True)[0])
    assert float(g.scores.candidates[0]) == pytest.approx(own, abs=1e-5) and own < 0
    with pytest.raises(VlrlcdError, match="train.self_ppo.scorer 'anchor_match' reads only the anchor"):
        SelfPpoConfig(scorer="anchor_match").validate()
    with pytest.raises(VlrlcdError, match="train.self_ppo.scorer 'nope' is not available"):
        SelfPpoConfig(scorer="nope").validate()


def test_rlsd_lambda_decays_with_the_step(tiny):
    s = tiny["student"]
    rcfg = RankingConfig()
    tcfg = TrainConfig(objective="rlsd", k=3, rlsd=RlsdConfig(lambda0=0.8))
    g = rollout(s, REC, "7", tcfg, rcfg, MAX_NEW, sample_generator(0, 0, 0))
    _, m = group_loss(s, g, tcfg, StepContext(step=1, total_steps=4, ranking=rcfg))
    assert m["rlsd_lambda"] == pytest.approx(0.8 * (1 - 1 / 4))
    constant = dataclasses.replace(tcfg, rlsd=RlsdConfig(lambda0=0.8, decay_steps=0))
    _, m = group_loss(s, g, constant, StepContext(3, 4, rcfg))
    assert m["rlsd_lambda"] == pytest.approx(0.8)
    _, m = group_loss(s, g, dataclasses.replace(tcfg, rlsd=RlsdConfig(lambda0=0.8, decay_steps=2)), StepContext(3, 4, rcfg))
    assert m["rlsd_lambda"] == 0.0


def test_anchor_grpo_rewards_come_from_the_frozen_sft_adapter(tiny):
    s = tiny["student"]
    with torch.no_grad():   # make the policy differ from the reference
        for n, p in s.model.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.add_(0.3)
    try:
        rcfg = RankingConfig(score_with="policy")
        g = rollout(s, REC, "7", TrainConfig(objective="anchor_grpo", k=3), rcfg, MAX_NEW, sample_generator(0, 0, 0))
        with s.reference():
            sc = self_likelihood(s, REC.prompt, None, "7", g.candidates)
        pol = self_likelihood(s, REC.prompt, None, "7", g.candidates)
        assert torch.allclose(g.margins, sc.candidates - sc.anchor, atol=1e-5)
        assert not torch.allclose(g.margins, pol.candidates - pol.anchor, atol=1e-3)
    finally:
        with torch.no_grad():
            for n, p in s.model.named_parameters():
                if p.requires_grad and "lora_B" in n:
                    p.sub_(0.3)


def test_dpo_pairs_map_to_the_right_sequences(tiny):
    """ranking.pairs=anchor with r = [-1, 0.5, -2]: the anchor beats candidates 0 and 2 (2 pairs)."""
    s = tiny["student"]
    prefix = s.prefix(REC.prompt)
    cands = [s.encode_response(t) for t in ("8", "7 7", "nine")]
    g = hand_group(REC, ["8", "7 7", "nine"], candidates=cands, margins=[-1.0, 0.5, -2.0], prefix=prefix)
    tcfg = TrainConfig(objective="anchor_rank_dpo", dpo=DpoConfig(beta=0.5))
    ctx = StepContext(0, 1, RankingConfig(pairs="anchor"))
    loss, m = group_loss(s, g, tcfg, ctx)
    seqs = [s.encode_response("7"), cands[0], cands[2]]
    with torch.no_grad():
        pol = s.token_logprobs(prefix, seqs).logp.sum(-1)
        with s.reference():
            ref = s.token_logprobs(prefix, seqs).logp.sum(-1)
    want, _ = dpo_loss(pol[[0, 0]], pol[[1, 2]], ref[[0, 0]], ref[[1, 2]], 0.5)
    assert m["pairs"] == 2.0 and float(loss.detach()) == pytest.approx(float(want), abs=1e-5)
    # best_worst: candidate 1 (r = 0.5) over candidate 2 (r = −2)
    loss, m = group_loss(s, g, tcfg, StepContext(0, 1, RankingConfig(pairs="best_worst")))
    with torch.no_grad():
        pol2 = s.token_logprobs(prefix, [cands[1], cands[2]]).logp.sum(-1)
        with s.reference():
            ref2 = s.token_logprobs(prefix, [cands[1], cands[2]]).logp.sum(-1)
    want, _ = dpo_loss(pol2[:1], pol2[1:], ref2[:1], ref2[1:], 0.5)
    assert m["pairs"] == 1.0 and float(loss.detach()) == pytest.approx(float(want), abs=1e-5)
    # a margin threshold nothing passes: no pair, a zero loss that still backpropagates
    loss, m = group_loss(s, g, tcfg, StepContext(0, 1, RankingConfig(pair_margin=10.0)))
    assert m["pairs"] == 0.0 and float(loss.detach()) == 0.0
    loss.backward()


def test_single_pair_dpo_skips_a_sample_equal_to_the_anchor(tiny):
    s = tiny["student"]
    g = hand_group(REC, ["7"], candidates=[s.encode_response("7")], prefix=s.prefix(REC.prompt))
    loss, m = group_loss(s, g, TrainConfig(objective="single_pair_dpo"), StepContext(0, 1, RankingConfig()))
    assert m["pairs"] == 0.0 and float(loss.detach()) == 0.0
    g = hand_group(REC, ["8"], candidates=[s.encode_response("8")], prefix=s.prefix(REC.prompt))
    loss, m = group_loss(s, g, TrainConfig(objective="single_pair_dpo"), StepContext(0, 1, RankingConfig()))
    assert m["pairs"] == 1.0 and float(loss.detach()) == pytest.approx(math.log(2), abs=1e-5)  # policy = reference


def test_tvkd_values_read_the_teacher_at_each_response_token(tiny):
    """V_T at response token t comes from the teacher's logits AT y_t (predicting y_{t+1}): checked
    against one plain forward over prompt + response, without the shared-prefix cache."""
    s = tiny["student"]
    tcfg = TrainConfig(objective="tvkd_dpo", tvkd_dpo=TvkdDpoConfig(teacher=str(tiny["teacher"]), topk=5, beta_t=0.5,
                                                                    alpha=2.0))
    teacher = load_tvkd_teacher(tcfg, s)
    responses = [s.encode_response("7"), s.encode_response("red and blue")]
    g = hand_group(REC, ["7", "red and blue"], candidates=responses, prefix=s.prefix(REC.prompt))
    got = teacher_token_values(teacher, g, responses, tcfg)
    P = teacher.prefix(REC.prompt).input_ids
    for resp, v in zip(responses, got):
        with torch.no_grad():
            logits = teacher.model(input_ids=torch.cat([P, torch.tensor([resp])], 1)).logits[0]
        at_tokens = logits[P.shape[1]: P.shape[1] + len(resp)]
        top, rest = topk_with_rest(at_tokens, 5)
        assert torch.allclose(v, tvkd_values(top, rest, 2.0, 0.5), atol=1e-4)
        assert v.shape == (len(resp),)

    ctx = StepContext(0, 1, RankingConfig())
    first = cached_token_values(s, g, responses, tcfg, ctx)
    assert ctx.state["tvkd_teacher_passes"] == 1 and ctx.state["tvkd_values_computed"] == 2
    again = cached_token_values(s, g, responses[::-1], tcfg, ctx)
    assert ctx.state["tvkd_teacher_passes"] == 1
    assert torch.equal(again[0], first[1])


def test_tvkd_teacher_with_another_tokenizer_is_refused(tiny):
    other = build("text", tiny["root"] / "other", seed=0, corpus=["completely different words here"] * 3)
    with pytest.raises(VlrlcdError, match="tokenizer"):
        load_tvkd_teacher(TrainConfig(objective="tvkd_dpo", tvkd_dpo=TvkdDpoConfig(teacher=str(other))),
                          tiny["student"])
    with pytest.raises(VlrlcdError, match="train.tvkd_dpo.teacher"):
        load_tvkd_teacher(TrainConfig(objective="tvkd_dpo"), tiny["student"])


@pytest.mark.parametrize("objective", ["sft2", "single_pair_dpo", "self_ppo"])
def test_unranked_groups_through_the_rl_loop(tiny, objective, tmp_path):
    from vlrlcd.training.rl import train_rl

    s = load_student(StudentConfig(name_or_path=str(tiny["base"])), adapter=tiny["adapter"], reference=tiny["adapter"])
    tcfg = TrainConfig(objective=objective, rl_steps=2, batch_size=2, k=2, lr=1e-2)
    rows = train_rl(s, [REC, OPEN], {"q": "7", "o": "red"}, tcfg, RankingConfig(), MAX_NEW, tmp_path, seed=0,
                    progress=False)
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and not r["skipped"] for r in rows)
    logged = [json.loads(line) for line in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert len(logged) == 4 and all(len(x["candidates"]) == (0 if objective == "sft2" else 1) for x in logged)
