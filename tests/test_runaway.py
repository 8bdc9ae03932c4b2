"""The collapse warning: the share of candidates that end without an EOS, and when it is worth a warning."""

from __future__ import annotations

import pytest

from vlrlcd.training.runaway import RunawayWatch, unfinished_share

EOS = [2]


def test_unfinished_share_counts_candidates_without_a_final_eos():
    assert unfinished_share([[5, 6, 2], [5, 6, 7], [2], []], EOS) == pytest.approx(0.5)
    assert unfinished_share([], EOS) == 0.0
    assert unfinished_share([[5, 9]], [2, 9]) == 0.0   # any of the EOS ids ends a candidate


def _feed(watch: RunawayWatch, shares: list[float]) -> list[tuple[int, str]]:
    out = []
    for step, s in enumerate(shares, 1):
        msg = watch.update(step, s, 1e-3)
        if msg:
            out.append((step, msg))
    return out


def test_a_rise_to_unfinished_candidates_warns_once_naming_the_lr():
    # the measured collapse: answers end at first, then run to the length limit
    fired = _feed(RunawayWatch(window=3), [0.0, 0.05, 0.0] + [0.2, 0.9, 1.0, 1.0, 1.0, 1.0])
    assert len(fired) == 1
    step, msg = fired[0]
    assert step == 6                                   # the last 3 steps' mean 0.70 first passes 0.5
    assert "train.lr (now 0.001)" in msg and "train.warmup_steps" in msg and "unfinished" in msg


@pytest.mark.parametrize("shares", [
    [0.0] * 3 + [0.3] * 10,            # a rise that stays under the threshold
    [0.7] * 3 + [0.9] * 10,            # long answers from the start: high, but no rise of 0.4
    [0.0] * 3 + [1.0, 0.0, 0.0] * 4,   # spikes that do not hold for a window
])
def test_no_warning_without_a_sustained_rise(shares):
    assert _feed(RunawayWatch(window=3), shares) == []


def test_a_missing_share_is_skipped():
    watch = RunawayWatch(window=2)
    assert _feed(watch, [0.0, 0.0]) == [] and watch.update(3, None, 1e-3) is None and watch.recent == []
