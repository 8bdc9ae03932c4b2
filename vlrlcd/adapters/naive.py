"""The naive per-candidate computation the shared-prefix path replaces (what peers do): every candidate
is its own full sequence (prompt, image and response) through the processor and the model, so the
vision tower runs once per candidate and the model computes every position itself. Used as the
independent reference in tests and benchmarks; never on the training path."""

from __future__ import annotations

from typing import Any

import torch

from vlrlcd.adapters.base import StudentAdapter
from vlrlcd.adapters.families import _text_prompt, _vlm_messages


def naive_inputs(student: StudentAdapter, prompt: str, image: Any, response: list[int]) -> tuple[dict, int]:
    """Model inputs for prompt + response as one sequence (from the processor / tokenizer directly), and the
    prompt length P: logits at positions P-1 .. P+T-2 predict the response."""
    img = student.load_image(image)
    if student.processor is None:
        ids = _text_prompt(student, prompt, None)[0]
        enc: dict = {}
    else:
        proc = student.processor
        text = proc.apply_chat_template(_vlm_messages(prompt, img), add_generation_prompt=True, tokenize=False)
        enc = dict(proc(images=[img] if img is not None else None, text=[text], return_tensors="pt"))
        ids = enc.pop("input_ids")
        enc.pop("attention_mask", None)
    P, T = ids.shape[1], len(response)
    full = torch.cat([ids, torch.tensor([response], dtype=torch.long)], dim=1)
    if "mm_token_type_ids" in enc:
        enc["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros(1, T, dtype=torch.long)], 1)
    inputs = {"input_ids": full, "attention_mask": torch.ones_like(full), **enc}
    return {k: v.to(student.device) if torch.is_tensor(v) else v for k, v in inputs.items()}, P


def naive_token_logprobs(student: StudentAdapter, prompt: str, image: Any,
                         responses: list[list[int]]) -> list[torch.Tensor]:
    """log π(y_t | x, y_<t) for each response from its own full forward pass (grad if enabled)."""
    out = []
    for r in responses:
        inputs, P = naive_inputs(student, prompt, image, r)
        logits = student.model(**inputs).logits[0, P - 1: P - 1 + len(r)].float()
        out.append(logits.log_softmax(-1).gather(-1, torch.tensor(r, device=logits.device)[:, None])[:, 0])
    return out
