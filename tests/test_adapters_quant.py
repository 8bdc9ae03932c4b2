"""QLoRA on CPU: a 4-bit (nf4, double quantisation) base + LoRA loads and takes an LDL-GRPO step for the
text and LLaVA families with only the LoRA tensors changing; the vision tower and projector stay in full
precision. 8-bit (LLM.int8) + LoRA loads and steps on CPU too."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlrlcd.adapters.config import LoraConfig, StudentConfig, TinyConfig
from vlrlcd.adapters.loader import load_student
from vlrlcd.adapters.tiny import BUILDERS
from vlrlcd.datasets.records import Record
from vlrlcd.ranking.config import RankingConfig
from vlrlcd.training.config import TrainConfig
from vlrlcd.training.rollout import rollout, sample_generator
from vlrlcd.training.steps import StepContext, group_loss

bnb = pytest.importorskip("bitsandbytes")

TINY = TinyConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                  vision_hidden_size=32, vision_layers=1)
PROMPT = "What color is the shape?"


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "red.png"
    Image.new("RGB", (32, 32), "red").save(path)
    return str(path)


def quantized_layers(model, cls) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


def outputs_of(layers: dict[str, torch.nn.Module], x_by_layer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What each quantized base layer computes on a fixed input: its weights as the model sees them
    (bitsandbytes may repack a 4-bit weight's storage on CPU for inference, so the bytes are no measure)."""
    with torch.no_grad():
        return {n: m(x_by_layer[n]).float().clone() for n, m in layers.items()}


def step_once(student, image: str | None) -> None:
    rec = Record(id="q", prompt=PROMPT, image=image)
    cfg, rcfg = TrainConfig(k=2, beta=0.1), RankingConfig()
    student.model.eval()
    group = rollout(student, rec, "red", cfg, rcfg, 3, sample_generator(0, 0, 0))
    student.model.train()
    loss, _ = group_loss(student, group, cfg, StepContext(0, 1, rcfg))
    assert torch.isfinite(loss)
    loss.backward()
    torch.optim.SGD(student.trainable_parameters(), lr=0.5).step()
    student.model.eval()


@pytest.mark.parametrize("name,bits", [("llama", "4bit"), ("llava", "4bit"), ("llama", "8bit")])
def test_quantized_base_with_lora_steps_and_only_lora_changes(name, bits, image, tmp_path):
    path = BUILDERS[name](tmp_path / name, [PROMPT, "red"], TINY, seed=0)
    student = load_student(StudentConfig(name_or_path=str(path), quantization=bits, lora=LoraConfig(r=4, alpha=8)))
    cls = bnb.nn.Linear4bit if bits == "4bit" else bnb.nn.Linear8bitLt
    layers = quantized_layers(student.model, cls)
    # the language model's 7 projections per layer are quantized, nothing in the vision tower / projector
    assert len(layers) == 7 and all(".language_model." in n or name != "llava" for n in layers)
    assert not any(k in n for n in layers for k in ("vision_tower", "multi_modal_projector", "lm_head"))
    if bits == "4bit":
        assert all(m.weight.quant_type == "nf4" and m.weight.quant_state.nested for m in layers.values())
    img = image if name == "llava" else None
    g = torch.Generator().manual_seed(0)
    xs = {n: torch.randn(2, m.in_features, generator=g) for n, m in layers.items()}
    student.model.eval()
    student.generate([Record(id="w", prompt=PROMPT, image=img)], 2)  # let bnb settle its inference layout
    base_out = outputs_of(layers, xs)
    others = {n: p.detach().clone() for n, p in student.model.named_parameters()
              if not isinstance(p, (bnb.nn.Params4bit, bnb.nn.Int8Params))}

    trainable = student.trainable_parameters()
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    names = {id(p): n for n, p in student.model.named_parameters()}
    assert all("lora_" in names[id(p)] for p in trainable)
    step_once(student, img)

    changed = {n for n, p in student.model.named_parameters() if n in others and not torch.equal(others[n], p)}
    assert changed and all("lora_" in n for n in changed), sorted(changed)[:4]
    after = outputs_of(layers, xs)
    assert all(torch.equal(base_out[n], after[n]) for n in layers)


def lora_grads(student, image: str | None) -> list[torch.Tensor]:
    student.model.train()
    student.model.zero_grad(set_to_none=True)
    responses = [student.encode_response(t) for t in ("red", "a blue one")]
    tl = student.token_logprobs(student.prefix(PROMPT, image), responses)
    (tl.logp.sum()).backward()
    return [p.grad.clone() for p in student.trainable_parameters()]


def test_4bit_gradients_survive_an_inference_pass(tmp_path):
    """After a generation in eval mode, the LoRA gradients through the 4-bit layers are the same as on a
    freshly loaded student (bitsandbytes' CPU inference kernel has no autograd; the loader keeps it off)."""
    path = BUILDERS["llama"](tmp_path / "llama", [PROMPT, "red"], TINY, seed=0)
    cfg = StudentConfig(name_or_path=str(path), quantization="4bit", lora=LoraConfig(r=4, alpha=8))
    torch.manual_seed(0)
    fresh = load_student(cfg)
    torch.manual_seed(0)
    used = load_student(cfg)  # the same LoRA init
    for s in (fresh, used):
        with torch.no_grad():
            for n, p in s.model.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.05)
    used.model.eval()
    used.generate([Record(id="w", prompt=PROMPT)], 3)
    for a, b in zip(lora_grads(fresh, None), lora_grads(used, None)):
        assert torch.allclose(a, b, atol=1e-6)
