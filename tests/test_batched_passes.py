"""A step's log-prob passes batched across its groups: `StudentAdapter.token_logprobs_batch` equals per-prefix
`token_logprobs` (values and gradients; text, LLaVA, the checkpointed path; Qwen2(.5)-VL in
tests/test_qwen_batched.py) in two forwards for all prompts; the batched self-likelihood scores equal the per-group ones; one train_rl step with
the batched policy / reference passes and one backward (group_chunk=0) gives the loss and LoRA weights of the
per-group path (group_chunk=1); a non-finite group is left out of the sum (kept under FSDP)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from test_steps_common import Forwards, lora_student
from vlrlcd.adapters.config import LoraConfig, StudentConfig, TinyConfig
from vlrlcd.adapters.loader import load_student
from vlrlcd.adapters.tiny import BUILDERS
from vlrlcd.datasets.records import Record
from vlrlcd.errors import VlrlcdError
from vlrlcd.methods import get_method
from vlrlcd.methods.base import Method
from vlrlcd.ranking.config import RankingConfig
from vlrlcd.ranking.scorers import ScoreItem, self_likelihood, self_likelihood_batch
from vlrlcd.training import sharding
from vlrlcd.training.common import activation_checkpointing
from vlrlcd.training.config import TrainConfig
from vlrlcd.training.distributed import Dist
from vlrlcd.training.rl import losses_and_backward, train_rl
from vlrlcd.training.rollout import rollout_batch, sample_generator
from vlrlcd.training.rollout import Group
from vlrlcd.training.steps import StepContext, batched_passes, group_loss

TINY = TinyConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                  vision_hidden_size=32, vision_layers=1)
CORPUS = ["What color is the shape?", "red green blue square circle", "What is 2 + 3? 5"]
PROMPTS = ["What is 2 + 3?", "What color is the shape on the left of the big square?", "Hi",
           "Describe the image. a red circle and a blue square"]
# K_i = 2, 1, 0 (no row), 3 responses of different lengths; prompt 3's longest row is the batch's longest
RESPONSES = [[[5, 6, 7], [8, 9]], [[10, 11, 12, 13]], [], [[4, 5], [6], [7, 8, 9, 10, 11, 12]]]
TOL = 1e-5


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("students")
    return {name: str(BUILDERS[name](root / name, CORPUS, TINY, seed=0)) for name in ("llama", "llava")}


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "red.png"
    img = Image.new("RGB", (32, 32), "red")
    img.paste((0, 0, 255), (4, 4, 12, 12))
    img.save(path)
    return str(path)


def load(path: str, seed: int = 0):
    """A student whose LoRA changes the logits (B random, not zero), in train mode (dropout 0)."""
    student = lora_student(path, LoraConfig(r=4, alpha=8, dropout=0.0), seed)
    student.model.train()
    return student


def grads_of(student, tls) -> list[torch.Tensor]:
    """Gradients of a weighted sum of the rows' log-probs (a different weight per prompt and token)."""
    total = sum((tl.logp * torch.linspace(0.5, 1.5, tl.logp.numel()).view_as(tl.logp)).sum() * (i + 1)
                for i, tl in enumerate(tls) if tl.logp.numel())
    total.backward()
    out = [p.grad.clone() for p in student.trainable_parameters()]
    student.model.zero_grad(set_to_none=True)
    return out


def assert_same(batched, one):
    for b, o in zip(batched, one):
        assert b.logp.shape == o.logp.shape and torch.equal(b.mask, o.mask) and torch.equal(b.ids, o.ids)
        assert torch.allclose(b.logp, o.logp, rtol=0, atol=TOL)


def per_prefix(student, prefixes, responses):
    return [student.token_logprobs(p, r) if r else None for p, r in zip(prefixes, responses)]


@pytest.mark.parametrize("name", ["llama", "llava"])
def test_token_logprobs_batch_equals_per_prefix_values_and_gradients(name, ckpts, image):
    student = load(ckpts[name])
    img = image if name == "llava" else None
    prefixes = [student.prefix(p, img if i != 1 else None) for i, p in enumerate(PROMPTS)]  # LLaVA: one text-only
    with Forwards(student) as fw:
        batched = student.token_logprobs_batch(prefixes, RESPONSES)
    assert fw.calls == 2  # one left-padded prefix pass, one continuation pass of all ΣK_i = 6 rows
    assert batched[2].logp.shape == (0, 0)  # a prompt without responses adds no row
    one = per_prefix(student, prefixes, RESPONSES)
    keep = [i for i, r in enumerate(RESPONSES) if r]
    assert_same([batched[i] for i in keep], [one[i] for i in keep])
    assert [batched[i].logp.shape for i in keep] == [(2, 3), (1, 4), (3, 6)]  # each cut to its own longest
    assert (batched[0].logp[1, 2] == 0) and (batched[0].mask[1, 2] == 0)  # padding is zero
    ga, gb = grads_of(student, [batched[i] for i in keep]), grads_of(student, [one[i] for i in keep])
    assert any(bool(g.abs().sum() > 0) for g in ga)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=TOL) for a, b in zip(ga, gb))
    if name == "llava":  # the image matters, so a mixed-up feature scatter would show
        other = student.token_logprobs_batch([student.prefix(PROMPTS[0], None)] + prefixes[1:], RESPONSES)
        assert not torch.allclose(other[0].logp, batched[0].logp, atol=1e-3)
        assert torch.allclose(other[3].logp, batched[3].logp, rtol=0, atol=TOL)


def test_lockstep_and_single_token_rows(ckpts):
    """One-token rows: the continuation pass is skipped, except in lockstep (FSDP) where it always runs, as in
    token_logprobs; the values are the same either way."""
    student = load(ckpts["llama"])
    prefixes = [student.prefix(p) for p in PROMPTS[:3]]
    rows = [[[5], [6]], [[7]], [[8], [9], [10]]]
    with torch.no_grad(), Forwards(student) as fw:
        alone = student.token_logprobs_batch(prefixes, rows)
    assert fw.calls == 1
    student.lockstep = lambda done: done
    try:
        with torch.no_grad(), Forwards(student) as fw:
            together = student.token_logprobs_batch(prefixes, rows)
        assert fw.calls == 2
    finally:
        student.lockstep = None
    assert_same(together, alone)
    with torch.no_grad():
        assert_same(alone, per_prefix(student, prefixes, rows))
    with pytest.raises(ValueError, match="one list of responses per prefix"):
        student.token_logprobs_batch(prefixes, rows[:2])


def test_checkpointed_path_is_one_full_sequence_batch(ckpts):
    student = load(ckpts["llama"])
    prefixes = [student.prefix(p) for p in PROMPTS]
    one = per_prefix(student, prefixes, RESPONSES)
    keep = [i for i, r in enumerate(RESPONSES) if r]
    g_one = grads_of(student, [one[i] for i in keep])
    with activation_checkpointing(student.model, True):
        assert student.checkpointing
        with Forwards(student) as fw:
            batched = student.token_logprobs_batch(prefixes, RESPONSES)
        assert fw.calls == 1
        g_batched = grads_of(student, [batched[i] for i in keep])
    assert_same([batched[i] for i in keep], [one[i] for i in keep])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=TOL) for a, b in zip(g_batched, g_one))


def test_batched_self_likelihood_equals_per_group(ckpts, image):
    student = load(ckpts["llava"])
    student.model.eval()
    items = [ScoreItem(PROMPTS[0], image, "red", RESPONSES[0]), ScoreItem(PROMPTS[1], None, None, RESPONSES[1]),
             ScoreItem(PROMPTS[3], image, "a blue square", RESPONSES[3])]
    with Forwards(student) as fw:
        batched = self_likelihood_batch(student, items)
    assert fw.calls == 2
    for it, s in zip(items, batched):
        one = self_likelihood(student, it.prompt, it.image, it.anchor, it.candidates)
        assert s.candidates.shape == one.candidates.shape
        assert torch.allclose(s.candidates, one.candidates, rtol=0, atol=TOL)
        assert torch.allclose(s.anchor, one.anchor, rtol=0, atol=TOL)
    assert float(batched[1].anchor) == 0.0  # scored without an anchor


# ------------------------------------------------------------------ the loop
RECORDS = [Record(id="r0", prompt="What is 2 + 3?", reference="5"), Record(id="r1", prompt="Hi"),
           Record(id="r2", prompt="What color is the shape on the left?", reference="red")]
ANCHORS = {"r0": "5", "r1": "a blue square", "r2": "red"}


@pytest.fixture(scope="module")
def sft_dir(ckpts, tmp_path_factory):
    return load(ckpts["llama"], seed=1).save(tmp_path_factory.mktemp("sft") / "sft")


def rl_student(ckpts, sft_dir):
    student = load_student(StudentConfig(name_or_path=ckpts["llama"], lora=LoraConfig(r=4, alpha=8, dropout=0.0)),
                           adapter=sft_dir, reference=sft_dir)
    with torch.no_grad():  # the policy starts away from the reference, so the KL term has a gradient
        for name, p in student.model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.add_(0.05)
    return student


@pytest.mark.parametrize("objective", ["ldl_grpo", "rlsd", "anchor_grpo"])
def test_one_batched_step_equals_the_per_group_step(objective, ckpts, sft_dir, tmp_path):
    """train_rl with group_chunk=0 (one policy pass, one reference pass — plus rlsd's privileged pass — for the
    3 groups, one backward) and group_chunk=1 (each group alone): same loss, metrics and LoRA weights."""
    out = {}
    for chunk in (0, 1):
        student = rl_student(ckpts, sft_dir)
        # lr 1e-4: Adam's first step moves every weight by about lr·sign(g), and its sensitivity lr/eps to a
        # near-zero gradient entry would turn float noise into 1e-5 differences at a larger lr
        cfg = TrainConfig(objective=objective, rl_steps=1, batch_size=3, k=3, beta=0.1, lr=1e-4, group_chunk=chunk,
                          tensorboard=False)
        with Forwards(student) as fw:
            rows = train_rl(student, RECORDS, ANCHORS, cfg, RankingConfig(), max_new_tokens=5,
                            out_dir=tmp_path / f"c{chunk}", seed=3, progress=False)
        weights = {n: p.detach().clone() for n, p in student.model.named_parameters() if p.requires_grad}
        out[chunk] = rows[0], weights, fw.calls
    (a, wa, calls_a), (b, wb, calls_b) = out[0], out[1]
    assert not a["skipped"] and not b["skipped"]
    for key in ("loss", "kl", "grad_norm", "margin_mean"):
        assert abs(a[key] - b[key]) <= TOL * max(1.0, abs(b[key])), key
    assert max(float((wa[n] - wb[n]).abs().max()) for n in wa) <= TOL
    start = {n: p.detach() for n, p in rl_student(ckpts, sft_dir).model.named_parameters()}
    assert max(float((wa[n] - start[n]).abs().max()) for n in wa) > 10 * TOL  # the step moved the weights
    passes = 3 if objective == "rlsd" else 2
    assert calls_b - calls_a == passes * 2 * (3 - 1)  # each kind: 2 forwards for the step instead of 2 per group


def _poisoned(bad: int) -> Method:
    """ldl_grpo whose loss is NaN on prompt `bad`."""
    real = get_method("ldl_grpo")

    class Poisoned(type(real)):
        def group_loss(self, student, group, passes, cfg, ctx):
            loss, m = real.group_loss(student, group, passes, cfg, ctx)
            return (loss * float("nan") if group.record.id == RECORDS[bad].id else loss), m
    return Poisoned()


def test_a_nan_group_is_left_out_of_the_batched_sum(ckpts, sft_dir):
    """The batched backward's gradient is that of the finite groups alone; under FSDP the NaN stays in (every
    process runs the same backward; the loop then discards the step everywhere)."""
    student = rl_student(ckpts, sft_dir)
    cfg, rcfg = TrainConfig(objective="ldl_grpo", k=3, beta=0.1), RankingConfig()
    ctx = StepContext(step=0, total_steps=1, ranking=rcfg)
    student.model.eval()
    groups = rollout_batch(student, RECORDS, [ANCHORS[r.id] for r in RECORDS], cfg, rcfg, 5,
                           [sample_generator(0, 0, i) for i in range(3)])
    student.model.train()
    params = student.trainable_parameters()
    res = losses_and_backward(student, groups, _poisoned(1), cfg, ctx, 3, Dist())
    # the passes are arguments of the group loss, never kept on a group (nothing holds the chunk's graph)
    assert [f for _, f in res] == [True, False, True] and "passes" not in {f.name for f in dataclasses.fields(Group)}
    batched = [p.grad.clone() for p in params]
    student.model.zero_grad(set_to_none=True)
    for g in (groups[0], groups[2]):  # the finite groups alone, each with its own passes
        loss, _ = group_loss(student, g, cfg, ctx)
        (loss / 3).backward()
    assert all(torch.isfinite(a).all() and torch.allclose(a, p.grad, rtol=1e-4, atol=TOL) for a, p in zip(batched, params))
    student.model.zero_grad(set_to_none=True)
    res = losses_and_backward(student, groups, _poisoned(1), cfg, ctx, 3,
                              Dist(rank=0, world=2, fsdp=sharding.FSDPSettings()))
    assert [f for _, f in res] == [True, False, True]
    assert any(not torch.isfinite(p.grad).all() for p in params if p.grad is not None)
    student.model.zero_grad(set_to_none=True)


def test_batched_passes_fill_each_group_and_the_losses_read_them(ckpts, sft_dir):
    student = rl_student(ckpts, sft_dir)
    cfg, rcfg = TrainConfig(objective="rlsd", k=2, beta=0.1), RankingConfig()
    student.model.eval()
    groups = rollout_batch(student, RECORDS[:2], [ANCHORS[r.id] for r in RECORDS[:2]], cfg, rcfg, 4,
                           [sample_generator(0, 0, i) for i in range(2)])
    rlsd = get_method("rlsd")
    with Forwards(student) as fw:
        passes = batched_passes(student, groups, rlsd.passes(cfg))
    assert fw.calls == 6 and all(set(p) == {"policy", "privileged", "reference"} for p in passes)
    ctx = StepContext(step=0, total_steps=1, ranking=rcfg)
    with Forwards(student) as fw:
        for g, p in zip(groups, passes):
            rlsd.group_loss(student, g, p, cfg, ctx)
    assert fw.calls == 0  # the losses read the slices, no pass of their own
    # objectives over subsets of candidates batch nothing
    dpo = TrainConfig(objective="anchor_rank_dpo", k=2)
    fresh = rollout_batch(student, RECORDS[:2], [ANCHORS[r.id] for r in RECORDS[:2]], dpo, rcfg, 4,
                          [sample_generator(0, 0, i) for i in range(2)])
    assert get_method("anchor_rank_dpo").passes(dpo) == ()
    with Forwards(student) as fw:
        assert batched_passes(student, fresh, ()) == [{}, {}] and fw.calls == 0


def test_group_chunk_is_validated():
    TrainConfig(group_chunk=2).validate()
    with pytest.raises(VlrlcdError, match="train.group_chunk must be >= 0"):
        TrainConfig(group_chunk=-1).validate()
