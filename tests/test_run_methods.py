"""One orchestration (`run.run_methods`) behind `vlrlcd train`, `demo` and `compare`: one summary.json
schema, the tiny base built by a named step, and the Session's parts working on their own."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest

from vlrlcd.cli import main
from vlrlcd.config import load_config
from vlrlcd.errors import VlrlcdError
from vlrlcd.summary import Summary

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "tiny_text_arithmetic.yaml"
TINY = ["data.train_size=4", "data.eval_size=2", "student.tiny.vocab_size=300", "student.tiny.hidden_size=64",
        "student.tiny.num_layers=1", "student.tiny.num_heads=2", "student.tiny.intermediate_size=128",
        "student.max_new_tokens=3", "eval.max_new_tokens=3", "train.sft_epochs=1", "train.sft_batch_size=4",
        "train.rl_steps=1", "train.batch_size=2", "train.k=2"]
SCHEMA = {f.name for f in dataclasses.fields(Summary)}


def test_train_and_compare_write_the_demos_summary_schema(tmp_path, capsys):
    """`vlrlcd train` and `vlrlcd compare` write the same summary.json keys as the demo (chance, anchor score,
    seed, ...), with the method entries the stages returned."""
    train, comp = tmp_path / "train", tmp_path / "compare"
    assert main(["train", str(RECIPE), *TINY, f"run_dir={train}", "train.objective=sft2", "--no-progress"]) == 0
    assert main(["compare", str(RECIPE), *TINY, f"run_dir={comp}", "--objectives", "sft2", "--no-progress"]) == 0
    a, b = (json.loads((run / "summary.json").read_text()) for run in (train, comp))
    assert set(a) == set(b) == SCHEMA
    assert set(a["methods"]) == set(b["methods"]) == {"sft", "sft2"}
    assert a["methods"]["sft"] == b["methods"]["sft"] | {"seconds": a["methods"]["sft"]["seconds"]}
    assert a["anchor_calls"] == b["anchor_calls"] == a["teacher_calls"] == 4 and a["seed"] == b["seed"] == 0
    assert a["chance"] == b["chance"] is not None and a["processes"] == 1 and a["errors"] == {}
    compare = json.loads((comp / "compare.json").read_text())
    assert [r["method"] for r in compare["rows"]] == ["sft", "sft2"]
    assert compare["rows"][1]["value"] == b["methods"]["sft2"]["accuracy"]


def test_run_sft_does_not_build_the_base_the_named_step_does(tmp_path):
    """Building (and pretraining) a tiny base is `student_base.build_student_base`, never a side effect of a
    getter or of stage I."""
    from vlrlcd.pipeline import prepare, run_sft
    from vlrlcd.student_base import build_student_base, built_student_config

    cfg = load_config(str(RECIPE), TINY + [f"run_dir={tmp_path / 'run'}"])
    prep = prepare(cfg, progress=False)
    with pytest.raises(VlrlcdError, match="built by a run"):
        built_student_config(cfg)
    with pytest.raises(VlrlcdError, match="built by a run"):
        run_sft(prep, progress=False)
    scfg = build_student_base(prep)
    assert scfg == built_student_config(cfg) and Path(scfg.name_or_path, "config.json").exists()


def test_interrupt_guard_turns_a_real_sigint_into_a_stop_request():
    from vlrlcd.training.distributed import single_process
    from vlrlcd.training.interrupts import InterruptGuard

    before = signal.getsignal(signal.SIGINT)
    with InterruptGuard("rl", single_process()) as guard:
        assert not guard.requested()
        os.kill(os.getpid(), signal.SIGINT)   # delivered to this (main) thread before kill returns
        assert guard.requested()
    assert signal.getsignal(signal.SIGINT) is before


def test_step_log_counts_bad_steps_and_stops(tmp_path):
    from vlrlcd.training.distributed import single_process
    from vlrlcd.training.metrics_log import StepLog

    log = StepLog("sft", tmp_path, single_process(), max_bad_steps=2)
    log.open(total=5, start_step=0, progress=False, tensorboard=False)
    log.log(1, {"loss": float("nan")}, ok=False, lr=0.1)
    log.log(2, {"loss": 1.0}, ok=True, lr=0.1)
    log.log(3, {"loss": float("nan")}, ok=False, lr=0.1, count_bad=False)   # an fp16 overflow: not counted
    log.log(4, {"loss": float("nan")}, ok=False, lr=0.1)
    with pytest.raises(VlrlcdError, match="2 steps in a row"):
        log.log(5, {"loss": float("nan")}, ok=False, lr=0.1)
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[0]["loss"] is None
    assert [r.get("bad_steps_in_a_row") for r in rows] == [1, None, 0, 1, 2]
