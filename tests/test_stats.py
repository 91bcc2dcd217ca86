"""Intervals of rates and of paired changes: their coverage, and their edges."""

from __future__ import annotations

import random

import pytest

from mlxpost.stats import paired_change, rate_interval


def test_wilson_interval_holds_the_rate_and_stays_in_0_1():
    for n in (1, 5, 48):
        for k in range(n + 1):
            lo, hi = rate_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0


@pytest.mark.parametrize("p_before, p_after, rho", [(0.5, 0.5, 0.0), (0.3, 0.6, 0.3), (0.1, 0.8, 0.0),
                                                   (0.6, 0.9, 0.5)])
def test_paired_change_covers_the_true_change_about_95_percent_of_the_time(p_before, p_after, rho):
    """Simulated paired outcomes (48 prompts; correlated by drawing 'after' from 'before' with probability
    rho): the interval holds the true change in 92-99% of 2000 trials."""
    rng = random.Random(0)
    n, trials, hits = 48, 2000, 0
    for _ in range(trials):
        before = [rng.random() < p_before for _ in range(n)]
        after = [b if rng.random() < rho else rng.random() < p_after for b in before]
        # With copying, the after-rate is rho * p_before + (1 - rho) * p_after.
        truth = rho * p_before + (1 - rho) * p_after - p_before
        lo, hi = paired_change(before, after)["ci95"]
        hits += lo <= truth <= hi
    assert 0.92 <= hits / trials <= 0.99


def test_paired_change_edges():
    c = paired_change([1] * 10, [1] * 10)  # nothing changed
    assert c["change"] == 0 and not c["outside_noise"] and c["ci95"][0] < 0 < c["ci95"][1]
    c = paired_change([0] * 48, [1] * 48)  # every item fixed: the interval is the after-rate's own lower end
    assert c["change"] == 1 and c["outside_noise"] and c["ci95"][1] == 1.0 and c["ci95"][0] > 0.85
    c = paired_change([2.0, 3.0, 4.0], [3.0, 4.0, 5.0])  # scores, not pass/fail: the normal approximation
    assert c["change"] == 1.0 and c["ci95"] == [1.0, 1.0]
    assert paired_change([], [])["change"] is None
    with pytest.raises(ValueError, match="same items"):
        paired_change([1], [1, 0])
