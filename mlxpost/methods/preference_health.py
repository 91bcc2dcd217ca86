"""Health checks of a preference run: shown live, logged, and summed up at the end.

The monitor reads the metrics the loop reports (means over the pairs of a
step, see :mod:`mlxpost.methods.preference`) and raises a :class:`Finding` the first
time a problem shows. Checks:

* **collapse**: within the first ``collapse_fraction`` of the steps the
  preference loss (``-log sigmoid(z)``) is already below ``collapse_loss``
  with every pair ranked right: the pairs are too easy (typical of
  synthetic negatives) and the run learns little beyond telling them apart.
  Also: the rejected completions' log-prob per token has fallen more than
  ``rejected_drop`` nats below where it started and is still falling: the
  model is pushing rejected text down without bound.
* **drift**: the KL estimate to the reference is above ``kl_max`` (nats per
  token), or the chosen completions' log-prob per token has fallen more
  than ``chosen_drop`` below its start while the rejected one falls too:
  the model is unlearning the chosen answers along with the rejected ones.
* **non-finite** loss or gradients are caught by the training loop itself,
  which stops, keeps the last good checkpoint and names the batch.
* **quality gate** (end of run): the mean reward margin and the accuracy on
  the validation pairs, against ``gate_min_margin`` and ``gate_min_accuracy``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..training.health import Finding, HealthMonitor


@dataclass
class Thresholds:
    kl_max: float = 0.1
    collapse_loss: float = 0.05
    collapse_fraction: float = 0.05
    rejected_drop: float = 2.0
    chosen_drop: float = 0.1
    gate_min_margin: float = 0.0
    gate_min_accuracy: float = 0.6


class PreferenceHealth(HealthMonitor):
    """Watches one preference run; ``observe`` takes every step's metrics, in step order.

    Single steps are noisy (each sees different pairs), so the drift and
    unbounded-fall checks use exponential moving averages (weight ``ema``)
    of the per-token log-ratios to the reference (0 at the start of every
    batch). Without a reference (ORPO, CPO, SimPO) the per-token log-probs
    are compared with their average over the first ``baseline_steps`` steps.
    """

    checks = {"collapse": "collapse", "drift": "drift"}

    def __init__(self, total_steps: int, thresholds: Thresholds | None = None, *, ema: float = 0.2,
                 baseline_steps: int = 5):
        super().__init__(total_steps)
        self.t = thresholds or Thresholds()
        self.alpha = ema
        self.baseline_steps = baseline_steps
        self.avg: dict[str, float] = {}
        self.prev_avg: dict[str, float] = {}
        self.base: dict[str, list[float]] = {"c": [], "r": []}

    def _track(self, name: str, value: float) -> float:
        old = self.avg.get(name)
        self.prev_avg[name] = old if old is not None else value
        self.avg[name] = value if old is None else (1 - self.alpha) * old + self.alpha * value
        return self.avg[name]

    def _drifts(self, m: dict) -> tuple[float | None, float | None]:
        """Per-token change of the chosen and rejected log-probs since the start (smoothed)."""
        if "logratio/chosen" in m:
            return self._track("c", m["logratio/chosen"]), self._track("r", m["logratio/rejected"])
        c, r = m.get("logps/chosen_mean"), m.get("logps/rejected_mean")
        if c is None or r is None:
            return None, None
        if len(self.base["c"]) < self.baseline_steps:
            self.base["c"].append(c)
            self.base["r"].append(r)
            return None, None
        c0, r0 = (sum(v) / len(v) for v in (self.base["c"], self.base["r"]))
        return self._track("c", c - c0), self._track("r", r - r0)

    def check(self, step: int, m: dict) -> list[Finding]:
        """New findings from the metrics of ``step`` (the stuck check runs first, in the base monitor)."""
        if "rewards/accuracies" not in m:
            return []
        out: list[Finding] = []
        t = self.t
        early = step <= max(1, math.ceil(t.collapse_fraction * self.total))
        pref = m.get("pref_loss")
        if early and pref is not None and pref < t.collapse_loss and m["rewards/accuracies"] >= 0.999:
            out += self.found(
                "collapse-early", "collapse", step,
                f"preference loss {pref:.4f} with accuracy 1.0 after {step} of {self.total} steps: the pairs "
                "are separated almost at once, so they teach little (typical of synthetic rejected answers "
                "that are too easy to tell apart).",
                "harder negatives (rejected answers close to the chosen ones), a lower learning rate, or a "
                "larger beta; check that chosen and rejected are not told apart by format alone.")
        dc, dr = self._drifts(m)
        if dr is not None and dr < -t.rejected_drop and dr < self.prev_avg["r"]:
            out += self.found(
                "collapse-rejected", "collapse", step,
                f"the rejected answers' log-prob per token has fallen {-dr:.2f} nats since the start and is "
                "still falling: the model is pushing rejected text down without bound instead of ranking pairs.",
                "a larger beta (a tighter tie to the reference), fewer steps or a lower learning rate, "
                "or IPO (--set dpo.loss=ipo), which targets a finite margin.")
        if "kl" in m:
            kl = self._track("kl", m["kl"])
            if kl > t.kl_max:
                out += self.found(
                    "drift-kl", "drift", step,
                    f"the KL estimate to the reference is {kl:.4f} nats per token (threshold {t.kl_max}): "
                    "the policy is moving far from where it started.",
                    "a larger beta, a lower learning rate or fewer steps; raise preference.kl_max if this "
                    "is intended.")
        if dc is not None and dr is not None and dc < -t.chosen_drop and dr < 0:
            out += self.found(
                "drift-chosen", "drift", step,
                f"the chosen answers' log-prob per token has fallen {-dc:.3f} nats since the start while the "
                f"rejected ones fell {-dr:.3f}: the model is unlearning the chosen answers along with the "
                "rejected ones.",
                "ORPO or CPO (they keep an NLL term on the chosen answers), a lower learning rate, or "
                "SFT on the chosen answers first (--from an SFT run).")
        return out

    def gate(self, val: dict | None) -> dict:
        """The end-of-run quality gate on the validation pairs."""
        t = self.t
        if not val or "val_rewards/margins" not in val:
            return {"verdict": "skipped", "reason": "no validation pairs"}
        margin, acc = val["val_rewards/margins"], val["val_rewards/accuracies"]
        ok_margin, ok_acc = margin > t.gate_min_margin, acc >= t.gate_min_accuracy
        return {"verdict": "pass" if ok_margin and ok_acc else "fail", "margin": margin, "accuracy": acc,
                "min_margin": t.gate_min_margin, "min_accuracy": t.gate_min_accuracy}

    def summary(self, val: dict | None = None) -> dict:
        checks = super().summary(val)
        checks["non_finite"] = {"verdict": "ok"}
        checks["quality_gate"] = self.gate(val)
        return checks
