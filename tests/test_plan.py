"""`vlrlcd plan`: the analytic memory plan against the measured peak of live tensor bytes of real RL steps
(bench.memory.LiveTensorPeak, a TorchDispatchMode that tracks storages) on tiny students; the config lookup
(local directory, the Hugging Face cache, the built-in table for hub ids not on disk); the CLI; and
bench/gpu_check.py skipping cleanly without a GPU; what the method registry says a step runs; the modules' size."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from bench.memory import LiveTensorPeak, plan_for_run, resident_tensors, rl_steps_peak
from vlrlcd import methods
from vlrlcd.adapters.config import LoraConfig, StudentConfig, TinyConfig
from vlrlcd.adapters.loader import load_student
from vlrlcd.adapters.tiny import BUILDERS
from vlrlcd.cli import main
from vlrlcd.config import load_config
from vlrlcd.datasets.records import Record
from vlrlcd.errors import VlrlcdError
from vlrlcd.plan import (PUBLISHED, Settings, Shapes, parse_size, plan_config, plan_step, read_config,
                         student_arch)
from vlrlcd.training.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
TINY = TinyConfig(vocab_size=2000, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=512,
                  vision_hidden_size=32, vision_layers=1)
# a few hundred distinct words, so the vocabulary (and the log-prob passes' logits) is not negligible
CORPUS = ["What is 3 + 4? 7 red blue green circle square"] * 3 + [f"word{i} tok{i * 7}" for i in range(400)]
TOLERANCE = 0.20


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    """name -> (base dir, SFT adapter dir, image or None) for a tiny text (Llama) and a tiny LLaVA student."""
    root = tmp_path_factory.mktemp("plan_students")
    image = root / "red.png"
    Image.new("RGB", (32, 32), "red").save(image)
    out = {}
    for name, builder, img in (("text", "llama", None), ("llava", "llava", str(image))):
        torch.manual_seed(0)
        base = BUILDERS[builder](root / name, CORPUS, TINY, seed=0)
        cfg = StudentConfig(name_or_path=str(base), lora=LoraConfig(r=4, alpha=8))
        sft = load_student(cfg).save(root / f"{name}_sft")
        out[name] = (cfg, sft, img)
    return out


@pytest.mark.parametrize("name", ["text", "llava"])
@pytest.mark.parametrize("k", [3, 12])
def test_plan_within_20_percent_of_measured_peak(students, tmp_path, name, k):
    """Two real steps of train_rl (the CLI's loop; the second has AdamW's state) under LiveTensorPeak: the
    plan's peak is within ±20% of the measured peak of live tensor bytes."""
    scfg, sft, image = students[name]
    student = load_student(scfg, reference=sft)
    records = [Record(id=f"r{i}", prompt=f"What is {i} + 4? word{i} tok{i}", image=image, reference="7")
               for i in range(4)]
    anchors = {r.id: "7 red" for r in records}
    cfg = TrainConfig(rl_steps=2, batch_size=4, k=k, beta=0.05, tensorboard=False, max_bad_steps=5)
    torch.manual_seed(0)
    measured, rows = rl_steps_peak(student, records, anchors, cfg, 8, tmp_path / "rl")
    assert len(rows) == 2
    plan = plan_for_run(student, scfg, records, anchors, cfg, 8, device="cpu")
    ratio = plan.peak / measured
    assert abs(ratio - 1) <= TOLERANCE, (name, k, plan.peak, measured, plan.phases)


def test_plan_weights_are_the_loaded_students_bytes(students):
    """The resident weight lines equal the bytes of the loaded student's parameters (meta-device count)."""
    scfg, sft, _ = students["llava"]
    student = load_student(scfg, reference=sft)
    loaded = sum(p.numel() * p.element_size() for p in student.model.parameters())
    arch = student_arch(scfg)
    plan = plan_step(arch, Settings(compute_dtype="float32", batch=1, k=2), Shapes(prompt_tokens=8))
    weights = sum(i.bytes for i in plan.items if i.phase == "resident" and not i.name.startswith("LoRA policy"))
    # the policy adapter's own weights are 4 of its 16 bytes per parameter
    assert weights + 4 * arch.params.lora == loaded


def test_live_tensor_peak_sees_frees_and_views():
    """A view costs nothing, a freed tensor leaves the count, the peak stays."""
    with LiveTensorPeak() as t:
        a = torch.zeros(1000)            # 4000 bytes
        v = a[10:20]                     # a view: same storage
        b = torch.ones(500)              # 2000 bytes
        del a, v
        c = torch.ones(250)              # 1000 bytes
    assert t.peak == 6000
    assert t.current == 3000
    assert b.numel() + c.numel() == 750


def test_resident_counts_4bit_quant_state(students):
    """A 4-bit student's resident bytes include bitsandbytes' quantisation constants beside the packed weights."""
    scfg, _, _ = students["text"]
    student = load_student(StudentConfig(name_or_path=scfg.name_or_path, quantization="4bit", lora=scfg.lora))
    packed = sum(p.numel() * p.element_size() for p in student.model.parameters())
    with LiveTensorPeak(resident_tensors(student.model)) as t:
        pass
    assert t.resident > packed


def _empty_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize("hub_id,params", [("llava-hf/llava-1.5-7b-hf", 7.06e9), ("Qwen/Qwen2-VL-2B-Instruct", 2.21e9),
                                           ("Qwen/Qwen2.5-VL-3B-Instruct", 3.75e9),
                                           ("Qwen/Qwen2.5-1.5B-Instruct", 1.54e9)])
def test_hub_id_not_on_disk_uses_published_table(monkeypatch, tmp_path, hub_id, params):
    """Nothing in the cache: the built-in architecture, with the published parameter count (±1%)."""
    _empty_cache(monkeypatch, tmp_path)
    arch = student_arch(StudentConfig(name_or_path=hub_id))
    assert "built-in table" in arch.source
    p = arch.params
    assert abs(p.quantizable + p.lm_other + p.vision - params) / params < 0.01


def test_hub_id_in_the_cache_reads_its_config(monkeypatch, tmp_path):
    """A config.json in the Hugging Face cache layout wins over the table (here: a smaller, edited copy)."""
    _empty_cache(monkeypatch, tmp_path)
    snap = tmp_path / "hub" / "models--Qwen--Qwen2.5-1.5B-Instruct"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("abc123")
    (snap / "snapshots" / "abc123").mkdir(parents=True)
    cfg = {**PUBLISHED["Qwen/Qwen2.5-1.5B-Instruct"], "num_hidden_layers": 2}
    (snap / "snapshots" / "abc123" / "config.json").write_text(json.dumps(cfg))
    config, source = read_config("Qwen/Qwen2.5-1.5B-Instruct")
    assert "Hugging Face cache" in source and config.num_hidden_layers == 2


def test_unknown_hub_id_not_on_disk_is_one_actionable_line(monkeypatch, tmp_path):
    _empty_cache(monkeypatch, tmp_path)
    with pytest.raises(VlrlcdError) as e:
        read_config("someone/unknown-model")
    msg = str(e.value)
    assert "someone/unknown-model" in msg and "huggingface-cli download" in msg and "\n" not in msg


def test_peers_layout_and_group_chunk(monkeypatch, tmp_path):
    """On the LLaVA recipe the peers' layout (vision and prompt per completion) costs more, and
    train.group_chunk=1 lowers the policy pass."""
    _empty_cache(monkeypatch, tmp_path)
    cfg = load_config(ROOT / "configs" / "llava15_7b_vqa_qlora.yaml")
    ours, peers = plan_config(cfg)
    assert peers.peak > 2 * ours.peak
    feats = lambda p: next(i.bytes for i in p.items if i.name.startswith("vision features"))  # noqa: E731
    assert feats(peers) == cfg.train.k * feats(ours)
    cfg.train.group_chunk = 1
    one, _ = plan_config(cfg)
    assert one.phases["policy"] < ours.phases["policy"]


def test_cli_plan_table_and_json(monkeypatch, tmp_path, capsys):
    _empty_cache(monkeypatch, tmp_path)
    cfg = str(ROOT / "configs" / "qwen25_15b_text_math.yaml")
    assert main(["plan", cfg, "--gpu-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "built-in table" in out and "largest K at batch 16" in out and "peers' layout" in out
    assert main(["plan", cfg, "train.k=4", "--gpu-memory", "80GB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["settings"]["k"] == 4 and data["gpu_memory_bytes"] == 80 * 2**30
    assert data["fits"] == (data["total_bytes"] <= 80 * 2**30) and data["largest_k"] >= 4
    assert data["peers"]["peak_bytes"] > data["peak_bytes"]


def test_cli_plan_bad_gpu_memory(capsys):
    assert main(["plan", str(ROOT / "configs" / "qwen25_15b_text_math.yaml"), "--gpu-memory", "lots"]) == 1
    err = capsys.readouterr().err
    assert "--gpu-memory 'lots'" in err and "24GB" in err
    assert parse_size("12.5GiB") == int(12.5 * 2**30) and parse_size("512MB") == 512 * 2**20


def test_gpu_check_skips_cleanly_without_cuda(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path / "gpu.json")],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped: no CUDA device" in proc.stdout
    assert not (tmp_path / "gpu.json").exists()


@pytest.mark.parametrize("objective", [n for n in methods.names() if n != "tvkd_dpo"])  # tvkd_dpo needs a teacher
def test_plan_follows_the_method_registry(objective):
    """K, the scoring pass and the privileged pass come from the method's rollout plan and passes: self_ppo
    scores its one sample without the anchor, rlsd adds the privileged pass, sft2 / DPO bound their own passes."""
    cfg = load_config(ROOT / "configs" / "tiny_text_arithmetic.yaml", [f"train.objective={objective}"])
    method = methods.get_method(objective)
    rp = method.plan(cfg.train, cfg.ranking, Record(id="plan", prompt=""), True)
    plan, _ = plan_config(cfg)
    assert plan.settings.k == (rp.k or cfg.train.k)
    assert ("scoring" in plan.phases) == (rp.score != "none")
    scoring = [i.name for i in plan.items if i.phase == "scoring"]
    assert scoring == ([] if rp.score == "none" else
                       ["scoring pass (no grad): cache + logits" + (" (no anchor)" if rp.score == "plain" else "")])
    assert ("privileged" in plan.phases) == ("privileged" in method.passes(cfg.train))
    assert any("upper bound" in n for n in plan.notes) == (method.passes(cfg.train) == ())


def test_plain_scoring_is_smaller_than_anchored():
    """The plain scoring pass (prompt, K candidates) costs less than the anchored one (anchor in the prompt,
    K candidates + the anchor) of the same step."""
    cfg = load_config(ROOT / "configs" / "tiny_text_arithmetic.yaml", ["train.objective=self_ppo"])
    arch = student_arch(cfg.student)
    s = Settings.from_config(cfg)
    score = lambda p: next(i.bytes for i in p.items if i.phase == "scoring")  # noqa: E731
    shapes = Shapes(response_tokens=16)
    assert score(plan_step(arch, s, shapes)) < score(plan_step(arch, replace(s, objective="anchor_grpo"), shapes))


def test_plan_modules_within_size_limits():
    """Issue 14: no planning module over 500 lines, no function over 80."""
    files = [ROOT / "vlrlcd" / "plan.py", *sorted((ROOT / "vlrlcd" / "planning").glob("*.py"))]
    for f in files:
        src = f.read_text()
        assert src.count("\n") <= 500, f
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 80, (f, node.name)


def test_importing_the_planner_does_not_import_torch():
    """The registry is read lazily: `import vlrlcd.plan` (the CLI's parse_size and Shapes) stays free of torch."""
    code = "import sys, vlrlcd.plan; sys.exit('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env).returncode == 0
