"""What the SFT and RL loops share: seeding, the optimizer and its schedule, a clipped step."""

from __future__ import annotations

import random

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
    import math

    if not params:
        raise ValueError("no trainable parameters: is the LoRA adapter loaded as trainable?")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def clipped_step(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, sched, max_norm: float) -> tuple[float, bool]:
    """Clip, check the gradient is finite, step; returns (grad norm, whether the step was taken)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    ok = bool(torch.isfinite(norm))
    if ok:
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    return float(norm), ok
