"""The command line: bad input gives a one-line error naming the problem, never a traceback."""

import os
import subprocess
import sys

import pytest

from vlrlcd.cli import main


def _run(args, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "vlrlcd.cli", *args], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)


@pytest.mark.parametrize("args,needle", [
    (["demo", "--quick", "train.lrr=1"], "did you mean 'train.lr'"),
    (["demo", "--quick", "train.k=many"], "'train.k' expects an integer"),
    (["demo", "--quick", "--out", "/proc/forbidden/run"], "cannot write to run directory"),
])
def test_demo_bad_input_is_one_line(tmp_path, args, needle):
    res = _run(args, tmp_path)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], res.stderr


def test_config_errors_in_process(tmp_path, capsys):
    assert main(["anchors", str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "does not exist" in err


def test_eval_with_judge_is_paid_once(tmp_path, capsys):
    """`vlrlcd eval --judge`: a win rate from the teacher's judgements, stored so a re-run costs nothing."""
    import json
    from pathlib import Path

    from vlrlcd.config import load_config
    from vlrlcd.datasets.records import Record
    from vlrlcd.evaluation.metrics import length_controlled_win_rate
    from vlrlcd.teacher.oracle import OracleTeacher

    recipe = Path(__file__).resolve().parents[1] / "configs" / "tiny_text_arithmetic.yaml"
    run = tmp_path / "run"
    common = [str(recipe), f"run_dir={run}", "data.train_size=8", "data.eval_size=4", "train.objective=sft",
              "train.sft_epochs=1", "--no-progress"]
    assert main(["train", *common]) == 0
    adapter = run / "sft" / "adapter"
    results = []
    for expected_calls in (4, 0):
        assert main(["eval", *common, "--adapter", str(adapter), "--judge"]) == 0
        result = json.loads((run / "sft" / "eval.json").read_text())
        assert result["judge_calls"] == expected_calls and result["n"] == 4
        results.append(result)
    # the win rates are those of the teacher's (oracle) judgements of the predictions against the references
    preds = [json.loads(x) for x in (run / "sft" / "predictions.jsonl").read_text().splitlines()]
    oracle = OracleTeacher(load_config(recipe, common[1:-1]).teacher)
    wins = [oracle.judge(Record(p["id"], p["prompt"], reference=p["reference"]), p["prediction"]) for p in preds]
    assert results[0]["win_rate"] == pytest.approx(sum(wins) / 4)
    assert results[0]["lc_win_rate"] == pytest.approx(length_controlled_win_rate(
        wins, [len(p["prediction"]) for p in preds], [len(p["reference"]) for p in preds]))
    assert {**results[1], "judge_calls": 4} == results[0]   # the stored judgements, not new ones
    capsys.readouterr()


def test_eval_of_a_tiny_student_before_any_run_says_to_train_first(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\nstudent: {{name_or_path: tiny-text}}\n", encoding="utf-8")
    assert main(["eval", str(cfg), "--adapter", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert "student_base-tiny-text" in err and "vlrlcd train CONFIG" in err and "Traceback" not in err
