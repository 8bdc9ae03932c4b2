"""Non-finite steps: an injected NaN loss (or NaN gradient) skips the step, is reported in the log and on
stderr, and the checkpoint holds only finite values; max_bad_steps in a row stop the run with a clear error;
a checkpoint is never written from non-finite weights."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from vlrlcd.adapters.config import LoraConfig, StudentConfig, TinyConfig
from vlrlcd.adapters.loader import load_student
from vlrlcd.adapters.tiny import build_tiny_text
from vlrlcd.datasets.records import Record
from vlrlcd.errors import VlrlcdError
from vlrlcd.methods import REGISTRY, get_method
from vlrlcd.ranking.config import RankingConfig
from vlrlcd.training import checkpoint as ckpt
from vlrlcd.training import sft as sft_module
from vlrlcd.training.config import TrainConfig
from vlrlcd.training.rl import train_rl
from vlrlcd.training.sft import sft_items, train_sft

TINY = TinyConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
CFG = TrainConfig(objective="ldl_grpo", rl_steps=3, batch_size=2, k=2, lr=0.01, save_every=0, max_bad_steps=2,
                  sft_epochs=1, sft_batch_size=2, sft_lr=0.01, tensorboard=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    records = [Record(id=f"r{i}", prompt=f"What is {i} + 3?", reference=str(i + 3)) for i in range(4)]
    anchors = {r.id: r.reference for r in records}
    base = build_tiny_text(root / "base", [r.prompt for r in records] + list(anchors.values()), TINY, seed=0)
    scfg = StudentConfig(name_or_path=str(base), max_new_tokens=3, lora=LoraConfig(r=4, alpha=8))
    torch.manual_seed(0)
    student = load_student(scfg)
    with torch.no_grad():  # a non-zero LoRA B: the policy differs from the bare base
        for n, p in student.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    student.save(root / "sft")
    return scfg, root / "sft", records, anchors


def rl_student(world):
    scfg, sft, _, _ = world
    return load_student(scfg, adapter=sft, reference=sft)


def assert_checkpoint_finite(path, stepped: bool = True):
    tensors = torch.load(path / ckpt.TENSORS, weights_only=True)
    state = torch.load(path / ckpt.STATE, weights_only=True)  # nothing in a checkpoint needs unpickling
    assert tensors and all(bool(torch.isfinite(t).all()) for t in tensors.values())
    opt_tensors = [v for st in state["optimizer"]["state"].values() for v in st.values() if torch.is_tensor(v)]
    assert (bool(opt_tensors) == stepped) and all(bool(torch.isfinite(t).all()) for t in opt_tensors)
    return tensors, state


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_injected_nan_is_skipped_reported_and_never_checkpointed(world, tmp_path, monkeypatch, capsys, kind):
    _, _, records, anchors = world
    real = get_method("ldl_grpo")
    seen = []

    class Poisoned(type(real)):
        def group_loss(self, student, group, passes, cfg, ctx):
            loss, m = real.group_loss(student, group, passes, cfg, ctx)
            seen.append(ctx.step)
            if ctx.step == 1 and seen.count(1) == 1:  # the first prompt of step 2
                if kind == "loss":
                    loss = loss * float("nan")
                else:  # a finite loss whose gradient is NaN: d sqrt(x)/dx at 0 is inf, times 0
                    p = student.trainable_parameters()[0]
                    loss = loss + torch.sqrt(p.sum() * 0.0)
                    assert torch.isfinite(loss)
            return loss, m

    monkeypatch.setitem(REGISTRY, "ldl_grpo", Poisoned)
    student = rl_student(world)
    rows = train_rl(student, records, anchors, CFG, RankingConfig(), 3, tmp_path, seed=0, progress=False)
    assert [r["skipped"] for r in rows] == [False, True, False]
    reason = rows[1]["skip_reason"]
    assert ("non-finite loss on prompt(s) r" in reason) if kind == "loss" else (reason == "non-finite gradient")
    assert "step 2: skipped" in capsys.readouterr().err
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in logged] == [False, True, False]
    assert logged[1]["grad_norm"] is None  # NaN, written as null
    path = ckpt.latest_checkpoint(tmp_path)
    assert ckpt.step_of(path) == 3
    tensors, state = assert_checkpoint_finite(path)
    # two optimizer steps were taken (1 and 3), and the schedule advanced twice
    steps = {float(st["step"]) for st in state["optimizer"]["state"].values()}
    assert steps == {2.0} and state["bad"] == 0
    live = {n: p for n, p in student.model.named_parameters() if p.requires_grad}
    assert all(torch.equal(tensors[n], live[n].detach()) for n in tensors)


def test_max_bad_steps_in_a_row_stop_with_a_clear_error(world, tmp_path, monkeypatch):
    _, _, records, anchors = world
    real = get_method("ldl_grpo")

    class AlwaysNan(type(real)):
        def group_loss(self, student, group, passes, cfg, ctx):
            loss, m = real.group_loss(student, group, passes, cfg, ctx)
            return loss * float("nan"), m

    monkeypatch.setitem(REGISTRY, "ldl_grpo", AlwaysNan)
    student = rl_student(world)
    before = {n: p.detach().clone() for n, p in student.model.named_parameters() if p.requires_grad}
    with pytest.raises(VlrlcdError, match=r"2 steps in a row had a non-finite loss or gradient \(last at step 2"):
        train_rl(student, records, anchors, replace(CFG, save_every=1), RankingConfig(), 3, tmp_path, seed=0,
                 progress=False)
    assert all(torch.equal(before[n], p) for n, p in student.model.named_parameters() if p.requires_grad)
    # step 1 was skipped yet saved (save_every=1): the weights it holds are the finite starting ones
    for path in ckpt.list_checkpoints(tmp_path):
        assert_checkpoint_finite(path, stepped=False)


def test_a_checkpoint_is_never_written_from_non_finite_weights(world, tmp_path):
    student = rl_student(world)
    params = student.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt.save_checkpoint(tmp_path, 1, student, opt, sched, {"step": 1}, keep=2)
    with torch.no_grad():
        params[0][0, 0] = float("inf")
    with pytest.raises(VlrlcdError, match="refusing to write a checkpoint at step 2: non-finite values in"):
        ckpt.save_checkpoint(tmp_path, 2, student, opt, sched, {"step": 2}, keep=2)
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(tmp_path)] == [1]
    assert not list(ckpt.checkpoints_dir(tmp_path).glob(".tmp-*"))


def test_sft_skips_a_nan_batch(world, tmp_path, monkeypatch):
    scfg, _, records, anchors = world
    real, calls = sft_module.batch_loss, []

    def poisoned(student, items):
        loss, m = real(student, items)
        calls.append(1)
        return (loss * float("nan"), m) if len(calls) == 1 else (loss, m)

    monkeypatch.setattr(sft_module, "batch_loss", poisoned)
    torch.manual_seed(0)
    student = load_student(scfg)
    rows = train_sft(student, sft_items(records, anchors), CFG, tmp_path, seed=0, progress=False)
    assert [r["skipped"] for r in rows] == [True, False]
    assert rows[0]["skip_reason"].startswith("non-finite loss") and rows[0]["loss"] != rows[0]["loss"]
    assert_checkpoint_finite(ckpt.latest_checkpoint(tmp_path))


def test_fp16_overflow_skips_do_not_count_until_the_loss_scale_is_spent():
    from vlrlcd.training.common import gradient_skip

    assert gradient_skip(None) == ("non-finite gradient", True)
    assert gradient_skip(torch.amp.GradScaler("cpu", init_scale=8.0)) == ("fp16 overflow, loss scale lowered to 8", False)
    assert gradient_skip(torch.amp.GradScaler("cpu", init_scale=0.5))[1] is True


def test_a_huge_lr_that_makes_sampling_logits_non_finite_counts_as_bad_steps(world, tmp_path, capsys):
    """After one step at lr=1e30 the logits overflow: torch.multinomial refuses the probabilities. That is a
    skipped step naming train.lr, and max_bad_steps of them stop the run with an error, not a RuntimeError."""
    _, _, records, anchors = world
    student = rl_student(world)
    with pytest.raises(VlrlcdError, match=r"2 steps in a row .*non-finite logits while sampling \(train.lr=1e\+30 "
                                          r"too high\?\).*lower train.lr"):
        train_rl(student, records, anchors, replace(CFG, lr=1e30, rl_steps=4), RankingConfig(), 3, tmp_path, seed=0,
                 progress=False)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in logged] == [False, True, True]
    assert all(r["skip_reason"].startswith("non-finite logits while sampling") for r in logged[1:])
    assert "step 2: skipped (non-finite logits while sampling" in capsys.readouterr().err
