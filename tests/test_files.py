"""vlrlcd.files: the one atomic write (old file or whole new file, never part; nothing left behind on error;
fsync where asked), the one JSON-lines reader (line numbers, bad lines carried, not raised), and the one
epoch order (reshuffled passes, a function of the seed only)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vlrlcd import files
from vlrlcd.datasets.records import iter_json_lines
from vlrlcd.errors import VlrlcdError
from vlrlcd.files import atomic_open, atomic_write, json_lines, text_lines, write_json
from vlrlcd.training.order import epoch_order

ROOT = Path(__file__).resolve().parents[1]


def test_atomic_write_replaces_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("old", encoding="utf-8")
    assert atomic_write(path, "new ✓") == path
    assert path.read_text(encoding="utf-8") == "new ✓"
    write_json(path, {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    atomic_write(path, b"\x89PNG bytes")
    assert path.read_bytes() == b"\x89PNG bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_an_error_inside_the_block_keeps_the_old_file_and_removes_the_temp(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text('{"old": true}', encoding="utf-8")
    with pytest.raises(ZeroDivisionError):
        with atomic_open(path) as f:
            f.write('{"new": ')
            1 / 0
    assert path.read_text(encoding="utf-8") == '{"old": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_fsync_reaches_the_file_and_its_folder_only_when_asked(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else str(fd))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write(tmp_path / "a.txt", "x")
    assert len(synced) == 2 and synced[0].endswith(".tmp") and synced[1] == str(tmp_path)
    synced.clear()
    atomic_write(tmp_path / "b.txt", "x", fsync=False)
    assert synced == []


def test_a_process_killed_mid_write_leaves_the_old_file_whole(tmp_path):
    """SIGKILL while the new content is half written: readers still see the complete old file."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n', encoding="utf-8")
    child = textwrap.dedent(f"""
        import sys, time
        from vlrlcd.files import atomic_open
        with atomic_open({str(path)!r}) as f:
            f.write('{{"step": 1}}\\n{{"st')
            f.flush()
            print("half", flush=True)
            time.sleep(60)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "half"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert path.read_text(encoding="utf-8") == '{"step": 1}\n'
    assert [line.value for line in json_lines(path)] == [{"step": 1}]


def test_json_lines_numbers_lines_and_carries_bad_ones(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(files.BOM + b'{"a": 1}\r\n\n  \n[2]\n{"b": \n{"c": "\xff"}\n{"cut')
    lines = list(json_lines(path))
    assert [(x.lineno, x.value) for x in lines] == [(1, {"a": 1}), (4, [2]), (5, None), (6, {"c": "\ufffd"}),
                                                    (7, None)]
    assert lines[2].error == "Expecting value at column 7" and lines[2].text == '{"b": '
    assert lines[4].error.startswith("Unterminated string starting at column 2")
    assert [n for n, _ in text_lines(path)] == [1, 4, 5, 6, 7]


def test_the_strict_reader_names_file_and_line(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text('{"id": "q1"}\n\n{"id": "q2"}\n', encoding="utf-8")
    assert list(iter_json_lines(good)) == [(1, {"id": "q1"}), (3, {"id": "q2"})]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"id": "q1"}\n{"id": q2}\n', encoding="utf-8")
    with pytest.raises(VlrlcdError, match=r"b.jsonl:2: not valid JSON \(Expecting value at column 8\)"):
        list(iter_json_lines(bad))
    latin = tmp_path / "c.jsonl"
    latin.write_bytes(b'{"id": "q1"}\n{"answer": "caf\xe9"}\n')   # Latin-1, not UTF-8: was a UnicodeDecodeError
    with pytest.raises(VlrlcdError, match=r"c.jsonl:2: not valid UTF-8"):
        list(iter_json_lines(latin))
    with pytest.raises(VlrlcdError, match=r"teacher.jsonl_path .*nope.jsonl: no such file"):
        list(iter_json_lines(tmp_path / "nope.jsonl", "teacher.jsonl_path "))


def test_epoch_order_is_reshuffled_passes_cut_to_length():
    order = epoch_order(range(5), 12, seed=3)
    assert order == [0, 2, 3, 4, 1, 1, 3, 2, 0, 4, 1, 0]   # the order the three loops it replaces gave
    assert sorted(order[:5]) == sorted(order[5:10]) == list(range(5))
    assert epoch_order("abc", 7, seed=0) == ["a", "c", "b", "c", "b", "a", "a"]
    assert epoch_order(range(5), 12, seed=4) != order and epoch_order([], 3, seed=0) == []


def test_sft_visits_items_in_the_epoch_order():
    from vlrlcd.training.sft import sft_order

    assert sft_order(list("abcd"), 1.5, seed=2) == epoch_order(list("abcd"), 6, seed=2)
    assert sft_order(list("abcd"), 0.01, seed=2) == epoch_order(list("abcd"), 1, seed=2)   # at least one item


def test_rl_order_is_whole_reshuffled_epochs_covering_the_steps():
    """rl_order through epoch_order gives exactly the order the RL loop always used (so data digests, and
    therefore resumes, are unchanged): whole epochs, each reshuffled by one Random(seed), until steps·batch."""
    import random

    from vlrlcd.training.rl import rl_order

    def old(pool, steps, batch, seed):
        rng, order = random.Random(seed), []
        while len(order) < steps * batch:
            epoch = list(pool)
            rng.shuffle(epoch)
            order.extend(epoch)
        return order

    for n, steps, batch in [(5, 1, 2), (5, 3, 2), (7, 7, 1), (4, 2, 2), (3, 10, 4)]:
        pool = list(range(n))
        assert rl_order(pool, steps, batch, 11) == old(pool, steps, batch, 11)
