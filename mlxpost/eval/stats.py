"""The numbers of an evaluation: means with their standard errors, pass@k, ratios of sums.

Every metric of ``eval.json`` is a mean over the task's samples with the
standard error of that mean, computed as lm-evaluation-harness computes it
for its own metrics (``sqrt(var / n)`` with the sample variance, ``ddof=1``),
so that numbers from our built-in tasks and from lm-eval tasks read alike.
Pure functions of plain numbers: the tasks call them, nothing here touches
a model.
"""

from __future__ import annotations

import math
from typing import Sequence

from ..stats import rate_interval


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, standard error of the mean)``; the error is ``sqrt(s^2 / n)`` with ``ddof=1`` (0 for one value).

    >>> mean_stderr([1, 0, 1, 1])
    (0.75, 0.25)
    >>> mean_stderr([])
    (nan, nan)
    """
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = sum(values) / n
    if n == 1:
        return float(m), 0.0
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return float(m), math.sqrt(var / n)


def ratio_stderr(numerators: Sequence[float], denominators: Sequence[float]) -> tuple[float, float]:
    """``sum(x) / sum(m)`` over samples and its standard error (the ratio estimator's, linearized).

    For a metric pooled over units inside samples (the share of correct steps
    over all steps of all answers, the mean log-loss over all tokens of all
    rows) the samples are the independent draws, not the units: a model that
    gets one long answer wrong gets all its steps wrong together. With
    ``R = sum(x_i) / sum(m_i)`` and ``mbar`` the mean of ``m_i``, the
    variance is ``sum((x_i - R m_i)^2) / ((n - 1) n mbar^2)``.

    >>> r, se = ratio_stderr([1, 2, 0], [1, 2, 2]); round(r, 3), round(se, 3)  # sqrt(2.24 / (2 * 3 * 25 / 9))
    (0.6, 0.367)
    >>> ratio_stderr([3], [4])
    (0.75, 0.0)
    """
    n = len(numerators)
    total = sum(denominators)
    if n == 0 or total == 0:
        return math.nan, math.nan
    r = sum(numerators) / total
    if n == 1:
        return r, 0.0
    mbar = total / n
    var = sum((x - r * m) ** 2 for x, m in zip(numerators, denominators)) / ((n - 1) * n * mbar**2)
    return r, math.sqrt(var)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from ``n`` samples of which ``c`` pass (Chen et al. 2021).

    ``1 - C(n - c, k) / C(n, k)``: the chance that at least one of ``k``
    samples drawn without replacement from the ``n`` passes, computed as a
    running product so large ``n`` does not overflow.

    >>> pass_at_k(10, 0, 1), pass_at_k(10, 10, 5), round(pass_at_k(10, 3, 1), 12)
    (0.0, 1.0, 0.3)
    >>> round(pass_at_k(10, 3, 5), 4)  # 1 - C(7, 5) / C(10, 5) = 1 - 21 / 252
    0.9167
    """
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def metric(value: float, stderr: float | None = None) -> dict:
    """One metric as ``eval.json`` keeps it: ``{"value": ..., "stderr": ...}`` (non-finite numbers as None).

    >>> metric(0.5, 0.1), metric(float("nan"))
    ({'value': 0.5, 'stderr': 0.1}, {'value': None, 'stderr': None})
    """

    def clean(x):
        return None if x is None or not math.isfinite(x) else float(x)

    return {"value": clean(value), "stderr": clean(stderr)}


def mean_metric(values: Sequence[float]) -> dict:
    """:func:`metric` of the mean of ``values`` with its standard error; for 0/1 values also ``ci95``.

    A rate's standard error says nothing at the ends (0 of 20 right has
    stderr 0, yet 20 samples cannot tell 0% from 10%), so a rate also gets
    Wilson's 95% interval (:func:`mlxpost.stats.rate_interval`), which stays
    honest at 0, at n and at small n.

    >>> mean_metric([1.0, 0.0])
    {'value': 0.5, 'stderr': 0.5, 'ci95': [0.0945, 0.9055]}
    >>> mean_metric([0.0] * 20)["ci95"], mean_metric([0.25, 0.75])
    ([0.0, 0.1611], {'value': 0.5, 'stderr': 0.25})
    """
    out = metric(*mean_stderr(values))
    if values and all(v in (0, 1) for v in values):
        out["ci95"] = [round(x, 4) for x in rate_interval(int(sum(values)), len(values))]
    return out
