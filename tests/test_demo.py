"""`vlrlcd demo --quick` for each task end to end on CPU: SFT ends well above the task's chance level,
stage II moves the policy away from SFT, and a re-run with the same --out pays the teacher nothing.

The suite runs on one thread (conftest.py), where every number below is deterministic; the margins leave
room for another torch build's rounding, not for a student that has stopped learning."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from vlrlcd.demo import QUICK, TASKS as DEMO_TASKS, demo_config
from vlrlcd.errors import VlrlcdError
from vlrlcd.evaluation.metrics import exact_match

# task -> (its held-out metric, by how much quick SFT must beat the chance level)
TASKS = {"vqa": ("accuracy", 0.1), "captions": ("caption_attributes", 0.1), "text": ("accuracy", 0.15)}


def _demo(out: Path, *extra: str) -> tuple[dict, str, float]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "vlrlcd.cli", "demo", "--quick", "--no-progress", "--out", str(out),
                          *extra], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "summary.json").read_text()), res.stdout, time.time() - t0


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _assert_learned_and_moved(out: Path, summary: dict, metric: str, margin: float) -> None:
    """SFT well above chance; stage II's policy differs from SFT (KL to it, weights, some answers)."""
    sft = summary["methods"]["sft"][metric]
    assert 0.0 <= summary["chance"] < 1.0
    assert sft >= summary["chance"] + margin, f"SFT {sft:.3f} is not clearly above chance {summary['chance']:.3f}"
    rows = _rows(out / "ldl_grpo" / "metrics.jsonl")
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)       # the first step samples the SFT policy itself
    assert max(r["kl"] for r in rows[1:]) > 1e-5, [r["kl"] for r in rows]
    before, after = (load_file(out / m / "adapter" / "adapter_model.safetensors") for m in ("sft", "ldl_grpo"))
    assert before.keys() == after.keys()
    assert any(not (before[k] == after[k]).all() for k in before), "stage II left the SFT weights as they were"


def test_quick_vqa_demo_learns_moves_and_a_rerun_costs_no_teacher_calls(tmp_path):
    out = tmp_path / "demo"
    summary, stdout, seconds = _demo(out)   # --task vqa is the default
    assert summary["task"] == "vqa" and set(summary["methods"]) == {"sft", "ldl_grpo"}
    for name, m in summary["methods"].items():   # the accuracy is the held-out answers' exact match, re-scored here
        preds = _rows(out / name / "predictions.jsonl")
        assert m["n"] == len(preds) == summary["eval_prompts"] == 128
        assert [p["correct"] for p in preds] == [float(exact_match(p["prediction"], p["reference"])) for p in preds]
        assert m["accuracy"] == pytest.approx(sum(p["correct"] for p in preds) / len(preds), abs=1e-4)
    assert summary["train_prompts"] == 256
    # one teacher call per distinct training prompt, ever
    assert summary["teacher_calls"] == summary["distinct_train_prompts"] > 0
    assert seconds < 180, f"--quick took {seconds:.0f}s"
    _assert_learned_and_moved(out, summary, *TASKS["vqa"])
    # the table, the chance level beside it and the report
    assert "ldl_grpo" in stdout and "teacher calls this run" in stdout
    assert "chance level (vqa" in stdout and f"{summary['chance']:.3f}" in stdout
    # the anchors' own training-prompt score (about 80% of them right by construction) beside SFT's
    assert 0.6 < summary["anchor_train_score"] < 1.0
    assert f"teacher anchors on the training prompts (the most stage II can get from agreeing with them): " \
           f"{summary['anchor_train_score']:.3f}; SFT's greedy answers there: " in stdout
    assert (out / "report.html").exists() and "report:" in stdout
    rows = _rows(out / "ldl_grpo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "kl", "margin_mean", "dx_entropy", "teacher_calls", "seconds"):
        assert key in rows[-1]
    rollouts = _rows(out / "ldl_grpo" / "rollouts.jsonl")
    assert len(rollouts) == 16 and all(len(g["candidates"]) == len(g["target"]) == 4 for g in rollouts)
    assert all(abs(sum(g["target"]) - 1) < 1e-3 for g in rollouts)

    # same --out: every anchor comes from the store (shrunk training keeps the re-run short)
    again, _, _ = _demo(out, "train.sft_epochs=0.5", "train.rl_steps=1")
    assert again["teacher_calls"] == 0
    assert again["anchors_stored"] == summary["anchors_stored"]


@pytest.mark.parametrize("task", ["captions", "text"])
def test_quick_demo_of_the_other_tasks_learns_and_moves(task, tmp_path):
    out = tmp_path / task
    summary, stdout, seconds = _demo(out, "--task", task)
    metric, margin = TASKS[task]
    assert summary["task"] == task and set(summary["methods"]) == {"sft", "ldl_grpo"}
    assert summary["methods"]["sft"]["n"] == summary["eval_prompts"] >= 64
    assert seconds < 180, f"--quick --task {task} took {seconds:.0f}s"
    assert f"chance level ({task}" in stdout
    _assert_learned_and_moved(out, summary, metric, margin)


def test_every_demo_recipe_loads_and_an_unknown_task_is_named():
    for task in DEMO_TASKS:
        for quick in (False, True):
            cfg = demo_config("runs/x", 3, quick, ["train.rl_steps=1"], task)
            assert cfg.seed == cfg.data.seed == cfg.teacher.seed == 3 and cfg.train.rl_steps == 1
    assert demo_config("runs/x", task="text").student.name_or_path == "tiny-text"
    assert demo_config("runs/x", task="captions").data.task == "shapes_caption"
    assert set(QUICK) == set(DEMO_TASKS) == set(TASKS)
    with pytest.raises(VlrlcdError, match="unknown demo task 'ocr'.*vqa, captions, text"):
        demo_config("runs/x", quick=True, task="ocr")
