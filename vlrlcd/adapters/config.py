"""The `student:` section."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlrlcd.errors import VlrlcdError


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | None = None   # None: the family's default (the language model's linear layers)
    train_projector: bool = False             # also train the vision -> language projector
    modules_to_save: list[str] | None = None  # extra modules trained in full and saved with the adapter (e.g. lm_head)


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
    pretrain_epochs: float = 2.0
    pretrain_lr: float = 0.003


@dataclass
class StudentConfig:
    name_or_path: str = "tiny-llava"   # a local directory or hub id; "tiny-llava" / "tiny-text" build one here
    family: str = "auto"               # auto (from config.model_type) | llava | llava_next | qwen2_vl | qwen2_5_vl | text
    quantization: str = "none"         # none | 8bit | 4bit
    compute_dtype: str = "float32"     # float32 | bfloat16 | float16
    lora: LoraConfig = field(default_factory=LoraConfig)
    tiny: TinyConfig = field(default_factory=TinyConfig)
    max_new_tokens: int = 12

    def validate(self) -> None:
        if self.quantization not in ("none", "8bit", "4bit"):
            raise VlrlcdError(f"student.quantization must be none, 8bit or 4bit, got '{self.quantization}'")
        if self.compute_dtype not in ("float32", "bfloat16", "float16"):
            raise VlrlcdError(f"student.compute_dtype must be float32, bfloat16 or float16, got '{self.compute_dtype}'")
