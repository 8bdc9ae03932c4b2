"""Synthetic generators: determinism, right answers (checked on the pixels), split disjointness, caching."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from vlrlcd.config import load_config
from vlrlcd.datasets import synthetic
from vlrlcd.datasets.load import load_splits
from vlrlcd.datasets.records import read_jsonl, write_jsonl
from vlrlcd.errors import VlrlcdError


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("gen", [synthetic.shapes_vqa, synthetic.shapes_caption])
def test_shapes_are_byte_identical_for_the_same_seed(tmp_path, gen):
    a = gen(12, 3, tmp_path / "a")
    b = gen(12, 3, tmp_path / "b")
    write_jsonl(a, tmp_path / "a" / "d.jsonl")
    write_jsonl(b, tmp_path / "b" / "d.jsonl")
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(fa) == 13 and fa == fb
    c = gen(12, 4, tmp_path / "c")
    assert [r.prompt + r.reference for r in c] != [r.prompt + r.reference for r in a]


def test_arithmetic_is_deterministic_and_right():
    a = synthetic.arithmetic(200, 5, ops=("+", "-", "*"), max_operand=9)
    assert [r.to_json() for r in a] == [r.to_json() for r in synthetic.arithmetic(200, 5, ops=("+", "-", "*"), max_operand=9)]
    ops = set()
    for r in a:
        expr = r.prompt.removeprefix("What is ").removesuffix("?")
        x, op, y = expr.split()
        ops.add(op)
        assert 0 <= int(x) <= 9 and 0 <= int(y) <= 9
        assert r.reference == str(eval(expr))  # noqa: S307 - our own two-integer expression
        assert int(r.reference) >= 0 and r.image is None
        assert r.meta["distractors"] and r.reference not in r.meta["distractors"]
        assert len(set(r.meta["distractors"])) == len(r.meta["distractors"])
    assert ops == {"+", "-", "*"}
    assert synthetic.arithmetic(3, 0)[0].prompt == "What is 9 - 8?"  # pinned: a generator change must bump GENERATOR_VERSION


def test_a_longer_run_extends_a_shorter_one(tmp_path):
    short = synthetic.shapes_vqa(5, 1, tmp_path / "s")
    long = synthetic.shapes_vqa(9, 1, tmp_path / "l")
    assert [r.to_json() | {"image": None} for r in short] == [r.to_json() | {"image": None} for r in long[:5]]


def test_vqa_answers_match_the_drawn_pixels(tmp_path):
    recs = synthetic.shapes_vqa(80, 0, tmp_path, max_objects=4)
    counts = {q: 0 for q in synthetic.QTYPES}
    for r in recs:
        m = r.meta
        counts[m["qtype"]] += 1
        objs = m["objects"]
        im = Image.open(r.image)
        assert im.mode == "RGB" and im.size == (32, 32)
        for o in objs:  # the centre pixel has the object's colour
            assert im.getpixel((o["x"], o["y"])) == synthetic.COLORS[o["color"]]
        # every drawn pixel is background or one of the objects' colours, and each colour is visible (>= 40 px)
        colors = {synthetic.COLORS[o["color"]]: o for o in objs}
        hist = {c: n for n, c in im.getcolors(1024)}
        assert set(hist) <= set(colors) | {synthetic.BACKGROUND}
        assert all(hist.get(c, 0) >= 40 for c in colors)
        assert len({o["color"] for o in objs}) == len(objs)
        assert r.reference not in m["distractors"] and r.reference == r.reference.lower() and " " not in r.reference
        if m["qtype"] == "count":
            assert r.reference == str(len(objs)) == str(len(hist) - 1)
        elif m["qtype"] == "color":
            target = [o for o in objs if len(objs) == 1 or f" {o['shape']}?" in r.prompt]
            assert len(target) == 1 and r.reference == target[0]["color"]
        elif m["qtype"] == "shape":
            (o,) = [o for o in objs if o["color"] in r.prompt]
            assert r.reference == o["shape"]
        else:
            (o,) = [o for o in objs if o["color"] in r.prompt]
            # all pixels of that colour lie on the answered half of the image
            xs = [x for x in range(32) for y in range(32) if im.getpixel((x, y)) == synthetic.COLORS[o["color"]]]
            assert r.reference == ("left" if max(xs) < 16 else "right" if min(xs) >= 16 else "?")
    assert counts == {"color": 20, "shape": 20, "count": 20, "position": 20}


def test_question_mix_is_a_parameter(tmp_path):
    recs = synthetic.shapes_vqa(6, 0, tmp_path, qtypes=("count",))
    assert {r.meta["qtype"] for r in recs} == {"count"}
    assert {r.prompt for r in recs} == {"How many shapes are there?"}
    with pytest.raises(VlrlcdError, match="colour"):
        synthetic.shapes_vqa(2, 0, tmp_path, qtypes=("colour",))


def test_caption_names_every_object_with_its_colour(tmp_path):
    recs = synthetic.shapes_caption(20, 2, tmp_path, image_size=48)
    assert synthetic.caption_of([{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"}]) \
        == "a red circle and a blue square"
    for r in recs:
        assert r.prompt == "Describe the image." and Image.open(r.image).size == (48, 48)
        objs = r.meta["objects"]
        for o in objs:
            assert f"a {o['color']} {o['shape']}" in r.reference
            assert Image.open(r.image).getpixel((o["x"], o["y"])) == synthetic.COLORS[o["color"]]
        assert r.reference.count(" a ") + 1 == len(objs)
        assert r.reference not in r.meta["distractors"]


def test_caption_with_sides_names_where_each_object_is(tmp_path):
    objs = [{"color": "red", "shape": "circle", "x": 5}, {"color": "blue", "shape": "square", "x": 27}]
    assert synthetic.caption_of(objs, 32) == "a red circle on the left and a blue square on the right"
    plain = synthetic.shapes_caption(12, 2, tmp_path / "a", image_size=32)
    sided = synthetic.shapes_caption(12, 2, tmp_path / "b", image_size=32, sides=True)
    for p, s in zip(plain, sided):
        assert p.meta["objects"] == s.meta["objects"]          # the same scenes, only the words differ
        for o in s.meta["objects"]:
            assert f"a {o['color']} {o['shape']} on the {synthetic.side(o, 32)}" in s.reference
        assert all(" on the " in d for d in s.meta["distractors"]) and s.reference not in s.meta["distractors"]


def _cfg(tmp_path, *over):
    return load_config(None, [f"run_dir={tmp_path}/run", "data.train_size=40", "data.eval_size=12", *over])


@pytest.mark.parametrize("task", ["shapes_vqa", "shapes_caption", "arithmetic"])
def test_splits_are_disjoint_and_written_once(tmp_path, task):
    cfg = _cfg(tmp_path, f"data.task={task}", "data.max_operand=4")  # arithmetic: only 40 distinct prompts
    s = load_splits(cfg)
    assert (len(s.train), len(s.eval), s.skipped) == (40, 12, 0)
    assert not {r.id for r in s.train} & {r.id for r in s.eval}
    keys = {synthetic.record_key(r) for r in s.train}
    if task != "arithmetic":  # arithmetic with 0..4 has 40 prompts: 40 training draws leave little out
        assert not keys & {synthetic.record_key(r) for r in s.eval}
    for r in s.train + s.eval:
        assert r.image is None or (Path(r.image).is_absolute() and Path(r.image).is_file())
    data = tmp_path / "run" / "data"
    assert read_jsonl(data / "train.jsonl") == s.train
    stamp = {p: p.stat().st_mtime_ns for p in data.rglob("*")}
    again = load_splits(cfg)
    assert again.train == s.train and again.eval == s.eval
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*")} == stamp   # nothing rewritten


def test_eval_split_avoids_training_examples_when_it_can():
    train = synthetic.arithmetic(30, 0, max_operand=5)      # 36 + 21 = 57 distinct prompts
    held = synthetic.arithmetic(20, 0, max_operand=5, split="eval", exclude={synthetic.record_key(r) for r in train})
    assert not {r.prompt for r in train} & {r.prompt for r in held}


def test_changed_parameters_regenerate(tmp_path):
    s = load_splits(_cfg(tmp_path))
    old_files = set((tmp_path / "run" / "data" / "images").iterdir())
    t = load_splits(_cfg(tmp_path, "data.image_size=48", "data.train_size=10"))
    assert len(t.train) == 10 and Image.open(t.train[0].image).size == (48, 48)
    assert len(list((tmp_path / "run" / "data" / "images").iterdir())) == 10 + 12
    assert old_files == {Path(r.image) for r in s.train + s.eval}
    os.remove(t.eval[0].image)                                  # a lost image: regenerate, not crash
    u = load_splits(_cfg(tmp_path, "data.image_size=48", "data.train_size=10"))
    assert Path(u.eval[0].image).is_file() and u.train == t.train


def test_unwritable_run_dir_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(VlrlcdError, match="data folder"):
        load_splits(load_config(None, [f"run_dir={blocker}/run"]))
