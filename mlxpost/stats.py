"""Rates with their intervals, and whether a before/after change is more than noise.

A behaviour measured on ``n`` held-out prompts is a rate ``k / n``; with a few
dozen prompts its uncertainty is large, so every rate the project reports
comes with a 95% interval (:func:`rate_interval`, Wilson's score interval,
which stays inside [0, 1] and behaves at 0 and 1 where the normal
approximation does not).

Before and after training the *same* prompts are answered, so a change is a
paired difference: :func:`paired_change` gives ``after - before`` with a 95%
interval. For pass/fail outcomes it is Newcombe's hybrid score interval for
paired proportions (method 10 of Newcombe, "Improved confidence intervals for
the difference between binomial proportions based on paired data", Stat. Med.
1998), built from the two Wilson intervals and the correlation of the pairs;
for other scores (partial credit, lengths) the normal approximation of the
mean paired difference. A change is *outside noise* when its interval does
not contain 0.
"""

from __future__ import annotations

import math
from typing import Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def rate_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval of a rate ``k / n``.

    >>> [round(x, 4) for x in rate_interval(0, 20)]
    [0.0, 0.1611]
    >>> [round(x, 4) for x in rate_interval(10, 20)]
    [0.2993, 0.7007]
    >>> rate_interval(0, 0)
    (0.0, 1.0)
    """
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At k = 0 and k = n the ends are exactly 0 and 1 (the formula gives them up to rounding).
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def _binary(xs: Sequence[float]) -> bool:
    return all(x in (0, 1, True, False) for x in xs)


def paired_change(before: Sequence[float], after: Sequence[float], z: float = Z95) -> dict:
    """``after - before`` on the same items: the two means, the change, its 95% interval, and a verdict.

    Pass/fail items (0/1) use Newcombe's hybrid score interval for paired
    proportions; other scores the normal approximation of the mean paired
    difference. ``outside_noise``: the interval excludes 0.

    >>> c = paired_change([0] * 40, [1] * 30 + [0] * 10)  # 30 of 40 fixed, none broken
    >>> c["before"], c["after"], c["change"], c["outside_noise"]
    (0.0, 0.75, 0.75, True)
    >>> [round(x, 3) for x in c["ci95"]]
    [0.575, 0.858]
    >>> c = paired_change([1, 0] * 10, [0, 1] * 10)  # as many fixed as broken
    >>> c["change"], c["outside_noise"]
    (0.0, False)
    """
    if len(before) != len(after):
        raise ValueError(f"{len(before)} items before, {len(after)} after: a paired change needs the same items")
    n = len(before)
    if n == 0:
        return {"n": 0, "before": None, "after": None, "change": None, "ci95": None, "outside_noise": False}
    mb, ma = sum(before) / n, sum(after) / n
    if _binary(before) and _binary(after):
        lo, hi = _newcombe_paired(before, after, z)
    else:
        d = [float(a) - float(b) for a, b in zip(after, before)]
        mean = sum(d) / n
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
        lo, hi = mean - z * sd / math.sqrt(n), mean + z * sd / math.sqrt(n)
    change = ma - mb
    return {"n": n, "before": mb, "after": ma, "change": change, "ci95": [lo, hi],
            "outside_noise": lo > 0 or hi < 0}


def _newcombe_paired(before: Sequence, after: Sequence, z: float) -> tuple[float, float]:
    """Newcombe's method 10 for ``p_after - p_before`` on paired 0/1 outcomes.

    With ``a`` items passing both times, ``b`` passing only before, ``c`` only
    after, ``d`` neither, and Wilson intervals ``(l1, u1)`` of the after-rate
    ``p1`` and ``(l2, u2)`` of the before-rate ``p2``: the interval of
    ``p1 - p2`` is ``(t - δ, t + ε)`` with ``δ² = (p1-l1)² - 2φ(p1-l1)(u2-p2)
    + (u2-p2)²``, ``ε² = (u1-p1)² - 2φ(u1-p1)(p2-l2) + (p2-l2)²`` and ``φ``
    the correlation of the pairs (0 when a margin is empty; its numerator
    ``ad - bc`` reduced by ``n/2`` towards 0 when positive, as Newcombe does).
    """
    n = len(before)
    a = sum(1 for x, y in zip(before, after) if x and y)
    b = sum(1 for x, y in zip(before, after) if x and not y)
    c = sum(1 for x, y in zip(before, after) if not x and y)
    d = n - a - b - c
    p1, p2 = (a + c) / n, (a + b) / n  # after, before
    l1, u1 = rate_interval(a + c, n, z)
    l2, u2 = rate_interval(a + b, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    if margins == 0:
        phi = 0.0
    else:
        num = a * d - b * c
        num = max(num - n / 2, 0.0) if num > 0 else num
        phi = num / math.sqrt(margins)
    delta = math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    eps = math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    t = p1 - p2
    return max(-1.0, t - delta), min(1.0, t + eps)


def describe(change: dict, digits: int = 2) -> str:
    """``0.10 -> 0.85 (+0.75, 95% CI +0.58..+0.86, outside noise)``, for tables.

    >>> describe(paired_change([0] * 40, [1] * 30 + [0] * 10))
    '0.00 -> 0.75 (+0.75, 95% CI +0.57..+0.86, outside noise)'
    """
    if not change.get("n"):
        return "-"
    lo, hi = change["ci95"]
    verdict = "outside noise" if change["outside_noise"] else "within noise"
    f = f"{{:.{digits}f}}"
    s = f"{{:+.{digits}f}}"
    return (f"{f.format(change['before'])} -> {f.format(change['after'])} ({s.format(change['change'])}, "
            f"95% CI {s.format(lo)}..{s.format(hi)}, {verdict})")
