"""One hot path each in StudentAdapter: a single prompt is a batch of one (`sample`, `token_logprobs` and
`continuation_logits` run the batched path's one prefix pass, `_shared_prefix`, with one prefix, and give exactly
what the batched forms give for it), one padding helper (`adapters/padding.py`) and one cache helper
(`cache.repeat_cache`); base.py stays small (issue 14)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from test_steps_common import Forwards, lora_student
from vlrlcd.adapters.cache import repeat_cache
from vlrlcd.adapters.config import LoraConfig, TinyConfig
from vlrlcd.adapters.families import _merge_mm
from vlrlcd.adapters.padding import pad_rows
from vlrlcd.adapters.tiny import BUILDERS

TINY = TinyConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                  vision_hidden_size=32, vision_layers=1)
CORPUS = ["What color is the shape?", "red green blue square circle", "What is 2 + 3? 5"]
PROMPTS = ["What is 2 + 3?", "What color is the shape on the left of the big square?", "Hi"]
ADAPTERS = Path(__file__).resolve().parents[1] / "vlrlcd" / "adapters"


def test_pad_rows_right_left_to_a_length_with_its_mask():
    ids, mask = pad_rows([[5, 6, 7], [8], []], 0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
    ids, mask = pad_rows([torch.tensor([1, 2]), torch.tensor([3])], -100, length=4, left=True)
    assert ids.tolist() == [[-100, -100, 1, 2], [-100, -100, -100, 3]]
    assert mask.tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    with pytest.raises(ValueError, match="row 0 has 3 entries, more than the padded length 2"):
        pad_rows([[1, 2, 3]], 0, length=2)


def test_token_types_of_a_batch_are_padded_on_the_prefix_side_and_zero_without_an_image():
    types = [{"mm_token_type_ids": torch.tensor([[0, 1, 1]])}, {}, {"mm_token_type_ids": torch.tensor([[1, 0]])}]
    assert _merge_mm(types, 4, left=True)["mm_token_type_ids"].tolist() == [[0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 1, 0]]
    assert _merge_mm(types, 4)["mm_token_type_ids"].tolist() == [[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]]


def _cache(batch: int) -> DynamicCache:
    g = torch.Generator().manual_seed(0)
    return DynamicCache(ddp_cache_data=[(torch.randn(batch, 2, 3, 4, generator=g),
                                         torch.randn(batch, 2, 3, 4, generator=g)) for _ in range(2)])


def test_repeat_cache_repeats_one_row_or_each_row_in_place():
    one = _cache(1)
    for src, layer in zip(one.layers, repeat_cache(one, 3).layers):
        assert torch.equal(layer.keys, src.keys.expand(3, -1, -1, -1))
        assert torch.equal(layer.values, src.values.expand(3, -1, -1, -1))
    two = _cache(2)
    rep = repeat_cache(two, torch.tensor([1, 3]))
    for src, layer in zip(two.layers, rep.layers):
        assert torch.equal(layer.keys, src.keys[[0, 1, 1, 1]]) and torch.equal(layer.values, src.values[[0, 1, 1, 1]])
    assert torch.equal(repeat_cache(two, 2).layers[0].keys, two.layers[0].keys[[0, 0, 1, 1]])


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    path = BUILDERS["llama"](tmp_path_factory.mktemp("students") / "llama", CORPUS, TINY, seed=0)
    torch.manual_seed(0)
    s = lora_student(str(path), LoraConfig(r=4, alpha=8), 0)
    s.model.eval()
    return s


def _count_prefix_passes(student, monkeypatch) -> list[int]:
    """The number of prefixes of each `_shared_prefix` call (the one prefix pass every path runs)."""
    calls: list[int] = []
    real = student._shared_prefix

    def counted(prefixes, repeats):
        calls.append(len(prefixes))
        return real(prefixes, repeats)

    monkeypatch.setattr(student, "_shared_prefix", counted)
    return calls


def test_single_prompt_forms_run_the_batched_path_with_one_prefix(student, monkeypatch):
    prefixes = [student.prefix(p) for p in PROMPTS]
    responses = [[student.encode_response(t) for t in ("5", "red square", "7 8")] for _ in PROMPTS]
    calls = _count_prefix_passes(student, monkeypatch)
    with Forwards(student) as fw:
        one = student.token_logprobs(prefixes[0], responses[0])
    assert calls == [1] and fw.calls == 2  # the prefix once, then all K continuations in one pass
    batched = student.token_logprobs_batch(prefixes, responses)
    assert calls == [1, 3]
    alone = student.token_logprobs_batch(prefixes[:1], responses[:1])[0]
    assert torch.equal(one.logp, alone.logp) and torch.equal(one.mask, alone.mask) and torch.equal(one.ids, alone.ids)
    assert torch.allclose(one.logp, batched[0].logp, atol=1e-5)
    assert calls == [1, 3, 1]
    student.continuation_logits(prefixes[1], responses[1])
    assert calls == [1, 3, 1, 1]
    del calls[:]
    sampled = student.sample(prefixes[2], 3, 5, 1.0, torch.Generator().manual_seed(7))
    assert calls == [1]
    assert sampled == student.sample_batch(prefixes[2:], 3, 5, 1.0, [torch.Generator().manual_seed(7)])[0]
    student.sample_batch(prefixes, 3, 5, 1.0, [torch.Generator().manual_seed(i) for i in range(3)])
    assert calls == [1, 1, 3]


def test_single_prompt_log_probs_still_need_a_response(student):
    with pytest.raises(ValueError, match="every response needs at least one token"):
        student.token_logprobs(student.prefix(PROMPTS[0]), [])
    assert student.token_logprobs_batch([student.prefix(PROMPTS[0])], [[]])[0].logp.shape == (0, 0)


def test_adapter_base_stays_small():
    """vlrlcd/adapters/base.py under 500 lines, no function in vlrlcd/adapters over 80 lines."""
    assert len((ADAPTERS / "base.py").read_text(encoding="utf-8").splitlines()) < 500
    for path in sorted(ADAPTERS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 80, f"{path.name}:{node.name}"
