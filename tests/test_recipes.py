"""Every recipe in configs/ loads and validates; a text student trains through the same CLI as a VLM
student, only the recipe differs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vlrlcd.adapters.config import StudentConfig
from vlrlcd.adapters.families import FAMILIES
from vlrlcd.adapters.loader import quantization_config, skip_modules
from vlrlcd.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# recipe -> the student family it is written for (read from the checkpoint's architecture, not from the YAML)
REAL = {
    "llava15_7b_vqa_qlora.yaml": "llava",
    "qwen25vl_3b_caption_qlora.yaml": "qwen2_5_vl",
    "qwen2vl_2b_vqa.yaml": "qwen2_vl",
    "qwen25_15b_text_math.yaml": "text",
}
# the memory figures a recipe's header states (`vlrlcd plan`'s total, as configured and with group_chunk=1)
PLAN_CLAIM = re.compile(r"\s+(?:#\s*)?".join(   # words may wrap onto the next comment line
    ["`vlrlcd plan`", "estimates", r"([\d.]+)", "GiB", "for", "one", "RL", "step", "as", "configured,", r"([\d.]+)",
     "GiB", "with", r"train\.group_chunk=1"]))


def test_every_recipe_loads_and_validates():
    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    assert set(REAL) | {"tiny_text_arithmetic.yaml"} <= set(names)
    for name in names:
        cfg = load_config(CONFIGS / name)
        assert cfg.train.k >= 2 and cfg.student.max_new_tokens > 0, name
    runs = [load_config(CONFIGS / n).run_dir for n in names]
    assert len(set(runs)) == len(runs), runs   # two recipes never train into (or resume) the same run directory


def _as_stated(gib: float) -> float:
    """How a header states an estimate: whole GiB from 10 up, else one decimal."""
    return float(round(gib)) if gib >= 10 else round(gib, 1)


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_checkpoint_recipes(name, monkeypatch, tmp_path):
    """A real recipe's checkpoint is of the family it is written for (its architecture, known offline), its
    4-bit setting builds the quantization its family needs, and the memory its header states is what
    `vlrlcd plan` estimates for it as configured and with train.group_chunk=1."""
    import huggingface_hub.constants as hub

    from vlrlcd.adapters.families import detect_family
    from vlrlcd.plan import GiB, plan_config, read_config

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))   # the built-in table, whatever is cached
    family = REAL[name]
    cfg = load_config(CONFIGS / name)
    assert detect_family(read_config(cfg.student.name_or_path)[0], cfg.student.family).name == family
    bnb = quantization_config(cfg.student, FAMILIES[family])
    if cfg.student.quantization == "4bit":
        assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
        assert set(skip_modules(FAMILIES[family])) <= set(bnb.llm_int8_skip_modules)
    else:
        assert bnb is None
    # overrides reach the student section like on the command line
    over = load_config(CONFIGS / name, ["student.lora.r=8", "student.quantization=8bit"])
    assert over.student.lora.r == 8 and quantization_config(over.student, FAMILIES[family]).load_in_8bit
    claim = PLAN_CLAIM.search((CONFIGS / name).read_text(encoding="utf-8"))
    assert claim, f"{name}: the header states no `vlrlcd plan` estimate"
    as_configured = plan_config(cfg)[0].total / GiB
    cfg.train.group_chunk = 1
    chunked = plan_config(cfg)[0].total / GiB
    assert (float(claim[1]), float(claim[2])) == (_as_stated(as_configured), _as_stated(chunked)), \
        f"{name}: `vlrlcd plan` now estimates {as_configured:.3g} and {chunked:.3g} GiB; update the header"


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
