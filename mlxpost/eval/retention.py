"""Before and after: per-metric deltas, retention and a verdict against a minimum retention.

Post-training moves a behaviour and should keep the model's other
capabilities: a DPO run that keeps at least 95% of the SFT model's MMLU
accuracy. For every metric that both evaluations have (same task, same task
configuration) :func:`compare` gives

* ``delta = after - before``, with the standard error ``sqrt(se_a^2 + se_b^2)``
  (the two evaluations are independent runs over the same samples, so this
  is conservative);
* ``retention``: ``after / before`` for a metric where higher is better
  (accuracy, pass@k), ``before / after`` where lower is better (perplexity),
  so that 1.0 is "unchanged" and below 1.0 is "worse" either way; None
  when the ratio says nothing (no direction, a value at or below 0, such as
  a margin that was negative before);
* ``verdict``: ``pass`` when retention >= ``min_retention``, ``fail`` below,
  ``n/a`` without a retention (never a failure).

The gate passes when no metric fails (:func:`gate_passed`); ``mlxpost eval
--baseline`` then exits 0, else 1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class Row:
    task: str
    metric: str
    before: float | None
    after: float | None
    delta: float | None
    delta_stderr: float | None
    retention: float | None
    verdict: str  # pass | fail | n/a

    def to_json(self) -> dict:
        return asdict(self)


def retention(before: float | None, after: float | None, higher_is_better: bool | None) -> float | None:
    """How much of ``before`` is kept in ``after`` (1.0: unchanged); None where a ratio means nothing.

    >>> retention(0.80, 0.76, True), retention(10.0, 12.5, False), retention(-0.2, 0.4, True)
    (0.95, 0.8, None)
    >>> retention(0.5, 0.6, None), retention(0.0, 0.3, True)
    (None, None)
    """
    if before is None or after is None or higher_is_better is None:
        return None
    if higher_is_better:
        return after / before if before > 0 and after >= 0 else None
    return before / after if before > 0 and after > 0 else None


def verdict(ret: float | None, min_retention: float) -> str:
    """``pass``, ``fail`` or ``n/a``, with a tolerance of 1e-9 for ratios that print as the threshold.

    >>> verdict(0.95, 0.95), verdict(0.9499, 0.95), verdict(None, 0.95)
    ('pass', 'fail', 'n/a')
    """
    if ret is None:
        return "n/a"
    return "pass" if ret >= min_retention - 1e-9 else "fail"


def _value(m: dict | None, key: str) -> float | None:
    v = (m or {}).get(key)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def compare(before: dict, after: dict, min_retention: float = 0.95) -> list[Row]:
    """Rows for every metric of every task in both ``before`` and ``after`` (eval.json ``tasks`` sections).

    A task whose ``config_hash`` differs between the two (other data, another
    limit) is compared all the same but every verdict is ``n/a``: its
    numbers are not of the same samples.

    >>> b = {"arith": {"config_hash": "h", "metrics": {"final_acc": {"value": 0.5, "stderr": 0.1}},
    ...                "higher_is_better": {"final_acc": True}}}
    >>> a = {"arith": {"config_hash": "h", "metrics": {"final_acc": {"value": 0.45, "stderr": 0.1}},
    ...                "higher_is_better": {"final_acc": True}}}
    >>> r = compare(b, a)[0]; (r.metric, round(r.delta, 3), round(r.retention, 3), r.verdict)
    ('final_acc', -0.05, 0.9, 'fail')
    """
    rows = []
    for task, a in after.items():
        b = before.get(task)
        if b is None:
            continue
        same = a.get("config_hash") == b.get("config_hash")
        for name, am in a.get("metrics", {}).items():
            bm = b.get("metrics", {}).get(name)
            if bm is None:
                continue
            va, vb = _value(am, "value"), _value(bm, "value")
            sa, sb = _value(am, "stderr"), _value(bm, "stderr")
            delta = va - vb if va is not None and vb is not None else None
            se = math.sqrt(sa**2 + sb**2) if sa is not None and sb is not None else None
            hib = (a.get("higher_is_better") or {}).get(name)
            ret = retention(vb, va, hib)
            rows.append(Row(task, name, vb, va, delta, se, ret, verdict(ret, min_retention) if same else "n/a"))
    return rows


def gate_passed(rows: list[Row]) -> bool:
    """No metric below the minimum retention."""
    return not any(r.verdict == "fail" for r in rows)


def mismatched_tasks(before: dict, after: dict) -> list[str]:
    """Tasks in both whose configurations differ (their verdicts are n/a)."""
    return [t for t in after if t in before and after[t].get("config_hash") != before[t].get("config_hash")]
