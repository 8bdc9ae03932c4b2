"""Checkpoints of a training stage: STAGE/checkpoints/step-NNNNNNNN/, complete or absent.

Each holds the policy adapter (a plain peft directory, loadable for evaluation), the trainable tensors by
parameter name (restored bit for bit on resume), and trainer_state.pt: optimizer, scheduler, RNG states
of every process (python, numpy, torch, CUDA), the data position (steps done), the loop's persistent
state (e.g. the RL StepContext.state) and the metric rows so far. It is written into a hidden temporary
directory and renamed into place, so a crash leaves either the whole checkpoint or none; the newest
`keep` are kept. Nothing non-finite is ever written.

Nothing is unpickled: both .pt files hold only tensors and JSON values (RNG states are converted to
tensors and ints, the loop state must be JSON) and are read with `torch.load(weights_only=True)`;
meta.json records their sha256, checked before loading, so a damaged or altered file is a one-line error.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlrlcd.errors import VlrlcdError
from vlrlcd.files import fsync_dir, sha256_of

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
    """This process's RNG states as tensors and plain numbers (safe for `weights_only` loading): python,
    numpy, torch CPU and (when present) CUDA."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": int(version), "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
             "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned; a malformed state is a ValueError."""
    try:
        py, nps = state["python"], state["numpy"]
        words = tuple(int(x) for x in py["words"].tolist())
        keys = nps["keys"].numpy().astype(np.uint32)
        random.setstate((int(py["version"]), words, py["gauss"]))
        np.random.set_state((str(nps["name"]), keys, int(nps["pos"]), int(nps["has_gauss"]), float(nps["cached"])))
        torch.set_rng_state(state["torch"])
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as e:
        raise ValueError(f"malformed RNG state ({type(e).__name__}: {_first_line(e)})") from None
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
    sums = {name: sha256_of(tmp / name) for name in (TENSORS, STATE)}
    (tmp / META).write_text(json.dumps({"step": step, **(meta or {}), "sha256": sums}, indent=1), encoding="utf-8")
    _fsync_tree(tmp)
    if final.exists():  # the same step written again (e.g. a resumed run that ends where it resumed)
        old = root / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    fsync_dir(root)
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
    """Restore the trainable tensors, optimizer and scheduler from `path`; returns the rest of its state.
    Both files are checked against meta.json's sha256 and read with weights_only=True (nothing is unpickled)."""
    tensors, state = read_tensors(path, TENSORS), read_tensors(path, STATE)
    if not isinstance(tensors, dict) or not all(torch.is_tensor(t) for t in tensors.values()):
        raise bad_checkpoint(path, f"{TENSORS} does not hold a name -> tensor mapping")
    if not isinstance(state, dict) or not isinstance(state.get("optimizer"), dict) \
            or not isinstance(state.get("scheduler"), dict):
        raise bad_checkpoint(path, f"{STATE} does not hold the optimizer and scheduler states")
    load_trainable_tensors(student.model, tensors, path)
    try:
        optimizer.load_state_dict(state.pop("optimizer"))
        scheduler.load_state_dict(state.pop("scheduler"))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise bad_checkpoint(path, f"its optimizer / scheduler state does not fit ({type(e).__name__}: "
                                   f"{_first_line(e)})") from None
    return state


def read_tensors(path: Path, name: str) -> Any:
    """`path/name` loaded with weights_only=True after its sha256 is checked against meta.json."""
    try:
        expected = read_meta(path).get("sha256", {}).get(name)
    except (OSError, ValueError, AttributeError) as e:
        raise bad_checkpoint(path, f"{META} is unreadable ({type(e).__name__})") from None
    if expected is None:
        raise bad_checkpoint(path, f"{META} records no checksum for {name} (written by an older vlrlcd?)")
    try:
        if sha256_of(path / name) != expected:
            raise bad_checkpoint(path, f"{name} does not match the checksum in {META} (damaged or altered)")
        return torch.load(path / name, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as e:
        raise bad_checkpoint(path, f"{name} is unreadable ({type(e).__name__}: {_first_line(e)})") from None


def bad_checkpoint(path: Path, why: str) -> VlrlcdError:
    return VlrlcdError(f"{path}: {why}; delete this checkpoint directory to resume from an older one, or start "
                       "again without --resume")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= 160 else line[:157] + "..."


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / META).read_text(encoding="utf-8"))


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(root)
