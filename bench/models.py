"""The students and prompts the benchmarks run on: tiny random checkpoints built from configs (no download),
sized so that image tokens are most of a VLM prompt, and the same prompts for vlrlcd and TRL."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlrlcd.adapters.config import TinyConfig
from vlrlcd.datasets.records import Record

# LLaVA: 64x64 image, patch 8 -> 64 patches = 64 image tokens ("default" strategy drops CLS).
LLAVA_TINY = TinyConfig(image_size=64, patch_size=8)
# Qwen2-VL: 224x224 image, patch 14 -> 16x16 patches, 2x2 merge -> 64 image tokens. The builder fixes its
# processor at 56x56 (4 tokens); `qwen_image_side` re-saves the processor for image_size x image_size.
QWEN_TINY = TinyConfig(image_size=224, patch_size=14)
TEXT_TINY = TinyConfig()
# About 100M parameters: 14 layers of hidden 768 / MLP 2048 (7.1M each) + 2 x 512 x 768 embeddings.
TEXT_100M = TinyConfig(vocab_size=512, hidden_size=768, num_layers=14, num_heads=12, intermediate_size=2048)

ARCHS = ("llava", "qwen2_vl", "text")

# Bench configurations: name -> (architecture, sizes).
CONFIGS: dict[str, tuple[str, TinyConfig]] = {
    "llava": ("llava", LLAVA_TINY),                                           # 64 image tokens of 76
    "qwen2_vl": ("qwen2_vl", QWEN_TINY),                                      # 64 image tokens of 89
    "text": ("text", TEXT_TINY),                                              # 11-token prompts
    "llava-256": ("llava", TinyConfig(image_size=128, patch_size=8)),         # 256 image tokens of 268
}
DEFAULT_CONFIGS = ("llava", "qwen2_vl", "text", "llava-256")


@dataclass
class Workload:
    """A saved student and the prompts (with their anchors) both trainers see."""

    arch: str
    path: Path
    records: list[Record]

    @property
    def anchors(self) -> dict[str, str]:
        return {r.id: r.reference for r in self.records}


def prompts(arch: str, n: int, out_dir: Path, image_size: int) -> list[Record]:
    """n records with a reference answer (used as the stored anchor): shapes VQA for VLMs, arithmetic for text."""
    from vlrlcd.datasets.synthetic import arithmetic, shapes_vqa

    if arch == "text":
        return arithmetic(n, seed=0)
    return shapes_vqa(n, seed=0, out_dir=out_dir / "images", image_size=image_size)


def corpus(records: list[Record]) -> list[str]:
    return [r.prompt for r in records] + [r.reference or "" for r in records]


def has_qwen2_vl() -> bool:
    import vlrlcd.adapters.tiny as tiny

    return hasattr(tiny, "build_tiny_qwen2_vl")


def build(arch: str, out_dir: str | Path, n_prompts: int, seed: int = 0, tiny_config: TinyConfig | None = None,
          name: str | None = None) -> Workload:
    """Build the `arch` student under out_dir/name and return it with n_prompts prompts."""
    import vlrlcd.adapters.tiny as tiny

    out = Path(out_dir) / (name or arch)
    out.mkdir(parents=True, exist_ok=True)
    size = tiny_config or {"llava": LLAVA_TINY, "qwen2_vl": QWEN_TINY, "text": TEXT_TINY}[arch]
    records = prompts(arch, n_prompts, out, size.image_size)
    if arch == "llava":
        path = tiny.build_tiny_llava(out / "model", corpus(records), size, seed=seed)
    elif arch == "qwen2_vl":
        if not has_qwen2_vl():
            raise RuntimeError("vlrlcd.adapters.tiny.build_tiny_qwen2_vl is not available yet")
        path = tiny.build_tiny_qwen2_vl(out / "model", corpus(records), size, seed=seed, variant="qwen2_vl")
        qwen_image_side(path, size.image_size)
    elif arch == "text":
        path = tiny.build_tiny_text(out / "model", corpus(records), size, seed=seed)
    else:
        raise ValueError(f"unknown arch {arch}; one of {ARCHS}")
    return Workload(arch, Path(path), records)


def qwen_image_side(path: Path, side: int) -> None:
    """Re-save a Qwen2-VL processor so every image is resized to side x side pixels: (side/28)^2 tokens."""
    from transformers import AutoProcessor, Qwen2VLImageProcessor

    if side % 28:
        raise ValueError(f"Qwen2-VL image side must be a multiple of 28 (patch 14 x merge 2), got {side}")
    proc = AutoProcessor.from_pretrained(path)
    proc.image_processor = Qwen2VLImageProcessor(min_pixels=side * side, max_pixels=side * side, patch_size=14,
                                                 merge_size=2, temporal_patch_size=2)
    proc.save_pretrained(path)


def build_text_small(out_dir: str | Path, seed: int = 0) -> Path:
    """The tiny text student, stored in bf16 like the 100M one (for --quick)."""
    import torch
    from transformers import AutoModelForCausalLM

    import vlrlcd.adapters.tiny as tiny

    records = prompts("text", 8, Path(out_dir), 0)
    path = tiny.build_tiny_text(Path(out_dir) / "text_small", corpus(records), TEXT_TINY, seed=seed)
    AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(path)
    return path


def build_text_100m(out_dir: str | Path, seed: int = 0) -> Path:
    """A ~100M-parameter random Llama text student, weights stored in bf16 (see bench/memory.py for why)."""
    import torch
    from transformers import AutoModelForCausalLM

    import vlrlcd.adapters.tiny as tiny

    records = prompts("text", 8, Path(out_dir), 0)
    path = tiny.build_tiny_text(Path(out_dir) / "text100m", corpus(records), TEXT_100M, seed=seed)
    AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(path)
    return path
