"""What differs between model families: the auto class, prompt building, the vision pass, positions,
LoRA targets. Detected from the checkpoint's `config.model_type`.

Supported: LLaVA-1.5 (`llava`), LLaVA-NeXT (`llava_next`), Qwen2-VL (`qwen2_vl`), Qwen2.5-VL
(`qwen2_5_vl`) and text-only causal LMs (Llama, Qwen2, any `AutoModelForCausalLM`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from vlrlcd.adapters.padding import pad_rows
from vlrlcd.errors import VlrlcdError

_LM_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VISION_MODULES = ("vision_tower", "visual", "vision_model")  # module names that hold a vision tower


def _lm_only(names: list[str]) -> str:
    """A peft target regex that hits the language model's linear layers, never the vision tower."""
    return r"^(?!.*(" + "|".join(VISION_MODULES) + r")).*\.(" + "|".join(names) + r")$"


@dataclass(frozen=True)
class Family:
    name: str
    vision: bool
    auto_class: str                 # transformers auto class used to load
    projector: str | None           # module name of the vision -> language projector
    vision_module: str | None       # module name of the vision tower (what a test hooks to count passes)
    build_prompts: Callable         # (adapter, prompts, images) -> ([(input_ids [1,P], model_kwargs)] per prompt,
                                    #    pixel inputs of the prompts' images, in order, for one vision pass)
    image_features: Callable        # (model, pixel_inputs) -> features, pooler_output one entry per image
    feature_kwargs: Callable        # (features, pixel_inputs) -> model kwargs that replace the vision pass
    merge_kwargs: Callable          # (list of prefix model_kwargs, padded length, left) -> kwargs for one batch
    positions: Callable | None = None  # (model, input_ids [N,L], attention_mask [N,L], model_kwargs) ->
                                       #    (position_ids [3,N,L], next position [N]); None: counted over real tokens

    def build_prompt(self, adapter, prompt: str, image) -> tuple[torch.Tensor, dict, dict]:
        """One prompt: (input_ids [1,P], model_kwargs, pixel_inputs of its image or {})."""
        rows, pixels = self.build_prompts(adapter, [prompt], [image])
        return rows[0][0], rows[0][1], pixels

    def default_targets(self) -> str | list[str]:
        return _lm_only(_LM_LINEAR) if self.vision else list(_LM_LINEAR)


PER_IMAGE_KEYS = ("image_sizes", "image_grid_thw")  # pixel inputs with one row per image (what feature_kwargs reads)


def image_row(pixel_inputs: dict, j: int) -> dict:
    """Image j's rows of a batch's per-image pixel inputs (sizes, grids)."""
    return {k: pixel_inputs[k][j:j + 1] for k in PER_IMAGE_KEYS if pixel_inputs.get(k) is not None}


def counted_positions(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D positions counted over real tokens [N, L] (pads 0) and each row's next position [N] (its length)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0), attention_mask.sum(-1)


def _merge_mm(kwargs_list: list[dict], length: int, left: bool = False) -> dict:
    """Batch several prefixes' image features (in batch order, as the model scatters them); token types padded
    to `length` on the right (or the `left`, for a left-padded batch)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    feats = [k["mm_encoder_outputs"]["image"].pooler_output for k in kwargs_list if "mm_encoder_outputs" in k]
    out: dict = {}
    if feats:
        out["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=[f for fs in feats for f in fs])}
    grids = [k["image_grid_thw"] for k in kwargs_list if k.get("image_grid_thw") is not None]
    if grids:
        out["image_grid_thw"] = torch.cat(grids, 0)
    sizes = [k["image_sizes"] for k in kwargs_list if k.get("image_sizes") is not None]
    if sizes:
        out["image_sizes"] = torch.cat(sizes, 0)
    types = [k.get("mm_token_type_ids") for k in kwargs_list]
    present = [t for t in types if t is not None]
    if present:  # a prefix without token types (no image) gets zeros (text) all along
        out["mm_token_type_ids"], _ = pad_rows([t[0] if t is not None else [] for t in types], 0, length, left,
                                               present[0].device)
    return out


def _no_merge(kwargs_list: list[dict], length: int, left: bool = False) -> dict:
    return {}


# ------------------------------------------------------------------ text
def _text_prompt(adapter, prompt: str, image=None):
    tok = adapter.tokenizer
    if tok.chat_template:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
    else:
        ids = tok(prompt + "\n", add_special_tokens=True)["input_ids"]
    return torch.tensor([list(ids)], dtype=torch.long), {}, {}


def _text_prompts(adapter, prompts: list[str], images):
    return [_text_prompt(adapter, p)[:2] for p in prompts], {}


def _no_features(model, pixel_inputs):  # pragma: no cover - prefix() refuses images for text students
    raise VlrlcdError("a text-only student cannot encode images")


# ------------------------------------------------------------------ vision-language (placeholder tokens)
def _vlm_messages(prompt: str, image) -> list[dict]:
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]


def _config_id(adapter, *keys: str) -> int | None:
    cfg = adapter.model.config
    for key in keys:
        v = getattr(cfg, key, None)
        if v is not None:
            return int(v)
    return None


def _vlm_prompts(pixel_keys: tuple[str, ...], extra_keys: tuple[str, ...] = ()):
    """Build several prompts (each with its image or none) in one processor call: the texts unpadded (one row
    per prompt, exactly as alone), the images' pixel inputs batched in prompt order."""
    def build(adapter, prompts: list[str], images: list):
        proc = adapter.processor
        if proc is None or getattr(proc, "image_processor", None) is None:
            raise VlrlcdError(
                f"{adapter.name_or_path}: no image processor found; a vision-language checkpoint directory "
                "needs its processor files (preprocessor_config.json / processor_config.json, tokenizer files): "
                "save them with processor.save_pretrained(DIR)"
            )
        if getattr(proc, "chat_template", None) is None and getattr(adapter.tokenizer, "chat_template", None) is None:
            raise VlrlcdError(f"{adapter.name_or_path}: the processor has no chat template; add one to its files")
        placeholder = getattr(proc, "image_token", None)
        texts = []
        for prompt, image in zip(prompts, images):
            text = proc.apply_chat_template(_vlm_messages(prompt, image), add_generation_prompt=True, tokenize=False)
            if image is not None and isinstance(placeholder, str) and placeholder not in text:
                raise VlrlcdError(
                    f"{adapter.name_or_path}: the prompt has no image placeholder '{placeholder}' after the chat "
                    "template; the template must emit it for {'type': 'image'} content (check chat_template.jinja)"
                )
            texts.append(text)
        present = [im for im in images if im is not None]
        try:  # token ids as unpadded lists (no pad token needed), pixels as one batch
            enc = proc(images=present or None, text=texts, text_kwargs={"return_tensors": None},
                       images_kwargs={"return_tensors": "pt"})
        except ValueError as e:
            raise VlrlcdError(
                f"{adapter.name_or_path}: the processor rejected the prompt ({str(e).splitlines()[0][:200]}); "
                "check that its chat template emits the image placeholder for {'type': 'image'} content"
            ) from None
        img_tok = _config_id(adapter, "image_token_id", "image_token_index")
        rows = []
        for i, image in enumerate(images):
            input_ids = torch.tensor([list(enc["input_ids"][i])], dtype=torch.long)
            if image is not None and img_tok is not None and not bool((input_ids == img_tok).any()):
                raise VlrlcdError(
                    f"{adapter.name_or_path}: the prompt has no image placeholder (token id {img_tok}) after the "
                    "chat template; the template must emit the image token for {'type': 'image'} content"
                )
            kwargs = {k: torch.tensor([list(enc[k][i])], dtype=torch.long) for k in extra_keys if k in enc}
            rows.append((input_ids, kwargs))
        pixels = {k: torch.as_tensor(enc[k]) for k in pixel_keys if k in enc} if present else {}
        return rows, pixels

    return build


def _qwen_prompts(adapter, prompts: list[str], images: list):
    """Like the other VLMs, plus `mm_token_type_ids` (1 on image tokens): Qwen2-VL's 3-D positions need it
    and Qwen2.5-VL computes silently wrong positions without it. Derived from the image token when an
    older processor does not return it."""
    rows, pixels = _vlm_prompts(("pixel_values", "image_grid_thw"), ("mm_token_type_ids",))(adapter, prompts, images)
    for input_ids, kwargs in rows:
        if "mm_token_type_ids" not in kwargs:
            types = torch.zeros_like(input_ids)
            for value, key in ((1, "image_token_id"), (2, "video_token_id")):
                tok = _config_id(adapter, key)
                if tok is not None:
                    types[input_ids == tok] = value
            kwargs["mm_token_type_ids"] = types
    return rows, pixels


def _image_features(model, pixel_inputs):
    return model.get_image_features(**pixel_inputs, return_dict=True)


def _mm_kwargs(features, pixel_inputs) -> dict:
    return {"mm_encoder_outputs": {"image": features}}


def _llava_next_kwargs(features, pixel_inputs) -> dict:
    return {"mm_encoder_outputs": {"image": features}, "image_sizes": pixel_inputs.get("image_sizes")}


def _qwen_kwargs(features, pixel_inputs) -> dict:
    # image_grid_thw is needed for the 3-D (mrope) positions even though the vision pass is skipped.
    return {"mm_encoder_outputs": {"image": features}, "image_grid_thw": pixel_inputs["image_grid_thw"]}


def _inner_qwen(model):
    """The Qwen2(.5)-VL `...Model` (holding get_rope_index) under peft / ForConditionalGeneration wrappers."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    return m.model if hasattr(m.model, "get_rope_index") else m


def _qwen_positions(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    model_kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3-D (temporal, height, width) rope positions [3, N, L] of a (padded) batch of prompts from the model's
    own `get_rope_index` given the attention mask (pads get 0), and each row's next position [N]. Computed here,
    so the continuations on a shared cache never depend on the model's cached `rope_deltas` (which belong to
    whatever prompts it saw last, at their batch size).

    Text after an image continues from max(position) + 1 = length + rope_delta (rope_delta < 0 when an image's
    h·w tokens take only max(h, w) positions)."""
    types = model_kwargs.get("mm_token_type_ids")
    if types is None or not bool(types.any()):  # no image in the batch: plain 1-D positions
        pos, nxt = counted_positions(attention_mask)
        return pos[None].expand(3, -1, -1), nxt
    pos, delta = _inner_qwen(model).get_rope_index(
        input_ids, mm_token_type_ids=types, image_grid_thw=model_kwargs.get("image_grid_thw"),
        attention_mask=attention_mask)
    return pos, attention_mask.sum(-1) + delta.reshape(-1).to(attention_mask.device)


FAMILIES: dict[str, Family] = {
    "text": Family("text", False, "AutoModelForCausalLM", None, None, _text_prompts, _no_features,
                   lambda f, p: {}, _no_merge),
    "llava": Family("llava", True, "AutoModelForImageTextToText", "multi_modal_projector", "vision_tower",
                    _vlm_prompts(("pixel_values",)), _image_features, _mm_kwargs, _merge_mm),
    "llava_next": Family("llava_next", True, "AutoModelForImageTextToText", "multi_modal_projector", "vision_tower",
                         _vlm_prompts(("pixel_values", "image_sizes")), _image_features, _llava_next_kwargs,
                         _merge_mm),
    "qwen2_vl": Family("qwen2_vl", True, "AutoModelForImageTextToText", "merger", "visual",
                       _qwen_prompts, _image_features, _qwen_kwargs, _merge_mm, _qwen_positions),
    "qwen2_5_vl": Family("qwen2_5_vl", True, "AutoModelForImageTextToText", "merger", "visual",
                         _qwen_prompts, _image_features, _qwen_kwargs, _merge_mm, _qwen_positions),
}

_MODEL_TYPE_TO_FAMILY = {"llava": "llava", "llava_next": "llava_next", "qwen2_vl": "qwen2_vl",
                         "qwen2_5_vl": "qwen2_5_vl"}
SUPPORTED = ("llava (LLaVA-1.5), llava_next (LLaVA-NeXT), qwen2_vl (Qwen2-VL), qwen2_5_vl (Qwen2.5-VL), "
             "and text causal LMs (llama, qwen2, any AutoModelForCausalLM)")


def detect_family(config, requested: str = "auto") -> Family:
    """The family for a checkpoint config (`student.family: auto` reads `config.model_type`)."""
    if requested != "auto":
        if requested not in FAMILIES:
            raise VlrlcdError(f"student.family '{requested}' is not supported; supported: {SUPPORTED}")
        return FAMILIES[requested]
    mt = getattr(config, "model_type", None)
    if mt in _MODEL_TYPE_TO_FAMILY:
        return FAMILIES[_MODEL_TYPE_TO_FAMILY[mt]]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not hasattr(config, "vision_config"):
        return FAMILIES["text"]
    raise VlrlcdError(f"model_type '{mt}' is not a supported student family; supported: {SUPPORTED}")
