"""Shared builders for the objective / scorer tests (no tests here): tiny random students built from
configs, SFT adapters with seeded non-zero LoRA weights, a few hand-made records, a few steps of `rl_step`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from PIL import Image

from vlrlcd.adapters.config import StudentConfig, TinyConfig
from vlrlcd.adapters.loader import load_student
from vlrlcd.adapters.tiny import build_tiny_llava, build_tiny_text
from vlrlcd.datasets.records import Record
from vlrlcd.ranking.config import RankingConfig
from vlrlcd.training.config import TrainConfig
from vlrlcd.training.rl import rl_setup, rl_step
from vlrlcd.training.steps import StepContext

TINY = TinyConfig(vocab_size=300, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128,
                  vision_hidden_size=32, vision_layers=1)
CORPUS = ["What is 3 + 4?", "7", "Name a colour.", "red", "What color is the shape?", "blue", "green",
          "Verdict: yes no"]
MAX_NEW = 4


def build(family: str, out: Path, seed: int = 0, corpus: list[str] | None = None) -> Path:
    builder = build_tiny_text if family == "text" else build_tiny_llava
    return builder(out, corpus or CORPUS, TINY, seed=seed)


def sft_adapter(base: Path, out: Path, seed: int = 0, scale: float = 0.05) -> Path:
    """A saved LoRA adapter with seeded non-zero B (so the SFT policy is not the bare base)."""
    student = load_student(StudentConfig(name_or_path=str(base)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return student.save(out)


def records(family: str, image_dir: Path) -> tuple[list[Record], dict[str, str]]:
    """Two prompts: one with a verifiable reference, one without (rlsd then uses the ranking)."""
    if family == "text":
        recs = [Record(id="t0", prompt="What is 3 + 4?", reference="7"), Record(id="t1", prompt="Name a colour.")]
        return recs, {"t0": "7", "t1": "red"}
    image_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, colour in enumerate(("red", "blue")):
        p = image_dir / f"{colour}.png"
        Image.new("RGB", (32, 32), colour).save(p)
        paths.append(str(p))
    recs = [Record(id="v0", prompt="What color is the shape?", image=paths[0], reference="red"),
            Record(id="v1", prompt="What color is the shape?", image=paths[1])]
    return recs, {"v0": "red", "v1": "blue"}


def policy_and_reference(student) -> tuple[dict, dict]:
    pol = {n: p.detach().clone() for n, p in student.model.named_parameters() if p.requires_grad}
    ref = {n: p.detach().clone() for n, p in student.model.named_parameters() if ".sft." in n}
    return pol, ref


def train_steps(student, recs, anchors, tcfg: TrainConfig, rcfg: RankingConfig, ctx: StepContext,
                steps: int = 2, lr: float = 1e-2, method=None) -> list[dict]:
    """`steps` steps of `rl_step` (the loop's own step: batched rollout, batched passes, one backward, the
    clipped step, the step-end hook) on `recs` every step, without the loop's logging; each group's row is
    its metrics with the group. AdamW without weight decay, so a parameter moves only when some gradient
    reached it."""
    ctx.total_steps = steps
    tcfg = dataclasses.replace(tcfg, lr=lr, weight_decay=0.0, rl_steps=steps, batch_size=len(recs))
    run = rl_setup(student, tcfg, rcfg, MAX_NEW, seed=0, ctx=ctx, method=method)
    out = []
    for step in range(steps):
        r = rl_step(run, step, list(recs), [anchors[rec.id] for rec in recs])
        out += [{**m, "group": g} for g, m in zip(r.groups, r.metrics)]
    student.model.eval()
    return out


class Forwards:
    """Counts calls of the base transformers model (one per language-model forward)."""

    def __init__(self, student):
        self.calls = 0
        self.handle = student.model.get_base_model().register_forward_pre_hook(self._hit)

    def _hit(self, *_):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.handle.remove()


def eval_students(root, families, corpus, tiny, lora) -> dict:
    """{family: a tiny student of that family built under root with a random LoRA (`lora_student`), in eval
    mode}; the same weights for every family's seed 0."""
    from vlrlcd.adapters.tiny import BUILDERS

    out = {}
    for name in families:
        path = str(BUILDERS[name](root / name, corpus, tiny, seed=0))
        torch.manual_seed(0)
        out[name] = lora_student(path, lora, seed=0)
        out[name].model.eval()
    return out


def lora_student(path: str, lora, seed: int = 0, scale: float = 0.3):
    """A student loaded through the real loader whose LoRA B is random (not zero), so the adapter changes
    the logits."""
    student = load_student(StudentConfig(name_or_path=path, lora=lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return student
