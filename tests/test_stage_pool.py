"""Stage-II methods side by side (`run_methods(jobs=N)`, vlrlcd/stage_pool.py): the numbers of a sequential run
to the digit, results in the methods' order, user errors and interrupts handled as the sequential loop does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from vlrlcd import stage_pool
from vlrlcd.cli import build_parser
from vlrlcd.config import load_config
from vlrlcd.errors import VlrlcdError
from vlrlcd.run import _stage_two_parallel, run_methods
from vlrlcd.stage_pool import MethodResult, auto_jobs
from vlrlcd.summary import Summary
from vlrlcd.training.interrupts import TrainingInterrupted

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "tiny_text_arithmetic.yaml"
TINY = ["data.train_size=8", "data.eval_size=8", "student.tiny.vocab_size=300", "student.tiny.hidden_size=64",
        "student.tiny.num_layers=1", "student.tiny.num_heads=2", "student.tiny.intermediate_size=128",
        "student.max_new_tokens=3", "eval.max_new_tokens=3", "train.sft_epochs=2", "train.sft_batch_size=4",
        "train.rl_steps=3", "train.batch_size=2", "train.k=2"]
METHODS = ["sft2", "ldl_grpo", "anchor_rank_dpo"]


def _losses(stage: Path) -> list:
    return [r.get("loss") for r in map(json.loads, (stage / "metrics.jsonl").read_text().splitlines())]


def test_methods_side_by_side_give_the_sequential_numbers(tmp_path):
    """jobs=2 trains the same adapters as jobs=1: equal weights, losses and held-out rows, listed in order."""
    runs = {}
    for jobs in (1, 2):
        cfg = load_config(str(RECIPE), TINY + [f"run_dir={tmp_path / f'j{jobs}'}"])
        runs[jobs] = run_methods(cfg, METHODS, progress=False, jobs=jobs)
    one, two = runs[1], runs[2]
    assert list(two.methods) == list(one.methods) == ["sft", *METHODS] and not one.errors and not two.errors
    for name in one.methods:
        strip = lambda m: {k: v for k, v in m.items() if k != "seconds"}  # noqa: E731
        assert strip(one.methods[name]) == strip(two.methods[name]), name
    for name in METHODS:
        a, b = (tmp_path / f"j{j}" / name for j in (1, 2))
        assert _losses(a) == _losses(b) and len(_losses(a)) == 3, name
        wa, wb = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (a, b))
        assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa), name
    assert json.loads((tmp_path / "j2" / "summary.json").read_text())["methods"].keys() == two.methods.keys()


def _fake_pool(results):
    def train_parallel(prep, sft_adapter, names, jobs, progress, resume):
        yield from results
    return train_parallel


def _summary() -> Summary:
    return Summary(methods={"sft": {"accuracy": 0.5}}, teacher_calls=0, anchors_stored=0, anchor_calls=0,
                   train_prompts=0, distinct_train_prompts=0, eval_prompts=0, chance=None, anchor_train_score=None,
                   seed=0, processes=1)


def test_results_are_listed_in_the_methods_order_and_errors_kept_with_keep_going(monkeypatch):
    seen = []
    monkeypatch.setattr(stage_pool, "train_parallel", _fake_pool(
        [MethodResult("c", metrics={"accuracy": 0.3}), MethodResult("a", error="a broke: do X"),
         MethodResult("b", metrics={"accuracy": 0.2})]))
    summary = _summary()
    _stage_two_parallel(None, None, ["a", "b", "c"], summary, 2, False, False, True, time.time(),
                        lambda name, s: seen.append(name))
    assert list(summary.methods) == ["sft", "b", "c"] and summary.errors == {"a": "a broke: do X"}
    assert seen == ["c", "a", "b"]   # on_method as each finishes


def test_a_user_error_stops_the_run_without_keep_going(monkeypatch):
    monkeypatch.setattr(stage_pool, "train_parallel", _fake_pool(
        [MethodResult("a", error="a broke: do X"), MethodResult("b", metrics={"accuracy": 0.2})]))
    summary = _summary()
    with pytest.raises(VlrlcdError, match="a broke: do X"):
        _stage_two_parallel(None, None, ["a", "b"], summary, 2, False, False, False, time.time(), None)
    assert "b" in summary.methods   # the method already running still finished and was kept


def test_an_interrupted_worker_raises_training_interrupted_after_the_others(monkeypatch):
    monkeypatch.setattr(stage_pool, "train_parallel", _fake_pool(
        [MethodResult("a", interrupted=("a", 7, "/run/a/checkpoints/step-7")), MethodResult("b", skipped=True),
         MethodResult("c", metrics={"accuracy": 0.2})]))
    summary = _summary()
    with pytest.raises(TrainingInterrupted) as e:
        _stage_two_parallel(None, None, ["a", "b", "c"], summary, 2, False, False, True, time.time(), None)
    assert (e.value.stage, e.value.step, e.value.checkpoint) == ("a", 7, Path("/run/a/checkpoints/step-7"))
    assert list(summary.methods) == ["sft", "c"] and not summary.errors


def test_a_worker_reports_user_errors_and_interrupts_as_results(monkeypatch):
    from vlrlcd import pipeline

    def fail(*a, **k):
        raise VlrlcdError("bad key: fix it")
    monkeypatch.setattr(pipeline, "run_rl", fail)
    assert stage_pool._train_method(None, None, "x", False, False) == MethodResult("x", error="bad key: fix it")

    def stop(*a, **k):
        raise TrainingInterrupted("x", 3, Path("/c"))
    monkeypatch.setattr(pipeline, "run_rl", stop)
    assert stage_pool._train_method(None, None, "x", False, False).interrupted == ("x", 3, "/c")


def test_auto_jobs_one_per_free_core_and_one_with_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(stage_pool, "free_cores", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert auto_jobs(4) == 4 and auto_jobs(8) == 4 and auto_jobs(1) == 1
    monkeypatch.setattr(stage_pool, "free_cores", lambda: 1)
    assert auto_jobs(4) == 1
    monkeypatch.setattr(stage_pool, "free_cores", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert auto_jobs(4) == 1


def test_the_method_with_the_most_work_per_prompt_starts_first():
    from vlrlcd.demo import demo_config

    cfg = demo_config("unused")
    assert stage_pool.start_order(cfg, ["sft2", "single_pair_dpo", "anchor_rank_dpo", "ldl_grpo"]) == \
        ["ldl_grpo", "anchor_rank_dpo", "single_pair_dpo", "sft2"]


def test_jobs_flag_takes_a_count_or_auto(capsys):
    p = build_parser()
    assert p.parse_args(["demo", "--jobs", "3"]).jobs == 3 and p.parse_args(["demo"]).jobs is None
    assert p.parse_args(["compare", "c.yaml", "--objectives", "sft2", "--jobs", "auto"]).jobs is None
    with pytest.raises(SystemExit):
        p.parse_args(["demo", "--jobs", "0"])
    assert "give a number of methods >= 1" in capsys.readouterr().err


def test_ctrl_c_stops_the_workers_with_checkpoints_and_resume_finishes(tmp_path):
    """A real SIGINT to `vlrlcd compare --jobs 2` while two methods train: both save a checkpoint, the command
    says how to continue, and --resume finishes from there."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "vlrlcd.cli", "compare", str(RECIPE), *TINY, "train.rl_steps=400",
            f"run_dir={run}", "--objectives", "ldl_grpo,anchor_rank_dpo", "--jobs", "2", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stages = [run / "ldl_grpo" / "metrics.jsonl", run / "anchor_rank_dpo" / "metrics.jsonl"]
    deadline = time.time() + 240
    while not all(p.exists() and p.read_text().count("\n") >= 2 for p in stages):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)   # to the parent alone: it passes the stop on to the workers
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, out[-2000:]
    for stage in ("ldl_grpo", "anchor_rank_dpo"):
        assert list((run / stage / "checkpoints").glob("*")), (stage, out[-2000:])
        assert not (run / stage / "adapter").exists()
    done = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["methods"]) == ["sft", "ldl_grpo", "anchor_rank_dpo"]
