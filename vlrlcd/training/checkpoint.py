"""Checkpoints of a training stage: STAGE/checkpoints/step-NNNNNNNN/, complete or absent.

Each holds the policy adapter (a plain peft directory, loadable for evaluation), the trainable tensors by
parameter name (restored bit for bit on resume), and trainer_state.pt: optimizer, scheduler, RNG states
of every process (python, numpy, torch, CUDA), the data position (steps done), the loop's persistent
state (e.g. the RL StepContext.state) and the metric rows so far. It is written into a hidden temporary
directory and renamed into place, so a crash leaves either the whole checkpoint or none; the newest
`keep` are kept. Nothing non-finite is ever written.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlrlcd.errors import VlrlcdError

DIR = "checkpoints"
PREFIX = "step-"
STATE = "trainer_state.pt"
TENSORS = "trainable.pt"
META = "meta.json"


def checkpoints_dir(stage_dir: str | Path) -> Path:
    return Path(stage_dir) / DIR


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX):])


def list_checkpoints(stage_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a stage, oldest first."""
    root = checkpoints_dir(stage_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p / META).exists()]
    return sorted(found, key=step_of)


def latest_checkpoint(stage_dir: str | Path) -> Path | None:
    found = list_checkpoints(stage_dir)
    return found[-1] if found else None


def clear_checkpoints(stage_dir: str | Path) -> None:
    """Remove a stage's checkpoints (a fresh run must not leave an older run's to resume from)."""
    shutil.rmtree(checkpoints_dir(stage_dir), ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """This process's RNG states: python, numpy, torch CPU and (when present) CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Copy saved trainable tensors into `model` bit for bit; a name mismatch means another model/adapter."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(tensors):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise VlrlcdError(
            f"{where}: the checkpoint's trainable tensors do not match this student ({len(missing)} missing, e.g. "
            f"{missing[:1]}; {len(extra)} unexpected, e.g. {extra[:1]}); was the student or its LoRA settings changed? "
            "Start without --resume"
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n].to(device=p.device, dtype=p.dtype))


def non_finite(tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """Names of trainable tensors (and optimizer state entries) holding NaN or inf."""
    bad = [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if optimizer is not None:
        for i, st in enumerate(optimizer.state.values()):
            for k, v in st.items():
                if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                    bad.append(f"optimizer.state[{i}].{k}")
    return bad


def save_checkpoint(stage_dir: str | Path, step: int, student, optimizer: torch.optim.Optimizer, scheduler,
                    state: dict[str, Any], keep: int, meta: dict[str, Any] | None = None) -> Path:
    """Write STAGE/checkpoints/step-N atomically (temp dir + rename) and prune to the newest `keep` (0: all).

    `state` is the loop's own part (rows, data position, RNG states of every process, ...).
    """
    tensors = trainable_tensors(student.model)
    bad = non_finite(tensors, optimizer)
    if bad:
        raise VlrlcdError(
            f"refusing to write a checkpoint at step {step}: non-finite values in {', '.join(bad[:3])}"
            f"{' ...' if len(bad) > 3 else ''}; the previous checkpoint in {checkpoints_dir(stage_dir)} is intact"
        )
    root = checkpoints_dir(stage_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    student.save(tmp / "adapter")
    torch.save(tensors, tmp / TENSORS)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **state}, tmp / STATE)
    (tmp / META).write_text(json.dumps({"step": step, **(meta or {})}, indent=1), encoding="utf-8")
    _fsync_tree(tmp)
    if final.exists():  # the same step written again (e.g. a resumed run that ends where it resumed)
        old = root / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    prune(stage_dir, keep)
    return final


def prune(stage_dir: str | Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints (0: keep all) and drop leftover temporary directories."""
    root = checkpoints_dir(stage_dir)
    for p in root.glob(".tmp-*"):
        if p.name.endswith(f"-{os.getpid()}"):
            continue
        shutil.rmtree(p, ignore_errors=True)
    found = list_checkpoints(stage_dir)
    if keep > 0:
        for p in found[:-keep]:
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, student, optimizer: torch.optim.Optimizer, scheduler) -> dict[str, Any]:
    """Restore the trainable tensors, optimizer and scheduler from `path`; returns the rest of its state."""
    try:
        tensors = torch.load(path / TENSORS, map_location="cpu", weights_only=True)
        # our own file: it holds RNG states (numpy arrays, tuples) besides tensors
        state = torch.load(path / STATE, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise VlrlcdError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e}); delete it to resume from an "
                          "older one") from None
    load_trainable_tensors(student.model, tensors, path)
    optimizer.load_state_dict(state.pop("optimizer"))
    scheduler.load_state_dict(state.pop("scheduler"))
    return state


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / META).read_text(encoding="utf-8"))


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
