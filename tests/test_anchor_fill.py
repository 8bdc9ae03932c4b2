"""Filling the anchor store (issue 15): one fill per store across processes, a dead endpoint stops at once,
`vlrlcd anchors` fails when prompts lack an anchor, a store shared by runs, the progress bar, the
`attempts` column, a damaged store, and the teacher's config checks. A real HTTP server on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml
from helpers_http import KEY_ENV, api_key, server  # noqa: F401 (fixtures)

from vlrlcd.cli import main
from vlrlcd.config import load_config
from vlrlcd.datasets.records import Record, write_jsonl
from vlrlcd.errors import VlrlcdError
from vlrlcd.teacher.base import TeacherAnswer
from vlrlcd.teacher.config import TeacherConfig
from vlrlcd.teacher.runner import EXIT_INCOMPLETE, fill_anchors, run_anchors
from vlrlcd.teacher.store import AnchorStore, anchor_key

REPO = Path(__file__).resolve().parents[1]


def text_records(n: int, tag: str = "question") -> list[Record]:
    return [Record(id=f"r{i}", prompt=f"{tag} {i}?") for i in range(n)]


def openai_cfg(url: str, **kw) -> TeacherConfig:
    base = dict(backend="openai", base_url=url, model="teacher-m", api_key_env=KEY_ENV, timeout_s=2.0,
                backoff_s=0.01, max_retries=5, concurrency=4)
    base.update(kw)
    return TeacherConfig(**base)


def overrides(tmp_path: Path, url: str, recs: list[Record], run: str = "run") -> list[str]:
    data = write_jsonl(recs, tmp_path / "data" / "train.jsonl")
    return [f"run_dir={tmp_path / run}", "data.task=file", f"data.train_path={data}", "teacher.backend=openai",
            f"teacher.base_url={url}", "teacher.model=teacher-m", f"teacher.api_key_env={KEY_ENV}",
            "teacher.timeout_s=2", "teacher.backoff_s=0.01"]


def free_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# ------------------------------------------------------------------ item 3: one fill per store
def test_two_processes_on_one_run_dir_pay_once(server, tmp_path, api_key):
    recs = text_records(24)
    gate = threading.Event()
    server.answer = lambda prompt, body: (gate.wait(20), f"answer to {prompt}")[1]  # hold the first fill
    args = [sys.executable, "-m", "vlrlcd.cli", "anchors", "/dev/null", *overrides(tmp_path, server.url, recs),
            "teacher.concurrency=4", "teacher.timeout_s=30", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    err2_path = tmp_path / "second.err"
    first = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not server.requests:  # the first process is inside its fill, holding the lock
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.02)
        with open(err2_path, "w") as err2:
            second = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=err2, text=True)
            while "another anchor fill is running" not in err2_path.read_text():
                assert second.poll() is None and time.monotonic() < deadline, err2_path.read_text()
                time.sleep(0.05)
            gate.set()
            out2, _ = second.communicate(timeout=60)
        out1, err1 = first.communicate(timeout=60)
    finally:
        gate.set()
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0 and second.returncode == 0, (err1, err2_path.read_text())
    assert len(server.requests) == 24 and server.total_successes() == 24
    assert "24 new, 0 already stored" in out1
    assert "0 new, 24 already stored" in out2 and "teacher calls: 0" in out2


def test_only_rows_actually_written_are_counted_new(tmp_path):
    """An answer that another writer stored meanwhile (an import, a fill without the lock) is not 'new'."""
    cfg = TeacherConfig()
    recs = [Record(id=f"q{i}", prompt=f"p{i}", reference=str(i)) for i in range(3)]
    path = tmp_path / "anchors.sqlite"

    class RacedTeacher:
        calls = 0

        def answer(self, record: Record) -> TeacherAnswer:
            self.calls += 1
            if record.id == "q1":
                with AnchorStore(path) as other:
                    other.put_answer(anchor_key(cfg, record), record, cfg, TeacherAnswer("other writer"))
            return TeacherAnswer(record.reference)

        def judge(self, *a) -> float:
            return 0.0

    with AnchorStore(path) as store:
        s = fill_anchors(cfg, recs, store, progress=False, teacher=RacedTeacher())
        assert (s.calls, s.stored, s.already_stored) == (3, 2, 1)
        assert store.anchors_for(recs, cfg) == {"q0": "0", "q1": "other writer", "q2": "2"}


# ------------------------------------------------------------------ item 4: a dead endpoint
def test_dead_endpoint_stops_at_once_with_one_line_naming_the_url(tmp_path, capsys):
    url = free_port_url()
    with AnchorStore(tmp_path / "anchors.sqlite") as store:
        t0 = time.monotonic()
        with pytest.raises(VlrlcdError) as e:
            fill_anchors(openai_cfg(url, concurrency=1, backoff_s=0.05), text_records(24), store, progress=False)
        assert time.monotonic() - t0 < 10
        assert store.counts() == {"ok": 0, "failed": 0}
    msg = str(e.value)
    assert "\n" not in msg and url in msg and "cannot reach the teacher" in msg and "24 prompts left" in msg
    # the CLI: exit 1, one line, no traceback, and no config.yaml-only "success"
    rc = main(["anchors", "/dev/null", *overrides(tmp_path, url, text_records(5)), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert url in line and "teacher.base_url" in line


def test_connection_errors_after_the_server_answered_are_retried(server, tmp_path):
    recs = text_records(8)
    server.faults[recs[0].prompt] = ["drop", "drop"]      # fewer than 3 before any answer: retried, not fatal
    for r in recs[1:]:
        server.faults[r.prompt] = ["drop"] * 3            # a blip on every prompt once the server has answered
    with AnchorStore(tmp_path / "anchors.sqlite") as store:
        s = fill_anchors(openai_cfg(server.url, concurrency=1), recs, store, progress=False)
    assert (s.stored, s.failed, s.retries) == (8, 0, 2 + 7 * 3)


def test_anchors_exits_nonzero_when_prompts_are_left_and_says_how_many_and_why(server, tmp_path, capsys):
    recs = text_records(3)
    server.faults[recs[2].prompt] = ["500"] * 10
    rc = main(["anchors", "/dev/null", *overrides(tmp_path, server.url, recs), "teacher.max_retries=1",
               "--no-progress"])
    out = capsys.readouterr().out
    assert rc == EXIT_INCOMPLETE
    assert "incomplete: 1 of 3 prompts have no anchor (1 failed)" in out and "server_error 1" in out
    rc = main(["anchors", "/dev/null", *overrides(tmp_path, server.url, recs), "teacher.max_calls=0",
               "--no-progress"])
    out = capsys.readouterr().out
    assert rc == EXIT_INCOMPLETE and "incomplete: 1 of 3 prompts have no anchor (1 not asked, budget spent)" in out
    server.faults.clear()
    assert main(["anchors", "/dev/null", *overrides(tmp_path, server.url, recs), "--no-progress"]) == 0
    assert "incomplete" not in capsys.readouterr().out


def test_empty_answers_are_retried_within_the_run(server, tmp_path):
    recs = text_records(2)
    server.faults[recs[0].prompt] = ["empty", "empty"]
    with AnchorStore(tmp_path / "anchors.sqlite") as store:
        s = fill_anchors(openai_cfg(server.url), recs, store, progress=False)
        assert (s.stored, s.failed, s.calls) == (2, 0, 4)
        assert store.anchors_for(recs, openai_cfg(server.url))["r0"] == "answer to question 0?"


def test_train_with_no_anchor_says_what_to_run(tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"id": "elsewhere", "answer": "x"}\n', encoding="utf-8")
    data = write_jsonl(text_records(4), tmp_path / "train.jsonl")
    rc = main(["train", "/dev/null", f"run_dir={tmp_path / 'run'}", "data.task=file", f"data.train_path={data}",
               "teacher.backend=jsonl", f"teacher.jsonl_path={answers}", "student.name_or_path=tiny-text",
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and "no SFT examples" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "no prompt has an anchor" in line and "missing_id 4" in line and "vlrlcd anchors" in line


# ------------------------------------------------------------------ item 5: a store shared across runs
def test_a_shared_store_pays_once_across_runs_with_different_students(server, tmp_path, capsys):
    recs = text_records(6)
    shared = tmp_path / "cache" / "anchors.sqlite"
    common = [f"teacher.store={shared}"]
    s1 = run_anchors(load_config(None, overrides(tmp_path, server.url, recs, "run_qwen") + common
                                 + ["student.name_or_path=Qwen/Qwen2-VL-2B-Instruct"]), progress=False)
    s2 = run_anchors(load_config(None, overrides(tmp_path, server.url, recs, "run_llava") + common
                                 + ["student.name_or_path=llava-hf/llava-1.5-7b-hf", "student.quantization=4bit"]),
                     progress=False)
    assert (s1.calls, s1.stored, s1.copied) == (6, 6, 6)
    assert (s2.calls, s2.stored, s2.already_stored, s2.copied) == (0, 0, 6, 6)
    assert len(server.requests) == 6 and f"shared store {shared}" in capsys.readouterr().out
    cfg = openai_cfg(server.url)
    for run in ("run_qwen", "run_llava"):  # each run directory keeps its own copy: it stays self-contained
        with AnchorStore(tmp_path / run / "anchors.sqlite") as store:
            assert store.anchors_for(recs, cfg) == {r.id: f"answer to {r.prompt}" for r in recs}
    # other generation settings are other answers, even in the shared store
    s3 = run_anchors(load_config(None, overrides(tmp_path, server.url, recs, "run_hot") + common
                                 + ["teacher.temperature=0.7"]), progress=False)
    assert s3.calls == 6 and len(server.requests) == 12
    # default unchanged: without teacher.store nothing is shared
    s4 = run_anchors(load_config(None, overrides(tmp_path, server.url, recs, "run_plain")), progress=False)
    assert s4.calls == 6 and s4.shared_store is None
    with AnchorStore(shared) as store:
        assert store.counts() == {"ok": 12, "failed": 0}


# ------------------------------------------------------------------ item 6 / 10: the progress bar
def test_progress_bar_shows_in_flight_retrying_and_the_oldest_wait(server, tmp_path, capsys):
    recs = text_records(3)
    server.hang_s = 1.6
    server.faults[recs[0].prompt] = ["hang"]
    server.faults[recs[1].prompt] = ["429:1.2"]
    with AnchorStore(tmp_path / "anchors.sqlite") as store:
        s = fill_anchors(openai_cfg(server.url, timeout_s=5.0, max_backoff_s=5.0), recs, store, progress=True)
    assert s.stored == 3 and s.retries == 2  # the hang ends in a 500 after 1.6 s, then an answer
    err = capsys.readouterr().err  # at 1 s: the hung request open for 1 s, the 429 waiting out its Retry-After
    assert "in flight 1, retrying 1, oldest 1s" in err


def test_no_progress_draws_no_bar_and_anchors_writes_the_resolved_config(server, tmp_path, capsys):
    recs = text_records(3)
    assert main(["anchors", "/dev/null", *overrides(tmp_path, server.url, recs), "teacher.concurrency=2",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "anchors:" not in err and "prompt/s" not in err and "%|" not in err
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["teacher"]["concurrency"] == 2 and saved["teacher"]["base_url"] == server.url
    assert saved["run_dir"] == str(tmp_path / "run")


# ------------------------------------------------------------------ item 10: the store
def test_attempts_column_counts_http_attempts(server, tmp_path):
    recs = text_records(3)
    server.faults[recs[0].prompt] = ["500", "500"]
    server.faults[recs[1].prompt] = ["500"] * 5
    cfg = openai_cfg(server.url, max_retries=2)
    with AnchorStore(tmp_path / "anchors.sqlite") as store:
        fill_anchors(cfg, recs, store, progress=False)
        attempts = {r.id: store.get(anchor_key(cfg, r))["attempts"] for r in recs}
        assert attempts == {"r0": 3, "r1": 3, "r2": 1}
        fill_anchors(cfg, recs, store, progress=False)  # r1: two more 500s, then an answer
        assert store.get(anchor_key(cfg, recs[1]))["attempts"] == 3 + 3
        assert store.get(anchor_key(cfg, recs[1]))["status"] == "ok"
    assert len([q for q in server.requests if q["prompt"] == recs[1].prompt]) == 6


def damaged_store(path: Path) -> None:
    """A store whose middle pages hold garbage (what a bad disk block or a torn copy leaves)."""
    cfg = TeacherConfig()
    with AnchorStore(path) as store:
        for i in range(300):
            rec = Record(id=f"q{i}", prompt=f"prompt {i} " + "x" * 300, reference="r")
            store.put_answer(anchor_key(cfg, rec), rec, cfg, TeacherAnswer("answer " * 50))
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = con.execute("PRAGMA page_size").fetchone()[0]
    con.close()
    with open(path, "r+b") as f:
        f.seek(page * 6)
        f.write(b"\xde\xad\xbe\xef" * (page // 2))


def test_a_damaged_store_is_one_line_naming_the_file_and_what_to_do(server, tmp_path, capsys):
    recs = text_records(3)
    store_path = tmp_path / "run" / "anchors.sqlite"
    damaged_store(store_path)
    with pytest.raises(VlrlcdError) as e:
        AnchorStore(store_path)
    msg = str(e.value)
    assert str(store_path) in msg and "damaged" in msg and "move it aside" in msg and "\n" not in msg
    rc = main(["anchors", "/dev/null", *overrides(tmp_path, server.url, recs), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert str(store_path) in line and "damaged" in line
    assert server.requests == []  # nothing paid into a broken store


# ------------------------------------------------------------------ item 9 and the config's ranges
def test_a_key_in_place_of_the_variable_name_is_refused_and_never_echoed(tmp_path):
    secret = "gsk_" + uuid.uuid4().hex + "AbCd"
    data = write_jsonl(text_records(2), tmp_path / "train.jsonl")
    res = subprocess.run([sys.executable, "-m", "vlrlcd.cli", "anchors", "/dev/null", f"run_dir={tmp_path / 'run'}",
                          "data.task=file", f"data.train_path={data}", "teacher.backend=openai",
                          f"teacher.base_url={free_port_url()}", f"teacher.api_key_env={secret}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore"))
    assert res.returncode == 1 and secret not in res.stdout + res.stderr
    (line,) = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert "teacher.api_key_env" in line and "NAME of an environment variable" in line
    assert not (tmp_path / "run" / "config.yaml").exists()
    for ok in ("OPENAI_API_KEY", "GROQ_API_KEY", "my_teacher_key", "HF_TOKEN", "AZURE_OPENAI_API_KEY_2"):
        assert load_config(None, [f"teacher.api_key_env={ok}"]).teacher.api_key_env == ok
    for bad in ("sk-proj-" + "a1" * 20, "hf_" + "AbC1" * 8, "0123456789abcdef" * 2, "xai-" + "Zz9" * 10):
        with pytest.raises(VlrlcdError, match="NAME of an environment variable") as e:
            load_config(None, [f"teacher.api_key_env={bad}"])
        assert bad not in str(e.value)


@pytest.mark.parametrize("key,value,words", [
    ("timeout_s", ".nan", "> 0 (seconds)"), ("timeout_s", "0", "> 0"), ("timeout_s", "-1", "> 0"),
    ("timeout_s", ".inf", "> 0"), ("max_retries", "-1", "in [0, 100]"), ("concurrency", "0", "in [1, 1024]"),
    ("max_calls", "-5", ">= 0 (null: no budget)"), ("temperature", "-0.1", ">= 0"), ("temperature", ".nan", ">= 0"),
    ("max_tokens", "0", ">= 1"), ("backoff_s", "-0.5", ">= 0"), ("max_backoff_s", ".nan", ">= 0"),
    ("error_rate", "1.5", "in [0, 1]"), ("paraphrase_rate", ".nan", "in [0, 1]"),
])
def test_teacher_numbers_out_of_range_are_one_line_naming_key_value_and_range(key, value, words):
    with pytest.raises(VlrlcdError) as e:
        load_config(None, [f"teacher.{key}={value}"])
    msg = str(e.value)
    shown = yaml.safe_load(value)
    assert msg.startswith(f"teacher.{key} must be {words}")
    assert msg.endswith((f"got {shown!r}", f"got {float(shown)!r}"))
    assert "\n" not in msg
