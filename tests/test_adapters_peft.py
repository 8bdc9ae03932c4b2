"""Saved adapters are plain peft directories, and the reference policy is the frozen SFT adapter (or the
disabled adapter) on the same base weights, switched by `with student.reference():`."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlrlcd.adapters.base import POLICY_ADAPTER, REFERENCE_ADAPTER
from vlrlcd.adapters.config import LoraConfig, StudentConfig, TinyConfig
from vlrlcd.adapters.loader import load_student
from vlrlcd.adapters.naive import naive_inputs
from vlrlcd.adapters.tiny import BUILDERS
from vlrlcd.datasets.records import Record
from vlrlcd.ranking.config import RankingConfig
from vlrlcd.training.config import TrainConfig
from vlrlcd.training.rollout import rollout, sample_generator
from vlrlcd.training.steps import StepContext, group_loss

TINY = TinyConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                  vision_hidden_size=32, vision_layers=1)
ALL = ["llama", "qwen2", "llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]
VLMS = {"llava", "llava_next", "qwen2_vl", "qwen2_5_vl"}
PROMPT = "What color is the shape?"


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "red.png"
    Image.new("RGB", (32, 32), "red").save(path)
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("students")
    return {name: str(BUILDERS[name](root / name, [PROMPT, "red blue"], TINY, seed=0)) for name in ALL}


def cfg_for(path: str) -> StudentConfig:
    return StudentConfig(name_or_path=path, lora=LoraConfig(r=4, alpha=8))


def randomize_lora(student, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.model.named_parameters():
            if "lora_B" in name and f".{POLICY_ADAPTER}." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


@pytest.mark.parametrize("name", ALL)
def test_saved_adapter_is_plain_peft(name, ckpts, image, tmp_path):
    """PeftModel.from_pretrained(base, adapter_dir), with no vlrlcd code, gives the logits of the student
    that saved it and of vlrlcd's own loaded student."""
    import transformers
    from peft import PeftModel

    student = load_student(cfg_for(ckpts[name]))
    randomize_lora(student, seed=0)
    student.model.eval()
    out = student.save(tmp_path / "adapter")
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (out / REFERENCE_ADAPTER).exists()
    inputs, _ = naive_inputs(student, PROMPT, image if name in VLMS else None, student.encode_response("red"))

    auto = transformers.AutoModelForImageTextToText if name in VLMS else transformers.AutoModelForCausalLM
    plain = PeftModel.from_pretrained(auto.from_pretrained(ckpts[name]), str(out)).eval()
    reloaded = load_student(cfg_for(ckpts[name]), adapter=out, trainable=False)
    reloaded.model.eval()
    expected = logits(student.model, inputs)
    assert torch.allclose(logits(plain, inputs), expected, atol=1e-5)
    assert torch.allclose(logits(reloaded.model, inputs), expected, atol=1e-5)
    with plain.disable_adapter():
        assert not torch.allclose(logits(plain, inputs), expected, atol=1e-3)  # the adapter matters
    assert not reloaded.trainable_parameters()


@pytest.mark.parametrize("name", ["llama", "llava", "qwen2_5_vl"])
def test_reference_is_the_frozen_sft_adapter(name, ckpts, image, tmp_path):
    sft = load_student(cfg_for(ckpts[name]))
    randomize_lora(sft, seed=1)
    sft.model.eval()
    img = image if name in VLMS else None
    inputs, _ = naive_inputs(sft, PROMPT, img, sft.encode_response("red"))
    sft_logits = logits(sft.model, inputs)
    sft_dir = sft.save(tmp_path / "sft")

    student = load_student(cfg_for(ckpts[name]), adapter=sft_dir, reference=sft_dir)
    assert student.has_reference_adapter
    ref_params = {n: p for n, p in student.model.named_parameters() if f".{REFERENCE_ADAPTER}." in n}
    policy = {n: p for n, p in student.model.named_parameters() if f".{POLICY_ADAPTER}." in n}
    assert ref_params and policy
    assert not any(p.requires_grad for p in ref_params.values())
    assert all(p.requires_grad for p in policy.values())
    assert {id(p) for p in student.trainable_parameters()} == {id(p) for p in policy.values()}
    ref_before = {n: p.detach().clone() for n, p in ref_params.items()}

    # one LDL-GRPO step (beta > 0: the reference log-probs run under the "sft" adapter)
    rec = Record(id="r", prompt=PROMPT, image=img)
    cfg, rcfg = TrainConfig(k=3, beta=0.5), RankingConfig(score_with="sft")
    student.model.eval()
    group = rollout(student, rec, "red", cfg, rcfg, 4, sample_generator(0, 0, 0))
    student.model.train()
    loss, _ = group_loss(student, group, cfg, StepContext(0, 1, rcfg))
    loss.backward()
    assert all(p.grad is None for p in ref_params.values())
    torch.optim.SGD(student.trainable_parameters(), lr=1.0).step()
    student.model.eval()

    policy_logits = logits(student.model, inputs)
    with student.reference():
        assert student.model.active_adapter == REFERENCE_ADAPTER
        assert not any(p.requires_grad for p in ref_params.values())
        ref_logits = logits(student.model, inputs)
    assert student.model.active_adapter == POLICY_ADAPTER
    assert torch.allclose(ref_logits, sft_logits, atol=1e-5)          # the SFT adapter's own logits
    assert not torch.allclose(policy_logits, ref_logits, atol=1e-4)  # the policy moved away from it
    assert torch.allclose(logits(student.model, inputs), policy_logits)  # switched back
    assert all(torch.equal(ref_before[n], p.detach()) for n, p in ref_params.items())
    assert not any(p.requires_grad for p in ref_params.values())
    assert all(p.requires_grad for p in policy.values())


def test_reference_without_sft_stage_is_the_disabled_adapter(ckpts, image):
    import transformers

    name = "llava"
    student = load_student(cfg_for(ckpts[name]))
    randomize_lora(student, seed=2)
    student.model.eval()
    assert not student.has_reference_adapter
    inputs, _ = naive_inputs(student, PROMPT, image, student.encode_response("red"))
    base = transformers.AutoModelForImageTextToText.from_pretrained(ckpts[name]).eval()
    with student.reference():
        ref_logits = logits(student.model, inputs)
    assert torch.allclose(ref_logits, logits(base, inputs), atol=1e-5)
    assert not torch.allclose(logits(student.model, inputs), ref_logits, atol=1e-4)


def test_reference_switch_keeps_an_eval_student_frozen(ckpts, tmp_path):
    name = "llama"
    sft = load_student(cfg_for(ckpts[name]))
    sft_dir = sft.save(tmp_path / "sft")
    student = load_student(cfg_for(ckpts[name]), adapter=sft_dir, reference=sft_dir, trainable=False)
    with student.reference():
        pass
    assert not student.trainable_parameters()
