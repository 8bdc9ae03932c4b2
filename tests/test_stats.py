"""The paired bootstrap of a method's held-out score difference against SFT (evaluation/stats.py): hand-computed
cases, properties, determinism, and pairing on the ids two predictions.jsonl files share."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlrlcd.evaluation.stats import (
    PairedDiff,
    diff_from_predictions,
    diff_vs_reference,
    entry_diff,
    format_diff,
    paired_bootstrap,
    prediction_scores,
)

EPS = 1e-12


def test_identical_scores_give_zero_and_a_zero_interval():
    s = [1.0, 0.0, 1.0, 1.0, 0.5]
    assert paired_bootstrap(s, s) == PairedDiff(0.0, 0.0, 0.0, 5)


def test_a_constant_shift_gives_a_point_interval():
    a = [0.1, 0.4, 0.2, 0.0]
    d = paired_bootstrap(a, [x + 0.25 for x in a])
    assert d.n == 4
    assert d.diff == pytest.approx(0.25, abs=EPS) and d.low == pytest.approx(0.25, abs=EPS)
    assert d.high == pytest.approx(0.25, abs=EPS)


def test_one_prompt_is_its_own_interval():
    assert paired_bootstrap([0.0], [1.0]) == PairedDiff(1.0, 1.0, 1.0, 1)


def test_two_prompts_hand_computed():
    """d = b - a = [0, 1]: a resample's mean is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4, so the 2.5% and
    97.5% percentiles of 2000 resampled means are 0 and 1 (each end holds ~25% of them), and diff = 1/2."""
    d = paired_bootstrap([1.0, 0.0], [1.0, 1.0])
    assert (d.diff, d.low, d.high, d.n) == (0.5, 0.0, 1.0, 2)


def test_four_prompts_hand_computed():
    """d = [0, 0, 0, 1]: a resample's mean is k/4 with k ~ Binomial(4, 1/4): P(k = 0) = 0.316 > 2.5% and
    P(k <= 2) = 0.949 < 97.5% <= P(k <= 3) = 0.996, so the interval is [0, 3/4] around diff = 1/4."""
    d = paired_bootstrap([1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 2.0])
    assert (d.diff, d.low, d.high) == (0.25, 0.0, 0.75)


def test_b_better_than_a_is_positive_and_the_level_widens_the_interval():
    rng = np.random.default_rng(1)
    a = (rng.random(200) < 0.5).astype(float)
    b = np.where(rng.random(200) < 0.3, 1.0, a)   # b fixes ~30% of a's misses
    d95 = paired_bootstrap(a, b)
    d50 = paired_bootstrap(a, b, level=0.5)
    assert d95.diff == pytest.approx(float(np.mean(b - a))) and d95.diff > 0
    assert d95.low > 0  # 200 prompts resolve a ~0.15 gain
    assert d95.low <= d50.low <= d50.high <= d95.high


def test_matches_a_direct_loop_with_the_same_generator():
    a, b = [0.0, 1.0, 0.5, 1.0, 0.0], [1.0, 1.0, 0.0, 1.0, 1.0]
    d = np.subtract(b, a)
    idx = np.random.default_rng(7).integers(0, 5, size=(300, 5))
    means = [float(np.mean([d[j] for j in row])) for row in idx]
    got = paired_bootstrap(a, b, resamples=300, seed=7, level=0.9)
    assert got.low == pytest.approx(float(np.quantile(means, 0.05)))
    assert got.high == pytest.approx(float(np.quantile(means, 0.95)))


def test_deterministic_for_a_seed():
    a, b = [0.0, 1.0, 1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)
    assert paired_bootstrap(a, b).diff == paired_bootstrap(a, b, seed=4).diff


@pytest.mark.parametrize("a, b, kw, match", [
    ([], [], {}, "no paired prompts"),
    ([1.0], [1.0, 0.0], {}, "same length"),
    ([1.0], [float("nan")], {}, "finite"),
    ([1.0], [1.0], {"resamples": 0}, "resamples"),
    ([1.0], [1.0], {"level": 1.0}, "level"),
])
def test_bad_input_says_what_is_wrong(a, b, kw, match):
    with pytest.raises(ValueError, match=match):
        paired_bootstrap(a, b, **kw)


scores = st.floats(0.0, 1.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(scores, scores), min_size=1, max_size=40), st.integers(0, 2**31 - 1))
def test_interval_contains_the_difference_within_the_range_of_the_differences(pairs, seed):
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    d = paired_bootstrap(a, b, resamples=400, seed=seed)
    diffs = np.subtract(b, a)
    assert d.n == len(pairs) and d.diff == pytest.approx(float(diffs.mean()), abs=EPS)
    assert diffs.min() - EPS <= d.low <= d.diff + EPS and d.diff - EPS <= d.high <= diffs.max() + EPS
    swapped = paired_bootstrap(b, a, resamples=400, seed=seed)   # same resamples: the mirror image
    assert swapped.diff == pytest.approx(-d.diff, abs=EPS)
    assert swapped.low == pytest.approx(-d.high, abs=1e-9) and swapped.high == pytest.approx(-d.low, abs=1e-9)


def test_format():
    assert format_diff(0.0312, 0.0081, 0.0549) == "+0.031 [+0.008, +0.055]"
    assert PairedDiff(-0.5, -0.75, -0.25, 4).format() == "-0.500 [-0.750, -0.250]"
    assert entry_diff({"diff_vs_sft": 0.1, "diff_low": 0.0, "diff_high": 0.2}) == "+0.100 [+0.000, +0.200]"
    assert entry_diff({"accuracy": 0.5}) is None and entry_diff({"diff_vs_sft": None}) is None


def _predictions(path, rows, tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail, encoding="utf-8")


def test_pairs_on_shared_ids_in_the_reference_order(tmp_path):
    _predictions(tmp_path / "sft" / "predictions.jsonl",
                 [{"id": "p1", "correct": False}, {"id": "p2", "correct": 1.0}, {"id": "p3", "correct": 0.0},
                  {"id": "only_sft", "correct": 1.0}, {"id": "unscored", "correct": None}],
                 tail='{"id": "cut off')
    _predictions(tmp_path / "m" / "predictions.jsonl",
                 [{"id": "p3", "correct": 1.0}, {"id": "p1", "correct": True}, {"id": "p2", "correct": 0.5},
                  {"id": "only_m", "correct": 0.0}, {"id": "unscored", "correct": 1.0}])
    assert prediction_scores(tmp_path / "sft" / "predictions.jsonl") == {
        "p1": 0.0, "p2": 1.0, "p3": 0.0, "only_sft": 1.0}
    d = diff_vs_reference(tmp_path, "m")
    want = paired_bootstrap([0.0, 1.0, 0.0], [1.0, 0.5, 1.0])  # p1, p2, p3
    assert d == want and d.n == 3 and d.diff == pytest.approx(0.5)
    assert diff_vs_reference(tmp_path, "sft") is None
    assert diff_vs_reference(tmp_path, "missing") is None
    _predictions(tmp_path / "other" / "predictions.jsonl", [{"id": "x", "correct": 1.0}])
    assert diff_from_predictions(tmp_path / "sft" / "predictions.jsonl",
                                 tmp_path / "other" / "predictions.jsonl") is None
