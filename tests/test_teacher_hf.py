"""The hf backend: a local (tiny, random) vision-language checkpoint answering through the adapters code."""

from __future__ import annotations

import pytest
from PIL import Image

from vlrlcd.adapters.config import TinyConfig
from vlrlcd.adapters.tiny import build_tiny_llava
from vlrlcd.datasets.records import Record
from vlrlcd.teacher import build_teacher
from vlrlcd.teacher.config import TeacherConfig
from vlrlcd.teacher.hf_teacher import HfTeacher
from vlrlcd.teacher.runner import fill_anchors
from vlrlcd.teacher.store import AnchorStore

TINY = TinyConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                  vision_hidden_size=32, vision_layers=1)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("hf") / "teacher", ["What colour is the shape?"], TINY, seed=0)


def test_hf_teacher_answers_greedily_once_per_prompt(teacher_dir, tmp_path):
    for i, colour in enumerate(("red", "blue", "green")):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{i}.png")
    recs = [Record(id=f"v{i}", prompt="What colour is the shape?", image=str(tmp_path / f"{i}.png")) for i in range(3)]
    recs.append(Record(id="t", prompt="What is 3 + 4?"))
    cfg = TeacherConfig(backend="hf", model=str(teacher_dir), max_tokens=4, concurrency=2)
    teacher = build_teacher(cfg)
    assert isinstance(teacher, HfTeacher)
    with AnchorStore(tmp_path / "anchors.sqlite") as store:
        s = fill_anchors(cfg, recs, store, progress=False, teacher=teacher)
        assert teacher.calls == 4 and s.calls == 4 and s.stored + s.failed == 4
        anchors = store.anchors_for(recs, cfg)
        direct = teacher.adapter.generate(recs, 4)  # greedy: the same text again
        assert anchors == {r.id: d.strip() for r, d in zip(recs, direct) if d.strip()}
        assert set(s.failures_by_kind) <= {"empty"}
        again = fill_anchors(cfg, recs, store, progress=False, teacher=teacher)
        assert again.calls == s.failed and teacher.calls == 4 + s.failed  # only failed prompts are asked again


def test_hf_teacher_is_the_saved_model_frozen_in_eval_mode_without_a_lora(teacher_dir):
    """The teacher answers with the checkpoint's own weights: no peft wrapper, no LoRA, nothing trainable,
    no dropout (eval mode)."""
    from safetensors.torch import load_file

    teacher = HfTeacher(TeacherConfig(backend="hf", model=str(teacher_dir), max_tokens=4))
    model = teacher.adapter.model
    assert not hasattr(model, "peft_config") and not any("lora" in n for n, _ in model.named_parameters())
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    saved = {}
    for f in sorted(teacher_dir.glob("*.safetensors")):
        saved.update(load_file(f))
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in saved.values())
    assert teacher.answer(Record(id="t", prompt="What is 3 + 4?")).text == \
        teacher.adapter.generate([Record(id="t", prompt="What is 3 + 4?")], 4)[0].strip()
