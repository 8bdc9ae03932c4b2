"""One batched decode for a step's prompts: `StudentAdapter.sample_batch` gives, token for token, the
candidates `sample` gives prompt by prompt (prompts of different lengths, left-padded; each prompt's draws
from its own generator), in one prefix pass plus at most max_new_tokens - 1 decode passes for the whole
batch; `rollout_batch` gives the per-prompt `rollout` groups; `train_rl` samples through it with the
(seed, step, global index) generators. Qwen2-VL / Qwen2.5-VL: tests/test_qwen_batched.py."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from test_steps_common import Forwards, lora_student
from vlrlcd.adapters.config import LoraConfig, TinyConfig
from vlrlcd.adapters.tiny import BUILDERS
from vlrlcd.datasets.records import Record
from vlrlcd.ranking.config import RankingConfig
from vlrlcd.training.config import TrainConfig
from vlrlcd.training.rl import rl_order, train_rl
from vlrlcd.training.rollout import rollout, rollout_batch, sample_generator

TINY = TinyConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                  vision_hidden_size=32, vision_layers=1)
CORPUS = ["What color is the shape?", "red green blue square circle", "What is 2 + 3? 5"]
# 4 prompts of different token lengths (left padding of 3 of them in every batch)
PROMPTS = ["What is 2 + 3?", "What color is the shape on the left of the big square?", "Hi",
           "Describe the image. a red circle and a blue square, then count the shapes"]
TEXT = ["llama", "qwen2"]
M = 6  # max new tokens


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("students")
    return {name: str(BUILDERS[name](root / name, CORPUS, TINY, seed=0))
            for name in TEXT + ["llava", "llava_next"]}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four images of different colours and sizes (LLaVA-NeXT: different tile layouts, so different lengths)."""
    root = tmp_path_factory.mktemp("images")
    paths = []
    for i, (size, colour) in enumerate((((32, 32), "red"), ((40, 24), "blue"), ((32, 32), "green"),
                                        ((48, 32), "white"))):
        img = Image.new("RGB", size, colour)
        img.paste((255, 255, 0), (4, 4, 12, 12))
        img.save(root / f"{i}.png")
        paths.append(str(root / f"{i}.png"))
    return paths


def load(path: str, seed: int = 0):
    """A student whose LoRA changes the logits (B random, not zero; A seeded too), in eval mode."""
    torch.manual_seed(seed)
    student = lora_student(path, LoraConfig(r=4, alpha=8), seed)
    student.model.eval()
    return student


@pytest.fixture(scope="module")
def students(ckpts):
    return {name: load(path) for name, path in ckpts.items()}


def gens(n: int, seed: int = 100) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def one_by_one(student, prefixes, k, temperature, max_new=M):
    return [student.sample(p, k, max_new, temperature, g) for p, g in zip(prefixes, gens(len(prefixes)))]


@pytest.mark.parametrize("name", TEXT)
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_text_sample_batch_equals_per_prompt_sample(name, k, temperature, students):
    student = students[name]
    prefixes = [student.prefix(p) for p in PROMPTS]
    assert len({p.input_ids.shape[1] for p in prefixes}) == len(PROMPTS)  # every row but one is padded
    with Forwards(student) as fw:
        batched = student.sample_batch(prefixes, k, M, temperature, gens(len(prefixes)))
    expected = one_by_one(student, prefixes, k, temperature)
    assert batched == expected
    # one [N, L] prefix pass + one decode pass of N·K rows per further token of the longest row
    assert fw.calls == max(len(c) for cands in batched for c in cands) == M
    if temperature > 0 and k > 1:  # really sampled: the K candidates of a prompt differ
        assert all(len({tuple(c) for c in cands}) > 1 for cands in batched)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rows_ending_at_eos_early_feed_pad_and_match(temperature, students):
    """A token prompt 0 samples early (its first new one after the first step) is declared an EOS id: its rows end there (EOS kept), the other
    prompts go on to the limit, and every row is still the per-prompt one. Greedy: every row of prompt 0 ends
    (a finished prompt inside a running batch); K = 1 at temperature 1: same, with sampling."""
    student = students["llama"]
    prefixes = [student.prefix(p) for p in PROMPTS]
    k = 4 if temperature == 0 else 1
    first = one_by_one(student, prefixes, k, temperature)[0][0]
    # the first token of prompt 0's row that did not occur before it (a repeated token would end the row earlier)
    at = next(i for i, t in enumerate(first) if i > 0 and t not in first[:i])
    stop = first[at]
    eos = student.eos_ids
    student.eos_ids = eos + [stop]
    try:
        expected = one_by_one(student, prefixes, k, temperature)
        with Forwards(student) as fw:
            batched = student.sample_batch(prefixes, k, M, temperature, gens(len(prefixes)))
    finally:
        student.eos_ids = eos
    assert batched == expected
    assert all(c == expected[0][0] and len(c) == at + 1 and c[-1] == stop for c in batched[0])  # ended, EOS kept
    assert any(len(c) == M for cands in batched[1:] for c in cands)  # the rest decoded on
    assert fw.calls == M


def test_lockstep_hook_never_done_gives_the_same_rows(students):
    """Under FSDP (`lockstep`) decoding runs until every process is done. Here every first draw is declared
    an EOS id, so every row ends after one token: alone that is the prefix pass only; with a hook that never
    says done all M passes run (the hook asked once per pass, with this batch's done = True) and the rows are
    unchanged; a hook that passes `done` through is the single-process loop."""
    student = students["llama"]
    prefixes = [student.prefix(p) for p in PROMPTS[:3]]
    eos = student.eos_ids
    first = student.sample_batch(prefixes, 2, M, 1.0, gens(3))
    student.eos_ids = eos + sorted({c[0] for cands in first for c in cands})
    try:
        with Forwards(student) as fw:
            alone = student.sample_batch(prefixes, 2, M, 1.0, gens(3))
        assert fw.calls == 1
        seen: list[bool] = []
        student.lockstep = lambda done: seen.append(done) or False  # another process is never done
        with Forwards(student) as fw:
            together = student.sample_batch(prefixes, 2, M, 1.0, gens(3))
        assert fw.calls == M and seen == [True] * (M - 1)
        assert together == one_by_one(student, prefixes, 2, 1.0)  # `sample` under the same hook
        student.lockstep = lambda done: done
        with Forwards(student) as fw:
            through = student.sample_batch(prefixes, 2, M, 1.0, gens(3))
        assert fw.calls == 1
    finally:
        student.lockstep = None
        student.eos_ids = eos
    assert together == alone == through == [[c[:1] for c in cands] for cands in first]


def test_one_batched_decode_replaces_a_decode_per_prompt(students):
    """Forward passes of the language model: the batch makes 1 + (M - 1), prompt by prompt makes N·M."""
    student = students["qwen2"]
    prefixes = [student.prefix(p) for p in PROMPTS]
    with Forwards(student) as fw:
        student.sample_batch(prefixes, 4, M, 1.0, gens(4))
    batched = fw.calls
    with Forwards(student) as fw:
        one_by_one(student, prefixes, 4, 1.0)
    assert batched <= M and fw.calls == len(PROMPTS) * M
    # the edge cases: no prefixes, k == 0, one prefix (the plain `sample` path)
    assert student.sample_batch([], 4, M, 1.0, []) == []
    assert student.sample_batch(prefixes[:2], 0, M, 1.0, gens(2)) == [[], []]
    assert student.sample_batch(prefixes[:1], 3, M, 1.0, gens(1)) == one_by_one(student, prefixes[:1], 3, 1.0)
    with pytest.raises(ValueError, match="one generator per prefix"):
        student.sample_batch(prefixes, 2, M, 1.0, gens(3))


@pytest.mark.parametrize("name", ["llava", "llava_next"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_llava_prompts_with_different_images_decode_together(name, temperature, students, images):
    """LLaVA / LLaVA-NeXT are batched too (image features scattered in batch order, positions counted over
    real tokens), also beside a text-only prompt; the decode runs no vision pass."""
    student = students[name]
    prefixes = [student.prefix(p, images[i] if i != 2 else None) for i, p in enumerate(PROMPTS)]
    vision = student.vision_calls
    with Forwards(student) as fw:
        batched = student.sample_batch(prefixes, 3, M, temperature, gens(4))
    assert student.vision_calls == vision and fw.calls == M
    assert batched == one_by_one(student, prefixes, 3, temperature)
    # the image matters: prompt 0 with image 1 samples differently (so a mixed-up scatter would show)
    other = student.sample_batch([student.prefix(PROMPTS[0], images[1])] + prefixes[1:], 3, M, temperature, gens(4))
    assert other[0] != batched[0] and other[1:] == batched[1:]


@pytest.mark.parametrize("name", ["llama", "llava"])
def test_rollout_batch_groups_equal_per_prompt_rollouts(name, students, images):
    student = students[name]
    recs = [Record(id=f"r{i}", prompt=p, image=images[i] if name == "llava" else None, reference="red")
            for i, p in enumerate(PROMPTS[:3])]
    anchors = ["red", "a blue square", "5"]
    cfg, rcfg = TrainConfig(objective="ldl_grpo", k=3, temperature=1.0), RankingConfig()
    student.inputs_cache.clear()   # prompts not built before (the module's student has seen them)
    vision = student.vision_calls
    groups = rollout_batch(student, recs, anchors, cfg, rcfg, M, [sample_generator(0, 2, i) for i in range(3)])
    assert student.vision_calls - vision == (3 if name == "llava" else 0)  # one vision pass per prompt
    for i, g in enumerate(groups):
        one = rollout(student, recs[i], anchors[i], cfg, rcfg, M, sample_generator(0, 2, i))
        assert g.record is recs[i] and g.anchor == anchors[i] and len(g.candidates) == 3
        assert g.candidates == one.candidates and g.texts == one.texts
        # the step's groups are scored in one batched pass (left padding: equal up to ~1e-6)
        close = lambda a, b: torch.allclose(a, b, rtol=0, atol=1e-5)  # noqa: E731
        assert close(g.scores.candidates, one.scores.candidates) and close(g.scores.anchor, one.scores.anchor)
        assert close(g.margins, one.margins) and close(g.target, one.target)
        assert torch.equal(g.prefix.input_ids, one.prefix.input_ids)
    # sft2 samples nothing; a mismatched list is refused
    none = rollout_batch(student, recs, anchors, TrainConfig(objective="sft2"), rcfg, M, gens(3))
    assert [g.candidates for g in none] == [[], [], []] and all(not g.ranked for g in none)
    with pytest.raises(ValueError, match="one anchor and one generator"):
        rollout_batch(student, recs, anchors[:2], cfg, rcfg, M, gens(3))


def test_train_rl_samples_the_step_with_the_global_index_generators(ckpts, tmp_path):
    """train_rl's first step logs, for each prompt i of the step, the candidates `rollout` draws with
    sample_generator(seed, 0, i) from the same starting weights."""
    student = load(ckpts["llama"], seed=3)
    recs = [Record(id=f"r{i}", prompt=p, reference=a) for i, (p, a) in enumerate(zip(PROMPTS, ["5", "red", "hi", "2"]))]
    anchors = {r.id: r.reference for r in recs}
    cfg, rcfg = TrainConfig(objective="ldl_grpo", rl_steps=1, batch_size=3, k=2, beta=0.1, lr=1e-3), RankingConfig()
    batch = rl_order(recs, 1, 3, seed=7)[:3]
    expected = {r.id: rollout(student, r, anchors[r.id], cfg, rcfg, M, sample_generator(7, 0, i)).texts
                for i, r in enumerate(batch)}
    rows = train_rl(student, recs, anchors, cfg, rcfg, max_new_tokens=M, out_dir=tmp_path / "rl", seed=7,
                    progress=False)
    assert len(rows) == 1 and not rows[0]["skipped"]
    logged = [json.loads(x) for x in (tmp_path / "rl" / "rollouts.jsonl").read_text().splitlines()]
    assert [g["id"] for g in logged] == [r.id for r in batch]
    assert {g["id"]: g["candidates"] for g in logged} == expected
