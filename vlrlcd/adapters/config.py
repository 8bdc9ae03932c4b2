"""The `student:` section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from vlrlcd.errors import VlrlcdError
from vlrlcd.ranges import check_ranges

TINY_VISION_HEADS = 4   # the tiny students' vision towers (adapters/tiny.py) have 4 attention heads


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | None = None   # None: the family's default (the language model's linear layers)
    train_projector: bool = False             # also train the vision -> language projector
    modules_to_save: list[str] | None = None  # extra modules trained in full and saved with the adapter (e.g. lm_head)

    RANGES: ClassVar[dict[str, str]] = {"r": "[1, inf)", "alpha": "[1, inf)", "dropout": "[0, 1)"}


@dataclass
class TinyConfig:
    """Sizes for the tiny random student the demo and tests build (no download)."""

    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    vision_hidden_size: int = 64
    vision_layers: int = 2
    image_size: int = 32
    patch_size: int = 8
    pretrain_examples: int = 0        # >0: pretrain every weight on generic data first (see training/pretrain.py)
    pretrain_epochs: float = 2.0      # of all weights on the generic data (0: only the tower's stage, below)
    pretrain_lr: float = 0.003
    tower_pretrain_epochs: float = 0.0  # >0 (tiny-llava): first train the vision tower alone to name each patch's
                                        # object on the pretraining scenes (training/pretrain.py: without it the
                                        # tower never learns shapes)
    pretrain_sides: bool = False      # tiny-llava: the pretraining captions name each object's side ("a red
                                      # circle on the left"); raises SFT, not stage II's gain (README, Results)

    RANGES: ClassVar[dict[str, str]] = {
        "vocab_size": "[1, inf)", "hidden_size": "[1, inf)", "num_layers": "[1, inf)", "num_heads": "[1, inf)",
        "intermediate_size": "[1, inf)", "vision_hidden_size": "[1, inf)", "vision_layers": "[1, inf)",
        "image_size": "[1, inf)", "patch_size": "[1, inf)", "pretrain_examples": "[0, inf) 0: no pretraining",
        "pretrain_epochs": "[0, inf) 0: the tower's stage only", "pretrain_lr": "(0, inf)",
        "tower_pretrain_epochs": "[0, inf) 0: none",
    }

    def validate(self, prefix: str = "student.tiny.") -> None:
        check_ranges(self, prefix)
        if self.hidden_size % self.num_heads:
            raise VlrlcdError(f"{prefix}hidden_size ({self.hidden_size}) must be a multiple of {prefix}num_heads "
                              f"({self.num_heads})")
        if self.vision_hidden_size % TINY_VISION_HEADS:
            raise VlrlcdError(f"{prefix}vision_hidden_size must be a multiple of {TINY_VISION_HEADS} (the tiny vision "
                              f"tower's heads), got {self.vision_hidden_size}")
        if self.patch_size > self.image_size:
            raise VlrlcdError(f"{prefix}patch_size ({self.patch_size}) must be <= {prefix}image_size ({self.image_size})")


@dataclass
class StudentConfig:
    name_or_path: str = "tiny-llava"   # a local directory or hub id; "tiny-llava" / "tiny-text" build one here
    family: str = "auto"               # auto (from config.model_type) | llava | llava_next | qwen2_vl | qwen2_5_vl | text
    quantization: str = "none"         # none | 8bit | 4bit
    compute_dtype: str = "float32"     # float32 | bfloat16 | float16
    lora: LoraConfig = field(default_factory=LoraConfig)
    tiny: TinyConfig = field(default_factory=TinyConfig)
    max_new_tokens: int = 12

    RANGES: ClassVar[dict[str, str]] = {"max_new_tokens": "[1, inf)"}

    def validate(self) -> None:
        check_ranges(self, "student.")
        check_ranges(self.lora, "student.lora.")
        self.tiny.validate("student.tiny.")
        if self.quantization not in ("none", "8bit", "4bit"):
            raise VlrlcdError(f"student.quantization must be none, 8bit or 4bit, got '{self.quantization}'")
        if self.compute_dtype not in ("float32", "bfloat16", "float16"):
            raise VlrlcdError(f"student.compute_dtype must be float32, bfloat16 or float16, got '{self.compute_dtype}'")
