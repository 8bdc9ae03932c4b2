"""Issue 9 fixtures, generated here: every bad record is named (file:line, id, field), never a traceback."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from vlrlcd.config import load_config
from vlrlcd.datasets.images import ImageProblem, load_image
from vlrlcd.datasets.load import load_splits
from vlrlcd.datasets.validate import check_data
from vlrlcd.errors import VlrlcdError


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels but holds almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _jpeg_with_orientation(path: Path) -> None:
    """40 wide x 20 high, left half red, right half blue, EXIF orientation 6 (display rotated 90 CW)."""
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, format="JPEG", exif=exif, quality=95)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("imgs")
    noise = Image.effect_noise((48, 48), 60).convert("RGB")
    out = {}

    def save(name: str, im: Image.Image, **kw) -> None:
        out[name] = d / name
        im.save(out[name], **kw)

    save("ok.png", Image.new("RGB", (24, 24), (10, 200, 30)))
    full = _png_bytes(noise)
    (d / "trunc.png").write_bytes(full[: len(full) // 2])
    out["trunc.png"] = d / "trunc.png"
    buf = io.BytesIO()
    noise.save(buf, format="JPEG")
    (d / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    out["trunc.jpg"] = d / "trunc.jpg"
    save("tiny.png", Image.new("RGB", (1, 1), (1, 2, 3)))
    (d / "bomb.png").write_bytes(_bomb_png(100_000, 100_000))    # past Pillow's own limit too
    out["bomb.png"] = d / "bomb.png"
    (d / "bomb64.png").write_bytes(_bomb_png(8_000, 8_000))       # past ours (40M) only
    out["bomb64.png"] = d / "bomb64.png"
    save("big.png", Image.new("RGB", (300, 300), (9, 9, 9)))
    save("cmyk.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)), quality=95)
    save("gray.png", Image.new("L", (16, 16), 100))
    save("gray16.png", Image.new("I;16", (16, 16), 25700))
    rgba = Image.new("RGBA", (16, 16), (0, 0, 255, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 8, 16))
    save("rgba.png", rgba)
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 0, 128, 255] + [0] * 762)
    save("palette.png", pal)
    pal_t = pal.copy()
    pal_t.paste(0, (0, 0, 8, 16))
    save("palette_t.png", pal_t, transparency=0)
    _jpeg_with_orientation(d / "exif.jpg")
    out["exif.jpg"] = d / "exif.jpg"
    (d / "notimage.png").write_bytes(b"hello, not an image")
    out["notimage.png"] = d / "notimage.png"
    return out


# ------------------------------------------------------------------------------------- load_image


@pytest.mark.parametrize(
    "name, size, pixel, expected",
    [
        ("cmyk.jpg", (16, 16), (8, 8), (255, 0, 0)),
        ("gray.png", (16, 16), (3, 3), (100, 100, 100)),
        ("gray16.png", (16, 16), (3, 3), (100, 100, 100)),   # 25700 / 257: scaled, not clipped to 255
        ("rgba.png", (16, 16), (2, 2), (255, 0, 0)),
        ("rgba.png", (16, 16), (12, 2), (255, 255, 255)),    # transparent -> white, not the hidden blue
        ("palette.png", (16, 16), (5, 5), (0, 128, 255)),
        ("palette_t.png", (16, 16), (2, 2), (255, 255, 255)),
        ("palette_t.png", (16, 16), (12, 2), (0, 128, 255)),
    ],
)
def test_other_modes_become_rgb(images, name, size, pixel, expected):
    im = load_image(images[name])
    assert im.mode == "RGB" and im.size == size
    got = im.getpixel(pixel)
    assert all(abs(g - e) <= 3 for g, e in zip(got, expected)), got   # JPEG: near, not exact


def test_exif_orientation_is_applied(images):
    im = load_image(images["exif.jpg"])
    assert im.size == (20, 40)                          # stored 40x20, displayed rotated
    top, bottom = im.getpixel((10, 5)), im.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60                 # the stored left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize(
    "name, kwargs, reason",
    [
        ("trunc.png", {}, "truncated"),
        ("trunc.jpg", {}, "truncated"),
        ("tiny.png", {"min_side": 8}, "1x1 is too small"),
        ("bomb.png", {}, "decompression-bomb"),
        ("bomb64.png", {}, "8000x8000 = 64000000 pixels is over the limit of 40000000"),
        ("big.png", {"max_pixels": 300 * 300 - 1}, "over the limit of 89999"),
        ("notimage.png", {}, "not an image"),
    ],
)
def test_bad_images_name_the_file_and_reason(images, name, kwargs, reason):
    with pytest.raises(ImageProblem) as e:
        load_image(images[name], **kwargs)
    assert reason in str(e.value) and str(images[name]) in str(e.value)
    assert isinstance(e.value, VlrlcdError)


def test_missing_image(tmp_path):
    with pytest.raises(VlrlcdError, match="file not found"):
        load_image(tmp_path / "nope.png")


# ------------------------------------------------------------------------------------- records

GOOD = {"id": "good", "prompt": "What is shown?", "reference": "a box"}


def _bad_cases(images: dict[str, Path]) -> list[tuple[str, bytes, str, str]]:
    """(case, JSONL line bytes, field, reason fragment); each record's id is the case name."""
    def rec(case: str, **kw) -> bytes:
        return json.dumps({"id": case, "prompt": "Q?", **kw}).encode()

    return [
        ("trunc_png", rec("trunc_png", image=str(images["trunc.png"])), "image", "truncated"),
        ("trunc_jpg", rec("trunc_jpg", image=str(images["trunc.jpg"])), "image", "truncated"),
        ("missing_img", rec("missing_img", image="no/such.png"), "image", "file not found"),
        ("one_px", rec("one_px", image=str(images["tiny.png"])), "image", "1x1 is too small"),
        ("bomb", rec("bomb", image=str(images["bomb.png"])), "image", "decompression-bomb"),
        ("not_image", rec("not_image", image=str(images["notimage.png"])), "image", "not an image"),
        ("bad_utf8", b'{"id": "bad_utf8", "prompt": "caf\xe9 au lait?"}', "prompt", "not valid UTF-8 (byte 0xe9"),
        ("surrogate", rec("surrogate", reference="x\udc80"), "reference", "not valid UTF-8"),
        ("empty", rec("empty") .replace(b'"Q?"', b'"   "'), "prompt", "empty"),
        ("good", rec("good"), "id", "duplicate id"),
        ("prompt_int", rec("prompt_int").replace(b'"Q?"', b"42"), "prompt", "expected a string, got int"),
        ("choices_str", rec("choices_str", choices="a, b"), "choices", "list of strings"),
        ("ref_list", rec("ref_list", reference=["a"]), "reference", "expected a string"),
        ("not_in_choices", rec("not_in_choices", choices=["a", "b"], reference="c"), "reference", "not one of the choices"),
        ("image_int", rec("image_int", image=7), "image", "expected an image path"),
        ("typo", rec("typo", refernce="x"), "refernce", "did you mean 'reference'"),
        ("meta_list", rec("meta_list", meta=[1]), "meta", "expected an object"),
    ]


def _write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _cfg(tmp_path: Path, train: Path, *over: str):
    return load_config(None, [f"run_dir={tmp_path}/run", "data.task=file", f"data.train_path={train}", *over])


def test_each_bad_record_stops_a_raise_run_naming_it(tmp_path, images):
    good_line = json.dumps({**GOOD, "image": str(images["ok.png"])}).encode()
    for case, line, field, reason in _bad_cases(images):
        path = _write(tmp_path / f"{case}.jsonl", [good_line, line])
        with pytest.raises(VlrlcdError) as e:
            load_splits(_cfg(tmp_path, path, f"data.image_root={images['ok.png'].parent}"))
        msg = str(e.value)
        assert f"{path}:2: record '{case}', field '{field}'" in msg, msg
        assert reason in msg, msg
        assert "\n" not in msg and "data.on_error=skip" in msg


def test_broken_json_line_and_non_object_are_named(tmp_path):
    path = _write(tmp_path / "t.jsonl", [json.dumps(GOOD).encode(), b'{"id": "x", "prompt": ', b"[1, 2]"])
    s = load_splits(_cfg(tmp_path, path, "data.on_error=skip"))
    assert s.skipped == 2 and [r.id for r in s.train] == ["good"]
    skipped = [json.loads(x) for x in (tmp_path / "run" / "data" / "skipped.jsonl").read_text().splitlines()]
    assert [x["where"] for x in skipped] == [f"{path}:2", f"{path}:3"]
    assert "not valid JSON" in skipped[0]["reason"] and "expected a JSON object" in skipped[1]["reason"]


def test_skip_mode_keeps_good_records_and_lists_every_bad_one(tmp_path, images):
    cases = _bad_cases(images)
    lines = [json.dumps({**GOOD, "image": "ok.png"}).encode()] + [c[1] for c in cases]
    path = _write(images["ok.png"].parent / "mixed.jsonl", lines)     # "ok.png" resolves next to the file
    eval_path = _write(tmp_path / "eval.jsonl", [b'{"id": "e1", "prompt": "Q?"}', b'{"id": "good", "prompt": "Q?"}'])
    s = load_splits(_cfg(tmp_path, path, "data.on_error=skip", f"data.eval_path={eval_path}"))
    assert [r.id for r in s.train] == ["good"] and s.train[0].image == str(images["ok.png"])
    assert [r.id for r in s.eval] == ["e1"]                          # "good" is already a training id
    assert s.skipped == len(cases) + 1
    rows = [json.loads(x) for x in (tmp_path / "run" / "data" / "skipped.jsonl").read_text().splitlines()]
    assert [(r["split"], r["where"], r["field"]) for r in rows] == [
        ("train", f"{path}:{i + 2}", c[2]) for i, c in enumerate(cases)
    ] + [("eval", f"{eval_path}:2", "id")]
    assert all(c[3] in r["reason"] for c, r in zip(cases, rows))
    assert any("skipped 18 bad records" in n for n in s.notes)
    clean = _write(tmp_path / "clean.jsonl", [json.dumps(GOOD).encode()])
    assert load_splits(_cfg(tmp_path, clean, "data.on_error=skip")).skipped == 0
    assert not (tmp_path / "run" / "data" / "skipped.jsonl").exists()   # no stale list from the last run


def test_all_records_bad_is_an_error(tmp_path):
    path = _write(tmp_path / "t.jsonl", [b'{"id": "a", "prompt": ""}'])
    with pytest.raises(VlrlcdError, match="no valid training records .1 skipped"):
        load_splits(_cfg(tmp_path, path, "data.on_error=skip"))


def test_text_file_with_bad_bytes_names_the_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"first prompt\n\nsecond \xff prompt\n   \nthird\n")
    s = load_splits(_cfg(tmp_path, path, "data.on_error=skip"))
    assert [r.prompt for r in s.train] == ["first prompt", "third"]
    assert [r.id for r in s.train] == ["train-prompts-1", "train-prompts-5"]
    with pytest.raises(VlrlcdError, match=rf"prompts.txt:3: record 'train-prompts-3', field 'prompt': not valid UTF-8 \(byte 0xff"):
        load_splits(_cfg(tmp_path, path))


def test_check_data_lists_every_problem(tmp_path, images):
    cases = _bad_cases(images)
    path = _write(tmp_path / "mixed.jsonl", [json.dumps(GOOD).encode()] + [c[1] for c in cases])
    summary = check_data(_cfg(tmp_path, path, f"data.image_root={images['ok.png'].parent}"))
    assert not summary.ok and len(summary.problems) == len(cases)
    text = summary.format(max_listed=100)
    assert "detected format 'jsonl'" in text
    assert f"{len(cases) + 1} records, 1 valid" in text
    for i, (case, _, field, _) in enumerate(cases):
        assert f"{path}:{i + 2}: record '{case}', field '{field}'" in text
    assert "a run would stop at the first one" in text
    assert "... and" in summary.format(max_listed=3)
    assert not (tmp_path / "run" / "data" / "skipped.jsonl").exists()


@pytest.mark.parametrize("content,fmt", [(b"", "jsonl"), (b"\n  \n", "jsonl"), (b"", "auto"), (b"\n", "text"),
                                         (b"[]", "hf")])
def test_check_data_on_an_empty_training_file_is_a_problem(tmp_path, content, fmt):
    """Issue 15 item 10: an empty training file is never "OK" (it was, with data.format set or a .txt file)."""
    name = "prompts.txt" if fmt == "text" else "data.json" if content == b"[]" else "train.jsonl"
    path = tmp_path / name
    path.write_bytes(content)
    cfg = _cfg(tmp_path, path, f"data.format={fmt}")
    if fmt == "auto":    # detection has nothing to look at: the same one-line error as a run
        with pytest.raises(VlrlcdError, match=f"{path}: holds no records"):
            check_data(cfg)
        return
    summary = check_data(cfg)
    text = str(summary)
    assert not summary.ok and "OK" not in text, text
    assert text.endswith(f"result: not usable: the training split {path} holds no records; a run needs at least one")


def test_check_data_when_no_training_record_is_valid(tmp_path):
    path = _write(tmp_path / "t.jsonl", [b'{"id": "a", "prompt": ""}', b'{"id": "b", "prompt": " "}'])
    summary = check_data(_cfg(tmp_path, path, "data.on_error=skip"))
    assert not summary.ok and len(summary.problems) == 2
    assert str(summary).endswith(f"result: not usable: none of the 2 training records in {path} is valid; a run would stop")


def test_cli_data_check_exits_non_zero_on_an_empty_training_file(tmp_path, capsys):
    from vlrlcd.cli import main

    path = tmp_path / "train.jsonl"
    path.write_bytes(b"")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\ndata: {{task: file, train_path: {path}, format: jsonl}}\n")
    assert main(["data", "check", str(cfg)]) == 1
    assert "result: not usable" in capsys.readouterr().out


@pytest.mark.parametrize("line,expected", [
    (b'{"id": "x", "prompt": "unterminated', "not valid JSON (Unterminated string starting at column 23)"),
    (b'{"id": "x", "prompt": "a\tb"}', "not valid JSON (Invalid control character at column 25)"),
    (b'{"id": "x", "prompt": }', "not valid JSON (Expecting value at column 23)"),
])
def test_json_errors_say_at_column_once(tmp_path, line, expected):
    path = _write(tmp_path / "t.jsonl", [json.dumps(GOOD).encode(), line])
    summary = check_data(_cfg(tmp_path, path))
    assert [p.reason for p in summary.problems] == [expected]
    doc = tmp_path / "t.json"
    doc.write_bytes(b"[" + line)
    with pytest.raises(VlrlcdError) as e:
        load_splits(_cfg(tmp_path, doc))
    assert "at at" not in str(e.value) and " at column " in str(e.value)
    from vlrlcd.datasets.records import read_jsonl

    with pytest.raises(VlrlcdError, match=r"t.jsonl:2: not valid JSON \(\w[\w ]* at column \d+\)$") as e:
        read_jsonl(path)
    assert "at at" not in str(e.value)


def test_check_data_on_synthetic_data(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}/run", "data.train_size=8", "data.eval_size=4"])
    summary = check_data(cfg)
    assert summary.ok and [(s.records, s.valid, s.with_image) for s in summary.splits] == [(8, 8, 8), (4, 4, 4)]
    assert str(summary).endswith("result: OK, every record is valid")


def test_file_task_config_errors(tmp_path):
    with pytest.raises(VlrlcdError, match="train_path is not set"):
        load_splits(load_config(None, [f"run_dir={tmp_path}", "data.task=file"]))
    with pytest.raises(VlrlcdError, match="no such file"):
        load_splits(_cfg(tmp_path, tmp_path / "missing.jsonl"))
    with pytest.raises(VlrlcdError, match="data.format 'csv'"):
        _cfg(tmp_path, tmp_path / "x.jsonl", "data.format=csv")


# ------------------------------------------------------------------------------------- robustness

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vlrlcd.datasets.checks import validate_entries  # noqa: E402
from vlrlcd.datasets.formats import Context, to_entries  # noqa: E402
from vlrlcd.datasets.sources import Row, Table  # noqa: E402

_scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=6)
_json = st.recursive(_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=6)
_keys = st.sampled_from([
    "id", "prompt", "image", "reference", "choices", "meta", "question", "answer", "correct_choice_idx",
    "rationales", "image_id", "split", "conversations", "messages", "from", "value", "refernce",
])
_rows = st.lists(st.dictionaries(_keys, _json, max_size=6), min_size=1, max_size=4)


@settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=_rows, fmt=st.sampled_from(["jsonl", "hf", "aokvqa", "llava", "text", "coco_captions"]))
def test_arbitrary_rows_give_records_or_named_problems(tmp_path, rows, fmt):
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    ctx = Context(source="x.json", base=tmp_path, image_root=None, extract_dir=tmp_path / "ex", stem="t", cfg=cfg.data)
    if fmt == "coco_captions":
        table = Table("x.json", "json", doc={"images": rows, "annotations": rows})
    else:
        table = Table("x.json", "json", [Row(f"x.json: [{i}]", i, data=r) for i, r in enumerate(rows)])
    try:
        entries = to_entries(table, fmt, ctx)
    except VlrlcdError:       # a whole-source problem (e.g. no prompt column): one line, no traceback
        return
    good, bad = validate_entries(entries, cfg.data)
    assert len(good) + len(bad) == len(entries)
    for p in bad:
        assert p.where.startswith("x.json: ") and p.reason and "\n" not in p.message()
