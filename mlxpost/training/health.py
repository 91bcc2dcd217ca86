"""Health checks of a run: what a check reports, and the monitor every method's checks build on.

A monitor watches one run. The training loop gives it every step's metrics
(:meth:`HealthMonitor.observe`) and every evaluation
(:meth:`HealthMonitor.observe_eval`); a check reports a :class:`Finding`
the first time its problem shows (the loop shows it live and logs it in
metrics.jsonl), and :meth:`HealthMonitor.summary` gives one verdict per check
at the end of the run. A method's objective names its monitor
(:attr:`mlxpost.training.loop.Objective.monitor`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Finding:
    check: str  # the check that found it: collapse, drift, flat-rewards, ...
    step: int
    message: str  # what was seen and why it matters
    advice: str  # what to try

    def __str__(self) -> str:
        return f"{self.check} at step {self.step}: {self.message} Try: {self.advice}"


class HealthMonitor:
    """The checks of one run. Subclasses write :meth:`observe` and name their checks in ``checks``."""

    checks: dict[str, str] = {}  # summary key -> the check name its findings carry

    def __init__(self, total_steps: int):
        self.total = total_steps
        self.findings: list[Finding] = []
        self._seen: set[str] = set()

    def found(self, key: str, check: str, step: int, message: str, advice: str) -> list[Finding]:
        """A new finding, or none when ``key`` was reported before (each problem is reported once)."""
        if key in self._seen:
            return []
        self._seen.add(key)
        f = Finding(check, step, message, advice)
        self.findings.append(f)
        return [f]

    def observe(self, step: int, metrics: dict) -> list[Finding]:
        """New findings from the metrics of ``step`` (called in step order)."""
        return []

    def observe_eval(self, step: int, val: dict) -> list[Finding]:
        """New findings from an evaluation on the validation data."""
        return []

    def summary(self, val: dict | None = None) -> dict:
        """One verdict per check: ``{"verdict": "ok" | "warn", "findings": [...]}``."""
        out = {}
        for key, check in self.checks.items():
            found = [asdict(f) for f in self.findings if f.check == check]
            out[key] = {"verdict": "warn" if found else "ok", "findings": found}
        return out
