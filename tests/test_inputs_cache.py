"""The processor-output cache (vlrlcd/adapters/inputs_cache.py): a prompt built again is not processed again,
gives the very same tensors and log-probs, and the cache stays within its byte bound."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from vlrlcd.adapters.config import LoraConfig, StudentConfig, TinyConfig
from vlrlcd.adapters.inputs_cache import InputsCache, inputs_key
from vlrlcd.adapters.loader import load_student
from vlrlcd.adapters.tiny import BUILDERS

TINY = TinyConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                  vision_hidden_size=32, vision_layers=1)
PROMPT = "What color is the shape?"
CORPUS = [PROMPT, "red green blue square circle", "What is 2 + 3? 5"]
FAMILIES = ["llama", "llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]


def test_least_recently_used_entries_go_first_within_the_byte_bound():
    cache = InputsCache(max_bytes=250)
    t = torch.zeros(25)   # 100 bytes
    for k in "abc":
        cache.put(k, ([t], {}))
        if k == "b":
            assert cache.get("a") is not None   # a is now the most recent
    assert len(cache) == 2 and cache.bytes == 200 and cache.get("b") is None and cache.get("a") is not None
    cache.put("big", {"pixel_values": torch.zeros(100)})   # 400 bytes: larger than the bound, never kept
    assert cache.get("big") is None and cache.bytes == 200
    assert (cache.hits, cache.misses) == (2, 2)
    cache.put(None, ([t], {}))
    assert len(cache) == 2


def test_keys_name_prompts_and_image_files_and_refuse_in_memory_images():
    assert inputs_key(["q"], ["/x/a.png"]) == (("q",), ("/x/a.png",)) == inputs_key(["q"], [__import__("pathlib").Path("/x/a.png")])
    assert inputs_key(["q", "r"], [None, "/x/a.png"]) == (("q", "r"), (None, "/x/a.png"))
    assert inputs_key(["q"], [Image.new("RGB", (4, 4))]) is None


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    root = tmp_path_factory.mktemp("students")
    img = Image.new("RGB", (40, 24), "blue")
    img.paste((255, 255, 0), (4, 4, 12, 12))
    img.save(root / "img.png")
    out = {}
    for name in FAMILIES:
        path = BUILDERS[name](root / name, CORPUS, TINY, seed=0)
        out[name] = (str(path), None if name == "llama" else str(root / "img.png"))
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_a_prompt_built_again_is_not_processed_again_and_gives_the_same_numbers(name, students):
    path, image = students[name]
    student = load_student(StudentConfig(name_or_path=path, lora=LoraConfig(r=4, alpha=8)))
    calls = []
    build = student.family.build_prompts

    def counting(adapter, prompts, images):
        calls.append(len(prompts))
        return build(adapter, prompts, images)
    student.family = dataclasses.replace(student.family, build_prompts=counting)
    responses = [student.encode_response(t) for t in ("red", "blue square")]
    first = student.prefix(PROMPT, image)
    lp1 = student.token_logprobs(first, responses).logp
    again = student.prefix(PROMPT, image)
    assert calls == [1] and student.inputs_cache.hits == (2 if image else 1)   # processor output (+ features)
    assert student.vision_calls == (1 if image else 0) and student.features_frozen()
    assert torch.equal(first.input_ids, again.input_ids) and first.next_position == again.next_position
    assert first.model_kwargs.keys() == again.model_kwargs.keys()
    for k, v in first.model_kwargs.items():
        if torch.is_tensor(v):
            assert torch.equal(v, again.model_kwargs[k]), k
    assert torch.equal(lp1, student.token_logprobs(again, responses).logp)
    student.prefixes([PROMPT, PROMPT + " Answer briefly."], [image, image])   # a new build: one more call
    student.prefixes([PROMPT, PROMPT + " Answer briefly."], [image, image])
    assert calls == [1, 2]
    if image is not None:   # an in-memory image has no stable name: processed every time
        pil = Image.open(image).convert("RGB")
        student.prefix(PROMPT, pil)
        student.prefix(PROMPT, pil)
        assert calls == [1, 2, 1, 1]


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_a_trained_projector_gets_a_new_vision_pass_every_build(name, students):
    """train_projector: the features depend on weights that train, so they are never kept (the processor's
    output still is)."""
    path, image = students[name]
    student = load_student(StudentConfig(name_or_path=path, lora=LoraConfig(r=4, alpha=8, train_projector=True)))
    assert not student.features_frozen()
    with torch.enable_grad():
        a = student.prefix(PROMPT, image)
        b = student.prefix(PROMPT, image)
    assert student.vision_calls == 2 and student.inputs_cache.hits == 1
    assert a.image_features.pooler_output[0].requires_grad and torch.equal(
        a.image_features.pooler_output[0], b.image_features.pooler_output[0])
