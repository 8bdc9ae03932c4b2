"""The anchor store: keys, WAL, failures never overwrite answers, JSONL exchange, cached judgements."""

from __future__ import annotations

import dataclasses
import sqlite3

import pytest
from PIL import Image

from vlrlcd.datasets.records import Record
from vlrlcd.errors import VlrlcdError
from vlrlcd.teacher.base import TeacherAnswer, TeacherCallError
from vlrlcd.teacher.config import TeacherConfig
from vlrlcd.teacher.oracle import OracleTeacher
from vlrlcd.teacher.runner import CachedJudge, fill_anchors
from vlrlcd.teacher.store import AnchorStore, anchor_key


def image(path, colour) -> str:
    Image.new("RGB", (8, 8), colour).save(path)
    return str(path)


def test_key_covers_backend_model_params_prompt_image_and_nothing_else(tmp_path):
    cfg = TeacherConfig(backend="openai", model="m")
    rec = Record(id="a", prompt="What colour?", image=image(tmp_path / "a.png", "red"))
    k = anchor_key(cfg, rec)
    assert len(k) == 64
    # not in the key: record id, run-time knobs
    assert anchor_key(cfg, dataclasses.replace(rec, id="b")) == k
    for knob in ({"concurrency": 9}, {"max_calls": 3}, {"timeout_s": 1.0}, {"max_retries": 0}, {"api_key_env": "OTHER"}):
        assert anchor_key(dataclasses.replace(cfg, **knob), rec) == k, knob
    # in the key
    for change in ({"backend": "hf"}, {"model": "m2"}, {"temperature": 0.7}, {"max_tokens": 5}, {"system_prompt": "x"}):
        assert anchor_key(dataclasses.replace(cfg, **change), rec) != k, change
    assert anchor_key(cfg, dataclasses.replace(rec, prompt="What color?")) != k
    assert anchor_key(cfg, dataclasses.replace(rec, choices=["red", "blue"])) != k
    same_bytes = tmp_path / "copy.png"
    same_bytes.write_bytes((tmp_path / "a.png").read_bytes())
    assert anchor_key(cfg, dataclasses.replace(rec, image=str(same_bytes))) == k
    assert anchor_key(cfg, dataclasses.replace(rec, image=image(tmp_path / "b.png", "blue"))) != k
    with pytest.raises(VlrlcdError, match="record 'a' image"):
        anchor_key(cfg, dataclasses.replace(rec, image=str(tmp_path / "gone.png")))


def test_store_uses_wal_and_failures_never_overwrite_answers(tmp_path):
    cfg = TeacherConfig()
    rec = Record(id="a", prompt="p", reference="r")
    key = anchor_key(cfg, rec)
    with AnchorStore(tmp_path / "s.sqlite") as store:
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        store.put_failure(key, rec, cfg, "timeout", "slow")
        store.put_failure(key, rec, cfg, "server_error", "boom")
        assert store.get(key)["status"] == "failed" and store.get(key)["error_kind"] == "server_error"
        assert store.get(key)["attempts"] == 2
        assert store.anchors_for([rec], cfg) == {} and store.missing([rec], cfg) == [rec]
        store.put_answer(key, rec, cfg, TeacherAnswer("first", 3, 1))
        store.put_failure(key, rec, cfg, "timeout", "late")
        store.put_answer(key, rec, cfg, TeacherAnswer("second"))
        assert store.anchors_for([rec], cfg) == {"a": "first"}
        assert store.get(key)["error"] is None and store.counts() == {"ok": 1, "failed": 0}
    # committed: another connection sees it
    row = sqlite3.connect(tmp_path / "s.sqlite").execute("SELECT text FROM anchors").fetchall()
    assert row == [("first",)]


def test_anchors_for_maps_every_record_with_the_same_prompt(tmp_path):
    cfg = TeacherConfig()
    recs = [Record(id=f"r{i}", prompt=f"q{i % 3}", reference=f"a{i % 3}") for i in range(7)]
    teacher = OracleTeacher(cfg)
    with AnchorStore(tmp_path / "s.sqlite") as store:
        s = fill_anchors(cfg, recs, store, progress=False, teacher=teacher)
        assert (s.prompts, s.calls, s.stored, teacher.calls) == (3, 3, 3, 3)
        assert store.anchors_for(recs, cfg) == {f"r{i}": f"a{i % 3}" for i in range(7)}
        assert store.missing(recs + [Record(id="new", prompt="q9", reference="a9")], cfg)[0].id == "new"


class CountingJudge:
    def __init__(self, faults: list[TeacherCallError] | None = None):
        self.calls, self.faults = 0, list(faults or [])

    def answer(self, record):
        raise AssertionError("not used")

    def judge(self, record, candidate, reference=None):
        self.calls += 1
        if self.faults:
            raise self.faults.pop(0)
        return 0.25 if candidate == "meh" else 1.0


def test_judgements_are_stored_and_never_paid_twice(tmp_path):
    cfg = TeacherConfig(backend="openai", model="judge", backoff_s=0.0)
    rec = Record(id="a", prompt="What colour?", reference="red")
    teacher = CountingJudge([TeacherCallError("server_error", "boom", retryable=True)])
    with AnchorStore(tmp_path / "s.sqlite") as store:
        assert store.get_judgement(cfg, rec, "meh") is None
        judge = CachedJudge(cfg, store, teacher)
        assert judge(rec, "meh") == 0.25 and judge(rec, "meh") == 0.25
        assert judge(rec, "red") == 1.0
        assert teacher.calls == 3 and judge.calls == 3  # one retry for the first, none for the repeat
        assert store.get_judgement(cfg, rec, "meh") == 0.25
        assert store.get_judgement(cfg, rec, "meh", reference="blue") is None
        store.put_judgement(cfg, rec, "x", "blue", 0.5)
        assert store.get_judgement(cfg, rec, "x", "blue") == 0.5
    with AnchorStore(tmp_path / "s.sqlite") as store:
        again = CountingJudge()
        assert CachedJudge(cfg, store, again)(rec, "meh") == 0.25 and again.calls == 0
