"""Crash safety of `python -m vlrlcd.teacher.runner`: SIGKILL mid-run, then re-runs finish the job with
no prompt answered twice beyond those in flight at the kill (at most teacher.concurrency)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from helpers_http import FakeChatServer

from vlrlcd.config import load_config
from vlrlcd.datasets.records import Record, write_jsonl
from vlrlcd.teacher.runner import EXIT_INCOMPLETE
from vlrlcd.teacher.store import AnchorStore

REPO = Path(__file__).resolve().parents[1]
KEY_ENV = "VLRLCD_TEST_KEY"
CONCURRENCY = 4


def runner(cfg_path: Path, *overrides: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, **{KEY_ENV: "sk-kill-test"}, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "vlrlcd.teacher.runner", str(cfg_path), *overrides],
                            cwd=REPO, env=env, **kw)


def test_sigkill_mid_run_then_rerun_stores_every_prompt_once(tmp_path):
    n = 60
    recs = [Record(id=f"r{i}", prompt=f"kill question {i}?") for i in range(n)]
    data = write_jsonl(recs, tmp_path / "train.jsonl")
    with FakeChatServer(delay_s=0.05) as server:
        cfg_path = tmp_path / "anchors.yaml"
        cfg_path.write_text(yaml.safe_dump({
            "run_dir": str(tmp_path / "run"),
            "data": {"task": "file", "train_path": str(data)},
            "teacher": {"backend": "openai", "base_url": server.url, "model": "m", "api_key_env": KEY_ENV,
                        "concurrency": CONCURRENCY, "timeout_s": 5.0, "backoff_s": 0.01},
        }))
        proc = runner(cfg_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while server.total_successes() < 12:
            assert proc.poll() is None and time.monotonic() < deadline, "runner ended before it could be killed"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        at_kill = server.total_successes()
        assert at_kill < n  # really mid-run

        server.delay_s = 0.0
        budgeted = runner(cfg_path, "teacher.max_calls=5", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = budgeted.communicate(timeout=60)
        assert budgeted.returncode == EXIT_INCOMPLETE, err  # prompts left without an anchor: not a success
        assert "prompts left" in out and "teacher.max_calls=5" in out and "incomplete:" in out

        final = runner(cfg_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = final.communicate(timeout=60)
        assert final.returncode == 0, err
        assert "prompts left" not in out

        assert set(server.successes) == {r.prompt for r in recs}
        twice = sum(k - 1 for k in server.successes.values())
        assert twice <= CONCURRENCY, f"{twice} prompts paid twice"
        assert server.total_successes() == n + twice

    cfg = load_config(cfg_path)
    with AnchorStore(tmp_path / "run" / "anchors.sqlite") as store:
        assert store.anchors_for(recs, cfg.teacher) == {r.id: f"answer to {r.prompt}" for r in recs}
        assert store.counts() == {"ok": n, "failed": 0}


def test_runner_bad_config_is_one_line_error(tmp_path):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("teacher:\n  backend: gpt\n")
    proc = runner(cfg_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err.strip().splitlines() == ["error: teacher.backend 'gpt' is not one of oracle, openai, hf, jsonl"]
