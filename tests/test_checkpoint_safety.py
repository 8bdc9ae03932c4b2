"""Resuming never unpickles code: checkpoints hold tensors and JSON values only, are read with
weights_only=True after a sha256 check, and a planted, altered, truncated or older-format file is a one-line
error. RNG states survive the round trip bit for bit."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from test_resume_digest import RUN
from vlrlcd import cli
from vlrlcd.errors import VlrlcdError
from vlrlcd.files import sha256_of
from vlrlcd.pipeline import STAGE_FILE
from vlrlcd.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Runs a shell command when unpickled by a loader that allows arbitrary globals."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """An SFT-only run with a checkpoint after each of its 2 steps."""
    root = tmp_path_factory.mktemp("ckpt")
    run = root / "run"
    cfg = {**RUN, "run_dir": str(run), "train": {**RUN["train"], "objective": "sft", "save_every": 1}}
    (root / "c.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    os.environ.pop("WORLD_SIZE", None)
    assert cli.main(["train", str(root / "c.yaml"), "--no-progress"]) == 0
    return run


@pytest.fixture
def unfinished(finished, tmp_path) -> Path:
    """A copy whose SFT stage is not marked done: --resume loads its newest checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "sft" / STAGE_FILE).unlink()
    cfg = yaml.safe_load((finished.parent / "c.yaml").read_text())
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**cfg, "run_dir": str(run)}), encoding="utf-8")
    return run


def newest(run: Path) -> Path:
    return ckpt.latest_checkpoint(run / "sft")


def reseal(path: Path) -> None:
    """Update meta.json's checksums as someone who can write the checkpoint could."""
    meta = ckpt.read_meta(path)
    meta["sha256"] = {n: sha256_of(path / n) for n in (ckpt.TENSORS, ckpt.STATE)}
    (path / ckpt.META).write_text(json.dumps(meta), encoding="utf-8")


def resume_in_subprocess(run: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "vlrlcd.cli", "train", str(run.parent / "c.yaml"), "--no-progress",
                           "--resume"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def plant(path: Path, marker: Path) -> None:
    torch.save({"optimizer": {}, "scheduler": {}, "step": 2, "x": Payload(f"touch {marker}")}, path / ckpt.STATE)


def test_a_planted_pickle_never_runs(unfinished, tmp_path):
    """trainer_state.pt replaced by a pickle that runs `touch`, meta.json's checksums updated to match."""
    marker = tmp_path / "pwned"
    path = newest(unfinished)
    plant(path, marker)
    reseal(path)
    res = resume_in_subprocess(unfinished)
    assert res.returncode == 1 and not marker.exists()
    line = one_error_line(res.stderr)
    assert str(path) in line and "unreadable (UnpicklingError" in line and "delete this checkpoint directory" in line


def test_an_altered_file_fails_its_checksum(unfinished, tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = newest(unfinished)
    plant(path, marker)
    assert cli.main(["train", str(unfinished.parent / "c.yaml"), "--no-progress", "--resume"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "trainer_state.pt does not match the checksum in meta.json" in line and not marker.exists()


def test_an_intact_checkpoint_resumes(unfinished, capsys):
    assert cli.main(["train", str(unfinished.parent / "c.yaml"), "--no-progress", "--resume"]) == 0
    assert "sft: resuming after step 2" in capsys.readouterr().err


@pytest.mark.parametrize("damage,needle", [
    ("truncate", "trainable.pt is unreadable"),
    ("no_rng", "not a training state this version wrote (KeyError: 'rng')"),
    ("old_meta", "records no checksum for trainable.pt (written by an older vlrlcd?)"),
    ("bad_meta", "meta.json is unreadable"),
    ("not_a_mapping", "does not hold the optimizer and scheduler states"),
    ("bad_step", "its step 99 lies outside this stage's 2 steps"),
])
def test_damaged_checkpoints_are_one_line_errors(unfinished, capsys, damage, needle):
    path = newest(unfinished)
    state = torch.load(path / ckpt.STATE, weights_only=True)
    if damage == "truncate":
        data = (path / ckpt.TENSORS).read_bytes()
        (path / ckpt.TENSORS).write_bytes(data[: len(data) // 2])
    elif damage == "no_rng":
        state.pop("rng")
        torch.save(state, path / ckpt.STATE)
    elif damage == "not_a_mapping":
        torch.save([1, 2, 3], path / ckpt.STATE)
    elif damage == "bad_step":
        torch.save({**state, "step": 99}, path / ckpt.STATE)
    if damage in ("truncate", "no_rng", "not_a_mapping", "bad_step"):
        reseal(path)
    elif damage == "old_meta":
        meta = ckpt.read_meta(path)
        meta.pop("sha256")
        (path / ckpt.META).write_text(json.dumps(meta), encoding="utf-8")
    else:
        (path / ckpt.META).write_text("{not json", encoding="utf-8")
    capsys.readouterr()
    assert cli.main(["train", str(unfinished.parent / "c.yaml"), "--no-progress", "--resume"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert needle in line and str(path) in line, line


def test_checkpoint_files_load_with_weights_only(finished):
    for path in ckpt.list_checkpoints(finished / "sft"):
        state = torch.load(path / ckpt.STATE, weights_only=True)
        assert isinstance(state["rng"][0]["torch"], torch.Tensor) and state["step"] in (1, 2)
        json.dumps({k: v for k, v in state.items() if k in ("rows", "loop", "step", "bad", "elapsed")})
        torch.load(path / ckpt.TENSORS, weights_only=True)


def test_rng_state_round_trips_bit_for_bit(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # leave cached gaussians in the states
    torch.save(ckpt.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected
    with pytest.raises(ValueError, match="malformed RNG state"):
        ckpt.set_rng_state({"python": {"version": 3}, "numpy": {}, "torch": torch.zeros(1)})


def test_a_loop_state_that_is_not_json_is_refused_when_saving():
    from vlrlcd.training.session import _json_values

    assert _json_values({"calls": {"judge": 3}, "b": 0.5}, "x") == {"calls": {"judge": 3}, "b": 0.5}
    with pytest.raises(VlrlcdError, match="only JSON values and tensors are saved"):
        _json_values({"baseline": object()}, "rl: the loop state")


def test_no_code_path_unpickles():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "vlrlcd").rglob("*.py")
                 if re.search(r"weights_only\s*=\s*False|pickle\.loads?\(", p.read_text(encoding="utf-8"))]
    assert offenders == []
