"""Qwen2-VL / Qwen2.5-VL batched: a left-padded batch of prompts gets its 3-D (mrope) positions from the model's
own `get_rope_index` given the attention mask (and the left-aligned `mm_token_type_ids`), so `sample_batch`,
`token_logprobs_batch` (the prefix cache + K continuation path of the RL step) and the full-sequence
`batch_token_logprobs` equal the per-prompt paths within 1e-5 (values and gradients), in one batch of forwards
for all prompts. Images of different aspect ratios give different patch grids, so the prompts have different
lengths and rope deltas (left padding in every batch), and one prompt is text only."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from test_steps_common import Forwards, eval_students
from vlrlcd.adapters.config import LoraConfig, TinyConfig

TINY = TinyConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                  vision_hidden_size=32, vision_layers=1)
CORPUS = ["What color is the shape?", "red green blue square circle", "What is 2 + 3? 5"]
PROMPTS = ["What is 2 + 3?", "What color is the shape on the left of the big square?", "Hi",
           "Describe the image. a red circle and a blue square"]
SIZES = [(32, 32), (40, 24), None, (16, 64)]  # patch grids 4x4, 4x6, none (text only), 8x2 -> deltas -2, -3, 0, 0
# K_i = 2, 1, 1, 3 responses of different lengths (ordinary tokens: ids 0-6 are Qwen's special tokens)
RESPONSES = [[[25, 26, 27], [28, 29]], [[30, 31, 32, 33]], [[34]], [[24, 25], [26], [27, 28, 29, 30, 31, 32]]]
FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
TOL = 1e-5
M = 6  # max new tokens


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    return eval_students(tmp_path_factory.mktemp("students"), FAMILIES, CORPUS, TINY, LoraConfig(r=4, alpha=8, dropout=0.0))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    paths = []
    for i, size in enumerate(SIZES):
        if size is None:
            paths.append(None)
            continue
        img = Image.new("RGB", size, ("red", "blue", None, "white")[i])
        img.paste((255, 255, 0), (2, 2, 10, 10))
        img.save(root / f"{i}.png")
        paths.append(str(root / f"{i}.png"))
    return paths


def prefixes_of(student, images, prompts=PROMPTS):
    return [student.prefix(p, images[i]) for i, p in enumerate(prompts)]


def gens(n: int, seed: int = 100) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("name", FAMILIES)
def test_left_padded_positions_are_the_per_prompt_ones(name, students, images):
    """The batch's positions at each prompt's real tokens and its next position are that prompt's own; the
    images really shift the positions (rope deltas -2 and -3), so 1-D positions would be wrong."""
    student = students[name]
    prefixes = prefixes_of(student, images)
    lens = [p.input_ids.shape[1] for p in prefixes]
    assert len(set(lens)) >= 3  # left padding in the batch
    assert [p.next_position - n for p, n in zip(prefixes, lens)] == [-2, -3, 0, 0]
    L = max(lens)
    ids = torch.full((len(prefixes), L), student.pad_id, dtype=torch.long)
    attn = torch.zeros(len(prefixes), L, dtype=torch.long)
    for i, p in enumerate(prefixes):
        ids[i, L - lens[i]:], attn[i, L - lens[i]:] = p.input_ids[0], 1
    kwargs = student.family.merge_kwargs([p.model_kwargs for p in prefixes], L, left=True)
    assert torch.equal(kwargs["mm_token_type_ids"] != 0, ids == student.model.config.image_token_id)
    pos, nxt = student.family.positions(student.model, ids, attn, kwargs)
    assert pos.shape == (3, len(prefixes), L)
    for i, p in enumerate(prefixes):
        assert torch.equal(pos[:, i, L - lens[i]:], p.model_kwargs["position_ids"][:, 0])
        assert int(nxt[i]) == p.next_position


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sample_batch_equals_per_prompt_sample(name, temperature, students, images):
    """One [N, L] prefix pass and one decode pass per new token for all prompts (prompt by prompt: N·M), the
    candidates token for token those of `sample`; no vision pass while decoding."""
    student = students[name]
    prefixes = prefixes_of(student, images)
    vision = student.vision_calls
    with Forwards(student) as fw:
        batched = student.sample_batch(prefixes, 3, M, temperature, gens(len(prefixes)))
    assert fw.calls == M and student.vision_calls == vision
    assert batched == [student.sample(p, 3, M, temperature, g) for p, g in zip(prefixes, gens(len(prefixes)))]


def assert_close(batched, one):
    for b, o in zip(batched, one):
        assert b.logp.shape == o.logp.shape and torch.equal(b.mask, o.mask) and torch.equal(b.ids, o.ids)
        assert torch.allclose(b.logp, o.logp, rtol=0, atol=TOL), float((b.logp - o.logp).abs().max())


def grads_of(student, tls) -> list[torch.Tensor]:
    """Gradients of a weighted sum of the rows' log-probs (a different weight per prompt and token)."""
    total = sum((tl.logp * torch.linspace(0.5, 1.5, tl.logp.numel()).view_as(tl.logp)).sum() * (i + 1)
                for i, tl in enumerate(tls))
    total.backward()
    out = [p.grad.clone() for p in student.trainable_parameters()]
    student.model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_token_logprobs_batch_equals_per_prefix_values_and_gradients(name, students, images):
    """The RL step's passes: one left-padded prefix pass, each row's cache repeated for its K_i responses, one
    continuation pass of all rows: the per-prefix `token_logprobs` within 1e-5, gradients too."""
    student = students[name]
    student.model.train()  # dropout 0: train mode only turns the gradient path on
    try:
        prefixes = prefixes_of(student, images)
        with Forwards(student) as fw:
            batched = student.token_logprobs_batch(prefixes, RESPONSES)
        assert fw.calls == 2
        one = [student.token_logprobs(p, r) for p, r in zip(prefixes, RESPONSES)]
        assert_close(batched, one)
        ga, gb = grads_of(student, batched), grads_of(student, one)
        assert any(bool(g.abs().sum() > 0) for g in ga)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=TOL) for a, b in zip(ga, gb))
        # the image matters: prompt 0 with image 1 scores differently (a mixed-up feature scatter or grid would
        # show), the other prompts' rows are unchanged
        with torch.no_grad():
            other = student.token_logprobs_batch([student.prefix(PROMPTS[0], images[1])] + prefixes[1:], RESPONSES)
        assert not torch.allclose(other[0].logp, batched[0].logp, atol=1e-3)
        assert_close(other[1:], batched[1:])
    finally:
        student.model.eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_full_sequence_batch_equals_per_prefix(name, students, images):
    """`batch_token_logprobs` (right padding: the SFT and checkpointed path) with the rope index given the mask."""
    student = students[name]
    prefixes = prefixes_of(student, images)
    rows = [r[0] for r in RESPONSES]
    with torch.no_grad():
        batched = student.batch_token_logprobs(prefixes, rows)
        one = [student.token_logprobs(p, [r]) for p, r in zip(prefixes, rows)]
    for i, o in enumerate(one):
        T = len(rows[i])
        assert torch.allclose(batched.logp[i, :T], o.logp[0], rtol=0, atol=TOL)


@pytest.mark.parametrize("name", FAMILIES)
def test_one_dimensional_positions_would_be_caught(name, students, images):
    """With positions counted over the tokens (what the other families use) the batched log-probs of the image
    prompts leave the per-prompt ones by far more than the tolerance: the equality above tests the positions."""
    student = students[name]
    prefixes = prefixes_of(student, images)
    with torch.no_grad():
        one = [student.token_logprobs(p, r) for p, r in zip(prefixes, RESPONSES)]
        family = student.family
        student.family = dataclasses.replace(family, positions=None)
        try:
            wrong = student.token_logprobs_batch(prefixes, RESPONSES)
        finally:
            student.family = family
    gaps = [float((w.logp - o.logp).abs().max()) for w, o in zip(wrong, one)]
    assert gaps[0] > 1e-3 and gaps[1] > 1e-3  # the prompts whose image shifts the positions
    assert gaps[2] < TOL  # the text-only prompt: its positions are the same either way
