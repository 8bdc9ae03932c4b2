"""The student's architecture: its config.json (a local directory or the Hugging Face cache, never a download;
else `published.PUBLISHED`), the dimensions the plan reads, and exact parameter counts from a meta-device model
(no weights are read)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from vlrlcd.errors import VlrlcdError
from vlrlcd.planning.published import PUBLISHED

DEFAULT_IMAGE = (640, 480)      # COCO-like; Qwen2-VL / Qwen2.5-VL token counts depend on it


@dataclass
class Params:
    """Parameter counts of the student, by where they live and how they are stored."""

    quantizable: int = 0      # the language model's linear weights (4-bit / 8-bit under quantization)
    quantizable_rows: int = 0  # their output rows (8-bit keeps one fp32 scale per row)
    lm_other: int = 0         # embeddings, lm_head, norms, biases (kept in full precision)
    vision: int = 0           # vision tower and projector (never quantized)
    lora: int = 0             # the LoRA policy adapter (fp32)
    lora_modules: int = 0     # how many linear layers it adapts
    lora_layer: dict = field(default_factory=dict)  # adapted projection names of one decoder layer
    modules_to_save: int = 0  # parameters trained in full (student.lora.modules_to_save, train_projector)


@dataclass
class Arch:
    """What the plan reads from a student's config (text and vision dimensions, exact parameter counts)."""

    name: str
    family: str
    source: str               # where the config came from
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    params: Params
    vision_hidden: int = 0
    vision_layers: int = 0
    vision_intermediate: int = 0
    image_tokens: int = 0     # language-model tokens per image
    vision_tokens: int = 0    # tower tokens per image (patches, CLS)
    vision_keeps_hidden: bool = False  # LLaVA takes hidden_states[-2]: the tower keeps every layer's output

    @property
    def vision(self) -> bool:
        return self.image_tokens > 0


def read_config(name_or_path: str, tiny=None):
    """(transformers config, where it came from) without downloading anything."""
    from transformers import AutoConfig

    if name_or_path in ("tiny-llava", "tiny-text"):
        return _tiny_config(name_or_path, tiny), f"tiny student {name_or_path} (built at run time; vocab <= {tiny.vocab_size})"
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise VlrlcdError(f"{name_or_path}: no config.json in this directory; point student.name_or_path to a "
                              "saved checkpoint")
        return AutoConfig.from_pretrained(str(path)), f"{path / 'config.json'}"
    cached = _cached_config(name_or_path)
    if cached is not None:
        return AutoConfig.from_pretrained(str(cached.parent)), f"{cached} (Hugging Face cache)"
    if name_or_path in PUBLISHED:
        d = dict(PUBLISHED[name_or_path])
        return AutoConfig.for_model(d.pop("model_type"), **d), (
            f"built-in table of published architectures ({name_or_path}'s config.json is not on disk)")
    raise VlrlcdError(
        f"student.name_or_path '{name_or_path}': no config.json on disk (not a local directory, not in the Hugging "
        f"Face cache) and not one of the built-in architectures ({', '.join(PUBLISHED)}); fetch only its config "
        f"with `huggingface-cli download {name_or_path} config.json` or point to a local copy")


def _cached_config(repo_id: str) -> Path | None:
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - an odd id or an unreadable cache: treat as not cached
        return None
    return Path(hit) if isinstance(hit, str) else None


def _tiny_config(name: str, tiny):
    """The config `adapters/tiny.py` builds for `tiny-llava` / `tiny-text` (vocab at its upper bound)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    t = tiny
    text = LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                       num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                       num_key_value_heads=t.num_heads, max_position_embeddings=512, tie_word_embeddings=False)
    if name == "tiny-text":
        return text
    vision = CLIPVisionConfig(hidden_size=t.vision_hidden_size, intermediate_size=2 * t.vision_hidden_size,
                              num_hidden_layers=t.vision_layers, num_attention_heads=4, image_size=t.image_size,
                              patch_size=t.patch_size, projection_dim=t.vision_hidden_size)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=4, vision_feature_layer=-1,
                       vision_feature_select_strategy="default", tie_word_embeddings=False)


def student_arch(scfg, image_size: tuple[int, int] = DEFAULT_IMAGE, image_tokens: int | None = None) -> Arch:
    """The student's architecture with exact parameter counts from a meta-device model (no weights read)."""
    import torch
    import transformers

    from vlrlcd.adapters.families import VISION_MODULES, detect_family

    config, source = read_config(str(scfg.name_or_path), scfg.tiny)
    family = detect_family(config, scfg.family)
    with torch.device("meta"):
        model = getattr(transformers, family.auto_class).from_config(config)
    params = _count_params(model, scfg, family, VISION_MODULES)
    text = config.get_text_config()
    heads = text.num_attention_heads
    arch = Arch(
        name=str(scfg.name_or_path), family=family.name, source=source, vocab=text.vocab_size,
        hidden=text.hidden_size, layers=text.num_hidden_layers, heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        intermediate=text.intermediate_size, params=params)
    if family.vision:
        _vision_dims(arch, config, image_size)
        if image_tokens is not None:
            scale = image_tokens / max(arch.image_tokens, 1)
            arch.vision_tokens = max(1, round(arch.vision_tokens * scale))
            arch.image_tokens = image_tokens
    return arch


def _vision_dims(arch: Arch, config, image_size: tuple[int, int]) -> None:
    v = config.vision_config
    if arch.family in ("llava", "llava_next"):
        patches = (v.image_size // v.patch_size) ** 2
        per_tile = patches + (1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0)
        tiles = 5 if arch.family == "llava_next" else 1  # base image + 2x2 tiles (an upper bound for anyres)
        arch.image_tokens, arch.vision_tokens = per_tile * tiles, (patches + 1) * tiles
        arch.vision_hidden, arch.vision_layers, arch.vision_intermediate = v.hidden_size, v.num_hidden_layers, v.intermediate_size
        arch.vision_keeps_hidden = getattr(config, "vision_feature_layer", -1) not in (-1, None)
        return
    merge, patch = v.spatial_merge_size, v.patch_size
    side = merge * patch
    w, h = (max(side, round(x / side) * side) for x in image_size)
    arch.image_tokens = (w // side) * (h // side)
    arch.vision_tokens = arch.image_tokens * merge * merge
    arch.vision_hidden = getattr(v, "embed_dim", None) or v.hidden_size
    arch.vision_layers = v.depth
    arch.vision_intermediate = getattr(v, "intermediate_size", None) or int(arch.vision_hidden * getattr(v, "mlp_ratio", 4))


def _targets(scfg, family):
    return scfg.lora.target_modules or family.default_targets()


def _is_target(name: str, targets) -> bool:
    """peft's rule: a regex string must match the whole module name; a list entry must end it."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _count_params(model, scfg, family, vision_modules) -> Params:
    import torch

    out = Params()
    skip = {"lm_head"} | ({family.vision_module, family.projector} - {None} if family.vision else set())
    in_vision = lambda n: any(p in vision_modules or p == family.projector for p in n.split("."))  # noqa: E731
    targets = _targets(scfg, family)
    save = list(scfg.lora.modules_to_save or []) + ([family.projector] if scfg.lora.train_projector and family.projector else [])
    seen: set[int] = set()
    for mname, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and _is_target(mname, targets):
            out.lora += scfg.lora.r * (module.in_features + module.out_features)
            out.lora_modules += 1
            leaf = mname.rsplit(".", 1)[-1]
            if ".layers.0." in mname or mname.startswith("layers.0."):
                out.lora_layer[leaf] = True
        if save and any(mname == s or mname.endswith("." + s) for s in save):
            out.modules_to_save += sum(p.numel() for p in module.parameters())
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            if in_vision(full):
                out.vision += p.numel()
            elif (isinstance(module, torch.nn.Linear) and pname == "weight"
                  and not any(s in full.split(".") for s in skip)):
                out.quantizable += p.numel()
                out.quantizable_rows += module.out_features
            else:
                out.lm_other += p.numel()
    return out
