"""The `data:` section."""

from __future__ import annotations

from dataclasses import dataclass

from vlrlcd.errors import VlrlcdError

SYNTHETIC_TASKS = ("shapes_vqa", "shapes_caption", "arithmetic")


@dataclass
class DataConfig:
    task: str = "shapes_vqa"          # a synthetic generator, or "file" to read train_path / eval_path
    train_path: str | None = None     # a data file or directory (see data.format)
    eval_path: str | None = None
    format: str = "auto"              # jsonl | hf | aokvqa | coco_captions | llava | text | auto
    image_root: str | None = None     # where COCO / A-OKVQA image ids resolve
    train_size: int = 256             # synthetic: number of training prompts
    eval_size: int = 64               # synthetic: number of held-out prompts
    seed: int = 0                     # synthetic: generator seed
    on_error: str = "raise"           # raise | skip: what a bad record does
    max_image_pixels: int = 40_000_000

    def validate(self) -> None:
        if self.task not in SYNTHETIC_TASKS + ("file",):
            raise VlrlcdError(
                f"data.task '{self.task}' is not one of {', '.join(SYNTHETIC_TASKS + ('file',))}"
            )
        if self.on_error not in ("raise", "skip"):
            raise VlrlcdError(f"data.on_error must be 'raise' or 'skip', got '{self.on_error}'")
        if self.train_size < 1 or self.eval_size < 0:
            raise VlrlcdError("data.train_size must be >= 1 and data.eval_size >= 0")
