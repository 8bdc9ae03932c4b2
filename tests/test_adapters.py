"""Every student family behind one StudentAdapter: tiny random checkpoints saved with save_pretrained
(model + real processor / tokenizer) load through `load_student`, sample, score and take an LDL-GRPO step;
the shared-prefix log-probs and their LoRA gradients equal the naive per-candidate computation; the
vision tower runs once per prompt per RL step."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image

from vlrlcd.adapters.config import LoraConfig, StudentConfig, TinyConfig
from vlrlcd.adapters.loader import load_student
from vlrlcd.adapters.naive import naive_token_logprobs
from vlrlcd.adapters.tiny import BUILDERS
from vlrlcd.datasets.records import Record
from vlrlcd.ranking.config import RankingConfig
from vlrlcd.ranking.scorers import self_likelihood
from vlrlcd.training.config import TrainConfig
from vlrlcd.training.rl import train_rl
from vlrlcd.training.rollout import rollout, sample_generator
from vlrlcd.training.steps import StepContext, group_loss

TINY = TinyConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                  vision_hidden_size=32, vision_layers=1)
FAMILY_OF = {"llama": "text", "qwen2": "text", "llava": "llava", "llava_next": "llava_next",
             "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl"}
ALL = list(FAMILY_OF)
VLMS = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]
PROMPT = "What color is the shape?"
CORPUS = [PROMPT, "red green blue square circle", "What is 2 + 3? 5"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("students")
    return {name: str(BUILDERS[name](root / name, CORPUS, TINY, seed=0)) for name in ALL}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A square and a non-square image (Qwen: a 4x6 patch grid, 2x3 merged tokens, so h != w positions)."""
    root = tmp_path_factory.mktemp("images")
    paths = []
    for i, (size, colour) in enumerate((((32, 32), "red"), ((40, 24), "blue"))):
        img = Image.new("RGB", size, colour)
        img.paste((255, 255, 0), (4, 4, 12, 12))
        img.save(root / f"{i}.png")
        paths.append(str(root / f"{i}.png"))
    return paths


def load(path: str, **kw):
    return load_student(StudentConfig(name_or_path=path, lora=LoraConfig(r=4, alpha=8)), **kw)


def randomize_lora(student, seed: int = 0, std: float = 0.3) -> None:
    """LoRA B starts at zero; give it random values so the adapter changes the logits and every LoRA
    matrix gets a gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def image_for(name: str, images: list[str], i: int = 0) -> str | None:
    return images[i] if name in VLMS else None


def vision_module(student) -> torch.nn.Module:
    name = student.family.vision_module
    matches = [m for n, m in student.model.named_modules() if n.split(".")[-1] == name]
    assert matches, f"no module named {name}"
    return matches[0]


class CallCounter:
    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.calls += 1


@pytest.mark.parametrize("name", ALL)
def test_family_loads_samples_scores_and_steps(name, ckpts, images):
    student = load(ckpts[name])
    assert student.family.name == FAMILY_OF[name]
    assert student.is_vision == (name in VLMS)
    assert (student.processor is not None) == (name in VLMS)
    randomize_lora(student, seed=1)
    rec = Record(id="r0", prompt=PROMPT, image=image_for(name, images), reference="red")
    cfg = TrainConfig(k=3, temperature=1.0, beta=0.1)
    rcfg = RankingConfig()
    group = rollout(student, rec, "red", cfg, rcfg, max_new_tokens=4, generator=sample_generator(0, 0, 0))
    assert len(group.candidates) == 3 and all(1 <= len(c) <= 4 for c in group.candidates)
    assert all(isinstance(t, str) for t in group.texts)
    assert torch.isfinite(group.scores.candidates).all() and torch.isfinite(group.scores.anchor)
    assert group.target.sum().item() == pytest.approx(1.0, abs=1e-6)
    # the scorer on its own: the anchor scored under the scoring prompt, candidates in [-inf, 0]
    scores = self_likelihood(student, rec.prompt, rec.image, "red", group.candidates, group.prefix.image_features)
    assert torch.allclose(scores.candidates, group.scores.candidates, atol=1e-6)
    assert (scores.candidates <= 0).all()

    before = {n: p.detach().clone() for n, p in student.model.named_parameters()}
    student.model.train()
    loss, metrics = group_loss(student, group, cfg, StepContext(0, 1, rcfg))
    assert torch.isfinite(loss) and metrics["kl_ref"] >= 0
    loss.backward()
    params = student.trainable_parameters()
    assert params and all(p.grad is not None for p in params)
    torch.optim.SGD(params, lr=0.5).step()
    changed = {n for n, p in student.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n for n in changed), sorted(changed)[:5]
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    assert set(changed) == {n for n, p in student.model.named_parameters() if p.requires_grad}
    # LoRA sits on the language model only: the vision tower is frozen and untouched
    assert not any(student.family.vision_module and f".{student.family.vision_module}." in n for n in changed)
    answers = student.generate([rec], max_new_tokens=3)
    assert len(answers) == 1 and isinstance(answers[0], str)


def assert_shared_equals_naive(student, image: str | None) -> list[str]:
    """token_logprobs and its gradients w.r.t. every trainable tensor == the naive per-candidate pass;
    returns the names of the trainable tensors checked."""
    student.model.eval()
    responses = [student.encode_response(t) for t in ("red", "a blue square", "two circles and red")]
    assert len({len(r) for r in responses}) == 3  # ragged: padding is exercised
    weights = torch.Generator().manual_seed(0)
    w = [torch.rand(len(r), generator=weights) + 0.5 for r in responses]
    named = [(n, p) for n, p in student.model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]

    prefix = student.prefix(PROMPT, image)
    shared = student.token_logprobs(prefix, responses)
    loss_shared = sum((shared.logp[k, : len(r)] * w[k]).sum() for k, r in enumerate(responses))
    grads_shared = torch.autograd.grad(loss_shared, params)

    naive = naive_token_logprobs(student, PROMPT, image, responses)
    loss_naive = sum((lp * w[k]).sum() for k, lp in enumerate(naive))
    grads_naive = torch.autograd.grad(loss_naive, params)

    for k, r in enumerate(responses):
        assert torch.allclose(shared.logp[k, : len(r)], naive[k], atol=1e-5, rtol=0)
        assert shared.mask[k].sum() == len(r) and (shared.logp[k, len(r):] == 0).all()
    assert loss_shared.abs() > 1.0  # not a vacuous comparison
    for (n, _), gs, gn in zip(named, grads_shared, grads_naive):
        assert torch.allclose(gs, gn, atol=1e-5, rtol=1e-4), (n, (gs - gn).abs().max())
        assert gs.abs().sum() > 0, n

    with torch.no_grad():
        batched = student.batch_token_logprobs([prefix] * len(responses), responses)
    assert torch.allclose(batched.logp, shared.logp.detach(), atol=1e-5, rtol=0)
    return [n for n, _ in named]


@pytest.mark.parametrize("name", ALL)
def test_shared_prefix_logprobs_and_grads_equal_naive(name, ckpts, images):
    """token_logprobs (prefix once, K continuations on the expanded cache) == each candidate as its own
    full sequence through the processor and model (the model computing every position itself), for the
    log-probs and for the gradients w.r.t. every LoRA tensor; the batched SFT path agrees too."""
    student = load(ckpts[name])
    randomize_lora(student, seed=2)
    checked = assert_shared_equals_naive(student, image_for(name, images, 1))
    assert checked and all("lora_" in n for n in checked)


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl"])
def test_trainable_projector_gets_the_same_gradients_through_the_one_vision_pass(name, ckpts, images):
    """student.lora.train_projector: the projector is trained in full (a peft modules_to_save copy), the
    vision tower stays frozen, and its gradient through the shared image features equals the naive one."""
    cfg = StudentConfig(name_or_path=ckpts[name], lora=LoraConfig(r=4, alpha=8, train_projector=True))
    student = load_student(cfg)
    randomize_lora(student, seed=6)
    checked = assert_shared_equals_naive(student, images[1])
    projector = [n for n in checked if "modules_to_save" in n]
    assert projector and all(student.family.projector in n for n in projector)
    assert all("lora_" in n or n in projector for n in checked)


@pytest.mark.parametrize("name", VLMS)
def test_text_prompt_after_image_prompt_on_a_vlm(name, ckpts, images):
    """A text-only prompt to a VLM after an image prompt: positions must not come from the image prompt
    (Qwen models cache rope deltas of the last prompt they saw)."""
    student = load(ckpts[name])
    randomize_lora(student, seed=3)
    student.model.eval()
    responses = [student.encode_response("five"), student.encode_response("2 + 3 is 5")]
    with torch.no_grad():
        student.token_logprobs(student.prefix(PROMPT, images[1]), responses)
        naive_token_logprobs(student, PROMPT, images[1], responses)  # the model's own pass with an image too
        text = student.token_logprobs(student.prefix("What is 2 + 3?"), responses)
        naive = naive_token_logprobs(student, "What is 2 + 3?", None, responses)
    for k, r in enumerate(responses):
        assert torch.allclose(text.logp[k, : len(r)], naive[k], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_greedy_sampling_on_the_shared_cache_follows_the_full_sequence_argmax(name, ckpts, images):
    """sample() steps on the expanded cache with its own positions: each greedy token is the argmax of the
    model's full-sequence logits at that step (positions of sampled tokens are right too)."""
    from vlrlcd.adapters.naive import naive_inputs

    student = load(ckpts[name])
    randomize_lora(student, seed=8, std=1.0)
    student.model.eval()
    image = image_for(name, images, 1)
    with torch.no_grad():
        seqs = student.sample(student.prefix(PROMPT, image), 2, 6, temperature=0.0)
        assert seqs[0] == seqs[1] and len(seqs[0]) >= 2
        inputs, P = naive_inputs(student, PROMPT, image, seqs[0])
        logits = student.model(**inputs).logits[0, P - 1: P - 1 + len(seqs[0])]
    chosen = logits.gather(-1, torch.tensor(seqs[0])[:, None])[:, 0]
    assert (chosen >= logits.max(-1).values - 1e-4).all()


@pytest.mark.parametrize("name", ["llama", "llava_next", "qwen2_5_vl"])
def test_continuation_logits_equal_naive(name, ckpts, images):
    """continuation_logits (what a white-box teacher's token values read) == the full-sequence logits after
    each response token."""
    from vlrlcd.adapters.naive import naive_inputs

    student = load(ckpts[name])
    randomize_lora(student, seed=7)
    student.model.eval()
    image = image_for(name, images, 1)
    responses = [student.encode_response("red"), student.encode_response("a blue square")]
    with torch.no_grad():
        logits, mask = student.continuation_logits(student.prefix(PROMPT, image), responses)
        for k, r in enumerate(responses):
            inputs, P = naive_inputs(student, PROMPT, image, r)
            full = student.model(**inputs).logits[0, P: P + len(r)]
            assert torch.allclose(logits[k, : len(r)], full, atol=1e-5)
            assert mask[k].sum() == len(r)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_dropping_mm_token_type_ids_is_caught(name, ckpts, images):
    """Without mm_token_type_ids the image tokens get 1-D positions (what Qwen2.5-VL silently does): the
    equality with the model's own computation must then break, so the test above guards it."""
    student = load(ckpts[name])
    randomize_lora(student, seed=4)
    student.model.eval()
    responses = [student.encode_response("red square")]
    with torch.no_grad():
        naive = naive_token_logprobs(student, PROMPT, images[1], responses)[0]
        good = student.token_logprobs(student.prefix(PROMPT, images[1]), responses).logp[0]
        original = student.family.build_prompts

        def without_types(adapter, prompts, images):
            rows, pixels = original(adapter, prompts, images)
            assert all("mm_token_type_ids" in kwargs for _, kwargs in rows)
            return [(ids, {k: v for k, v in kwargs.items() if k != "mm_token_type_ids"}) for ids, kwargs in rows], pixels

        student.family = dataclasses.replace(student.family, build_prompts=without_types)
        student.inputs_cache.clear()   # build the prompt again through the altered processor
        bad_prefix = student.prefix(PROMPT, images[1])
        bad = student.token_logprobs(bad_prefix, responses).logp[0]
    assert torch.allclose(good, naive, atol=1e-5)
    assert (bad - naive).abs().max() > 1e-3
    # the next-token position after a 2x3-token image is P - 3 (its 6 tokens take max(2, 3) = 3 positions)
    assert bad_prefix.next_position == bad_prefix.input_ids.shape[1]
    assert student.prefix(PROMPT, images[0]).next_position is not None


@pytest.mark.parametrize("name", VLMS)
def test_vision_tower_runs_once_per_prompt_per_rl_step(name, ckpts, images, tmp_path):
    """A forward hook on the vision tower: one whole RL step (train_rl, rl_steps=1, 2 prompts, K=3, scored
    under the frozen SFT adapter, policy + reference log-probs) runs it exactly twice; the naive
    per-candidate path runs it once per candidate."""
    sft = load(ckpts[name])
    randomize_lora(sft, seed=5)
    sft_dir = sft.save(tmp_path / "sft")
    student = load(ckpts[name], adapter=sft_dir, reference=sft_dir)
    counter = CallCounter(vision_module(student))
    recs = [Record(id=f"r{i}", prompt=PROMPT, image=images[i], reference="red") for i in range(2)]
    cfg = TrainConfig(rl_steps=1, batch_size=2, k=3, beta=0.1, lr=1e-3)
    rows = train_rl(student, recs, {"r0": "red", "r1": "blue"}, cfg, RankingConfig(score_with="sft"),
                    max_new_tokens=3, out_dir=tmp_path / "rl", seed=0, progress=False)
    assert len(rows) == 1 and not rows[0]["skipped"]
    assert counter.calls == 2 and student.vision_calls == 2
    groups = [json.loads(line) for line in (tmp_path / "rl" / "rollouts.jsonl").read_text().splitlines()]
    assert len(groups) == 2 and all(len(g["candidates"]) == 3 for g in groups)

    counter.calls = 0
    naive_token_logprobs(student, PROMPT, images[0], [student.encode_response(t) for t in ("a", "b c", "d")])
    assert counter.calls == 3
    counter.handle.remove()
