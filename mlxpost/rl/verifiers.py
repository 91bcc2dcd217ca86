"""Step verifiers for step-verified RL (RLVR): which parts of a completion are right.

A step verifier checks one completion at a time and says, step by step, which
character spans of it are correct::

    def my_verifier(completion: str, **columns) -> Verdict | dict:
        ...

``columns`` are that row's dataset columns (``answer="9"``, ``numbers=[3, 4]``,
...) plus ``prompt_text``, the rendered prompt. A verifier that does not take
``**columns`` gets only the columns it names as parameters; a parameter
without a default is a column the data must have.

It returns a :class:`Verdict` (or a dict of the same shape)::

    {"steps": [{"start": 0, "end": 9, "score": 1.0, "reason": "ok"}, ...],
     "final_score": 1.0, "final_reason": "answer 9 is correct"}

Each step is a character span ``completion[start:end]`` with a score in
[0, 1] (1 = correct); spans are increasing and do not overlap. Text outside
every span is not scored. :func:`coerce_verdict` checks all of this and names
the verifier and row in its errors.

Built-in verifiers (:func:`load_verifier` names):

* ``arithmetic``: every line with a calculation ``a op b = c`` (any common
  operator spelling, chains ``a = b = c`` link by link) is a step, checked
  with exact arithmetic (see :func:`arithmetic`); the final answer is
  compared with column ``answer``.
* ``arithmetic_lenient``: the same, but an operand that is neither given nor
  computed earlier is allowed.
* ``exact``: no steps; only the final answer against column ``answer``.

Your own: ``path/to/file.py:function`` or ``package.module:function``.

The built-ins treat a completion as untrusted input: whatever it holds
(``1e4999999``, a product of a hundred 11-digit numbers, ``((((...``, a
100,000-character line, NUL bytes), they return a verdict in bounded time
and never raise. Numbers and expressions beyond the limits
(:mod:`mlxpost.rl.answers`: ``MAX_DIGITS``, ``MAX_EXPR_TOKENS``, ``MAX_DEPTH``,
``MAX_LINE_CHARS``, ``MAX_STEPS``) are not evaluated: they score 0
with a reason saying so.

What rewards and verifiers share lives beside: final answers and numbers
(:mod:`mlxpost.rl.answers`), loading user functions (:mod:`mlxpost.rl.plugins`);
the arithmetic checker is :mod:`mlxpost.rl.arithmetic`.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import MlxpostError
from .answers import score_final_answer
from .arithmetic import arithmetic, arithmetic_lenient
from .plugins import ColumnArgs, describe_exception, load_callable, where_label
from .verdict import Step, Verdict

__all__ = ["Step", "Verdict", "StepVerifier", "coerce_verdict", "load_verifier", "exact", "BUILTIN_VERIFIERS"]


def _score(value: Any, what: str, err: Callable[[str], MlxpostError]) -> float:
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, numbers.Real):
        raise err(f"{what} must be a number in [0, 1], got {value!r}")
    x = float(value)
    if not math.isfinite(x) or not 0.0 <= x <= 1.0:
        raise err(f"{what} must be a number in [0, 1], got {value!r}")
    return x


_STEP_KEYS = ("start", "end", "score", "reason")


_VERDICT_KEYS = ("steps", "final_score", "final_reason")


def coerce_verdict(obj: Any, name: str, row: int | str, completion: str) -> Verdict:
    """Check a verifier's result and turn it into a :class:`Verdict`.

    Accepts a :class:`Verdict` or a dict ``{"steps": [...], "final_score": x,
    "final_reason": "..."}`` (``final_reason`` optional); each step a
    :class:`Step`, a dict with ``start``, ``end``, ``score`` and optional
    ``reason``, or a tuple ``(start, end, score[, reason])``. Spans must lie
    within ``completion``, be non-empty, increasing and non-overlapping;
    scores finite in [0, 1] (a bool counts as 0/1). Errors name the verifier
    ``name`` and the ``row``.
    """
    where = where_label(row)

    def err(msg: str) -> MlxpostError:
        return MlxpostError(f"verifier {name}, {where}: {msg}")

    if isinstance(obj, Verdict):
        raw_steps, final_score, final_reason = obj.steps, obj.final_score, obj.final_reason
    elif isinstance(obj, Mapping):
        unknown = [k for k in obj if k not in _VERDICT_KEYS]
        if unknown:
            raise err(f"unknown key {unknown[0]!r} in the verdict (expected {', '.join(_VERDICT_KEYS)})")
        if "final_score" not in obj:
            raise err("the verdict has no 'final_score'")
        raw_steps, final_score = obj.get("steps", []), obj["final_score"]
        final_reason = obj.get("final_reason", "")
    else:
        raise err(f"expected a Verdict or a dict with 'steps' and 'final_score', got {type(obj).__name__}")
    if raw_steps is None:
        raw_steps = []
    if not isinstance(raw_steps, (list, tuple)):
        raise err(f"steps must be a list, got {type(raw_steps).__name__}")
    n = len(completion)
    steps: list[Step] = []
    prev_end = 0
    for i, s in enumerate(raw_steps):
        f = f"steps[{i}]"
        if isinstance(s, Step):
            start, end, score, reason = s.start, s.end, s.score, s.reason
        elif isinstance(s, Mapping):
            unknown = [k for k in s if k not in _STEP_KEYS]
            if unknown:
                raise err(f"{f}: unknown key {unknown[0]!r} (expected {', '.join(_STEP_KEYS)})")
            for k in ("start", "end", "score"):
                if k not in s:
                    raise err(f"{f}: missing {k!r}")
            start, end, score, reason = s["start"], s["end"], s["score"], s.get("reason", "")
        elif isinstance(s, (list, tuple)) and len(s) in (3, 4):
            start, end, score = s[:3]
            reason = s[3] if len(s) == 4 else ""
        else:
            raise err(f"{f}: expected a Step, a dict or a (start, end, score[, reason]) tuple, got {s!r}")
        for k, v in (("start", start), ("end", end)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise err(f"{f}.{k} must be an integer character offset, got {v!r}")
        start, end = int(start), int(end)
        if not 0 <= start < end <= n:
            raise err(f"{f}: span [{start}, {end}) is empty or outside the completion (length {n})")
        if start < prev_end:
            raise err(f"{f}: span [{start}, {end}) overlaps or comes before the previous step "
                      f"(which ends at {prev_end}); steps must be in order and not overlap")
        if reason is None:
            reason = ""
        if not isinstance(reason, str):
            raise err(f"{f}.reason must be a string, got {reason!r}")
        steps.append(Step(start, end, _score(score, f"{f}.score", err), reason))
        prev_end = end
    if final_reason is None:
        final_reason = ""
    if not isinstance(final_reason, str):
        raise err(f"final_reason must be a string, got {final_reason!r}")
    return Verdict(steps, _score(final_score, "final_score", err), final_reason)


def exact(completion: str, answer: Any, **columns) -> Verdict:
    """Final answer only: ``extract_final_answer(completion)`` against column ``answer``; no steps."""
    score, reason = score_final_answer(completion, answer)
    return Verdict([], score, reason)


BUILTIN_VERIFIERS: dict[str, Callable[..., Any]] = {
    "arithmetic": arithmetic,
    "arithmetic_lenient": arithmetic_lenient,
    "exact": exact,
}


def load_verifier(spec: str | Callable, *, base_dir: str | Path | None = None) -> Callable:
    """The verifier function for a built-in name, ``file.py:name`` or ``module:name``."""
    return load_callable(spec, kind="verifier", builtins=BUILTIN_VERIFIERS, base_dir=base_dir)


def _spec_name(spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    return getattr(spec, "__name__", None) or type(spec).__name__


class StepVerifier:
    """A loaded verifier that checks its results.

    ``verify(completion, row_columns)`` calls the function with that row's
    columns and returns a checked :class:`Verdict`; an exception in the
    function becomes an :class:`MlxpostError` naming the verifier and row.
    ``verify_batch(completions, columns)`` does it for a batch whose columns
    are lists aligned with ``completions``.
    """

    def __init__(self, spec: str | Callable, *, base_dir: str | Path | None = None):
        self.spec = _spec_name(spec)
        self.name = self.spec
        self.fn = load_verifier(spec, base_dir=base_dir)
        self.args = ColumnArgs(self.fn, kind="verifier", name=self.name)

    def verify(self, completion: str, row_columns: Mapping[str, Any] | None = None, *,
               row: int | str = 0, source: str | None = None) -> Verdict:
        cols = {k: v for k, v in (row_columns or {}).items() if k != "completion"}
        self.args.check(cols)
        where = where_label(row) + (f" ({source})" if source else "")
        try:
            out = self.fn(completion, **self.args.select(cols))
        except MlxpostError:
            raise
        except Exception as e:  # noqa: BLE001 - user code
            raise MlxpostError(f"verifier {self.name} raised on {where}: {describe_exception(e)}") from e
        return coerce_verdict(out, self.name, where, completion)

    def verify_batch(self, completions: list[str], columns: Mapping[str, list] | None = None, *,
                     prompts: list[str] | None = None, sources: list[str] | None = None) -> list[Verdict]:
        """Verdicts for a batch; ``prompts`` (rendered prompt text) reach the verifier as ``prompt_text``."""
        columns = dict(columns or {})
        if prompts is not None:
            columns["prompt_text"] = prompts
        n = len(completions)
        for k, v in columns.items():
            if not isinstance(v, (list, tuple)) or len(v) != n:
                got = f"{len(v)} values" if isinstance(v, (list, tuple)) else type(v).__name__
                raise MlxpostError(f"verifier {self.name}: column {k!r} has {got} for {n} completions")
        return [self.verify(c, {k: v[i] for k, v in columns.items()}, row=i,
                            source=sources[i] if sources else None)
                for i, c in enumerate(completions)]

    def __repr__(self) -> str:
        return f"StepVerifier({self.spec!r})"
