"""The `data:` section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from vlrlcd.errors import VlrlcdError
from vlrlcd.ranges import check_ranges

SYNTHETIC_TASKS = ("shapes_vqa", "shapes_caption", "arithmetic")
FORMATS = ("auto", "jsonl", "hf", "aokvqa", "coco_captions", "llava", "text")
QTYPES = ("color", "shape", "count", "position")
RECORD_FIELDS = ("id", "prompt", "image", "reference", "choices")


@dataclass
class DataConfig:
    task: str = "shapes_vqa"          # a synthetic generator, or "file" to read train_path / eval_path
    train_path: str | None = None     # a data file or directory (see data.format)
    eval_path: str | None = None      # file task: unset means no held-out split
    format: str = "auto"              # jsonl | hf | aokvqa | coco_captions | llava | text | auto
    image_root: str | None = None     # where COCO / A-OKVQA image ids and relative image paths resolve
    allow_outside_images: bool = False  # true: images may resolve outside the data file's folder and image_root
    train_size: int = 256             # synthetic: number of training prompts
    eval_size: int = 64               # synthetic: number of held-out prompts
    seed: int = 0                     # synthetic: generator seed
    on_error: str = "raise"           # raise | skip: what a bad record does
    max_image_pixels: int = 40_000_000  # decompression-bomb guard, checked before decoding
    min_image_side: int = 8           # smaller images (e.g. 1x1) are rejected: processors cannot use them
    # synthetic generators
    image_size: int = 32              # shapes: square image side (the tiny student's vision tower takes 32)
    max_objects: int = 3              # shapes: at most this many objects per image (1..4)
    qtypes: list[str] = field(default_factory=lambda: list(QTYPES))  # shapes_vqa question mix
    ops: list[str] = field(default_factory=lambda: ["+", "-"])       # arithmetic operators (+, -, *)
    max_operand: int = 20             # arithmetic: operands in 0..max_operand
    # file sources
    train_split: str = "train"        # split name inside a Hugging Face DatasetDict / hub dataset
    eval_split: str = "validation"
    columns: dict[str, str] = field(default_factory=dict)  # hf: our field -> source column, e.g. {prompt: question}
    aokvqa_task: str = "mc"           # mc (reference = correct choice) | rationale (reference = first rationale + answer)
    caption_prompt: str = "Describe the image."  # coco_captions: the prompt for every image

    RANGES: ClassVar[dict[str, str]] = {   # vlrlcd/ranges.py
        "train_size": "[1, inf)", "eval_size": "[0, inf)", "seed": "[0, 2147483647]",
        "max_image_pixels": "[1, inf)", "min_image_side": "[1, inf)",
        "image_size": "[16, inf) so shapes stay visible", "max_objects": "[1, 4]", "max_operand": "[1, inf)",
    }

    def validate(self) -> None:
        check_ranges(self, "data.")
        if self.task not in SYNTHETIC_TASKS + ("file",):
            raise VlrlcdError(
                f"data.task '{self.task}' is not one of {', '.join(SYNTHETIC_TASKS + ('file',))}"
            )
        if self.on_error not in ("raise", "skip"):
            raise VlrlcdError(f"data.on_error must be 'raise' or 'skip', got '{self.on_error}'")
        if self.format not in FORMATS:
            raise VlrlcdError(f"data.format '{self.format}' is not one of {', '.join(FORMATS)}")
        if self.aokvqa_task not in ("mc", "rationale"):
            raise VlrlcdError(f"data.aokvqa_task must be 'mc' or 'rationale', got '{self.aokvqa_task}'")
        bad = [q for q in self.qtypes if q not in QTYPES]
        if bad or not self.qtypes:
            raise VlrlcdError(f"data.qtypes must be a non-empty list of {', '.join(QTYPES)}, got {self.qtypes}")
        bad = [o for o in self.ops if o not in ("+", "-", "*")]
        if bad or not self.ops:
            raise VlrlcdError(f"data.ops must be a non-empty list of +, -, *, got {self.ops}")
        for k in self.columns:
            if k not in RECORD_FIELDS:
                raise VlrlcdError(
                    f"data.columns key '{k}' is not a record field; use one of {', '.join(RECORD_FIELDS)}"
                )
