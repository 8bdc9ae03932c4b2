"""What differs between model families: the auto class, prompt building, the vision pass, LoRA targets.

Detected from the checkpoint's `config.model_type`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from vlrlcd.errors import VlrlcdError

_LM_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lm_only(names: list[str]) -> str:
    """A peft target regex that hits the language model's linear layers, never the vision tower."""
    return r"^(?!.*(vision_tower|visual|vision_model)).*\.(" + "|".join(names) + r")$"


@dataclass(frozen=True)
class Family:
    name: str
    vision: bool
    auto_class: str                 # transformers auto class used to load
    projector: str | None           # module name of the vision -> language projector
    build_prompt: Callable          # (adapter, prompt, image) -> (input_ids [1,P], model_kwargs, pixel_inputs)
    image_features: Callable        # (model, pixel_inputs) -> features
    feature_kwargs: Callable        # (features, pixel_inputs) -> model kwargs that replace the vision pass
    merge_kwargs: Callable = None   # (list of prefix model_kwargs, padded length) -> kwargs for one batch

    def default_targets(self) -> str | list[str]:
        return _lm_only(_LM_LINEAR) if self.vision else list(_LM_LINEAR)


def _merge_mm(kwargs_list: list[dict], length: int) -> dict:
    """Batch several prefixes' image features (in batch order, as the model scatters them)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    feats = [k["mm_encoder_outputs"]["image"].pooler_output for k in kwargs_list if "mm_encoder_outputs" in k]
    if not feats:
        return {}
    out: dict = {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=[f for fs in feats for f in fs])}}
    grids = [k["image_grid_thw"] for k in kwargs_list if k.get("image_grid_thw") is not None]
    if grids:
        out["image_grid_thw"] = torch.cat(grids, 0)
    sizes = [k["image_sizes"] for k in kwargs_list if k.get("image_sizes") is not None]
    if sizes:
        out["image_sizes"] = torch.cat(sizes, 0)
    types = [k.get("mm_token_type_ids") for k in kwargs_list]
    if any(t is not None for t in types):
        rows = torch.zeros(len(kwargs_list), length, dtype=torch.long)
        for i, t in enumerate(types):
            if t is not None:
                rows[i, : t.shape[1]] = t[0]
        out["mm_token_type_ids"] = rows
    return out


# ------------------------------------------------------------------ text
def _text_prompt(adapter, prompt: str, image):
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


def _no_features(model, pixel_inputs):  # pragma: no cover - text models never see an image
    raise VlrlcdError("a text-only student cannot encode images")


# ------------------------------------------------------------------ LLaVA-style (one image, placeholder tokens)
def _vlm_messages(prompt: str, image) -> list[dict]:
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]


def _image_token_id(adapter) -> int | None:
    cfg = adapter.model.config
    for key in ("image_token_id", "image_token_index"):
        v = getattr(cfg, key, None)
        if v is not None:
            return int(v)
    return None


def _vlm_prompt(pixel_keys: tuple[str, ...], extra_keys: tuple[str, ...] = ()):
    def build(adapter, prompt: str, image):
        proc = adapter.processor
        if proc is None or getattr(proc, "image_processor", None) is None:
            raise VlrlcdError(
                f"{adapter.name_or_path}: no image processor found; a vision-language checkpoint directory "
                "needs its processor files (preprocessor_config.json, tokenizer files): save them with "
                "processor.save_pretrained(DIR)"
            )
        if getattr(proc, "chat_template", None) is None and getattr(adapter.tokenizer, "chat_template", None) is None:
            raise VlrlcdError(f"{adapter.name_or_path}: the processor has no chat template; add one to its files")
        text = proc.apply_chat_template(_vlm_messages(prompt, image), add_generation_prompt=True, tokenize=False)
        enc = proc(images=[image] if image is not None else None, text=[text], return_tensors="pt")
        input_ids = enc["input_ids"]
        img_tok = _image_token_id(adapter)
        if image is not None and img_tok is not None and not bool((input_ids == img_tok).any()):
            raise VlrlcdError(
                f"{adapter.name_or_path}: the prompt has no image placeholder after the chat template; the "
                "template must emit the image token for {'type': 'image'} content"
            )
        kwargs = {k: enc[k] for k in extra_keys if k in enc}
        pixels = {k: enc[k] for k in pixel_keys if k in enc} if image is not None else {}
        return input_ids, kwargs, pixels

    return build


def _llava_features(model, pixel_inputs):
    return model.get_image_features(**pixel_inputs, return_dict=True)


def _qwen_features(model, pixel_inputs):
    return model.get_image_features(**pixel_inputs, return_dict=True)


def _mm_kwargs(features, pixel_inputs) -> dict:
    return {"mm_encoder_outputs": {"image": features}}


def _llava_next_kwargs(features, pixel_inputs) -> dict:
    return {"mm_encoder_outputs": {"image": features}, "image_sizes": pixel_inputs.get("image_sizes")}


def _qwen_kwargs(features, pixel_inputs) -> dict:
    # image_grid_thw is needed for the 3-D (mrope) positions even though the vision pass is skipped.
    return {"mm_encoder_outputs": {"image": features}, "image_grid_thw": pixel_inputs["image_grid_thw"]}


FAMILIES: dict[str, Family] = {
    "text": Family("text", False, "AutoModelForCausalLM", None, _text_prompt, _no_features, lambda f, p: {},
                   lambda ks, n: {}),
    "llava": Family("llava", True, "AutoModelForImageTextToText", "multi_modal_projector",
                    _vlm_prompt(("pixel_values",)), _llava_features, _mm_kwargs, _merge_mm),
    "llava_next": Family("llava_next", True, "AutoModelForImageTextToText", "multi_modal_projector",
                         _vlm_prompt(("pixel_values", "image_sizes")), _llava_features, _llava_next_kwargs, _merge_mm),
    "qwen2_vl": Family("qwen2_vl", True, "AutoModelForImageTextToText", "merger",
                       _vlm_prompt(("pixel_values", "image_grid_thw"), ("mm_token_type_ids",)),
                       _qwen_features, _qwen_kwargs, _merge_mm),
    "qwen2_5_vl": Family("qwen2_5_vl", True, "AutoModelForImageTextToText", "merger",
                         _vlm_prompt(("pixel_values", "image_grid_thw"), ("mm_token_type_ids",)),
                         _qwen_features, _qwen_kwargs, _merge_mm),
}

_MODEL_TYPE_TO_FAMILY = {"llava": "llava", "llava_next": "llava_next", "qwen2_vl": "qwen2_vl",
                         "qwen2_5_vl": "qwen2_5_vl"}
SUPPORTED = "llava (LLaVA-1.5), llava_next, qwen2_vl, qwen2_5_vl, and text causal LMs (llama, qwen2, any AutoModelForCausalLM)"


def detect_family(config, requested: str = "auto") -> Family:
    """The family for a checkpoint config (`student.family: auto` reads `config.model_type`)."""
    if requested != "auto":
        if requested not in FAMILIES:
            raise VlrlcdError(f"student.family '{requested}' is not supported; supported: {SUPPORTED}")
        return FAMILIES[requested]
    mt = getattr(config, "model_type", None)
    if mt in _MODEL_TYPE_TO_FAMILY:
        return FAMILIES[_MODEL_TYPE_TO_FAMILY[mt]]
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not hasattr(config, "vision_config"):
        return FAMILIES["text"]
    raise VlrlcdError(f"model_type '{mt}' is not a supported student family; supported: {SUPPORTED}")
