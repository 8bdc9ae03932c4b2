"""Smoke test of the bench machinery (not of the numbers): one tiny interleaved row, the vision-pass count,
teacher calls counted at the teacher, in-process memory measurement, and the tables."""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("trl")

from bench import step_time, teacher_calls  # noqa: E402
from bench.memory import _status_kb, measure, reset_peak  # noqa: E402
from bench.models import build, build_text_small  # noqa: E402
from bench.table import report  # noqa: E402
from bench.vision import _images_in_call  # noqa: E402
from vlrlcd.adapters.config import TinyConfig  # noqa: E402

SMALL = TinyConfig(vocab_size=320, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                   vision_hidden_size=32, vision_layers=1, image_size=32, patch_size=8)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_one_interleaved_llava_row_counts_vision_passes(tmp_path):
    w = build("llava", tmp_path, 1, tiny_config=SMALL)
    spec = step_time.RowSpec("llava", k=2, batch=1, max_new_tokens=3, warmup=0, reps=1)
    row = step_time.run_row(w, spec, tmp_path).summary()
    assert row["image_tokens"] == 16 and row["prompt_tokens"] > 16        # 32x32 / patch 8, CLS dropped
    assert row["reps"] == 1 and len(row["ours_step_s"]) == len(row["trl_step_s"]) == 1
    assert all(x > 0 for x in row["ours_step_s"] + row["trl_step_s"])
    a, b = row["ours_step_s"][0], row["trl_step_s"][0]  # A_i / B_i of the same pair; the times are rounded
    assert math.isclose(row["ratio_median"], a / b, rel_tol=1e-4 / min(a, b))  # to 1e-4 s (tiny steps: ~1e-2 s)
    assert row["ratio_min"] == row["ratio_median"] == row["ratio_max"]
    # vlrlcd: one tower pass per prompt. TRL: every completion in generate, the reference and the policy
    # pass (3K), plus one in the reward (the same scorer, on TRL's model).
    assert row["ours_vision_per_prompt"] == 1.0
    assert row["trl_vision_per_prompt"] == 3 * spec.k + 1
    assert 0 < row["ours_completion_tokens"] <= spec.k * spec.max_new_tokens
    assert 0 < row["trl_completion_tokens"] <= spec.k * spec.max_new_tokens


def test_teacher_calls_are_n_for_ldl_grpo_and_nk_for_the_judge(tmp_path):
    t = teacher_calls.count_calls(n_prompts=2, k=2, batch=2, max_new_tokens=3, work_dir=tmp_path)
    assert t["ldl_grpo"] == {"anchor_calls": 2, "rl_calls": 0, "total": 2, "rerun_anchor_calls": 0}
    assert t["judge_grpo"]["anchor_calls"] == 2 and t["judge_grpo"]["rerun_anchor_calls"] == 0
    assert t["judge_grpo"]["rl_calls"] == 4                                 # N·K, each judged once
    assert t["ratio"] == pytest.approx(0.5)


def test_counting_teacher_counts_both_kinds_of_request():
    class Inner:
        def answer(self, record):
            return "a"

        def judge(self, record, candidate, reference=None):
            return 1.0

    c = teacher_calls.CountingTeacher(Inner())
    c.answer(None), c.judge(None, "x"), c.judge(None, "y", "z")
    assert (c.answers, c.judgements, c.total) == (1, 2, 3)


def test_images_in_call_reads_grid_rows_or_pixel_batch():
    assert _images_in_call((torch.zeros(3, 3, 8, 8),), {}) == 3                          # LLaVA pixel batch
    assert _images_in_call((torch.zeros(40, 1176),), {"grid_thw": torch.ones(2, 3)}) == 2  # Qwen2-VL packed
    assert _images_in_call((torch.zeros(40, 1176), torch.ones(5, 3, dtype=torch.long)), {}) == 5


def test_reset_peak_lowers_the_high_water_mark_to_the_current_rss():
    """A freed 128 MB block stays in VmHWM until reset_peak(); after it VmHWM is the RSS of now. Where the
    kernel has no /proc/self/clear_refs to write, it says so and the mark stays where it was."""
    block = bytearray(128 * 2**20)
    block[::4096] = b"x" * len(block[::4096])   # touch every page: resident
    del block                                    # an mmap'd block: handed back to the kernel
    before = _status_kb("VmHWM")
    assert before >= _status_kb("VmRSS") + 100 * 1024
    if os.access("/proc/self/clear_refs", os.W_OK):   # Linux >= 4.0
        assert reset_peak() is True
        assert _status_kb("VmHWM") <= _status_kb("VmRSS") + 16 * 1024
    else:
        assert reset_peak() is False and _status_kb("VmHWM") >= before


def test_memory_measure_in_process(tmp_path):
    resettable = reset_peak()
    path = build_text_small(tmp_path)
    m = measure(str(path), "none", k=2, batch=1, max_new_tokens=3, steps=1)
    assert m["params"] > 0 and 0 < m["trainable_params"] < m["params"]
    assert m["weight_mb"] == pytest.approx(m["params"] * 4 / 2**20, abs=0.06)   # fp32 in memory, bf16 on disk
    assert (m["step_peak_rss_mb"] is None) == (not resettable)   # a step peak exactly where the mark can be reset
    if m["step_peak_rss_mb"] is not None:
        assert m["step_peak_rss_mb"] >= m["rss_after_load_mb"] - 1


def test_report_tables():
    row = {"name": "llava", "k": 4, "prompt_tokens": 76, "image_tokens": 64, "ours_s": 1.0, "trl_s": 2.0,
           "ratio_median": 0.5, "ratio_q1": 0.45, "ratio_q3": 0.55, "ratio_min": 0.4, "ratio_max": 0.6,
           "ours_vision_per_prompt": 1.0, "trl_vision_per_prompt": 13.0}
    mem = {"params": 1e8, "weight_mb": 400.0, "step_peak_rss_mb": 1600.0, "step_peak_above_runtime_mb": 600.0,
           "load_peak_rss_mb": 1700.0, "step_s": [2.0]}
    results = {"machine": {"line": "cpu x"}, "command": "python -m bench", "wall_s": 10.0,
               "step_time": [row, {"name": "qwen2_vl", "error": "RuntimeError: missing"}],
               "memory": {"fp32": mem, "4bit": {**mem, "weight_mb": 62.0, "step_peak_rss_mb": 1200.0}},
               "teacher_calls": {"n_prompts": 8, "k": 4, "ratio": 0.25,
                                 "ldl_grpo": {"anchor_calls": 8, "rl_calls": 0, "total": 8, "rerun_anchor_calls": 0},
                                 "judge_grpo": {"anchor_calls": 8, "rl_calls": 32, "total": 40,
                                                "rerun_anchor_calls": 0}}}
    text = report(results)
    assert "| llava | 76 (64) | 4 | 1.00 | 2.00 | **0.50** | 0.45–0.55 | 0.40–0.60 | 1.0 | 13.0 |" in text
    assert "| qwen2_vl | – | – | RuntimeError: missing |" in text
    assert "| peak RSS during the step (MB) | 1600 | 1200 | 0.75 |" in text
    assert "| method's teacher cost | **8** (N) | **32** judgements (N·K) | **0.25** |" in text


def test_report_has_the_batched_evaluation_row():
    results = {"machine": {"line": "cpu x"}, "command": "python -m bench", "wall_s": 10.0, "step_time": [],
               "eval_speed": {"n": 128, "batch": 32, "max_new_tokens": 8, "reps": 3, "one_ms": 20.0, "batched_ms": 2.5,
                              "speedup_median": 8.0, "speedup_min": 7.1, "speedup_max": 8.3, "same_answers": True}}
    text = report(results)
    assert "one prompt at a time (A) against batch 32 (B)" in text
    assert "| 0.0200 | 0.0025 | 8.00x [7.10, 8.30] | yes |" in text
    assert "eval speed: RuntimeError: x" in report({**results, "eval_speed": {"error": "RuntimeError: x"}})
