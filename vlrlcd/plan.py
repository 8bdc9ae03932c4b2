"""`vlrlcd plan CONFIG`: where the accelerator's memory goes in one RL step, before anything is loaded.

The student's architecture comes from its config.json (a local directory, or the Hugging Face cache; never a
download), or, for a hub id that is not on disk, from `PUBLISHED` (the architectures of the README recipes'
students). Parameters are counted exactly on a meta-device model built from that config (no weights are
read). Activations follow this code's step (training/rl.py): sampling on a K-fold repeated prefix cache,
scoring, the policy pass with gradient (the prompt prefix run once per prompt, the K continuations on its
cache), the reference pass under the SFT adapter, backward, AdamW.

What each pass keeps, per token and decoder layer, is what autograd saves there (the fp32 input of each
RMSNorm, LoRA's fp32 input of each adapted linear, q / k / v / the attention output, the MLP's gate, up and
SiLU outputs), counted by storage as `bench.memory.LiveTensorPeak` measures it; the log-prob passes add the
fp32 full-vocabulary logits of every fed token. Under QLoRA everything but the 4-bit linears is upcast to
fp32 by peft's `prepare_model_for_kbit_training`, and bitsandbytes returns each 4-bit matmul in its input's
dtype, so a 4-bit student's activations and KV cache are fp32.

All figures are estimates: within ±20% of the measured peak of live tensor bytes on the tiny students
(tests/test_plan.py); `bench/gpu_check.py` compares them with `torch.cuda.max_memory_allocated` on a GPU.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from vlrlcd.errors import VlrlcdError

GiB = 2**30
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# CUDA context, cuBLAS workspaces and the caching allocator's rounding: not in max_memory_allocated, but in
# what the card must hold. A rule of thumb, not a measurement.
CUDA_OVERHEAD = int(1.0 * GiB)
DEFAULT_PROMPT_TOKENS = 48      # a question and the chat template, without image tokens
DEFAULT_IMAGE = (640, 480)      # COCO-like; Qwen2-VL / Qwen2.5-VL token counts depend on it
SCORING_EXTRA_TOKENS = 4        # ranking/scorers.py SCORING_TEMPLATE's "\nReference answer: " around the anchor

# config.json of the README recipes' students (their published architectures, abridged to what the plan reads).
PUBLISHED: dict[str, dict] = {
    "llava-hf/llava-1.5-7b-hf": {
        "model_type": "llava", "image_token_index": 32000, "projector_hidden_act": "gelu",
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "tie_word_embeddings": False,
        "text_config": {"model_type": "llama", "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008,
                        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                        "tie_word_embeddings": False},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                          "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                          "projection_dim": 768},
    },
    "Qwen/Qwen2-VL-2B-Instruct": {
        "model_type": "qwen2_vl", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True,
        "image_token_id": 151655, "video_token_id": 151656,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "mlp_ratio": 4, "num_heads": 16,
                          "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    },
    "Qwen/Qwen2.5-VL-3B-Instruct": {
        "model_type": "qwen2_5_vl", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008,
        "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2, "tie_word_embeddings": True,
        "image_token_id": 151655, "video_token_id": 151656,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                          "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]},
    },
    "Qwen/Qwen2.5-1.5B-Instruct": {
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True,
    },
}
LM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------ the architecture
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


# ------------------------------------------------------------------ the workload
@dataclass
class Shapes:
    """Token counts of one step's prompts (the plan assumes every prompt and candidate at these lengths)."""

    prompt_tokens: int = DEFAULT_PROMPT_TOKENS  # text tokens of a prompt, chat template included
    response_tokens: int = 16                   # candidates' length (student.max_new_tokens: the worst case)
    anchor_tokens: int | None = None            # the anchor's length (default: response_tokens)
    scoring_extra: int = SCORING_EXTRA_TOKENS    # the scoring template's words
    images: bool = True                          # one image per prompt (VLM students)


@dataclass
class Settings:
    """The recipe's knobs that size a step."""

    batch: int = 8
    k: int = 8
    objective: str = "ldl_grpo"
    beta: float = 0.05
    group_chunk: int = 0
    gradient_checkpointing: bool = False
    quantization: str = "none"
    compute_dtype: str = "bfloat16"
    mixed_precision: str = "no"
    lora_dropout: float = 0.0
    reference_adapter: bool = True   # the SFT adapter kept beside the policy (always after stage I)
    score: bool = True               # the objective ranks its candidates with the student (self_likelihood)
    layout: str = "shared"           # shared (this code) | peers (vision tower and prompt per completion)
    device: str = "cuda"             # cuda | cpu (only LoRA dropout's mask differs)

    @classmethod
    def from_config(cls, cfg) -> "Settings":
        t, s = cfg.train, cfg.student
        k = 1 if t.objective in ("self_ppo", "single_pair_dpo") else t.k
        return cls(batch=t.batch_size, k=k, objective=t.objective, beta=t.beta, group_chunk=t.group_chunk,
                   gradient_checkpointing=t.gradient_checkpointing, quantization=s.quantization,
                   compute_dtype=s.compute_dtype, mixed_precision=t.mixed_precision, lora_dropout=s.lora.dropout,
                   score=t.objective not in ("sft2", "single_pair_dpo", "judge_grpo", "self_ppo"))


@dataclass
class Item:
    """One line of the plan: bytes, and the phase of the step it belongs to."""

    name: str
    bytes: int
    phase: str
    note: str = ""


@dataclass
class Plan:
    arch: Arch
    settings: Settings
    shapes: Shapes
    items: list[Item]
    phases: dict[str, int]     # phase -> peak tensor bytes while it runs (resident included)
    peak_phase: str
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        """Peak tensor bytes of the step (what torch.cuda.max_memory_allocated reports)."""
        return self.phases[self.peak_phase]

    @property
    def total(self) -> int:
        """What the GPU must hold: the peak plus CUDA context and allocator slack."""
        return self.peak + CUDA_OVERHEAD

    def to_json(self) -> dict:
        return {"student": self.arch.name, "family": self.arch.family, "source": self.arch.source,
                "settings": asdict(self.settings), "shapes": asdict(self.shapes),
                "items": [asdict(i) for i in self.items], "phases": self.phases, "peak_phase": self.peak_phase,
                "peak_bytes": self.peak, "total_bytes": self.total, "notes": self.notes}


# ------------------------------------------------------------------ the model of a step
@dataclass(frozen=True)
class _Dt:
    act: int      # activations, KV cache, linear outputs
    weight: int   # the full-precision weights (embeddings, lm_head, norms, vision, projector)
    logits: int   # lm_head output


def _dtypes(s: Settings) -> _Dt:
    c = _BYTES[s.compute_dtype]
    if s.quantization != "none":  # prepare_model_for_kbit_training upcasts all but the 4/8-bit linears to fp32;
        return _Dt(4, 4, 4)       # bitsandbytes casts each matmul's output back to its (fp32) input dtype
    if s.mixed_precision != "no":  # autocast: matmul outputs in half precision (approximate)
        return _Dt(2, c, 2)
    return _Dt(c, c, c)


def _lora_inputs(a: int, width: int, count: int, dropout: bool, device: str) -> int:
    """Bytes per token LoRA's A matrices save of one input shared by `count` adapted linears: peft casts the
    input to the adapter's fp32 (a copy each unless it is fp32 already); with dropout each keeps its own
    dropped copy and its mask (CUDA's fused dropout: a bool mask; the CPU one: an fp32 noise tensor)."""
    if count == 0:
        return 0
    if dropout:
        return count * (4 + (1 if device == "cuda" else 4)) * width
    return 4 * width if a == 4 else count * 4 * width


def _layer_saved(arch: Arch, s: Settings, dt: _Dt) -> int:
    """Bytes per token one decoder layer saves for backward (k / v excluded: see `_kv_width`)."""
    h, m, hq = arch.hidden, arch.intermediate, arch.heads * arch.head_dim
    lora = arch.params.lora_layer
    n = lambda *names: sum(1 for x in names if lora.get(x))  # noqa: E731
    d, dev = s.lora_dropout > 0, s.device
    a = dt.act
    out = 2 * (4 * h + 4)                                        # two RMSNorms: fp32 input, rsqrt
    out += _lora_inputs(a, h, n("q_proj", "k_proj", "v_proj"), d, dev)
    out += _lora_inputs(a, hq, n("o_proj"), d, dev)
    out += _lora_inputs(a, h, n("gate_proj", "up_proj"), d, dev)
    out += _lora_inputs(a, m, n("down_proj"), d, dev)
    out += 4 * 8 * len(lora)                                     # LoRA A outputs [tokens, r] (r <= 64 typical)
    out += a * hq * 2 + 4 * arch.heads                           # q after rope, attention output; log-sum-exp
    out += a * m * 3                                             # gate, up, SiLU(gate)
    return out


def _layer_forward(arch: Arch, dt: _Dt) -> int:
    """Bytes per token a decoder layer holds at once in a pass without gradient (inputs, q/k/v, MLP)."""
    h, m, hq, hkv = arch.hidden, arch.intermediate, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    return dt.act * (2 * h + 2 * hq + 2 * hkv + 3 * m) + (4 * m if dt.act != 4 else 0)


def _kv_width(arch: Arch, batched_mask: bool) -> int:
    """Key + value elements per token attention keeps: both at full head count where transformers repeats
    grouped-query heads (any attention mask, i.e. every batched or cached pass), else the KV heads."""
    kv = arch.kv_heads if not batched_mask else arch.heads
    return 2 * kv * arch.head_dim


def _cache(arch: Arch, rows: int, length: int, dt: _Dt) -> int:
    """A KV cache of `rows` sequences of `length` over all layers."""
    return rows * length * 2 * arch.kv_heads * arch.head_dim * dt.act * arch.layers


def plan_step(arch: Arch, s: Settings, shapes: Shapes) -> Plan:
    """Peak tensor bytes of one RL step, phase by phase, with the line items that make them up."""
    dt = _dtypes(s)
    p = arch.params
    N, K, T = s.batch, s.k, max(shapes.response_tokens, 1)
    G = min(s.group_chunk or N, N)                     # groups per log-prob pass and backward
    img = arch.image_tokens if (arch.vision and shapes.images) else 0
    L = shapes.prompt_tokens + img                     # prefix length
    A = shapes.anchor_tokens or T
    Ls = L + A + shapes.scoring_extra                  # the scoring prompt (anchor in context)
    C = max(T - 1, 1)                                  # continuation tokens fed
    batchable = arch.family in ("text", "llava", "llava_next")  # Qwen2-VL's mrope: prompt by prompt
    peers = s.layout == "peers"
    items: list[Item] = []
    add = lambda name, b, phase, note="": items.append(Item(name, int(b), phase, note)) or int(b)  # noqa: E731

    # resident: weights, LoRA, optimizer
    if s.quantization == "4bit":
        qw = p.quantizable * (0.5 + 1 / 64 + 4 / (64 * 256))  # nf4 + double-quantised absmax
        wname = "weights: LM linears 4-bit nf4"
    elif s.quantization == "8bit":
        qw, wname = p.quantizable + 4 * p.quantizable_rows, "weights: LM linears 8-bit"
    else:
        qw, wname = p.quantizable * dt.weight, f"weights: LM linears {s.compute_dtype}"
    resident = add(wname, qw, "resident", f"{p.quantizable / 1e9:.2f}B params")
    resident += add("weights: embeddings, lm_head, norms" + (" (fp32: kbit prep)" if s.quantization != "none" else ""),
                    p.lm_other * dt.weight, "resident", f"{p.lm_other / 1e6:.0f}M params")
    if p.vision:
        resident += add("weights: vision tower + projector" + (" (fp32)" if s.quantization != "none" else ""),
                        p.vision * dt.weight, "resident", f"{p.vision / 1e6:.0f}M params")
    resident += add("LoRA policy: weights, grads, AdamW m and v (fp32)", 16 * p.lora, "resident",
                    f"{p.lora / 1e6:.1f}M params on {p.lora_modules} linears")
    if s.reference_adapter:
        resident += add("LoRA reference (the SFT adapter, fp32)", 4 * p.lora, "resident")
    if p.modules_to_save:
        resident += add("modules_to_save: weights, grads, AdamW (+ reference copy)",
                        p.modules_to_save * dt.weight * (4 + int(s.reference_adapter)), "resident")

    # vision: once per prompt (peers: once per completion, in every pass)
    feats = 0
    if img:
        copies = K if peers else 1
        feats = add("vision features kept for the step" + (" (K copies)" if peers else " (once per prompt)"),
                    N * copies * img * arch.hidden * dt.weight, "step")
        V, Lv = arch.vision_tokens, arch.vision_layers
        tower = V * (4 * arch.vision_hidden + 2 * arch.vision_intermediate) * dt.weight
        if arch.vision_keeps_hidden:
            tower += (Lv + 1) * V * arch.vision_hidden * dt.weight
        tower_imgs = N * K if peers else 1             # peers batch every completion's image
        tower = add("vision tower activations (transient, no grad)", tower * tower_imgs, "vision")
    else:
        tower = 0

    # sampling: prefix pass, K-fold repeated cache, decode
    rows_s = N * K
    pre_rows = N if batchable and not peers else (N * K if peers else 1)
    cache_pre = _cache(arch, pre_rows, L, dt) if not peers else 0
    cache_final = _cache(arch, rows_s if batchable or peers else K, L + T, dt)
    layer_dup = cache_final // arch.layers
    dec_logits = (rows_s if batchable or peers else K) * arch.vocab * (dt.logits + 4)
    sampling = max(cache_pre + cache_final * L // (L + T), cache_final + layer_dup + dec_logits)
    sampling = max(sampling, _cache(arch, pre_rows, L, dt) + pre_rows * L * _layer_forward(arch, dt))
    add(f"sampling: KV cache {rows_s if batchable or peers else K} rows x {L + T} tokens"
        + ("" if batchable or peers else " (prompt by prompt)"), cache_final, "sampling")
    phases = {"vision": resident + feats + tower, "sampling": resident + feats + sampling}

    def nograd_pass(rows: int, prefix_rows: int, prefix_len: int, fed: int) -> int:
        """A log-prob pass without gradient: the repeated prefix cache, its growth, the logits."""
        cache = _cache(arch, rows, prefix_len + fed, dt)
        kv_rep = rows * (prefix_len + fed) * _kv_width(arch, True) * dt.act if arch.kv_heads < arch.heads else 0
        logits = rows * (fed + 1) * arch.vocab * (dt.logits + (4 if dt.logits != 4 else 0))
        first = _cache(arch, prefix_rows, prefix_len, dt) + _cache(arch, rows, prefix_len, dt)
        act = rows * fed * _layer_forward(arch, dt)
        return max(first, cache + max(kv_rep + act, logits))

    # scoring (no grad): the anchor-in-context prompt, K candidates + the anchor
    if s.score:
        if peers:
            score = nograd_full(arch, dt, N * (K + 1), Ls + T, T)
        elif batchable:
            score = nograd_pass(N * (K + 1), N, Ls, C)
        else:
            score = nograd_pass(K + 1, 1, Ls, C)
        add("scoring pass (no grad): cache + logits", score, "scoring")
        phases["scoring"] = resident + feats + score

    # the policy pass with gradient, then the reference pass on top of its graph, then backward
    R = G * K
    saved_layer = _layer_saved(arch, s, dt)
    if s.gradient_checkpointing or peers:
        seq = L + T
        if s.gradient_checkpointing:   # full sequences; each layer keeps only its input
            graph = R * seq * arch.layers * 4 * arch.hidden if dt.act == 4 else R * seq * arch.layers * dt.act * arch.hidden
            recompute = R * seq * (saved_layer + _kv_width(arch, True) * dt.act)
            note = f"{R} full sequences x {seq} tokens, layer inputs only"
        else:
            graph = R * seq * arch.layers * (saved_layer + _kv_width(arch, True) * dt.act)
            recompute = 0
            note = f"{R} full sequences x {seq} tokens (the prompt K times)"
        graph += R * seq * (4 * arch.hidden + 4)
        add("policy pass activations (saved for backward)", graph, "policy", note)
        logit_rows = R * T
    else:
        pre_tok = (G if batchable else G) * L
        graph = pre_tok * arch.layers * (saved_layer + _kv_width(arch, batchable) * dt.act)
        add("policy pass: prompt prefix activations (once per prompt)", graph, "policy", f"{G} x {L} tokens")
        cont = R * C * arch.layers * saved_layer + R * (L + C) * arch.layers * _kv_width(arch, True) * dt.act
        graph += add("policy pass: K continuations on the shared prefix cache", cont, "policy",
                     f"{R} rows x {C} tokens over {L + C} keys")
        graph += (pre_tok + R * C) * (4 * arch.hidden + 4)
        recompute = 0
        logit_rows = R * (C + 1)
    logits = add(f"log-prob logits, fp32 ({logit_rows} tokens x {arch.vocab} vocab)", 4 * logit_rows * arch.vocab,
                 "policy")
    graph += logits
    lm_out = logit_rows * arch.vocab * dt.logits if dt.logits != 4 else 0
    policy = graph + max(lm_out, recompute)
    if peers:
        policy += feats
    passes = {"policy": policy}
    if s.beta != 0:
        ref = (nograd_full(arch, dt, R, L + T, T) if peers or s.gradient_checkpointing
               else nograd_pass(R, G, L, C) if batchable else nograd_pass(K, 1, L, C))
        add("reference pass (no grad) on top of the policy graph", ref, "reference")
        passes["reference"] = graph + ref
    if s.objective == "rlsd":
        priv = nograd_pass(R, G, Ls, C) if batchable else nograd_pass(K, 1, Ls, C)
        add("privileged pass (no grad) on top of the policy graph", priv, "reference")
        passes["privileged"] = graph + priv
    # backward starts at the logits (their fp32 gradient and the gather's), freed before the layers run (and,
    # with checkpointing, recompute one at a time); the groups of a prompt-by-prompt pass go one by one
    grad_rows = logit_rows if batchable or peers or s.gradient_checkpointing else logit_rows // max(G, 1)
    hidden_grads = 2 * 4 * arch.hidden * (R * (L + T) if peers or s.gradient_checkpointing else G * L + R * C)
    back = max(2 * 4 * grad_rows * arch.vocab, recompute - logits) + hidden_grads
    add("backward: logits gradients (fp32), or a recomputed layer, + hidden-state gradients", back, "backward")
    passes["backward"] = graph + back
    for name, b in passes.items():
        phases[name] = resident + feats + b
    peak_phase = max(phases, key=phases.get)
    notes = []
    if s.objective in ("single_pair_dpo", "anchor_rank_dpo", "tvkd_dpo", "sft2"):
        notes.append(f"{s.objective} runs its passes group by group over the pairs' responses: the policy lines "
                     "are an upper bound")
    if s.mixed_precision != "no":
        notes.append("train.mixed_precision: activations modelled at 2 bytes (approximate)")
    if s.quantization == "8bit":
        notes.append("8-bit: activations modelled as under 4-bit (fp32; not measured)")
    return Plan(arch, s, shapes, items, phases, peak_phase, notes)


def nograd_full(arch: Arch, dt: _Dt, rows: int, length: int, logit_tokens: int) -> int:
    """A pass without gradient over full sequences (no shared prefix): one layer's working set, the logits."""
    act = rows * length * (_layer_forward(arch, dt) + _kv_width(arch, True) * dt.act)
    logits = rows * logit_tokens * arch.vocab * (dt.logits + (4 if dt.logits != 4 else 0))
    return max(act, logits)


# ------------------------------------------------------------------ what fits
def largest(arch: Arch, s: Settings, shapes: Shapes, budget: int, key: str, limit: int = 512) -> int:
    """The largest `key` (k or batch) whose step fits `budget` bytes (with CUDA overhead); 0 if none."""
    best = 0
    for v in range(1, limit + 1):
        if plan_step(arch, replace(s, **{key: v}), shapes).total > budget:
            break
        best = v
    return best


def parse_size(text: str) -> int:
    """'24GB', '24GiB', '80G', '512MB' -> bytes (GB read as GiB, as GPU cards are sold)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([GMT]i?B?|)\s*", text, flags=re.I)
    if not m:
        raise VlrlcdError(f"--gpu-memory '{text}': give a size such as 24GB, 80GB or 12.5GiB")
    unit = (m.group(2) or "G").upper()[0]
    return int(float(m.group(1)) * {"M": 2**20, "G": 2**30, "T": 2**40}[unit])


def plan_config(cfg, shapes: Shapes | None = None, image_size=DEFAULT_IMAGE, image_tokens: int | None = None):
    """(Plan of this code's step, Plan of the peers' layout) for a loaded root config."""
    arch = student_arch(cfg.student, image_size, image_tokens)
    shapes = shapes or Shapes(response_tokens=cfg.student.max_new_tokens)
    s = Settings.from_config(cfg)
    return plan_step(arch, s, shapes), plan_step(arch, replace(s, layout="peers"), shapes)


def _fits(n: int, limit: int = 512) -> str:
    return "none" if n == 0 else f"{n}+" if n >= limit else str(n)


def _gb(b: float) -> str:
    return f"{b / GiB:.2f}"


def format_plan(plan: Plan, peers: Plan, budget: int) -> str:
    """The plan as a table: line items, the peak phase against `budget`, what fits, the peers' layout."""
    a, s = plan.arch, plan.settings
    lines = [f"student {a.name} ({a.family}); architecture from {a.source}",
             f"{s.quantization if s.quantization != 'none' else s.compute_dtype} base, LoRA {a.params.lora / 1e6:.1f}M "
             f"params; batch {s.batch}, K {s.k}, {plan.shapes.response_tokens} new tokens, prompt "
             f"{plan.shapes.prompt_tokens} text + {a.image_tokens if plan.shapes.images else 0} image tokens; "
             f"group_chunk {s.group_chunk or 'all'}; gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}",
             "", "| where | GiB | phase | note |", "|---|---|---|---|"]
    lines += [f"| {i.name} | {_gb(i.bytes)} | {i.phase} | {i.note} |" for i in plan.items]
    lines += ["", "| phase | peak tensor GiB |", "|---|---|"]
    lines += [f"| {k}{' (peak)' if k == plan.peak_phase else ''} | {_gb(v)} |" for k, v in plan.phases.items()]
    fits = "fits" if plan.total <= budget else "does NOT fit"
    lines += ["", f"peak {_gb(plan.peak)} GiB of tensors ({plan.peak_phase}) + ~{_gb(CUDA_OVERHEAD)} GiB CUDA context "
              f"and allocator slack = {_gb(plan.total)} GiB against {_gb(budget)} GiB: {fits}"]
    k_max = largest(a, s, plan.shapes, budget, "k")
    b_max = largest(a, s, plan.shapes, budget, "batch")
    lines.append(f"largest K at batch {s.batch}: {_fits(k_max)}; largest batch at K {s.k}: {_fits(b_max)}")
    if s.group_chunk != 1 and plan.total > budget:
        one = replace(s, group_chunk=1)
        lines.append(f"with train.group_chunk=1: {_gb(plan_step(a, one, plan.shapes).total)} GiB; largest K "
                     f"{_fits(largest(a, one, plan.shapes, budget, 'k'))}")
    lines.append(f"the same step in the peers' layout (vision tower and prompt once per completion): "
                 f"{_gb(peers.total)} GiB ({peers.peak_phase}), {peers.total / max(plan.total, 1):.1f}x; largest K "
                 f"{_fits(largest(a, replace(s, layout='peers'), plan.shapes, budget, 'k'))}")
    lines += [f"note: {n}" for n in plan.notes]
    lines.append("estimates (see README, Memory plan); prompt lengths assumed, every candidate at the token limit")
    return "\n".join(lines)


def plan_json(plan: Plan, peers: Plan, budget: int) -> str:
    a, s = plan.arch, plan.settings
    return json.dumps({**plan.to_json(), "gpu_memory_bytes": budget, "fits": plan.total <= budget,
                       "largest_k": largest(a, s, plan.shapes, budget, "k"),
                       "largest_batch": largest(a, s, plan.shapes, budget, "batch"),
                       "peers": {"peak_bytes": peers.peak, "total_bytes": peers.total, "peak_phase": peers.peak_phase,
                                 "phases": peers.phases}}, indent=2)
