"""`vlrlcd demo --quick`: the whole method end to end on CPU, and a re-run that pays the teacher nothing."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _demo(out: Path, *extra: str) -> tuple[dict, str, float]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "vlrlcd.cli", "demo", "--quick", "--no-progress", "--out", str(out),
                          *extra], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "summary.json").read_text()), res.stdout, time.time() - t0


def test_quick_demo_end_to_end_and_rerun_costs_no_teacher_calls(tmp_path):
    out = tmp_path / "demo"
    summary, stdout, seconds = _demo(out)
    assert set(summary["methods"]) == {"sft", "ldl_grpo"}
    for m in summary["methods"].values():
        assert 0.0 <= m["accuracy"] <= 1.0 and m["n"] == summary["eval_prompts"] == 32
    assert summary["train_prompts"] == 48
    # one teacher call per distinct training prompt, ever
    assert summary["teacher_calls"] == summary["distinct_train_prompts"] > 0
    assert seconds < 240, f"--quick took {seconds:.0f}s"
    # the table and the report
    assert "ldl_grpo" in stdout and "teacher calls this run" in stdout
    assert (out / "report.html").exists() and "report:" in stdout
    rows = [json.loads(x) for x in (out / "ldl_grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "kl", "margin_mean", "dx_entropy", "teacher_calls", "seconds"):
        assert key in rows[-1]
    rollouts = [json.loads(x) for x in (out / "ldl_grpo" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 16 and all(len(g["candidates"]) == len(g["target"]) == 4 for g in rollouts)
    assert all(abs(sum(g["target"]) - 1) < 1e-3 for g in rollouts)

    # same --out: every anchor comes from the store (shrunk training keeps the re-run short)
    again, _, _ = _demo(out, "train.sft_epochs=0.5", "train.rl_steps=1")
    assert again["teacher_calls"] == 0
    assert again["anchors_stored"] == summary["anchors_stored"]
