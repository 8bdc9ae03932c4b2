"""Ranking core math: margins, D_x, its entropy, DPO pairs. Expected values are worked out by hand here."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlrlcd.errors import VlrlcdError
from vlrlcd.ranking.core import entropy, log_target_distribution, margins, target_distribution
from vlrlcd.ranking.pairs import ANCHOR, preference_pairs

HYP = settings(derandomize=True, deadline=None, max_examples=100)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --- margins -------------------------------------------------------------------------------------

def test_margins_subtract_the_anchor_self_score_per_prompt():
    g = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -3.0, -1.0]])
    ga = torch.tensor([-1.5, -2.0])
    expected = torch.tensor([[0.5, -0.5, 1.0], [-1.0, -1.0, 1.0]])
    assert torch.equal(margins(g, ga), expected)


def test_margins_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="g_anchor"):
        margins(torch.zeros(2, 3), torch.zeros(3))


# --- target distribution -------------------------------------------------------------------------

def test_target_distribution_hand_computed():
    r = [0.0, 1.0, -1.0]
    gamma, tau = 1.0, 0.5
    # D(k) ∝ sigmoid(γ r_k) · exp(r_k / τ)
    w = [_sigmoid(gamma * x) * math.exp(x / tau) for x in r]
    # w = [0.5, 0.7310586 * e^2, 0.2689414 * e^-2]
    assert w[0] == pytest.approx(0.5)
    assert w[1] == pytest.approx(0.7310585786 * 7.3890560989)
    z = sum(w)
    expected = torch.tensor([[x / z for x in w]], dtype=torch.float64)
    D = target_distribution(torch.tensor([r], dtype=torch.float64), gamma, tau)
    assert torch.allclose(D, expected, atol=1e-12)
    assert D.sum().item() == pytest.approx(1.0)


def test_gamma_zero_is_the_gibbs_distribution():
    # sigmoid(0) = 1/2 for everyone, so D = softmax(r / τ): r = [0, ln 2, ln 3], τ = 1 -> [1, 2, 3] / 6
    r = torch.tensor([[0.0, math.log(2.0), math.log(3.0)]], dtype=torch.float64)
    D = target_distribution(r, gamma=0.0, tau=1.0)
    assert torch.allclose(D, torch.tensor([[1 / 6, 2 / 6, 3 / 6]], dtype=torch.float64), atol=1e-12)


def test_invalid_candidates_get_zero_and_the_rest_renormalise():
    r = torch.tensor([[0.0, math.log(3.0), 5.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    valid = torch.tensor([[True, True, False], [False, False, False]])
    D = target_distribution(r, gamma=0.0, tau=1.0, valid=valid)
    # row 0: softmax over [0, ln 3] = [1/4, 3/4]; row 1: nothing valid -> all zeros, no NaN
    expected = torch.tensor([[0.25, 0.75, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(D, expected, atol=1e-12)
    assert torch.equal(entropy(D)[1], torch.tensor(0.0, dtype=torch.float64))


def test_target_distribution_is_stable_for_huge_margins():
    r = torch.tensor([[1000.0, -1000.0, 0.0]])
    D = target_distribution(r, gamma=10.0, tau=0.01)
    assert torch.isfinite(D).all()
    assert torch.allclose(D, torch.tensor([[1.0, 0.0, 0.0]]))


def test_target_distribution_rejects_bad_temperature():
    with pytest.raises(ValueError, match="tau"):
        target_distribution(torch.zeros(1, 2), gamma=1.0, tau=0.0)
    with pytest.raises(ValueError, match="gamma"):
        target_distribution(torch.zeros(1, 2), gamma=-1.0, tau=1.0)


def test_entropy_hand_computed():
    D = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.25, 0.25, 0.5]])
    expected = torch.tensor([math.log(2.0), 0.0, -(0.5 * math.log(0.25) + 0.5 * math.log(0.5))])
    assert torch.allclose(entropy(D), expected, atol=1e-7)


# --- properties ----------------------------------------------------------------------------------

distinct_margins = st.lists(st.integers(-2000, 2000), min_size=2, max_size=8, unique=True).map(
    lambda xs: [x / 100.0 for x in xs])  # distinct values in [-20, 20], at least 0.01 apart


@HYP
@given(r=distinct_margins, gamma=st.floats(0.0, 5.0), tau=st.floats(0.05, 5.0))
def test_log_D_is_strictly_increasing_in_r(r, gamma, tau):
    rt = torch.tensor([r], dtype=torch.float64)
    logd = log_target_distribution(rt, gamma, tau)[0]
    order = torch.argsort(rt[0])
    assert torch.all(logd[order][1:] > logd[order][:-1])


@HYP
@given(r=st.lists(st.integers(-500, 500), min_size=2, max_size=8, unique=True).map(
    lambda xs: [x / 100.0 for x in xs]), gamma=st.floats(0.0, 5.0), tau=st.floats(0.5, 5.0))
def test_D_is_strictly_increasing_in_r(r, gamma, tau):
    rt = torch.tensor([r], dtype=torch.float64)
    D = target_distribution(rt, gamma, tau)[0]
    order = torch.argsort(rt[0])
    assert torch.all(D[order][1:] > D[order][:-1])
    assert D.sum().item() == pytest.approx(1.0, abs=1e-12)


@HYP
@given(r=st.lists(st.floats(-50.0, 50.0), min_size=1, max_size=10), tau=st.floats(0.01, 10.0))
def test_gibbs_expected_margin_is_within_tau_log_k_of_the_max(r, tau):
    # E_D[r] = τ·(logsumexp(r/τ) − H(D)) ≥ max r − τ log K, since logsumexp ≥ max and H ≤ log K
    rt = torch.tensor([r], dtype=torch.float64)
    D = target_distribution(rt, gamma=0.0, tau=tau)
    expected_r = (D * rt).sum().item()
    assert expected_r >= max(r) - tau * math.log(len(r)) - 1e-9
    assert expected_r <= max(r) + 1e-9


def test_gibbs_bound_is_tight_when_all_margins_tie():
    # all equal: E_D[r] = r = max r; the bound max r − τ log K is below it by exactly τ log K
    r = torch.full((1, 4), -0.3, dtype=torch.float64)
    D = target_distribution(r, gamma=0.0, tau=2.0)
    assert torch.allclose(D, torch.full((1, 4), 0.25, dtype=torch.float64))
    assert entropy(D).item() == pytest.approx(math.log(4.0))


# --- pairs ---------------------------------------------------------------------------------------

R = torch.tensor([[0.0, -1.0, 1.0], [0.2, 0.2, 0.2], [-0.5, -0.2, -0.4]])


def test_best_worst_pairs():
    assert preference_pairs(R, "best_worst", 0.0) == [(0, 2, 1), (2, 1, 0)]
    # margin 0.3 drops prompt 2 (best − worst = 0.3, not > 0.3)
    assert preference_pairs(R, "best_worst", 0.3) == [(0, 2, 1)]


def test_best_worst_breaks_ties_by_first_index():
    r = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    assert preference_pairs(r, "best_worst", 0.0) == [(0, 0, 1)]


def test_all_pairs_with_margin():
    assert preference_pairs(R, "all", 0.0) == [
        (0, 0, 1), (0, 2, 0), (0, 2, 1),
        (2, 1, 0), (2, 1, 2), (2, 2, 0),
    ]
    # differences > 0.5: prompt 0 keeps 0 − (−1) = 1, 1 − 0 = 1, 1 − (−1) = 2; prompt 2's largest is 0.3
    assert preference_pairs(R, "all", 0.5) == [(0, 0, 1), (0, 2, 0), (0, 2, 1)]


def test_anchor_pairs_are_anchor_against_each_candidate_it_beats():
    # the anchor's own margin is 0: it beats candidates with r_k < −margin
    assert preference_pairs(R, "anchor", 0.0) == [
        (0, ANCHOR, 1), (2, ANCHOR, 0), (2, ANCHOR, 1), (2, ANCHOR, 2)]
    assert preference_pairs(R, "anchor", 0.3) == [(0, ANCHOR, 1), (2, ANCHOR, 0), (2, ANCHOR, 2)]
    assert preference_pairs(torch.zeros(1, 3), "anchor", 0.0) == []


def test_pairs_reject_bad_mode_and_margin():
    with pytest.raises(VlrlcdError, match="ranking.pairs 'best'"):
        preference_pairs(R, "best", 0.0)
    with pytest.raises(VlrlcdError, match="pair_margin"):
        preference_pairs(R, "all", -0.1)
