"""Ranking diagnostics (training/diagnostics.py): hand-computed AUROC, D's mass on right answers."""

import torch

from vlrlcd.datasets.records import Record
from vlrlcd.training.diagnostics import candidate_correctness, group_diagnostics, within_group_auroc


def test_auroc_hand_computed():
    # right scores {0.9, 0.1}, wrong {0.5, 0.1}: pairs (0.9>0.5)=1, (0.9>0.1)=1, (0.1<0.5)=0, (0.1=0.1)=1/2
    assert within_group_auroc([0.9, 0.5, 0.1, 0.1], [1, 0, 1, 0]) == 2.5 / 4


def test_auroc_undefined_without_both_kinds():
    assert within_group_auroc([0.1, 0.2], [1, 1]) is None
    assert within_group_auroc([0.1, 0.2], [0, 0]) is None


def test_group_diagnostics_exact_match():
    rec = Record(id="r", prompt="What color is the square?", reference="red")
    texts = ["red", "Red.", "blue", "green"]
    out = group_diagnostics(rec, texts, torch.tensor([0.0, -0.1, -0.5, -2.0]), torch.tensor([0.4, 0.3, 0.2, 0.1]))
    assert out["diag_right"] == 0.5
    assert abs(out["diag_d_right"] - 0.7) < 1e-6
    assert out["diag_auroc"] == 1.0


def test_unranked_group_gives_only_right_share():
    rec = Record(id="r", prompt="What is 2 + 2?", reference="4")
    assert group_diagnostics(rec, ["4", "5"], torch.zeros(0), torch.zeros(0)) == {"diag_right": 0.5}


def test_unverifiable_record_gives_nothing():
    rec = Record(id="r", prompt="Write a poem.")
    assert candidate_correctness(rec, ["a poem"]) is None
    assert group_diagnostics(rec, ["a poem"], torch.zeros(1), torch.ones(1)) == {}
