"""Evaluation metrics on hand-made cases: normalisation, multiple choice, captions, ties, length control."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlrlcd.datasets.records import Record
from vlrlcd.errors import VlrlcdError
from vlrlcd.evaluation.metrics import (
    caption_attribute_score,
    caption_mentions,
    choice_match,
    exact_match,
    judge_predictions,
    judge_win_rate,
    length_controlled_win_rate,
    normalize_answer,
    predicted_choice,
    resolve_metric,
    score_record,
    win_rates,
)


@pytest.mark.parametrize("raw, norm", [
    ("The Red.", "red"),
    ("  an   apple,  a pear ", "apple pear"),
    ("Three!", "3"),
    ("twenty one", "20 1"),
    ("-4", "-4"),
    ("minus four", "-4"),
    ("3 - 4", "3 4"),          # a dash between words is not a sign
    ("left-hand", "left hand"),
    ("3.50", "3.5"),
    ("2.0", "2"),
    ("1,000 apples.", "1000 apples"),
    ("It’s “red”", "its red"),
    ("", ""),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


@given(st.text(max_size=30))
@settings(max_examples=300, deadline=None)
def test_normalize_answer_is_idempotent(s):
    once = normalize_answer(s)
    assert normalize_answer(once) == once


def test_exact_match():
    assert exact_match("The circle.", "circle")
    assert exact_match("seven", "7") and exact_match("-3", "minus 3")
    assert not exact_match("-3", "3")          # the sign survives punctuation stripping
    assert not exact_match("The answer is red", "red")  # exact after normalisation, not containment
    assert not exact_match("red circle", "red")


CHOICES = ["red circle", "blue", "green", "7"]


@pytest.mark.parametrize("pred, want", [
    ("B", 1), ("(b)", 1), ("B.", 1), ("b) blue", 1), ("[C]", 2), ("C: green", 2),
    ("The red circle.", 0),     # choice text (article and punctuation ignored)
    ("A red circle", 0),        # choice text again, not the label A followed by words
    ("2", 2), ("(1)", 1),       # 0-based index
    ("7", 3),                   # a choice whose text is the number wins over the index rule
    ("seven", 3),
    ("E", None), ("9", None), ("1.5", None), ("I think blue", None), ("", None),
])
def test_predicted_choice(pred, want):
    assert predicted_choice(pred, CHOICES) == want


def test_choice_match_accepts_index_text_or_letter_as_the_correct_answer():
    assert choice_match("B", CHOICES, 1)
    assert choice_match("blue", CHOICES, "Blue")
    assert choice_match("blue", CHOICES, "b")           # a single letter names a choice
    assert not choice_match("A", CHOICES, 1)
    assert choice_match("purple", CHOICES, "purple")    # correct answer not among the choices: exact match
    with pytest.raises(VlrlcdError, match="out of range"):
        choice_match("A", CHOICES, 4)
    with pytest.raises(VlrlcdError, match="non-empty"):
        choice_match("A", [], 0)


OBJECTS = [{"shape": "circle", "color": "red"}, {"shape": "square", "color": "blue"},
           {"shape": "square", "color": "blue"}]


@pytest.mark.parametrize("caption, score", [
    ("a red circle and a blue square", 2 / 3),      # one blue square named, two in the image
    ("a red circle and blue squares", 1.0),          # plural without a number covers all of them
    ("A RED CIRCLE, TWO BLUE SQUARES.", 1.0),
    ("a red circle and three blue squares", 1.0),    # naming more than there are is not penalised
    ("red and blue squares", 2 / 3),                 # both colours go to "squares"; no red square exists
    ("a red and a blue square", 1 / 3),              # "a blue square" counts once, "red square" is wrong
    ("a small red circle", 1 / 3),
    ("a circle that is red", 0.0),                   # colour after the noun does not count
    ("a blue circle and a red square", 0.0),         # colours swapped
    ("a red triangle", 0.0),
    ("", 0.0),
])
def test_caption_attribute_score(caption, score):
    assert caption_attribute_score(caption, OBJECTS) == pytest.approx(score)


def test_caption_mentions_counts():
    m = caption_mentions("two red and three blue squares, a green circle and red triangles")
    assert m == {("red", "square"): 2, ("blue", "square"): 3, ("green", "circle"): 1,
                 ("red", "triangle"): math.inf}


def test_caption_attribute_score_edge_cases():
    assert caption_attribute_score("a teal circle", [{"shape": "circle", "color": "Teal"}]) == 1.0
    assert caption_attribute_score("a box", []) == 1.0
    with pytest.raises(VlrlcdError, match="object 0"):
        caption_attribute_score("a red circle", [{"shape": "circle"}])


def test_score_record_dispatch():
    cap = Record("c1", "Describe the image.", "x.png", "a red circle",
                 meta={"task": "shapes_caption", "objects": OBJECTS})
    mc = Record("m1", "Which?", None, "blue", choices=CHOICES, meta={"answer_index": 1})
    vqa = Record("v1", "What color?", "x.png", "red", meta={"task": "shapes_vqa", "objects": OBJECTS})
    bare = Record("b1", "Say something.")
    assert resolve_metric(cap) == "caption_attributes" and resolve_metric(mc) == "choice"
    assert resolve_metric(vqa) == "exact_match"       # a VQA record with objects still scores by its answer
    assert score_record(cap, "a red circle and blue squares") == 1.0
    assert score_record(cap, "a red circle", metric="exact_match") == 1.0
    assert score_record(mc, "(B)") == 1.0 and score_record(mc, "A") == 0.0
    assert score_record(vqa, "Red.") == 1.0 and score_record(vqa, "blue") == 0.0
    with pytest.raises(VlrlcdError, match="'b1'"):
        score_record(bare, "hi")
    with pytest.raises(VlrlcdError, match="unknown eval metric 'bleu'"):
        score_record(vqa, "red", metric="bleu")


def test_judge_win_rate_counts_ties_as_half():
    assert judge_win_rate([1, 0.5, 0, 0.5]) == 0.5
    assert judge_win_rate([1, 1, 0.5, 0]) == 0.625
    with pytest.raises(VlrlcdError):
        judge_win_rate([])
    with pytest.raises(VlrlcdError):
        judge_win_rate([1.5])


def test_length_controlled_win_rate_hand_computed():
    # Longer answers (+10 chars) win 4 of 5, shorter ones (-10) win 1 of 2: raw 5/7.
    # The saturated fit gives sigmoid(a ± b·t) = 0.8 / 0.5, so a = (logit 0.8 + logit 0.5)/2 = ln 2
    # and the LC win rate sigmoid(ln 2) = 2/3.
    wins = [1, 1, 1, 1, 0, 1, 0]
    lc = [20] * 5 + [0] * 2
    lr = [10] * 7
    assert judge_win_rate(wins) == pytest.approx(5 / 7)
    assert length_controlled_win_rate(wins, lc, lr) == pytest.approx(2 / 3, abs=1e-4)
    # lengths only enter through d / std(d): scaling them changes nothing
    assert length_controlled_win_rate(wins, [3 * x for x in lc], [3 * x for x in lr]) == pytest.approx(
        2 / 3, abs=1e-4)


def test_length_controlled_win_rate_with_ties_as_soft_labels():
    # +d group: 1, 1, tie, tie -> 0.75; -d group: tie, 0 -> 0.25; a = (logit .75 + logit .25)/2 = 0
    wins = [1, 1, 0.5, 0.5, 0.5, 0]
    d = [5, 5, 5, 5, -5, -5]
    assert judge_win_rate(wins) == pytest.approx(3.5 / 6)
    assert length_controlled_win_rate(wins, d, [0] * 6) == pytest.approx(0.5, abs=1e-4)


def test_length_controlled_win_rate_degenerate_cases():
    assert length_controlled_win_rate([1, 0, 0], [5, 5, 5], [1, 1, 1]) == pytest.approx(1 / 3)  # no length spread
    assert length_controlled_win_rate([1, 1, 1], [9, 1, 5], [1, 1, 1]) == 1.0                 # all wins
    sep = length_controlled_win_rate([1, 1, 0, 0], [10, 10, 0, 0], [5, 5, 5, 5])  # separated by length
    assert math.isfinite(sep) and sep == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(VlrlcdError, match="2 wins, 1 candidate lengths"):
        length_controlled_win_rate([1, 0], [1], [1, 2])


def test_judge_predictions_uses_record_references_and_validates():
    recs = [Record("a", "q1", reference="ref one"), Record("b", "q2", reference="r2")]
    calls = []

    def judge(record, candidate, reference):
        calls.append((record.id, candidate, reference))
        return {"win": 1.0, "tie": 0.5}.get(candidate, 0.0)

    scores = judge_predictions(recs, ["win", "tie"], None, judge)
    assert scores == [1.0, 0.5] and calls == [("a", "win", "ref one"), ("b", "tie", "r2")]
    assert judge_predictions(recs, ["x", "win"], ["s", "t"], judge) == [0.0, 1.0]
    # equal lengths: nothing to control for, the LC win rate is the plain one
    assert win_rates(scores, ["win", "tie"], ["abc", "xyz"]) == {"win_rate": 0.75, "lc_win_rate": 0.75, "n": 2}
    with pytest.raises(VlrlcdError, match="record 'a'"):
        judge_predictions(recs[:1], ["p"], None, lambda r, c, ref: float("nan"))
    with pytest.raises(VlrlcdError, match="aligned"):
        judge_predictions(recs, ["p"], None, judge)

