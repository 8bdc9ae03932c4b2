"""Every recipe in configs/ loads and validates; a text student trains through the same CLI as a VLM
student, only the recipe differs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlrlcd.adapters.config import StudentConfig
from vlrlcd.adapters.families import FAMILIES
from vlrlcd.adapters.loader import quantization_config, skip_modules
from vlrlcd.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
REAL = {
    "llava15_7b_vqa_qlora.yaml": ("llava-hf/llava-1.5-7b-hf", "4bit", "llava"),
    "qwen25vl_3b_caption_qlora.yaml": ("Qwen/Qwen2.5-VL-3B-Instruct", "4bit", "qwen2_5_vl"),
    "qwen2vl_2b_vqa.yaml": ("Qwen/Qwen2-VL-2B-Instruct", "none", "qwen2_vl"),
    "qwen25_15b_text_math.yaml": ("Qwen/Qwen2.5-1.5B-Instruct", "none", "text"),
}


def test_every_recipe_loads_and_validates():
    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    assert set(REAL) | {"tiny_text_arithmetic.yaml"} <= set(names)
    for name in names:
        cfg = load_config(CONFIGS / name)
        assert cfg.train.k >= 2 and cfg.student.max_new_tokens > 0, name


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_checkpoint_recipes(name):
    model, quant, family = REAL[name]
    cfg = load_config(CONFIGS / name)
    assert cfg.student.name_or_path == model and cfg.student.quantization == quant
    assert cfg.student.compute_dtype == "bfloat16" and cfg.train.objective == "ldl_grpo"
    assert cfg.run_dir.startswith("runs/")
    if family == "text":
        assert cfg.data.task == "arithmetic"
    else:
        assert cfg.data.task == "file" and cfg.data.train_path and cfg.data.eval_path
    bnb = quantization_config(cfg.student, FAMILIES[family])
    if quant == "4bit":
        assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
        assert set(skip_modules(FAMILIES[family])) <= set(bnb.llm_int8_skip_modules)
    else:
        assert bnb is None
    # overrides reach the student section like on the command line
    over = load_config(CONFIGS / name, ["student.lora.r=8", "student.quantization=8bit"])
    assert over.student.lora.r == 8 and quantization_config(over.student, FAMILIES[family]).load_in_8bit


def test_recipe_typos_are_named():
    from vlrlcd.errors import VlrlcdError

    with pytest.raises(VlrlcdError, match="did you mean 'student.quantization'"):
        load_config(CONFIGS / "qwen25_15b_text_math.yaml", ["student.quantisation=4bit"])
    with pytest.raises(VlrlcdError, match="student.quantization must be none, 8bit or 4bit"):
        load_config(CONFIGS / "qwen25_15b_text_math.yaml", ["student.quantization=int4"])


@pytest.mark.parametrize("student", ["tiny-text", "tiny-llava"])
def test_text_and_vlm_students_train_through_the_same_cli(student, tmp_path, capsys):
    """`vlrlcd train configs/tiny_text_arithmetic.yaml`: SFT then LDL-GRPO of a text student; the same
    command with a VLM student and an image task (only recipe keys differ) goes the same way."""
    from vlrlcd.cli import main

    run = tmp_path / "run"
    extra = [] if student == "tiny-text" else [
        "student.name_or_path=tiny-llava", "data.task=shapes_vqa",
        "student.tiny={vocab_size: 300, hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64, "
        "vision_hidden_size: 32, vision_layers: 1}"]
    rc = main(["train", str(CONFIGS / "tiny_text_arithmetic.yaml"), f"run_dir={run}", *extra, "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["methods"]) == {"sft", "ldl_grpo"} and summary["teacher_calls"] == 16
    assert (run / "ldl_grpo" / "adapter" / "adapter_config.json").exists()
    rows = [json.loads(x) for x in (run / "ldl_grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("stage") == "rl"] == [1, 2]
    base = json.loads((run / f"student_base-{student}" / "config.json").read_text())
    assert base["model_type"] == ("llama" if student == "tiny-text" else "llava")
    cfg = StudentConfig()
    assert cfg.name_or_path == "tiny-llava"  # the default student is the VLM; the recipe picked the text one
