"""`run_compare`: one SFT start, several objectives, one table written as CSV and JSON (tiny text
student on synthetic arithmetic; a failing objective becomes an error row, the others still run)."""

from __future__ import annotations

import csv
import json

import pytest

from vlrlcd.compare import COLUMNS, format_compare, parse_objectives, run_compare
from vlrlcd.config import load_config
from vlrlcd.errors import VlrlcdError
from vlrlcd.evaluation.metrics import exact_match

TINY = ["data.task=arithmetic", "data.train_size=4", "data.eval_size=2", "student.name_or_path=tiny-text",
        "student.tiny.vocab_size=300", "student.tiny.hidden_size=64", "student.tiny.num_layers=1",
        "student.tiny.num_heads=2", "student.tiny.intermediate_size=128", "student.max_new_tokens=3",
        "eval.max_new_tokens=3", "train.sft_epochs=1", "train.sft_batch_size=4", "train.rl_steps=1",
        "train.batch_size=2", "train.k=2"]


def test_parse_objectives():
    assert parse_objectives(" sft2, ldl_grpo,sft2 ,") == ["sft2", "ldl_grpo"]
    with pytest.raises(VlrlcdError, match="not an objective"):
        parse_objectives("sft2,grpo")
    with pytest.raises(VlrlcdError, match="empty"):
        parse_objectives(" , ")


def test_unusable_objective_fails_before_any_work(tmp_path):
    cfg = load_config(None, TINY + [f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(VlrlcdError, match="train.tvkd_dpo.teacher"):
        run_compare(cfg, "sft2,tvkd_dpo", progress=False)
    assert not (tmp_path / "run").exists()


def test_compare_writes_one_table_from_one_sft_start(tmp_path, monkeypatch):
    import vlrlcd.pipeline as pipeline

    real_run_rl, starts = pipeline.run_rl, []

    def run_rl(prep, sft_adapter, objective=None, progress=True, resume=False, dist=None):
        starts.append(sft_adapter)
        if objective == "anchor_grpo":
            raise VlrlcdError("anchor_grpo: simulated failure")
        return real_run_rl(prep, sft_adapter, objective, progress=progress, resume=resume, dist=dist)

    monkeypatch.setattr(pipeline, "run_rl", run_rl)
    run = tmp_path / "run"
    cfg = load_config(None, TINY + [f"run_dir={run}"])
    result = run_compare(cfg, "sft2,single_pair_dpo,anchor_grpo,judge_grpo", progress=False)

    methods = ["sft", "sft2", "single_pair_dpo", "anchor_grpo", "judge_grpo"]
    assert [r["method"] for r in result["rows"]] == methods
    assert len(starts) == 4 and len(set(starts)) == 1 and starts[0] == run / "sft" / "adapter"
    assert result["anchor_calls"] == 4 and result["teacher_calls_this_run"] == 4
    rows = dict(zip(methods, result["rows"]))
    for name in ("sft", "sft2", "single_pair_dpo", "judge_grpo"):
        row = rows[name]
        assert row["error"] is None and row["metric"] == "accuracy"
        assert row["n"] == 2 and row["seconds"] > 0 and row["train_seconds"] is not None
        preds = [json.loads(x) for x in (run / name / "predictions.jsonl").read_text().splitlines()]
        assert len(preds) == 2 and [p["correct"] for p in preds] == [
            float(exact_match(p["prediction"], p["reference"])) for p in preds]
        assert row["value"] == pytest.approx(sum(p["correct"] for p in preds) / 2)   # the rows' mean, not a copy
    assert all(rows[m]["teacher_calls"] == 4 and rows[m]["stage2_teacher_calls"] == 0 for m in methods[:3])
    assert "simulated failure" in rows["anchor_grpo"]["error"]
    # judge_grpo: the teacher judged each distinct candidate once (1 step x 2 prompts x K=2), stored
    judged = [json.loads(x) for x in (run / "judge_grpo" / "rollouts.jsonl").read_text().splitlines()]
    distinct = {(x["id"], c) for x in judged for c in x["candidates"]}
    assert len(judged) == 2 and rows["judge_grpo"]["stage2_teacher_calls"] == len(distinct) > 0
    assert rows["judge_grpo"]["teacher_calls"] == 4 + len(distinct)

    assert json.loads((run / "compare.json").read_text()) == result
    with open(run / "compare.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert list(lines[0]) == list(COLUMNS) and [x["method"] for x in lines] == [r["method"] for r in result["rows"]]
    assert lines[1]["teacher_calls"] == "4" and lines[3]["value"] == ""
    summary = json.loads((run / "summary.json").read_text())
    assert {"sft", "sft2", "single_pair_dpo", "judge_grpo"} <= set(summary["methods"])
    assert "anchor_grpo" not in summary["methods"]
    table = format_compare(result)
    assert all(m in table for m in ("sft2", "single_pair_dpo", "error: anchor_grpo: simulated failure"))

    # resumed: finished stages are reused (no training, no teacher call); the failed one is retried
    monkeypatch.setattr(pipeline, "run_rl", real_run_rl)
    again = run_compare(cfg, "sft2,single_pair_dpo,anchor_grpo,judge_grpo", progress=False, resume=True)
    assert again["teacher_calls_this_run"] == 0
    redo = dict(zip(methods, again["rows"]))
    assert all(redo[m]["value"] == rows[m]["value"] and redo[m]["seconds"] == rows[m]["seconds"]
               for m in ("sft", "sft2", "single_pair_dpo", "judge_grpo"))
    assert redo["anchor_grpo"]["error"] is None and redo["anchor_grpo"]["metric"] == "accuracy"
