"""Checkpoints and resume: a run killed with SIGKILL after a checkpoint and resumed ends with adapter
tensors bit-identical to an uninterrupted run, and its metrics log holds each step exactly once; Ctrl-C
saves a checkpoint and exits cleanly; checkpoints are complete or absent and pruned to the newest few."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from test_distributed import RUN
from vlrlcd import cli
from vlrlcd.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]

# test_distributed's tiny run, with more RL steps in batches of 2 and two checkpoints kept
TINY_RUN = {**RUN, "train": {**RUN["train"], "sft_batch_size": 4, "rl_steps": 5, "batch_size": 2,
                             "keep_checkpoints": 2}}


def write_config(path: Path, run_dir: Path, **train) -> Path:
    cfg = json.loads(json.dumps(TINY_RUN))
    cfg["run_dir"] = str(run_dir)
    cfg["train"].update(train)
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def adapter_tensors(stage_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(stage_dir / "adapter" / "adapter_model.safetensors"))


def steps_logged(stage_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def subprocess_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORLD_SIZE", None)
    return env


def test_sigkill_after_checkpoint_then_resume_is_bit_identical(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    # the uninterrupted run, in this process
    full = tmp_path / "full"
    assert cli.main(["train", str(write_config(tmp_path / "full.yaml", full)), "--no-progress"]) == 0
    # the same run in a subprocess, killed with SIGKILL as soon as RL checkpoint 2 is complete
    killed = tmp_path / "killed"
    cfg = write_config(tmp_path / "killed.yaml", killed)
    proc = subprocess.Popen([sys.executable, "-m", "vlrlcd.cli", "train", str(cfg), "--no-progress"], cwd=ROOT,
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = killed / "ldl_grpo" / "checkpoints" / "step-00000002" / ckpt.META
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended on its own before the kill:\n{err.decode()[-2000:]}"
    assert not (killed / "ldl_grpo" / "stage.json").exists()
    assert (killed / "sft" / "stage.json").exists()
    # resume (in this process): SFT is reused, RL continues after step 2
    assert cli.main(["train", str(cfg), "--no-progress", "--resume"]) == 0
    for stage in ("sft", "ldl_grpo"):
        a, b = adapter_tensors(full / stage), adapter_tensors(killed / stage)
        assert a.keys() == b.keys() and a
        for k in a:
            assert torch.equal(a[k], b[k]), f"{stage}: {k} differs after resume"
    assert steps_logged(killed / "ldl_grpo") == [1, 2, 3, 4, 5]
    assert steps_logged(killed / "sft") == steps_logged(full / "sft") == [1, 2]
    full_rows = [json.loads(x) for x in (full / "ldl_grpo" / "metrics.jsonl").read_text().splitlines()]
    resumed_rows = [json.loads(x) for x in (killed / "ldl_grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in full_rows] == [r["loss"] for r in resumed_rows]
    rollout_steps = [json.loads(x)["step"] for x in (killed / "ldl_grpo" / "rollouts.jsonl").read_text().splitlines()]
    assert rollout_steps == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    # the newest two checkpoints are kept (4 and the final 5), each complete
    kept = ckpt.list_checkpoints(killed / "ldl_grpo")
    assert [ckpt.step_of(p) for p in kept] == [4, 5]
    assert ckpt.read_meta(kept[-1])["resumed_from"].endswith("step-00000002")
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["teacher_calls"] == 0 and set(summary["methods"]) == {"sft", "ldl_grpo"}


def test_ctrl_c_saves_a_checkpoint_and_resume_matches(tmp_path, monkeypatch, capsys):
    """SIGINT during SFT step 2: the step finishes, a checkpoint is written, the command exits with 130."""
    from vlrlcd.training import sft

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    overrides = dict(objective="sft", sft_epochs=2, sft_batch_size=2, save_every=0)
    full = tmp_path / "full"
    assert cli.main(["train", str(write_config(tmp_path / "full.yaml", full, **overrides)), "--no-progress"]) == 0

    real, calls = sft.batch_loss, []

    def interrupting(student, items):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(student, items)

    monkeypatch.setattr(sft, "batch_loss", interrupting)
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", run, **overrides)
    handler = signal.getsignal(signal.SIGINT)
    assert cli.main(["train", str(cfg), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "stopped after step 2" in err and "--resume" in err
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(run / "sft")] == [2]
    assert steps_logged(run / "sft") == [1, 2] and not (run / "sft" / "stage.json").exists()
    assert signal.getsignal(signal.SIGINT) is handler  # the loop's handler is gone again
    monkeypatch.setattr(sft, "batch_loss", real)
    assert cli.main(["train", str(cfg), "--no-progress", "--resume"]) == 0
    a, b = adapter_tensors(full / "sft"), adapter_tensors(run / "sft")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert steps_logged(run / "sft") == list(range(1, 9))


def test_checkpoints_are_atomic_pruned_and_cleared_by_a_fresh_run(tmp_path):
    class Tiny:
        def __init__(self):
            self.model = torch.nn.Linear(2, 2)

        def save(self, out):
            Path(out).mkdir(parents=True)
            (Path(out) / "adapter_config.json").write_text("{}")

    student = Tiny()
    opt = torch.optim.AdamW(student.model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    stage = tmp_path / "stage"
    for step in (1, 2, 3):
        ckpt.save_checkpoint(stage, step, student, opt, sched, {"step": step}, keep=2)
    root = ckpt.checkpoints_dir(stage)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000003"]
    # a half-written checkpoint (no meta.json, or a temporary directory) is never picked
    (root / "step-00000009").mkdir()
    (root / ".tmp-step-00000010-1").mkdir()
    assert ckpt.step_of(ckpt.latest_checkpoint(stage)) == 3
    ckpt.save_checkpoint(stage, 4, student, opt, sched, {"step": 4}, keep=0)
    assert not (root / ".tmp-step-00000010-1").exists()
    # the trainable tensors come back bit for bit
    saved = {n: p.detach().clone() for n, p in student.model.named_parameters()}
    with torch.no_grad():
        for p in student.model.parameters():
            p.add_(1.0)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(stage), student, opt, sched)
    assert state["step"] == 4
    assert all(torch.equal(p, saved[n]) for n, p in student.model.named_parameters())
    ckpt.clear_checkpoints(stage)
    assert ckpt.latest_checkpoint(stage) is None


def test_a_finished_stage_is_reused_only_from_the_same_start(tmp_path):
    from vlrlcd.pipeline import STAGE_FILE, finished_stage, start_key

    sft, rl = tmp_path / "sft", tmp_path / "rl"
    (sft / "adapter").mkdir(parents=True)
    (sft / "adapter" / "adapter_config.json").write_text("{}")
    (sft / "adapter" / "adapter_model.safetensors").write_bytes(b"weights v1")
    (rl / "adapter").mkdir(parents=True)
    (rl / "adapter" / "adapter_config.json").write_text("{}")
    key = start_key(sft / "adapter", 0)
    (rl / STAGE_FILE).write_text(json.dumps({"done": True, "start": key, "metrics": {"accuracy": 0.5}}))
    assert finished_stage(rl, key)["metrics"] == {"accuracy": 0.5}
    (sft / "adapter" / "adapter_model.safetensors").write_bytes(b"weights v2")  # SFT was trained again
    assert finished_stage(rl, start_key(sft / "adapter", 0)) is None
    assert start_key(None, 0) != start_key(None, 1)
