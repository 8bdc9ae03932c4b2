"""One small valid file in each supported format, format detection, and format-specific errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vlrlcd.config import load_config
from vlrlcd.datasets.images import load_image
from vlrlcd.datasets.load import load_splits
from vlrlcd.datasets.validate import check_data
from vlrlcd.errors import VlrlcdError


def _png(path: Path, color=(200, 10, 10), size=(16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _cfg(tmp_path: Path, train, *over: str):
    return load_config(None, [f"run_dir={tmp_path}/run", "data.task=file", f"data.train_path={train}", *over])


def _json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def test_our_jsonl(tmp_path):
    _png(tmp_path / "d" / "img" / "a.png")
    path = tmp_path / "d" / "train.jsonl"
    path.write_text(
        json.dumps({"id": "a", "prompt": "Color?", "image": "img/a.png", "reference": "red", "choices": ["red", "blue"]}) + "\n"
        + json.dumps({"id": 7, "prompt": "Sum?", "reference": "2", "source": "web", "meta": {"k": 1}}) + "\n",
        encoding="utf-8",
    )
    s = load_splits(_cfg(tmp_path, path))
    a, b = s.train
    assert (a.id, a.prompt, a.reference, a.choices) == ("a", "Color?", "red", ["red", "blue"])
    assert a.image == str(tmp_path / "d" / "img" / "a.png") and load_image(a.image).getpixel((0, 0)) == (200, 10, 10)
    assert (b.id, b.image, b.meta) == ("7", None, {"k": 1, "source": "web"})   # int id -> str; extra keys -> meta
    assert s.eval == [] and any("detected format 'jsonl'" in n for n in s.notes)


def test_image_root_is_the_fallback_for_relative_paths(tmp_path):
    _png(tmp_path / "pics" / "a.png")
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "Q?", "image": "a.png"}) + "\n", encoding="utf-8")
    with pytest.raises(VlrlcdError, match="file not found"):
        load_splits(_cfg(tmp_path, path))
    s = load_splits(_cfg(tmp_path, path, f"data.image_root={tmp_path / 'pics'}"))
    assert s.train[0].image == str(tmp_path / "pics" / "a.png")


def _hf_dataset(tmp_path: Path):
    import datasets

    datasets.disable_progress_bars()
    png = _png(tmp_path / "src.png", (0, 0, 250)).read_bytes()
    image = {"bytes": png, "path": "src.png"}              # embedded, as save_to_disk / the hub store them
    return datasets.Dataset.from_dict(
        {"question": ["What color?", "How many?"], "answer": ["blue", "3"], "image": [image, image], "n": [1, 2]}
    ).cast_column("image", datasets.Image())


def _check_hf_records(s, tmp_path: Path) -> None:
    a, b = s.train
    assert (a.id, a.prompt, a.reference) == ("train-hf-0", "What color?", "blue")
    assert b.reference == "3" and a.meta == {"n": 1}
    extracted = Path(a.image)
    assert extracted.parent == tmp_path / "run" / "data" / "extracted" and a.image == b.image  # one file per content
    assert load_image(extracted).getpixel((3, 3)) == (0, 0, 250)


def test_hf_save_to_disk_dataset_and_dict(tmp_path):
    import datasets

    ds = _hf_dataset(tmp_path)
    ds.save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "src.png").unlink()                      # the bytes are embedded: the file is not needed
    s = load_splits(_cfg(tmp_path, tmp_path / "hf"))
    _check_hf_records(s, tmp_path)
    assert any("detected format 'hf'" in n for n in s.notes)
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dd"))
    s = load_splits(_cfg(tmp_path, tmp_path / "dd", f"data.eval_path={tmp_path / 'dd'}", "data.eval_split=test"))
    assert [r.prompt for r in s.eval] == ["How many?"] and s.eval[0].id == "eval-dd-0"
    with pytest.raises(VlrlcdError, match=r"no split 'validation'; it has train, test"):
        load_splits(_cfg(tmp_path, tmp_path / "dd", f"data.eval_path={tmp_path / 'dd'}"))


def test_hf_parquet_and_json_lines(tmp_path):
    _hf_dataset(tmp_path).to_parquet(str(tmp_path / "hf.parquet"))
    _check_hf_records(load_splits(_cfg(tmp_path, tmp_path / "hf.parquet")), tmp_path)
    _png(tmp_path / "j" / "x.png")
    path = tmp_path / "j" / "data.json"                  # JSON lines in a .json file, as datasets writes them
    path.write_text('{"instruction": "Say hi", "output": "hi", "image_path": "x.png"}\n'
                    '{"instruction": "Add 1 and 2", "output": 3, "image_path": null}\n', encoding="utf-8")
    s = load_splits(_cfg(tmp_path, path))
    assert [(r.prompt, r.reference) for r in s.train] == [("Say hi", "hi"), ("Add 1 and 2", "3")]  # a number -> str
    assert s.train[0].image == str(tmp_path / "j" / "x.png") and s.train[1].image is None


def test_hf_column_mapping(tmp_path):
    path = _json(tmp_path / "rows.json", {"data": [{"q_text": "A?", "gold": "a", "answers": ["x", "y", "y"]}]})
    with pytest.raises(VlrlcdError, match="keys answers, gold, q_text; set data.format .* data.columns.prompt=<column>"):
        load_splits(_cfg(tmp_path, path))
    with pytest.raises(VlrlcdError, match="no prompt column among q_text, gold, answers; name it with data.columns.prompt"):
        load_splits(_cfg(tmp_path, path, "data.format=hf"))
    s = load_splits(_cfg(tmp_path, path, "data.columns={prompt: q_text}"))
    assert (s.train[0].prompt, s.train[0].reference, s.train[0].meta["references"]) == ("A?", "y", ["x", "y", "y"])
    s = load_splits(_cfg(tmp_path, path, "data.columns={prompt: q_text, reference: gold}"))
    assert s.train[0].reference == "a"
    with pytest.raises(VlrlcdError, match="data.columns.prompt is 'nope'"):
        load_splits(_cfg(tmp_path, path, "data.columns={prompt: nope}"))


AOKVQA = [
    {"split": "val", "image_id": 42, "question_id": "q1", "question": "What is the animal doing?",
     "choices": ["sleeping", "eating", "running", "flying"], "correct_choice_idx": 1,
     "direct_answers": ["eating"] * 10, "difficult_direct_answer": False,
     "rationales": ["It has food in its mouth.", "It is chewing."]},
    {"split": "val", "image_id": 43, "question_id": "q2", "question": "Which season?",
     "choices": ["winter", "summer"], "correct_choice_idx": 5, "rationales": []},
]


def test_aokvqa_multiple_choice_and_rationale(tmp_path):
    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    Image.new("RGB", (16, 16), (1, 2, 3)).save(root / "val2017" / "000000000042.jpg", format="JPEG")
    Image.new("RGB", (16, 16), (1, 2, 3)).save(root / "000000000043.jpg", format="JPEG")
    path = _json(tmp_path / "aokvqa_val.json", AOKVQA)
    s = load_splits(_cfg(tmp_path, path, f"data.image_root={root}", "data.on_error=skip"))
    (r,) = s.train
    assert any("detected format 'aokvqa'" in n for n in s.notes)
    assert r.id == "q1" and r.image == str(root / "val2017" / "000000000042.jpg")
    assert r.prompt == "What is the animal doing?\nChoices: sleeping, eating, running, flying\nAnswer with one of the choices."
    assert (r.reference, r.choices, r.meta["answer_index"]) == ("eating", ["sleeping", "eating", "running", "flying"], 1)
    assert s.skipped == 1
    with pytest.raises(VlrlcdError, match=r"aokvqa_val.json: \[1\]: record 'q2', field 'correct_choice_idx': expected an index into the 2 choices, got 5"):
        load_splits(_cfg(tmp_path, path, f"data.image_root={root}"))
    s = load_splits(_cfg(tmp_path, path, f"data.image_root={root}", "data.on_error=skip", "data.aokvqa_task=rationale"))
    (r,) = s.train
    assert r.reference == "It has food in its mouth. So the answer is eating." and r.choices is None
    assert r.prompt.endswith("Explain your reasoning briefly, then give the answer.")
    assert r.meta["answer"] == "eating" and r.meta["rationales"] == AOKVQA[0]["rationales"]


def test_coco_captions(tmp_path):
    root = tmp_path / "coco"
    _png(root / "val2014" / "COCO_val2014_000000000001.jpg")
    _png(root / "b.jpg")
    doc = {
        "images": [
            {"id": 1, "file_name": "COCO_val2014_000000000001.jpg",
             "coco_url": "http://images.cocodataset.org/val2014/COCO_val2014_000000000001.jpg"},
            {"id": 2, "file_name": "b.jpg"},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": " A red square. "},
            {"id": 11, "image_id": 1, "caption": "Something red."},
            {"id": 12, "image_id": 2, "caption": "Another."},
            {"id": 13, "image_id": 99, "caption": "Orphan."},
        ],
    }
    path = _json(tmp_path / "captions_val2014.json", doc)
    s = load_splits(_cfg(tmp_path, path, f"data.image_root={root}", "data.on_error=skip"))
    a, b = s.train
    assert any("detected format 'coco_captions'" in n for n in s.notes)
    assert (a.id, a.prompt, a.reference, a.meta["references"]) == ("coco-1", "Describe the image.", "A red square.", ["A red square.", "Something red."])
    assert a.image == str(root / "val2014" / "COCO_val2014_000000000001.jpg") and b.reference == "Another."
    skipped = json.loads((tmp_path / "run" / "data" / "skipped.jsonl").read_text())
    assert skipped["where"].endswith("annotations[3]") and skipped["id"] == "13" and "image_id 99" in skipped["reason"]


LLAVA = [
    {"id": "000000033471", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat are the colors of the bus?"},
        {"from": "gpt", "value": "White and red."},
        {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "On a street."}]},
    {"id": "text-only", "conversations": [{"from": "human", "value": "Tell a joke."}, {"from": "gpt", "value": "No."}]},
    {"id": "share", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                                 {"role": "assistant", "content": "Hello."}]},
    {"id": "noimg", "conversations": [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]},
]


def test_llava_and_sharegpt(tmp_path):
    _png(tmp_path / "images" / "a.png")
    path = _json(tmp_path / "llava.json", LLAVA)
    s = load_splits(_cfg(tmp_path, path, f"data.image_root={tmp_path / 'images'}", "data.on_error=skip"))
    assert any("detected format 'llava'" in n for n in s.notes)
    a, b, c = s.train
    assert (a.prompt, a.reference, a.meta["turns"]) == ("What are the colors of the bus?", "White and red.", 4)
    assert a.image == str(tmp_path / "images" / "a.png")
    assert (b.prompt, b.reference, b.image) == ("Tell a joke.", "No.", None)
    assert (c.id, c.prompt, c.reference) == ("share", "Hi?", "Hello.")
    with pytest.raises(VlrlcdError, match=r"llava.json: \[3\]: record 'noimg', field 'image': the prompt has <image> but the record names no image"):
        load_splits(_cfg(tmp_path, path, f"data.image_root={tmp_path / 'images'}"))


def test_plain_text_prompts_and_explicit_format(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("What is 2 + 2?\n\nName a colour.\n", encoding="utf-8")
    s = load_splits(_cfg(tmp_path, path))
    assert [(r.id, r.prompt, r.reference) for r in s.train] == [("train-prompts-1", "What is 2 + 2?", None), ("train-prompts-3", "Name a colour.", None)]
    jl = tmp_path / "lines.jsonl"
    jl.write_text('{"id": "a", "prompt": "x"}\n', encoding="utf-8")
    s = load_splits(_cfg(tmp_path, jl, "data.format=text"))
    assert s.train[0].prompt == '{"id": "a", "prompt": "x"}' and any("(data.format)" in n for n in s.notes)


def test_undetectable_format_names_the_keys(tmp_path):
    path = _json(tmp_path / "odd.json", [{"foo": 1, "bar": 2}])
    with pytest.raises(VlrlcdError, match="cannot tell the format from the keys bar, foo; set data.format"):
        load_splits(_cfg(tmp_path, path))
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1,\n "prompt": }]', encoding="utf-8")
    with pytest.raises(VlrlcdError, match=r"bad.json:2: not valid JSON"):
        check_data(_cfg(tmp_path, bad))
    (tmp_path / "folder").mkdir()
    with pytest.raises(VlrlcdError, match="neither a Hugging Face save_to_disk folder"):
        load_splits(_cfg(tmp_path, tmp_path / "folder"))


def test_check_data_reports_formats_per_split(tmp_path):
    train = tmp_path / "p.txt"
    train.write_text("a?\nb?\n", encoding="utf-8")
    ev = _json(tmp_path / "ev.json", [{"id": "e", "prompt": "c?", "reference": "x"}])
    summary = check_data(_cfg(tmp_path, train, f"data.eval_path={ev}"))
    assert summary.ok
    text = summary.format()
    assert f"train {train} [text]: 2 records, 2 valid (0 with image, 0 with reference), 0 bad" in text
    assert f"eval  {ev} [jsonl]: 1 records, 1 valid (0 with image, 1 with reference), 0 bad" in text
    assert "detected format 'text': a plain text file" in text
