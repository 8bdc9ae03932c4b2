"""Loop infrastructure on one process: gradient accumulation and activation checkpointing leave the step
unchanged, mixed precision runs, TensorBoard holds each step once across a resume, metric rows carry
tokens/s and s/step, and the launcher settings the loop cannot honour are refused clearly."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from vlrlcd.adapters.config import LoraConfig, StudentConfig, TinyConfig
from vlrlcd.adapters.loader import load_student
from vlrlcd.adapters.tiny import build_tiny_text
from vlrlcd.config import load_config
from vlrlcd.datasets.records import Record
from vlrlcd.errors import VlrlcdError
from vlrlcd.ranking.config import RankingConfig
from vlrlcd.training import checkpoint as ckpt
from vlrlcd.training import sft as sft_module
from vlrlcd.training.config import TrainConfig
from vlrlcd.training.distributed import effective_mixed_precision, setup_distributed
from vlrlcd.training.rl import train_rl
from vlrlcd.training.sft import sft_items, train_sft

TINY = TinyConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
CFG = TrainConfig(objective="ldl_grpo", rl_steps=2, batch_size=2, k=2, lr=0.01, sft_epochs=1, sft_batch_size=6,
                  sft_lr=0.01, tensorboard=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("infra")
    records = [Record(id=f"r{i}", prompt=f"What is {i} + {i % 3}?", reference=str(i + i % 3)) for i in range(6)]
    anchors = {r.id: r.reference for r in records}
    base = build_tiny_text(root / "base", [r.prompt for r in records] + list(anchors.values()), TINY, seed=0)
    return StudentConfig(name_or_path=str(base), max_new_tokens=3, lora=LoraConfig(r=4, alpha=8)), records, anchors


def fresh(scfg):
    torch.manual_seed(0)
    return load_student(scfg)


def lora(student) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in student.model.named_parameters() if p.requires_grad}


def test_grad_accum_and_activation_checkpointing_leave_the_step_unchanged(world, tmp_path, monkeypatch):
    scfg, records, anchors = world
    items = sft_items(records, anchors)  # 6 items x 2 pairs: one step of 6 items
    plain = fresh(scfg)
    train_sft(plain, items, CFG, tmp_path / "plain", progress=False)

    from transformers.modeling_layers import GradientCheckpointingLayer

    real, active = sft_module.batch_loss, []

    def spy(student, chunk):
        layers = [m for m in student.model.modules() if isinstance(m, GradientCheckpointingLayer)]
        active.append((len(chunk), bool(layers) and all(m.gradient_checkpointing for m in layers)))
        return real(student, chunk)

    monkeypatch.setattr(sft_module, "batch_loss", spy)
    split = fresh(scfg)
    train_sft(split, items, replace(CFG, grad_accum=4, gradient_checkpointing=True), tmp_path / "split", progress=False)
    assert active == [(2, True), (2, True), (1, True), (1, True)]  # 6 items in 4 micro-batches, recomputed
    assert not any(m.gradient_checkpointing for m in split.model.modules() if isinstance(m, GradientCheckpointingLayer))
    a, b = lora(plain), lora(split)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert any(float(v.abs().max()) > 0 for k, v in b.items() if "lora_B" in k)  # the step did move the weights


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_finite(world, tmp_path, precision):
    scfg, records, anchors = world
    student = fresh(scfg)
    rows = train_sft(student, sft_items(records, anchors), replace(CFG, mixed_precision=precision, sft_epochs=2),
                     tmp_path, progress=False)
    reference = train_sft(fresh(scfg), sft_items(records, anchors), replace(CFG, sft_epochs=2), tmp_path / "fp32",
                          progress=False)
    assert not any(r["skipped"] for r in rows)
    for r, f in zip(rows, reference):
        assert r["loss"] == pytest.approx(f["loss"], abs=0.05)


def test_tensorboard_holds_each_step_once_across_a_resume(world, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scfg, records, anchors = world
    student = fresh(scfg)
    student.save(tmp_path / "sft")
    cfg = replace(CFG, rl_steps=3, save_every=1, keep_checkpoints=0, tensorboard=True)

    def run(resume: bool):
        s = load_student(scfg, adapter=tmp_path / "sft", reference=tmp_path / "sft")
        return train_rl(s, records, anchors, cfg, RankingConfig(), 3, tmp_path / "rl", seed=0, progress=False,
                        resume=resume)

    rows = run(False)
    assert all(r["tokens_per_s"] > 0 and r["seconds_per_step"] > 0 and r["seconds"] > 0 for r in rows)
    # as if killed after checkpoint 1: later checkpoints lost, later steps already in the event file
    for p in ckpt.list_checkpoints(tmp_path / "rl")[1:]:
        import shutil

        shutil.rmtree(p)
    again = run(True)
    assert [r["step"] for r in again] == [1, 2, 3]
    assert [r["loss"] for r in again] == [r["loss"] for r in rows]
    acc = EventAccumulator(str(tmp_path / "rl" / "tb"))
    acc.Reload()
    assert {"rl/loss", "rl/kl", "rl/margin_mean", "rl/tokens_per_s", "rl/seconds_per_step"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("rl/loss")] == [1, 2, 3]


def test_launch_settings_the_loop_cannot_honour_are_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "NO_SHARD")
    with pytest.raises(VlrlcdError, match="NO_SHARD"):
        setup_distributed("no")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "true")
    assert not setup_distributed("no").sharded  # one process: nothing to shard over
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert effective_mixed_precision("no") == "bf16" and effective_mixed_precision("fp16") == "fp16"
    assert setup_distributed("no").mixed_precision == "bf16" and not setup_distributed("no").multi
    for bad, msg in (("train.grad_accum=0", "grad_accum"), ("train.mixed_precision=fp8", "mixed_precision"),
                     ("train.max_bad_steps=0", "max_bad_steps")):
        with pytest.raises(VlrlcdError, match=msg):
            load_config(None, [bad])


@pytest.mark.parametrize("objective,warmup", [("ldl_grpo", 0), ("single_pair_dpo", 2)])
def test_logged_lr_is_the_one_the_step_ran_at_and_kl_only_where_the_objective_has_one(world, tmp_path,
                                                                                       objective, warmup):
    """Linear warm-up over train.warmup_steps, then cosine to 10% of train.lr: with no warm-up step 1 runs at
    train.lr itself; a method without a KL term logs no "kl" (curves.png draws no flat zero line for it)."""
    import math as _math

    scfg, records, anchors = world
    student = fresh(scfg)
    student.save(tmp_path / "sft")
    s = load_student(scfg, adapter=tmp_path / "sft", reference=tmp_path / "sft")
    cfg = replace(CFG, objective=objective, rl_steps=4, warmup_steps=warmup, lr=0.01)
    rows = train_rl(s, records, anchors, cfg, RankingConfig(), 3, tmp_path / "rl", seed=0, progress=False)
    assert all(not r["skipped"] for r in rows)

    def expected(i: int) -> float:   # step i + 1 runs at factor(i)
        if i < warmup:
            return 0.01 * (i + 1) / warmup
        progress = (i - warmup) / max(1, 4 - warmup)
        return 0.01 * (0.1 + 0.45 * (1 + _math.cos(_math.pi * progress)))

    assert [r["lr"] for r in rows] == pytest.approx([expected(i) for i in range(4)])
    if warmup == 0:
        assert rows[0]["lr"] == pytest.approx(0.01)
    assert all(("kl" in r) == (objective == "ldl_grpo") for r in rows)
