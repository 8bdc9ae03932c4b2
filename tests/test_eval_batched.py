"""Batched greedy evaluation: `StudentAdapter.generate` builds `batch_size` prompts' prefixes together (one
processor call, one vision pass: `prefixes`, equal to `prefix` one at a time) and decodes them in one
`sample_batch` call, giving, answer for answer, what one prompt at a time gives, on every family (Llama and Qwen2
text, LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL; images of different sizes, prompts of different lengths, so left
padding); `evaluate` and the pipeline honour `eval.batch_size`; `generate_sharded` decodes its shard in batches
with the same calls on every process and the same answers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from test_steps_common import Forwards, eval_students
from vlrlcd.adapters.config import LoraConfig, TinyConfig
from vlrlcd.config import load_config
from vlrlcd.datasets.records import Record
from vlrlcd.errors import VlrlcdError
from vlrlcd.evaluation.config import EvalConfig
from vlrlcd.evaluation.evaluate import evaluate, generate_sharded

TINY = TinyConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                  vision_hidden_size=32, vision_layers=1)
CORPUS = ["What color is the shape?", "red green blue square circle", "What is 2 + 3? 5"]
FAMILIES = ["llama", "qwen2", "llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]
TEXT = ("llama", "qwen2")
PROMPTS = ["What is 2 + 3?", "What color is the shape on the left of the big square?", "Hi",
           "Describe the image. a red circle and a blue square", "Count the shapes", "What is 12 + 30?",
           "Name the colour of the circle in the middle"]
M = 6  # max new tokens


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    return eval_students(tmp_path_factory.mktemp("students"), FAMILIES, CORPUS, TINY, LoraConfig(r=4, alpha=8))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    paths = []
    sizes = ((32, 32), (40, 24), (32, 32), (16, 64), (48, 32), (32, 32), (24, 48))  # Qwen / NeXT: different grids
    for i, colour in enumerate(("red", "blue", "green", "white", "black", "yellow", "purple")):
        img = Image.new("RGB", sizes[i], colour)
        img.paste((255, 255, 0) if i % 2 else (0, 0, 255), (4 + i, 4, 12 + i, 12))
        img.save(root / f"{i}.png")
        paths.append(str(root / f"{i}.png"))
    return paths


def records(name: str, images: list[str]) -> list[Record]:
    """One record per prompt; vision students get an image on every prompt but one (text only beside images)."""
    return [Record(f"r{i}", p, images[i] if name not in TEXT and i != 2 else None, "5")
            for i, p in enumerate(PROMPTS)]


def one_at_a_time(student, recs: list[Record]) -> list[str]:
    """The reference: each prompt's own prefix, decoded alone by `sample` (the pre-batching path)."""
    return [student.decode(student.sample(student.prefix(r.prompt, r.image), 1, M, temperature=0.0)[0])
            for r in recs]


class SampleBatchCalls:
    """Records the number of prefixes of each `sample_batch` call."""

    def __init__(self, student, monkeypatch):
        self.sizes: list[int] = []
        real = student.sample_batch

        def wrapped(prefixes, *args, **kwargs):
            self.sizes.append(len(prefixes))
            return real(prefixes, *args, **kwargs)

        monkeypatch.setattr(student, "sample_batch", wrapped)


@pytest.mark.parametrize("name", FAMILIES)
def test_batched_answers_equal_one_at_a_time(name, students, images):
    student = students[name]
    recs = records(name, images)
    want = one_at_a_time(student, recs)
    assert len(set(want)) > 1  # the random LoRA makes prompts answer differently: a real comparison
    for bs in (1, 3, 7, 32):
        assert student.generate(recs, M, batch_size=bs) == want, bs


@pytest.mark.parametrize("name", FAMILIES)
def test_prefixes_built_together_equal_one_at_a_time(name, students, images):
    """`prefixes`: the same token ids, model inputs and image features as `prefix` per prompt, from one vision
    pass over the batch's images (vision_calls counts the images); given features skip the vision pass."""
    student = students[name]
    recs = records(name, images)
    passes = []
    towers = [m for n, m in student.model.named_modules() if n.split(".")[-1] == student.family.vision_module]
    handle = towers[0].register_forward_hook(lambda *_: passes.append(1)) if student.is_vision else None
    student.inputs_cache.clear()   # prompts not built before (the module's student has seen them)
    before = student.vision_calls
    with torch.no_grad():
        together = student.prefixes([r.prompt for r in recs], [r.image for r in recs])
    n_images = sum(r.image is not None for r in recs)
    assert student.vision_calls - before == n_images and len(passes) == (1 if n_images else 0)
    with torch.no_grad():
        alone = [student.prefix(r.prompt, r.image) for r in recs]
        again = student.prefixes([r.prompt for r in recs], [r.image for r in recs], [p.image_features for p in alone])
    if handle is not None:
        handle.remove()
    assert student.vision_calls - before == 2 * n_images  # `again` encoded nothing
    for a, b, c in zip(together, alone, again):
        assert torch.equal(a.input_ids, b.input_ids) and a.next_position == b.next_position
        assert a.model_kwargs.keys() == b.model_kwargs.keys() == c.model_kwargs.keys()
        for k, v in b.model_kwargs.items():
            if torch.is_tensor(v):
                assert torch.equal(a.model_kwargs[k], v) and torch.equal(c.model_kwargs[k], v), k
        if b.image_features is None:
            assert a.image_features is None and c.image_features is None
        else:
            fa, fb = a.image_features.pooler_output, b.image_features.pooler_output
            assert len(fa) == len(fb) == 1 and fa[0].shape == fb[0].shape
            assert torch.allclose(fa[0], fb[0], rtol=0, atol=1e-5)
            assert c.image_features is b.image_features
    with pytest.raises(ValueError, match="one image and one features entry per prompt"):
        student.prefixes(["a", "b"], [None])


@pytest.mark.parametrize("name", ["llama", "llava", "qwen2_vl"])
def test_evaluate_honours_batch_size(name, students, images, monkeypatch, tmp_path):
    student = students[name]
    recs = records(name, images)
    calls = SampleBatchCalls(student, monkeypatch)
    res3 = evaluate(student, recs, M, out_dir=tmp_path / "bs3", progress=False, batch_size=3)
    assert calls.sizes == [3, 3, 1]
    calls.sizes.clear()
    res1 = evaluate(student, recs, M, progress=False, batch_size=1)
    assert calls.sizes == [1] * 7
    assert res3.predictions == res1.predictions and res3.value == res1.value and res3.n == 7
    assert [p["prediction"] for p in res3.predictions] == one_at_a_time(student, recs)
    assert (tmp_path / "bs3" / "predictions.jsonl").read_text().count("\n") == 7
    calls.sizes.clear()
    evaluate(student, recs, M, progress=False)
    assert calls.sizes == [7]  # the default (EvalConfig.batch_size = 16) takes them all at once


def test_a_batch_decodes_in_one_pass_per_token(students):
    """4 prompts in one batch: one prefix pass plus at most M - 1 decode passes, instead of >= 4 per prompt."""
    student = students["llama"]
    recs = records("llama", [])[:4]
    with Forwards(student) as batched:
        student.generate(recs, M, batch_size=4)
    with Forwards(student) as single:
        student.generate(recs, M, batch_size=1)
    assert batched.calls <= M and single.calls >= 4 and batched.calls < single.calls


def test_bad_batch_size_is_a_user_error(students):
    with pytest.raises(VlrlcdError, match="batch_size must be >= 1"):
        students["llama"].generate(records("llama", [])[:2], M, batch_size=0)
    with pytest.raises(VlrlcdError, match="eval.batch_size must be >= 1"):
        load_config(None, ["eval.batch_size=0"])
    with pytest.raises(VlrlcdError, match="eval.metric 'bleu'"):
        load_config(None, ["eval.metric=bleu"])
    assert load_config(None, ["eval.batch_size=4"]).eval.batch_size == 4


@dataclass
class FakeDist:
    """A process of a `world`-process launch: all_gather hands back every rank's part (collected by the test)."""

    rank: int
    world: int
    parts: list
    sharded: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> list[int]:
        return list(range(self.rank, n, self.world))

    def all_gather(self, obj):
        self.parts[self.rank] = obj
        return self.parts


@pytest.mark.parametrize("name", FAMILIES)
def test_generate_sharded_decodes_in_batches_in_lockstep(name, students, images, monkeypatch):
    """7 records over 3 processes: shards of 3, 2, 2 padded to 3 slots each; batch 2 -> every process makes
    the same calls (sizes [2, 1]); process 0 gets every answer in record order, equal to one at a time."""
    student = students[name]
    recs = records(name, images)
    calls = SampleBatchCalls(student, monkeypatch)
    parts: list = [None] * 3
    sizes = []
    for rank in (2, 1, 0):  # the main process last, once every part is in
        calls.sizes.clear()
        got = generate_sharded(student, recs, M, FakeDist(rank, 3, parts), batch_size=2)
        sizes.append(list(calls.sizes))
        assert (got is None) == (rank != 0)
    assert sizes == [[2, 1]] * 3
    assert got == one_at_a_time(student, recs)


def test_pipeline_eval_passes_the_configured_batch_size(monkeypatch, tmp_path):
    import vlrlcd.evaluation.evaluate as evaluation
    from vlrlcd.pipeline import _eval

    seen = {}

    def fake_evaluate(student, recs, max_new_tokens, metric, out, progress, answers, batch_size=-1):
        seen.update(batch_size=batch_size, max_new_tokens=max_new_tokens)
        return SimpleNamespace(metric="accuracy", value=1.0, n=len(recs))

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    cfg = SimpleNamespace(eval=EvalConfig(max_new_tokens=5, batch_size=3, train_prompts=0))
    prep = SimpleNamespace(cfg=cfg, eval=[Record("a", "q", None, "r")])
    assert _eval(None, prep, tmp_path, False) == {"accuracy": 1.0, "n": 1}
    assert seen == {"batch_size": 3, "max_new_tokens": 5}


def test_sharded_stage_evaluation_decodes_eval_batch_size_at_a_time(students, images, monkeypatch, tmp_path):
    """A stage on a sharded base: every process decodes the held-out prompts `eval.batch_size` at a time."""
    from vlrlcd.pipeline import _evaluate_stage

    student = students["llava"]
    recs = records("llava", images)
    calls = SampleBatchCalls(student, monkeypatch)
    prep = SimpleNamespace(cfg=SimpleNamespace(eval=EvalConfig(max_new_tokens=M, batch_size=2, train_prompts=0)),
                           eval=recs)
    metrics = _evaluate_stage(student, prep, tmp_path, FakeDist(0, 1, [None]), progress=False)
    assert calls.sizes == [2, 2, 2, 1] and metrics["n"] == 7
    assert [p["prediction"] for p in map(json.loads, (tmp_path / "predictions.jsonl").read_text().splitlines())] \
        == one_at_a_time(student, recs)


def test_cli_eval_passes_the_configured_batch_size(students, monkeypatch, tmp_path, capsys):
    """`vlrlcd eval CONFIG eval.batch_size=3 --adapter A`: the held-out prompts are decoded 3 at a time."""
    import vlrlcd.adapters.loader as loader
    import vlrlcd.datasets.load as load
    import vlrlcd.student_base as student_base
    from vlrlcd.cli import main

    student = students["llama"]
    calls = SampleBatchCalls(student, monkeypatch)
    monkeypatch.setattr(student_base, "built_student_config", lambda cfg: cfg.student)
    monkeypatch.setattr(loader, "load_student", lambda *args, **kwargs: student)
    monkeypatch.setattr(load, "load_splits", lambda cfg: SimpleNamespace(eval=records("llama", [])))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\n", encoding="utf-8")
    assert main(["eval", str(cfg), "eval.batch_size=3", f"eval.max_new_tokens={M}", "--adapter",
                 str(tmp_path / "adapter"), "--no-progress"]) == 0
    assert calls.sizes == [3, 3, 1]
    assert json.loads((tmp_path / "eval.json").read_text())["n"] == 7
    capsys.readouterr()


def test_pipeline_eval_also_scores_the_first_training_prompts(monkeypatch, tmp_path):
    import vlrlcd.evaluation.evaluate as evaluation
    from vlrlcd.pipeline import _eval

    calls = []

    def fake_evaluate(student, recs, max_new_tokens, metric, out, progress, answers=None, batch_size=-1):
        calls.append(([r.id for r in recs], out))
        return SimpleNamespace(metric="accuracy", value=0.25 * len(calls), n=len(recs))

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    cfg = SimpleNamespace(eval=EvalConfig(train_prompts=2))
    train = [Record(f"t{i}", "q", None, "r") for i in range(5)]
    prep = SimpleNamespace(cfg=cfg, eval=[Record("a", "q", None, "r")], train=train)
    assert _eval(None, prep, tmp_path, False) == {"accuracy": 0.25, "n": 1, "train_accuracy": 0.5}
    assert calls == [(["a"], tmp_path), (["t0", "t1"], None)]   # training answers are never written as predictions
    calls.clear()   # sharded runs pass the held-out answers: no extra decode of training prompts there
    assert _eval(None, prep, tmp_path, False, answers=["r"]) == {"accuracy": 0.25, "n": 1}


def test_eval_speed_bench_measures_both_side_by_side(students, images):
    """bench/eval_speed.py's measurement on a tiny student: both timings, their ratio, the same answers."""
    from bench.eval_speed import measure

    recs = records("llava", images)
    res = measure(students["llava"], recs, M, batch=4, reps=2, warmup=0)
    assert res["n"] == 7 and res["batch"] == 4 and res["same_answers"] is True
    assert res["one_ms"] > 0 and res["batched_ms"] > 0 and res["prefixes_ms"] > 0 and res["decode_ms"] > 0
    assert res["speedup_min"] <= res["speedup_median"] <= res["speedup_max"]
