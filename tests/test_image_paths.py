"""Images outside the data folder (issue 15, item 8): a `../`, absolute or symlinked path that resolves
outside the data file's folder (and data.image_root) is a bad record, so its file is never read nor sent to
the teacher, unless data.allow_outside_images is set."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from helpers_http import FakeChatServer
from PIL import Image

from vlrlcd.cli import main
from vlrlcd.config import load_config
from vlrlcd.datasets.load import data_dir, load_splits
from vlrlcd.datasets.records import read_jsonl, write_jsonl
from vlrlcd.datasets.validate import check_data
from vlrlcd.errors import VlrlcdError

KEY_ENV = "VLRLCD_TEST_IMAGE_KEY"


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """data/ (the JSONL's folder) with an image inside, and secret/ beside it with one that is not."""
    data, secret = tmp_path / "data", tmp_path / "secret"
    (data / "pics").mkdir(parents=True)
    secret.mkdir()
    Image.new("RGB", (16, 16), (0, 200, 0)).save(data / "pics" / "in.png")
    Image.new("RGB", (16, 16), (200, 0, 0)).save(secret / "private.png")
    (data / "link_out.png").symlink_to(secret / "private.png")
    (data / "link_in.png").symlink_to(data / "pics" / "in.png")
    return {"data": data, "secret": secret, "in": data / "pics" / "in.png", "private": secret / "private.png"}


OUTSIDE = {   # record id -> how its image path leaves the data folder
    "dotdot": lambda t: "../secret/private.png",
    "absolute": lambda t: str(t["private"]),
    "symlink": lambda t: "link_out.png",
}
INSIDE = {
    "relative": lambda t: "pics/in.png",
    "absolute_in": lambda t: str(t["in"]),
    "symlink_in": lambda t: "link_in.png",
    "dotdot_in": lambda t: "pics/../pics/in.png",
}


def _write(t: dict[str, Path], cases: dict) -> Path:
    path = t["data"] / "train.jsonl"
    lines = [json.dumps({"id": rid, "prompt": f"what colour is {rid}?", "image": f(t)}) for rid, f in cases.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _cfg(t: dict[str, Path], train: Path, *over: str):
    return load_config(None, [f"run_dir={t['data'].parent / 'run'}", "data.task=file", f"data.train_path={train}", *over])


@pytest.mark.parametrize("rid", sorted(OUTSIDE))
def test_an_image_outside_the_data_folder_stops_the_run_naming_it(tree, rid):
    path = _write(tree, {"ok": INSIDE["relative"], rid: OUTSIDE[rid]})
    with pytest.raises(VlrlcdError) as e:
        load_splits(_cfg(tree, path))
    msg = str(e.value)
    assert f"{path}:2: record '{rid}', field 'image': " in msg and "\n" not in msg, msg
    assert f"is outside the data folder {tree['data']}" in msg and "data.allow_outside_images=true" in msg, msg
    assert str(tree["private"]) in msg   # where it really points (a symlink's target too)


def test_images_inside_the_data_folder_are_accepted(tree):
    path = _write(tree, INSIDE)
    s = load_splits(_cfg(tree, path))
    assert [r.id for r in s.train] == list(INSIDE)


def test_data_image_root_and_allow_outside_images_let_them_in(tree):
    path = _write(tree, OUTSIDE)
    s = load_splits(_cfg(tree, path, f"data.image_root={tree['secret']}"))
    assert [r.id for r in s.train] == list(OUTSIDE)
    s = load_splits(_cfg(tree, path, "data.allow_outside_images=true"))
    assert [Path(r.image).resolve() for r in s.train] == [tree["private"]] * 3


def test_data_check_lists_every_outside_image(tree):
    path = _write(tree, {**INSIDE, **OUTSIDE})
    summary = check_data(_cfg(tree, path))
    assert not summary.ok and [p.id for p in summary.problems] == list(OUTSIDE)
    assert all(p.field == "image" and "outside the data folder" in p.reason for p in summary.problems)


def test_coco_file_names_cannot_climb_out_of_image_root(tree):
    root = tree["data"] / "coco"
    root.mkdir()
    Image.new("RGB", (16, 16)).save(root / "a.jpg")
    doc = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "../../secret/private.png"}],
           "annotations": [{"id": 10, "image_id": 1, "caption": "a"}, {"id": 11, "image_id": 2, "caption": "b"}]}
    path = tree["data"] / "captions.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    s = load_splits(_cfg(tree, path, f"data.image_root={root}", "data.on_error=skip"))
    assert [r.id for r in s.train] == ["coco-1"] and s.skipped == 1


def test_an_edited_synthetic_split_cannot_point_outside(tmp_path, tree):
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "data.train_size=3", "data.eval_size=1"])
    first = load_splits(cfg).train
    train = data_dir(cfg) / "train.jsonl"
    recs = read_jsonl(train)
    recs[0].image = str(tree["private"])
    write_jsonl(recs, train)
    again = load_splits(cfg).train    # regenerated: the manifest matches, but an image is not the generator's
    assert [r.image for r in again] == [r.image for r in first]
    assert all(Path(r.image).resolve().is_relative_to(data_dir(cfg).resolve()) for r in again)


def test_the_teacher_never_receives_an_outside_image(tree, monkeypatch, capsys):
    """`vlrlcd anchors` against a real HTTP teacher: raise mode sends nothing; skip mode sends only the
    records whose images are inside, and never the outside file's bytes."""
    monkeypatch.setenv(KEY_ENV, "sk-test")
    path = _write(tree, {**INSIDE, **OUTSIDE})
    secret_b64 = base64.b64encode(tree["private"].read_bytes()).decode()
    with FakeChatServer() as server:
        common = ["anchors", str(Path(__file__).resolve().parents[1] / "configs" / "tiny_text_arithmetic.yaml"),
                  f"run_dir={tree['data'].parent / 'run'}", "data.task=file", f"data.train_path={path}",
                  "teacher.backend=openai", f"teacher.base_url={server.url}", "teacher.model=m",
                  f"teacher.api_key_env={KEY_ENV}", "teacher.timeout_s=5"]
        assert main(common) == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "record 'dotdot', field 'image'" in errors[0], errors
        assert "outside the data folder" in errors[0]
        assert server.requests == []
        assert main([*common, "data.on_error=skip"]) == 0
        sent = {r["prompt"] for r in server.requests}
        assert sent == {f"what colour is {rid}?" for rid in INSIDE}
        assert not any(secret_b64 in json.dumps(r["body"]) for r in server.requests)
