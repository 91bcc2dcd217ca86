"""Health checks of a run: what a check reports, and the monitor every method's checks build on.

A monitor watches one run. The training loop gives it every step's metrics
(:meth:`HealthMonitor.observe`) and every evaluation
(:meth:`HealthMonitor.observe_eval`); a check reports a :class:`Finding`
the first time its problem shows (the loop shows it live and logs it in
metrics.jsonl), and :meth:`HealthMonitor.summary` gives one verdict per check
at the end of the run. A method's objective names its monitor
(:attr:`mlxpost.training.loop.Objective.monitor`); an objective that names
none gets this base monitor, so every run has the checks below.

Every method's monitor has the *stuck* check (:class:`StuckCheck`): after
warmup, a loss that has not changed at all over ``window`` steps, or a
gradient norm that has collapsed to nothing, means the weights no longer
move (a learning rate so large that the model saturated, frozen
parameters, a loss with no trained tokens). A run like that used to end
with exit 0 and a flat loss curve; now it says so, live and in the summary.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field


@dataclass
class Finding:
    check: str  # the check that found it: collapse, drift, flat-rewards, ...
    step: int
    message: str  # what was seen and why it matters
    advice: str  # what to try

    def __str__(self) -> str:
        return f"{self.check} at step {self.step}: {self.message} Try: {self.advice}"


@dataclass
class StuckCheck:
    """No change: the last ``window`` losses within ``rtol`` of each other, or their gradient norms all below
    ``grad_floor`` times the largest seen, counted only after ``after`` steps (the warmup).

    Different batches give different losses, so even a slow but healthy run
    moves by far more than ``rtol`` (1e-6 of the loss: float32 rounding) from
    step to step; an exactly flat loss means the model's outputs no longer
    depend on what it is trained on.

    >>> c = StuckCheck(window=3)
    >>> [c.update(s, 2.5 + s, 0.0 if s > 1 else 1.0) for s in range(1, 5)]
    [None, None, None, 'grad']
    >>> c = StuckCheck(window=3)
    >>> [c.update(s, 6.2383, 0.5) for s in range(1, 4)]
    [None, None, 'loss']
    """

    window: int = 10  # steps; 0 turns the check off
    after: int = 0  # warmup steps, not judged
    rtol: float = 1e-6
    grad_floor: float = 1e-6
    by_loss: bool = True  # False for objectives whose value says nothing of progress (policy gradients)
    losses: deque = field(default_factory=deque)
    grads: deque = field(default_factory=deque)
    grad_max: float = 0.0

    def update(self, step: int, loss: float | None, grad_norm: float | None) -> str | None:
        """``"loss"`` (flat), ``"grad"`` (collapsed) or None, after the metrics of ``step``."""
        if self.window <= 0 or loss is None:
            return None
        if grad_norm is not None:
            self.grad_max = max(self.grad_max, grad_norm)
        if step <= self.after:
            return None
        self.losses.append(loss)
        self.grads.append(grad_norm)
        while len(self.losses) > self.window:
            self.losses.popleft()
            self.grads.popleft()
        if len(self.losses) < self.window:
            return None
        if all(g is not None and g <= self.grad_floor * self.grad_max for g in self.grads):
            return "grad"
        if self.by_loss and max(self.losses) - min(self.losses) <= self.rtol * max(1.0, abs(self.losses[-1])):
            return "loss"
        return None


class HealthMonitor:
    """The checks of one run. Subclasses write :meth:`check` and name their checks in ``checks``."""

    checks: dict[str, str] = {}  # summary key -> the check name its findings carry

    def __init__(self, total_steps: int):
        self.total = total_steps
        self.findings: list[Finding] = []
        self._seen: set[str] = set()
        self.stuck = StuckCheck()  # the loop sets its window and warmup from the run's settings

    def found(self, key: str, check: str, step: int, message: str, advice: str) -> list[Finding]:
        """A new finding, or none when ``key`` was reported before (each problem is reported once)."""
        if key in self._seen:
            return []
        self._seen.add(key)
        f = Finding(check, step, message, advice)
        self.findings.append(f)
        return [f]

    def observe(self, step: int, metrics: dict) -> list[Finding]:
        """New findings from the metrics of ``step`` (called in step order): the stuck check, then the method's."""
        return self._stuck(step, metrics) + self.check(step, metrics)

    def check(self, step: int, metrics: dict) -> list[Finding]:
        """The method's own checks of one step's metrics."""
        return []

    def observe_eval(self, step: int, val: dict) -> list[Finding]:
        """New findings from an evaluation on the validation data."""
        return []

    def _stuck(self, step: int, m: dict) -> list[Finding]:
        what = self.stuck.update(step, m.get("loss"), m.get("grad_norm"))
        if what is None:
            return []
        n = self.stuck.window
        seen = (f"the loss has not changed for {n} steps (last {m['loss']:.6g})" if what == "loss"
                else f"the gradient norm has been ~0 for {n} steps (last {m.get('grad_norm', 0.0):.3g})")
        return self.found("stuck", "stuck", step, f"{seen}: the weights are no longer learning anything.",
                          "a lower learning rate (train.lr; a rate that is far too high saturates the model), "
                          "and check that the data has trained tokens; train.stuck_steps=0 turns this check off.")

    def summary(self, val: dict | None = None) -> dict:
        """One verdict per check: ``{"verdict": "ok" | "warn", "findings": [...]}``."""
        out = {}
        for key, check in {"stuck": "stuck", **self.checks}.items():
            found = [asdict(f) for f in self.findings if f.check == check]
            out[key] = {"verdict": "warn" if found else "ok", "findings": found}
        return out
