"""Pretraining of the tiny students: the vision tower's object-recognition stage (training/pretrain.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from vlrlcd.adapters.config import TinyConfig
from vlrlcd.adapters.tiny import build_tiny_llava
from vlrlcd.datasets import synthetic
from vlrlcd.datasets.records import Record
from vlrlcd.training.pretrain import patch_labels, pretrain_tower, pretraining_records

RED = 1 + list(synthetic.COLORS).index("red")
CIRCLE = 1 + synthetic.SHAPES.index("circle")
TRIANGLE = 1 + synthetic.SHAPES.index("triangle")


def test_patch_labels_one_patch_per_cell():
    """32 px, 16 px patches: the object centred in the top-left cell labels patch 0, the rest is background."""
    objects = [{"shape": "circle", "color": "red", "x": 8, "y": 8, "size": 11}]
    assert patch_labels(objects, 32, 16) == ([CIRCLE, 0, 0, 0], [RED, 0, 0, 0])


def test_patch_labels_object_spanning_patches():
    """8 px patches: an 11 px object centred at (24, 8) spans x 18.5..29.5, y 2.5..13.5, so it holds the
    centres (20, 4), (28, 4), (20, 12), (28, 12): patches 2, 3, 6, 7 of the 4x4 grid."""
    objects = [{"shape": "triangle", "color": "red", "x": 24, "y": 8, "size": 11}]
    shapes, colours = patch_labels(objects, 32, 8)
    assert [i for i, s in enumerate(shapes) if s] == [2, 3, 6, 7]
    assert set(shapes) == {0, TRIANGLE} and set(colours) == {0, RED}


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_pretrain_tower_trains_the_tower_only(tmp_path):
    recs = synthetic.shapes_caption(64, 5, tmp_path / "img", 32, split="pretrain")
    tiny = TinyConfig(hidden_size=32, num_layers=1, intermediate_size=64, vision_hidden_size=32,
                      vision_layers=1, patch_size=16)
    path = build_tiny_llava(tmp_path / "m", [r.prompt for r in recs] + [r.reference for r in recs], tiny, seed=0)
    before = _weights(path)
    losses = pretrain_tower(path, recs, epochs=6, lr=0.005, seed=0, progress=False)
    after = _weights(path)
    assert len(losses) == 24                                  # 6 epochs x 64 records / batch 16
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4   # it learns to name the patches' objects
    tower = [k for k in before if "vision_tower" in k]
    rest = [k for k in before if "vision_tower" not in k]
    assert tower and rest and set(after) == set(before)       # the heads are not saved
    assert any(not torch.equal(before[k], after[k]) for k in tower)
    assert all(torch.equal(before[k], after[k]) for k in rest)


def test_pretrain_tower_rejects_records_without_a_scene(tmp_path):
    recs = synthetic.shapes_caption(2, 5, tmp_path / "img", 32, split="pretrain")
    tiny = TinyConfig(hidden_size=32, num_layers=1, intermediate_size=64, vision_hidden_size=32,
                      vision_layers=1, patch_size=16)
    path = build_tiny_llava(tmp_path / "m", [r.prompt for r in recs], tiny, seed=0)
    bare = [Record(id="x1", prompt=recs[0].prompt, reference="a red circle", image=recs[0].image)]
    with pytest.raises(ValueError, match="x1.*objects"):
        pretrain_tower(path, bare, epochs=1, lr=0.005, progress=False)


def test_pretraining_captions_name_sides_only_when_asked(tmp_path):
    plain = pretraining_records(True, 6, 0, tmp_path / "a", 32)
    sided = pretraining_records(True, 6, 0, tmp_path / "b", 32, sides=True)
    assert not any(" on the " in r.reference for r in plain)
    assert all(r.reference.count(" on the ") == len(r.meta["objects"]) for r in sided)
    assert pretraining_records(False, 3, 0, tmp_path / "c", 32, sides=True) == pretraining_records(False, 3, 0, tmp_path / "d", 32)

