"""Counting vision-tower passes with forward hooks: how many images went through the tower."""

from __future__ import annotations

import torch

VISION_MODULES = ("vision_tower", "visual", "vision_model")


def vision_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    """The outermost module named like a vision tower (LLaVA `vision_tower`, Qwen2-VL `visual`), or None."""
    for name, module in model.named_modules():
        if name.split(".")[-1] in VISION_MODULES:
            return module
    return None


def _images_in_call(args: tuple, kwargs: dict) -> int:
    """Images in one tower call: rows of `grid_thw` (Qwen2-VL packs patches), else the pixel batch size."""
    grid = kwargs.get("grid_thw", kwargs.get("image_grid_thw"))
    if grid is None and len(args) > 1 and isinstance(args[1], torch.Tensor) and args[1].dim() == 2 and args[1].shape[-1] == 3:
        grid = args[1]
    if grid is not None:
        return int(grid.shape[0])
    pixels = args[0] if args else kwargs.get("pixel_values", kwargs.get("hidden_states"))
    return int(pixels.shape[0]) if isinstance(pixels, torch.Tensor) else 1


class VisionCounter:
    """Counts tower calls and images encoded for one model; `images` only grows while attached."""

    def __init__(self, model: torch.nn.Module):
        self.calls = 0
        self.images = 0
        tower = vision_tower(model)
        self._handle = tower.register_forward_hook(self._hook, with_kwargs=True) if tower is not None else None

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def _hook(self, module, args, kwargs, output) -> None:
        self.calls += 1
        self.images += _images_in_call(args, kwargs)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
