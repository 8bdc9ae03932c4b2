"""What the SFT and RL loops share: seeding, the optimizer and its schedule, a clipped step, activation
checkpointing."""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
from dataclasses import dataclass

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float, total_steps: int,
                   warmup_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with linear warm-up then cosine decay to 10% of `lr`."""
    if not params:
        raise ValueError("no trainable parameters: is the LoRA adapter loaded as trainable?")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def clipped_step(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, sched, max_norm: float,
                 scaler: torch.amp.GradScaler | None = None) -> tuple[float, bool]:
    """Unscale (fp16), clip, check the gradient is finite, step; returns (grad norm, whether the step was
    taken). A non-finite gradient leaves weights, optimizer and schedule untouched."""
    if scaler is not None:
        scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    ok = bool(torch.isfinite(norm))
    if ok:
        if scaler is not None:
            scaler.step(opt)
        else:
            opt.step()
        sched.step()
    if scaler is not None:
        scaler.update()
    opt.zero_grad(set_to_none=True)
    return float(norm), ok


def gradient_skip(scaler: torch.amp.GradScaler | None) -> tuple[str, bool]:
    """Why a step with a finite loss was skipped, and whether it counts toward train.max_bad_steps: under
    fp16 an overflow while the loss scale is still >= 1 is the scaler's normal search (it halved the scale)."""
    if scaler is not None and scaler.get_scale() >= 1.0:
        return f"fp16 overflow, loss scale lowered to {scaler.get_scale():g}", False
    return "non-finite gradient", True


@dataclass
class StepOutcome:
    """How an optimizer step went: the gradient norm, whether it was taken, why not (None when it was, or
    when losses were non-finite: the loop names them), whether it counts toward train.max_bad_steps, and
    how many non-finite losses every process saw together."""

    grad_norm: float
    ok: bool
    reason: str | None
    counts_bad: bool
    bad_losses: int


def finish_step(dist, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, sched, max_norm: float,
                scaler: torch.amp.GradScaler | None, bad_losses: int) -> StepOutcome:
    """Sum the gradients and the non-finite loss count over the processes (`Dist.sum_gradients`), then take
    the clipped step — or, when any process saw a non-finite loss, drop the gradients on every process."""
    n_bad = int(dist.sum_gradients(params, [float(bad_losses)])[0])
    if n_bad:
        opt.zero_grad(set_to_none=True)
        return StepOutcome(float("nan"), False, None, True, n_bad)
    norm, ok = clipped_step(params, opt, sched, max_norm, scaler)
    reason, counts = gradient_skip(scaler) if not ok else (None, True)
    return StepOutcome(norm, ok, reason, counts, 0)


def digest(items: list[str]) -> str:
    """A short hash of the data order (a checkpoint's data position is only valid for the same order)."""
    return hashlib.sha1("\x00".join(items).encode("utf-8")).hexdigest()[:16]


def set_activation_checkpointing(model, on: bool) -> None:
    """transformers' activation (gradient) checkpointing on or off: recompute each decoder layer in backward
    (non-reentrant, so frozen inputs with a LoRA inside work). transformers 5 name first, 4.x name otherwise."""
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()


@contextlib.contextmanager
def activation_checkpointing(model, on: bool):
    """Activation checkpointing on `model` for the block (nothing when `on` is false); off again after."""
    if not on:
        yield
        return
    set_activation_checkpointing(model, True)
    try:
        yield
    finally:
        set_activation_checkpointing(model, False)
