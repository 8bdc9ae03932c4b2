"""Chance levels on hand-made splits: the best input-blind constant answer per question type, chosen on
the training split and scored on the held-out one."""

from __future__ import annotations

import pytest

from vlrlcd.datasets.records import Record
from vlrlcd.errors import VlrlcdError
from vlrlcd.evaluation.chance import anchor_score, best_constant, chance_level, constant_answers


def _qa(ref: str, qtype: str | None = None) -> Record:
    return Record(id=f"{qtype}-{ref}", prompt="q?", reference=ref, meta={"qtype": qtype} if qtype else {})


def _caption(*objects: tuple[str, str]) -> Record:
    objs = [{"color": c, "shape": s} for c, s in objects]
    ref = " and ".join(f"a {c} {s}" for c, s in objects)
    return Record(id=ref, prompt="Describe the image.", reference=ref,
                  meta={"task": "shapes_caption", "objects": objs})


def test_vqa_most_common_training_answer_per_question_type():
    train = [_qa("red", "color"), _qa("red", "color"), _qa("blue", "color"),
             _qa("2", "count"), _qa("3", "count"), _qa("3", "count"), _qa("3", "count")]
    held = [_qa("red", "color"), _qa("green", "color"), _qa("3", "count"), _qa("2", "count")]
    assert constant_answers(train) == {"color": "red", "count": "3", None: "3"}
    assert chance_level(train, held) == pytest.approx(2 / 4)   # red: 1, 0; 3: 1, 0


def test_a_question_type_training_never_asked_gets_the_overall_constant():
    train = [_qa("x", "a"), _qa("x", "a"), _qa("y", "b"), _qa("y", "b"), _qa("y", "b")]
    held = [_qa("y", "c"), _qa("x", "c"), _qa("x", "a")]
    assert chance_level(train, held) == pytest.approx(2 / 3)   # c -> overall "y": 1, 0; a -> "x": 1


def test_text_without_question_types_is_the_most_common_answer_normalised():
    train = [_qa("4"), _qa("4"), _qa("7")]
    held = [_qa("4"), _qa("four"), _qa("7"), _qa("4.0")]
    assert best_constant(train) == "4"
    assert chance_level(train, held) == pytest.approx(3 / 4)   # "four" and "4.0" normalise to "4"


def test_ties_go_to_the_more_frequent_then_the_alphabetically_first_reference():
    assert best_constant([_qa("b"), _qa("a")]) == "a"
    # "Red" and "red." both match every record (normalised): same score, same count -> sorted first
    assert best_constant([_qa("red."), _qa("Red")]) == "Red"


def test_captions_best_constant_caption_from_the_training_references():
    train = [_caption(("red", "circle"), ("blue", "square")), _caption(("red", "circle")),
             _caption(("green", "triangle"))]
    # training scores: "red circle and blue square" 1 + 1 + 0 = 2/3, "red circle" 0.5 + 1 + 0 = 1/2,
    # "green triangle" 0 + 0 + 1 = 1/3
    assert best_constant(train) == "a red circle and a blue square"
    held = [_caption(("red", "circle"), ("green", "triangle")), _caption(("blue", "square"))]
    assert chance_level(train, held) == pytest.approx((0.5 + 1.0) / 2)


def test_errors_are_actionable():
    with pytest.raises(VlrlcdError, match="held-out"):
        chance_level([_qa("a")], [])
    with pytest.raises(VlrlcdError, match="reference"):
        chance_level([Record(id="x", prompt="q")], [_qa("a")])


def test_anchor_score_is_the_anchors_mean_score_against_the_training_references():
    train = [Record(id=f"t{i}", prompt="q?", reference=ref) for i, ref in enumerate(("red", "blue", "green"))]
    train.append(Record(id="t3", prompt="q"))
    anchors = {"t0": "red", "t1": "I think it is blue.", "t2": "blue", "t3": "x"}
    # t0 right, t1 a sentence (exact match: wrong), t2 wrong, t3 has no reference; "t9" not anchored
    assert anchor_score(train, anchors) == pytest.approx(1 / 3)
    assert anchor_score(train, {"t1": "blue"}) == 1.0
    assert anchor_score(train, {}) is None
