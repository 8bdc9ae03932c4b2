"""The openai backend and the anchor runner against a real HTTP server on 127.0.0.1 with injected faults."""

from __future__ import annotations

import base64
import io
import logging
import random
from pathlib import Path

import pytest
from helpers_http import KEY_ENV, FakeChatServer, api_key, server  # noqa: F401 (fixtures)
from PIL import Image

from vlrlcd.config import load_config
from vlrlcd.datasets.records import Record, write_jsonl
from vlrlcd.errors import VlrlcdError
from vlrlcd.teacher.base import TeacherCallError
from vlrlcd.teacher.config import TeacherConfig
from vlrlcd.teacher.retry import retry_delay
from vlrlcd.teacher.runner import CachedJudge, fill_anchors, run_anchors
from vlrlcd.teacher.store import AnchorStore


def openai_cfg(server: FakeChatServer, **kw) -> TeacherConfig:
    base = dict(backend="openai", base_url=server.url, model="teacher-m", api_key_env=KEY_ENV, timeout_s=0.5,
                backoff_s=0.01, max_retries=3, concurrency=4)
    base.update(kw)
    return TeacherConfig(**base)


def text_records(n: int) -> list[Record]:
    return [Record(id=f"r{i}", prompt=f"question {i}?") for i in range(n)]


def per_prompt(server: FakeChatServer, prompt: str) -> list[dict]:
    return [r for r in server.requests if r["prompt"] == prompt]


def test_n_prompts_make_n_calls_and_a_rerun_makes_none(server, tmp_path):
    cfg = openai_cfg(server)
    recs = text_records(24)
    with AnchorStore(tmp_path / "anchors.sqlite") as store:
        s = fill_anchors(cfg, recs, store, progress=False)
        assert (s.calls, s.stored, s.already_stored, s.failed, s.remaining) == (24, 24, 0, 0, 0)
        assert len(server.requests) == 24 and server.total_successes() == 24
        assert all(n == 1 for n in server.successes.values())
        # usage: prompt "question i?" is 2 words, answer "answer to question i?" 4 words
        assert (s.prompt_tokens, s.completion_tokens) == (48, 96)
        assert store.anchors_for(recs, cfg) == {r.id: f"answer to {r.prompt}" for r in recs}
        again = fill_anchors(cfg, recs, store, progress=False)
        assert (again.calls, again.stored, again.already_stored) == (0, 0, 24)
        assert len(server.requests) == 24
    body = server.requests[0]["body"]
    assert body["model"] == "teacher-m" and body["max_tokens"] == cfg.max_tokens
    assert body["messages"][0] == {"role": "system", "content": cfg.system_prompt}


def test_retry_delay_bounds():
    cfg = TeacherConfig(backoff_s=0.5, max_backoff_s=3.0)
    rng = random.Random(0)
    plain = TeacherCallError("server_error", "x", retryable=True)
    for attempt, cap in ((0, 0.5), (1, 1.0), (2, 2.0), (5, 3.0)):
        d = [retry_delay(plain, attempt, cfg, rng) for _ in range(50)]
        assert all(cap / 2 <= x <= cap for x in d) and len(set(d)) > 1  # jittered, doubling, capped
    told = TeacherCallError("rate_limit", "x", retryable=True, retry_after=2.0)
    assert all(2.0 <= retry_delay(told, 0, cfg, rng) <= 2.2 for _ in range(50))
    assert retry_delay(TeacherCallError("rate_limit", "x", True, retry_after=10.0), 0, cfg, rng) is None


def test_faults_are_retried_within_bounds_or_recorded_and_never_lose_answers(server, tmp_path):
    cfg = openai_cfg(server)
    recs = text_records(6)
    p = [r.prompt for r in recs]
    server.faults.update({p[0]: ["429:1"], p[1]: ["500", "500"], p[2]: ["hang"], p[3]: ["malformed"],
                          p[4]: ["empty"] * 4, p[5]: ["500"] * 5})
    with AnchorStore(tmp_path / "anchors.sqlite") as store:
        s = fill_anchors(cfg, recs, store, progress=False)
        assert s.stored == 4 and s.failures_by_kind == {"empty": 1, "server_error": 1}
        # empty answers are retried like 5xx, within teacher.max_retries=3
        assert s.calls == 2 + 3 + 2 + 2 + 4 + 4 and s.retries == 1 + 2 + 1 + 1 + 3 + 3
        assert [len(per_prompt(server, q)) for q in p] == [2, 3, 2, 2, 4, 4]
        waited = per_prompt(server, p[0])[1]["t"] - per_prompt(server, p[0])[0]["t"]
        assert 1.0 <= waited < 2.0  # Retry-After: 1 honoured
        first = store.anchors_for(recs, cfg)
        assert set(first) == {"r0", "r1", "r2", "r3"}
        assert {f["error_kind"] for f in store.failures()} == {"empty", "server_error"}
        assert "empty" in str(s) and "server_error" in str(s)
        # the next run retries only the failures (p5 still has one 500 queued) and keeps the rest
        again = fill_anchors(cfg, recs, store, progress=False)
        assert (again.stored, again.already_stored, again.failed) == (2, 4, 0)
        assert [len(per_prompt(server, q)) for q in p] == [2, 3, 2, 2, 5, 6]
        final = store.anchors_for(recs, cfg)
        assert final == {r.id: f"answer to {r.prompt}" for r in recs}
        assert {k: final[k] for k in first} == first and store.failures() == []


def test_fatal_auth_error_stops_the_run_with_a_clear_message(server, tmp_path):
    cfg = openai_cfg(server, concurrency=2)
    server.global_faults.extend(["401"] * 50)
    with AnchorStore(tmp_path / "anchors.sqlite") as store:
        with pytest.raises(VlrlcdError, match=f"environment variable {KEY_ENV}"):
            fill_anchors(cfg, text_records(20), store, progress=False)
        assert len(server.requests) <= 2 and store.counts() == {"ok": 0, "failed": 0}


def file_config(tmp_path: Path, server: FakeChatServer, recs: list[Record], *extra: str):
    data = write_jsonl(recs, tmp_path / "data" / "train.jsonl")
    return load_config(None, [
        f"run_dir={tmp_path / 'run'}", "data.task=file", f"data.train_path={data}",
        "teacher.backend=openai", f"teacher.base_url={server.url}", "teacher.model=teacher-m",
        f"teacher.api_key_env={KEY_ENV}", "teacher.timeout_s=0.5", "teacher.backoff_s=0.01", *extra,
    ])


def test_budget_stops_cleanly_and_a_larger_budget_finishes(server, tmp_path, capsys):
    recs = text_records(10)
    s = run_anchors(file_config(tmp_path, server, recs, "teacher.max_calls=4", "teacher.concurrency=2"))
    out = capsys.readouterr().out
    assert (s.calls, s.stored, s.remaining) == (4, 4, 6) and s.budget_exhausted
    assert "6 prompts left" in out and "teacher.max_calls" in out
    assert len(server.requests) == 4
    s2 = run_anchors(file_config(tmp_path, server, recs, "teacher.max_calls=100"))
    assert (s2.calls, s2.stored, s2.already_stored, s2.remaining) == (6, 6, 4, 0) and not s2.budget_exhausted
    assert "prompts left" not in capsys.readouterr().out
    assert server.total_successes() == 10 and all(n == 1 for n in server.successes.values())


def test_retries_count_against_the_budget(server, tmp_path):
    cfg = openai_cfg(server, max_calls=3, concurrency=1)
    recs = text_records(2)
    server.faults[recs[0].prompt] = ["500", "500"]
    with AnchorStore(tmp_path / "anchors.sqlite") as store:
        s = fill_anchors(cfg, recs, store, progress=False)
    assert len(server.requests) == 3 and (s.calls, s.stored, s.remaining) == (3, 1, 1)


def test_api_key_is_in_no_file_under_the_run_dir_and_no_log_line(server, tmp_path, capsys, caplog, api_key):
    caplog.set_level(logging.DEBUG)
    recs = text_records(6)
    server.faults[recs[0].prompt] = ["500echo"] * 4  # a proxy that echoes the Authorization header
    server.faults[recs[1].prompt] = ["429:0", "hang"]
    cfg = file_config(tmp_path, server, recs, "teacher.max_retries=3")
    s = run_anchors(cfg)
    assert s.stored == 5 and s.failures_by_kind == {"server_error": 1}
    with AnchorStore(Path(cfg.run_dir) / "anchors.sqlite") as store:
        assert "Bearer ***" in store.failures()[0]["error"]
    assert server.requests[0]["headers"]["authorization"] == f"Bearer {api_key}"  # it was used
    files = [f for f in Path(cfg.run_dir).rglob("*") if f.is_file()]
    assert "anchors.sqlite" in {f.name for f in files}
    for f in files:
        assert api_key.encode() not in f.read_bytes(), f
    captured = capsys.readouterr()
    assert caplog.records  # the SDK and httpx did log at DEBUG
    assert api_key not in caplog.text and api_key not in captured.out + captured.err


def test_images_reach_the_server_as_png_of_the_decoded_pixels_never_the_files_bytes(server, tmp_path):
    Image.new("RGB", (12, 10), (200, 30, 40)).save(tmp_path / "a.png")
    with open(tmp_path / "a.png", "ab") as f:
        f.write(b"TRAILER-AFTER-IEND private notes")  # bytes after the image data never reach the teacher
    Image.new("RGB", (16, 16), (10, 200, 40)).save(tmp_path / "b.jpg", quality=90)
    bmp = Image.new("RGB", (5, 7), (1, 2, 3))
    bmp.save(tmp_path / "c.bmp")
    recs = [Record(id="a", prompt="colour of a?", image=str(tmp_path / "a.png")),
            Record(id="b", prompt="colour of b?", image=str(tmp_path / "b.jpg")),
            Record(id="c", prompt="colour of c?", image=str(tmp_path / "c.bmp")),
            Record(id="t", prompt="no image?")]
    with AnchorStore(tmp_path / "anchors.sqlite") as store:
        assert fill_anchors(openai_cfg(server), recs, store, progress=False).stored == 4
    by_id = {r.id: r for r in recs}
    by_prompt = {r["prompt"]: r["body"]["messages"][-1]["content"] for r in server.requests}
    assert by_prompt["no image?"] == "no image?"
    for rec in ("a", "b", "c"):
        content = by_prompt[f"colour of {rec}?"]
        (img_part,) = [c for c in content if c["type"] == "image_url"]
        url = img_part["image_url"]["url"]
        head, b64 = url.split(",", 1)
        assert head == "data:image/png;base64"
        data = base64.b64decode(b64, validate=True)
        original = Path(by_id[rec].image).read_bytes()
        assert data != original and b"TRAILER" not in data
        with Image.open(io.BytesIO(data)) as sent, Image.open(by_id[rec].image) as im:
            assert sent.format == "PNG" and sent.size == im.size
            assert list(sent.convert("RGB").getdata()) == list(im.convert("RGB").getdata())


def test_judge_through_the_server_is_cached(server, tmp_path):
    def grader(prompt: str, body: dict) -> str:
        return "7" if "Candidate answer: blue-ish" in prompt else "10"

    server.answer = grader
    cfg = openai_cfg(server)
    rec = Record(id="j", prompt="What colour?", reference="blue")
    with AnchorStore(tmp_path / "anchors.sqlite") as store:
        judge = CachedJudge(cfg, store)
        assert judge(rec, "blue-ish") == pytest.approx(0.7) and judge(rec, "blue") == 1.0
        assert judge(rec, "blue-ish") == pytest.approx(0.7)
        assert len(server.requests) == 2 and judge.calls == 2
    prompt = server.requests[0]["prompt"]
    assert "Reference answer: blue" in prompt and "What colour?" in prompt
