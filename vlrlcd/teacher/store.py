"""The anchor store: every teacher answer (and judge score) in SQLite, committed as it arrives.

Keyed by sha256 of (backend, model, generation parameters, prompt, image bytes), so a prompt is paid
for once, whatever its record id or run. WAL mode with synchronous=FULL: a killed process loses at
most the answers it had not yet received. Failures are stored with their error and retried by the
next run; a failure never overwrites an answer; `attempts` counts the requests a prompt took, over runs.
Nothing secret is stored: the config's API key is only ever the *name* of an environment variable, and
it is not part of the key either. A damaged file is one VlrlcdError naming it and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from vlrlcd.datasets.records import Record
from vlrlcd.errors import VlrlcdError
from vlrlcd.files import sha256_of
from vlrlcd.teacher.base import TeacherAnswer, user_text
from vlrlcd.teacher.config import TeacherConfig

_SCHEMA = """
CREATE TABLE IF NOT EXISTS anchors (
    key TEXT PRIMARY KEY,
    record_id TEXT NOT NULL,
    backend TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    image_sha256 TEXT,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    text TEXT,
    error_kind TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS judgements (
    key TEXT PRIMARY KEY,
    record_id TEXT NOT NULL,
    candidate TEXT NOT NULL,
    reference TEXT,
    score REAL NOT NULL,
    updated REAL NOT NULL
);
"""


@lru_cache(maxsize=65536)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_of(path)


def file_sha256(path: str | Path, what: str) -> str:
    """sha256 of a file's bytes (cached while size and mtime hold); a missing file names `what`."""
    try:
        st = os.stat(path)
    except OSError:
        raise VlrlcdError(f"{what}: file {path} not found") from None
    return _file_sha256(str(path), st.st_size, st.st_mtime_ns)


def image_sha256(record: Record) -> str | None:
    if record.image is None:
        return None
    return file_sha256(record.image, f"record '{record.id}' image")


def generation_params(cfg: TeacherConfig, record: Record) -> dict:
    """What, besides prompt and image, decides the teacher's answer (so belongs in the key)."""
    params: dict = {
        "temperature": cfg.temperature,
        "max_tokens": cfg.max_tokens,
        "system_prompt": cfg.system_prompt,
    }
    if cfg.backend == "oracle":
        params.update(seed=cfg.seed, error_rate=cfg.error_rate, paraphrase_rate=cfg.paraphrase_rate,
                      reference=record.reference, distractors=record.meta.get("distractors"))
    elif cfg.backend == "jsonl":
        # Answers are matched by id; a changed answer file is a new teacher.
        src = file_sha256(cfg.jsonl_path, "teacher.jsonl_path") if cfg.jsonl_path else None
        params.update(record_id=record.id, answers_sha256=src)
    return params


def anchor_key(cfg: TeacherConfig, record: Record) -> str:
    """sha256 of (backend, model, generation params, prompt with choices, image bytes)."""
    material = [cfg.backend, cfg.model, generation_params(cfg, record), user_text(record), image_sha256(record)]
    return hashlib.sha256(json.dumps(material, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def judgement_key(cfg: TeacherConfig, record: Record, candidate: str, reference: str | None) -> str:
    material = ["judge", anchor_key(cfg, record), candidate, reference]
    return hashlib.sha256(json.dumps(material, ensure_ascii=False).encode()).hexdigest()


class AnchorStore:
    """SQLite store of anchors and judge scores; safe to share between threads of one process."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise VlrlcdError(f"anchor store {self.path}: cannot create its directory ({e.strerror or e})") from None
        try:
            self._db = sqlite3.connect(str(self.path), timeout=30.0, check_same_thread=False)
        except sqlite3.Error as e:
            raise self._error(e) from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            problems = [row[0] for row in self._db.execute("PRAGMA quick_check(3)")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(problems))
            self._db.executescript(_SCHEMA)
            self._db.commit()
        except sqlite3.Error as e:
            self._db.close()
            raise self._error(e) from None

    def _error(self, e: sqlite3.Error) -> VlrlcdError:
        """One line naming the file and what to do: a damaged file is moved aside, anything else is checked."""
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if type(e) is sqlite3.DatabaseError or "malformed" in msg or "not a database" in msg:
            return VlrlcdError(
                f"anchor store {self.path} is damaged ({msg}): move it aside (mv {self.path} {self.path}.damaged) "
                f"and run `vlrlcd anchors CONFIG` to ask the teacher again; `sqlite3 {self.path}.damaged .recover` "
                "may save its answers first"
            )
        return VlrlcdError(f"anchor store {self.path}: {msg}; check the file, its directory's permissions and "
                           "free disk space")

    # -- lifecycle
    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "AnchorStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write(self, sql: str, args: tuple) -> int:
        with self._lock:
            try:
                cur = self._db.execute(sql, args)
                self._db.commit()
            except sqlite3.Error as e:
                raise self._error(e) from None
            return cur.rowcount

    def _query(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock:
            try:
                cur = self._db.execute(sql, args)
                names = [d[0] for d in cur.description]
                return [dict(zip(names, row)) for row in cur.fetchall()]
            except sqlite3.Error as e:
                raise self._error(e) from None

    # -- anchors
    def get(self, key: str) -> dict | None:
        rows = self._query("SELECT * FROM anchors WHERE key = ?", (key,))
        return rows[0] if rows else None

    def statuses(self, keys: Iterable[str]) -> dict[str, str]:
        """key -> 'ok' | 'failed' for the keys that have a row."""
        keys = list(dict.fromkeys(keys))
        out: dict[str, str] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            marks = ",".join("?" * len(chunk))
            for r in self._query(f"SELECT key, status FROM anchors WHERE key IN ({marks})", tuple(chunk)):
                out[r["key"]] = r["status"]
        return out

    def anchors_for(self, records: list[Record], cfg: TeacherConfig) -> dict[str, str]:
        """record id -> anchor text, for the records whose prompt has a stored answer."""
        keys = {r.id: anchor_key(cfg, r) for r in records}
        texts: dict[str, str] = {}
        uniq = list(dict.fromkeys(keys.values()))
        for i in range(0, len(uniq), 500):
            chunk = uniq[i : i + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._query(f"SELECT key, text FROM anchors WHERE status = 'ok' AND key IN ({marks})", tuple(chunk))
            texts.update({r["key"]: r["text"] for r in rows})
        return {rid: texts[k] for rid, k in keys.items() if k in texts}

    def missing(self, records: list[Record], cfg: TeacherConfig) -> list[Record]:
        """The records whose prompt has no stored answer (failed ones included)."""
        have = self.anchors_for(records, cfg)
        return [r for r in records if r.id not in have]

    def put_answer(self, key: str, record: Record, cfg: TeacherConfig, answer: TeacherAnswer,
                   attempts: int = 1) -> bool:
        """Store an answer (replacing a stored failure) and commit at once; False when one was stored already.

        `attempts` is the number of requests this answer took; the column sums them over runs."""
        return self._write(
            "INSERT INTO anchors (key, record_id, backend, model, prompt, image_sha256, status, text, attempts,"
            " prompt_tokens, completion_tokens, updated) VALUES (?, ?, ?, ?, ?, ?, 'ok', ?, ?, ?, ?, ?)"
            " ON CONFLICT(key) DO UPDATE SET status = 'ok', text = excluded.text, error_kind = NULL, error = NULL,"
            " attempts = anchors.attempts + excluded.attempts, prompt_tokens = excluded.prompt_tokens,"
            " completion_tokens = excluded.completion_tokens, updated = excluded.updated"
            " WHERE anchors.status != 'ok'",
            (key, record.id, cfg.backend, cfg.model, user_text(record), image_sha256(record), answer.text, attempts,
             answer.prompt_tokens, answer.completion_tokens, time.time()),
        ) > 0

    def put_failure(self, key: str, record: Record, cfg: TeacherConfig, kind: str, message: str,
                    attempts: int = 1) -> bool:
        """Record a failed prompt and its `attempts` requests (retried by the next run); never overwrites an answer."""
        return self._write(
            "INSERT INTO anchors (key, record_id, backend, model, prompt, image_sha256, status, error_kind, error,"
            " attempts, updated) VALUES (?, ?, ?, ?, ?, ?, 'failed', ?, ?, ?, ?)"
            " ON CONFLICT(key) DO UPDATE SET error_kind = excluded.error_kind, error = excluded.error,"
            " attempts = anchors.attempts + excluded.attempts, updated = excluded.updated"
            " WHERE anchors.status = 'failed'",
            (key, record.id, cfg.backend, cfg.model, user_text(record), image_sha256(record), kind, message[:2000],
             attempts, time.time()),
        ) > 0

    def copy_answers(self, src: "AnchorStore", keys: Iterable[str]) -> int:
        """Copy `src`'s stored answers for `keys` into this store (answers here win); returns how many were new."""
        keys = list(dict.fromkeys(keys))
        cols = ("key, record_id, backend, model, prompt, image_sha256, status, text, attempts, prompt_tokens,"
                " completion_tokens, updated")
        rows: list[tuple] = []
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            marks = ",".join("?" * len(chunk))
            got = src._query(f"SELECT {cols} FROM anchors WHERE status = 'ok' AND key IN ({marks})", tuple(chunk))
            rows += [tuple(r.values()) for r in got]
        with self._lock:
            try:
                before = self._db.total_changes
                self._db.executemany(
                    f"INSERT INTO anchors ({cols}) VALUES ({','.join('?' * 12)}) ON CONFLICT(key) DO UPDATE SET"
                    " status = 'ok', text = excluded.text, error_kind = NULL, error = NULL,"
                    " prompt_tokens = excluded.prompt_tokens, completion_tokens = excluded.completion_tokens,"
                    " updated = excluded.updated WHERE anchors.status != 'ok'",
                    rows,
                )
                self._db.commit()
            except sqlite3.Error as e:
                raise self._error(e) from None
            return self._db.total_changes - before

    def failures(self) -> list[dict]:
        return self._query("SELECT key, record_id, error_kind, error, attempts FROM anchors WHERE status = 'failed'")

    def counts(self) -> dict[str, int]:
        rows = self._query("SELECT status, COUNT(*) AS n FROM anchors GROUP BY status")
        out = {"ok": 0, "failed": 0}
        out.update({r["status"]: r["n"] for r in rows})
        return out

    # -- judge scores
    def get_judgement(self, cfg: TeacherConfig, record: Record, candidate: str, reference: str | None = None) -> float | None:
        rows = self._query("SELECT score FROM judgements WHERE key = ?", (judgement_key(cfg, record, candidate, reference),))
        return rows[0]["score"] if rows else None

    def put_judgement(self, cfg: TeacherConfig, record: Record, candidate: str, reference: str | None, score: float) -> None:
        self._write(
            "INSERT OR IGNORE INTO judgements (key, record_id, candidate, reference, score, updated)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (judgement_key(cfg, record, candidate, reference), record.id, candidate, reference, float(score), time.time()),
        )
