"""Every shown result carries its paired difference against SFT: `summary.write_summary` adds it from the
methods' predictions.jsonl files, `summary.format_table` and `compare.format_compare` print it as a
`Δ vs SFT [95% CI]` column (old keys and columns kept)."""

from __future__ import annotations

import json

import pytest

from vlrlcd.compare import COLUMNS, format_compare, with_diff
from vlrlcd.evaluation.stats import paired_bootstrap
from vlrlcd.summary import format_table, write_summary

SFT = [1, 0, 0, 1, 0, 1, 0, 0]
GRPO = [1, 1, 0, 1, 1, 1, 0, 1]


def _predictions(run, method, correct, ids=None):
    ids = ids or [f"e{i}" for i in range(len(correct))]
    (run / method).mkdir(parents=True, exist_ok=True)
    (run / method / "predictions.jsonl").write_text(
        "".join(json.dumps({"id": i, "prompt": "q", "prediction": "p", "reference": "r", "correct": float(c)}) + "\n"
                for i, c in zip(ids, correct)), encoding="utf-8")


def _summary():
    return {"methods": {"sft": {"accuracy": 0.375, "n": 8, "seconds": 3.0},
                        "ldl_grpo": {"accuracy": 0.75, "n": 8, "seconds": 5.0},
                        "sft2": {"accuracy": 0.5, "n": 8, "seconds": 4.0}},
            "teacher_calls": 8, "train_prompts": 16, "eval_prompts": 8, "seconds": 12.0}


def test_write_summary_adds_the_paired_difference_and_keeps_the_old_keys(tmp_path):
    _predictions(tmp_path, "sft", SFT)
    _predictions(tmp_path, "ldl_grpo", GRPO)
    summary = _summary()
    path = write_summary(tmp_path, summary)
    on_disk = json.loads(path.read_text())
    assert on_disk == summary  # the caller's dict got the same keys (format_table prints it next)
    grpo, want = on_disk["methods"]["ldl_grpo"], paired_bootstrap(SFT, GRPO, resamples=2000, seed=0)
    assert grpo["accuracy"] == 0.75 and grpo["n"] == 8 and grpo["seconds"] == 5.0
    assert (grpo["diff_vs_sft"], grpo["diff_low"], grpo["diff_high"], grpo["diff_n"]) == (
        want.diff, want.low, want.high, 8)
    assert grpo["diff_vs_sft"] == pytest.approx(0.375)
    assert "diff_vs_sft" not in on_disk["methods"]["sft"]
    assert "diff_vs_sft" not in on_disk["methods"]["sft2"]  # no predictions of its own
    assert on_disk["paired_bootstrap"] == {"reference": "sft", "resamples": 2000, "seed": 0, "level": 0.95}

    table = format_table(summary)
    header, _, sft, grpo_row, sft2 = table.splitlines()[:5]
    assert "Δ vs SFT [95% CI]" in header and "accuracy" in header and "diff_low" not in header
    assert want.format() in grpo_row and grpo_row.split()[:2] == ["ldl_grpo", "0.750"]
    assert sft.split()[:3] == ["sft", "0.375", "-"] and sft2.split()[:3] == ["sft2", "0.500", "-"]
    assert "paired bootstrap 2000 resamples (seed 0)" in table and "held-out prompts: 8" in table

    # the predictions go away: so does the stale difference
    (tmp_path / "ldl_grpo" / "predictions.jsonl").unlink()
    write_summary(tmp_path, summary)
    assert "diff_vs_sft" not in json.loads(path.read_text())["methods"]["ldl_grpo"]
    assert "Δ vs SFT" not in format_table(summary)


def test_the_difference_pairs_only_the_shared_prompts(tmp_path):
    _predictions(tmp_path, "sft", SFT)
    _predictions(tmp_path, "ldl_grpo", GRPO[:5] + [0, 0], ids=[f"e{i}" for i in range(5)] + ["x", "y"])
    summary = _summary()
    write_summary(tmp_path, summary)
    grpo = summary["methods"]["ldl_grpo"]
    assert grpo["diff_n"] == 5 and grpo["diff_vs_sft"] == pytest.approx(paired_bootstrap(SFT[:5], GRPO[:5]).diff)


def test_format_table_without_predictions_is_the_old_table():
    table = format_table(_summary())
    assert "Δ" not in table and table.splitlines()[0].split() == ["method", "accuracy", "seconds"]


def test_compare_rows_and_table_show_the_difference(tmp_path):
    _predictions(tmp_path, "sft", SFT)
    _predictions(tmp_path, "ldl_grpo", GRPO)
    base = {k: None for k in COLUMNS}
    rows = [with_diff({**base, "method": "sft", "metric": "accuracy", "value": 0.375, "n": 8, "teacher_calls": 8,
                       "stage2_teacher_calls": 0, "seconds": 3.0}, tmp_path),
            with_diff({**base, "method": "ldl_grpo", "metric": "accuracy", "value": 0.75, "n": 8, "teacher_calls": 8,
                       "stage2_teacher_calls": 0, "seconds": 5.0}, tmp_path),
            with_diff({**base, "method": "anchor_grpo", "error": "boom"}, tmp_path)]
    want = paired_bootstrap(SFT, GRPO)
    assert rows[0]["diff_vs_sft"] is None and rows[2]["diff_vs_sft"] is None
    assert (rows[1]["diff_vs_sft"], rows[1]["diff_low"], rows[1]["diff_high"], rows[1]["diff_n"]) == (
        want.diff, want.low, want.high, 8)
    assert set(rows[1]) == set(COLUMNS)
    table = format_compare({"rows": rows, "anchor_calls": 8, "teacher_calls_this_run": 8, "train_prompts": 16,
                            "eval_prompts": 8, "seconds": 9.0})
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["method", "accuracy"] and "Δ vs SFT [95% CI]" in lines[0]
    assert lines[2].split()[:3] == ["sft", "0.375", "-"]
    assert lines[3].split()[:5] == ["ldl_grpo", "0.750", *want.format().split()] and lines[3].split()[-1] == "5"
    assert "error: boom" in lines[4] and "paired bootstrap 95% interval" in table
