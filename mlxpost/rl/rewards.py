"""Reward functions for online RL (GRPO): plain Python functions over a batch.

A reward function scores a batch of completions::

    def my_reward(completions: list[str], **columns) -> list[float | None]:
        ...

``columns`` are the dataset columns of the rows the completions answer, each
a list aligned with ``completions`` (``answer=[...]``, ``prompt=[...]``, any
extra column of the data), plus ``prompts``: the rendered prompt text of each
completion. A column named ``completions`` is not passed (it would clash with
the first argument). A function that does not take ``**columns`` gets only
the columns it names as parameters; a parameter without a default is a
column the data must have, and a clear error says so when it is missing.

It returns one value per completion: a number (``bool`` counts as 0/1), or
``None`` when the reward does not apply to that row. ``None`` is left out of
that reward's mean (:meth:`RewardScores.means`) and counts as 0 in the
weighted total. Strings, NaN and infinities are errors.

Built-in rewards (:func:`load_reward` names):

* ``accuracy``: 1.0 when the completion's final answer
  (:func:`mlxpost.rl.answers.extract_final_answer`) matches column ``answer``
  (:func:`mlxpost.rl.answers.answers_match`: numbers exactly, with a tolerance
  only for a decimal its writer may have rounded; else normalized text), else
  0.0; ``None`` for a row without an answer.
* ``format``: 1.0 when the last non-blank line of the completion is
  ``Answer: <something>`` (:data:`FORMAT_LINE`), else 0.0.

Both take completions as untrusted input: any string (``Answer: 1e400``,
``1e4999999``, a 100,000-character line) scores in bounded time, and a
number beyond the parsing limits scores 0, never an exception.

Your own: ``path/to/file.py:function`` or ``package.module:function``. On the
command line a weight follows ``@`` (:func:`parse_reward_option`)::

    --reward accuracy --reward format@0.2 --reward rewards/mine.py:brevity@0.1
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import MlxpostError
from .answers import answers_match, extract_final_answer
from .plugins import ColumnArgs, describe_exception, load_callable, where_label

__all__ = [
    "accuracy", "format_reward", "FORMAT_LINE", "BUILTIN_REWARDS", "load_reward", "parse_reward_option",
    "RewardSet", "RewardScores",
]


# ---------------------------------------------------------------------------
# Built-in rewards
# ---------------------------------------------------------------------------


def accuracy(completions: list[str], answer: list[Any] | None = None, **columns) -> list[float | None]:
    """1.0 when the final answer matches column ``answer``, else 0.0; None where there is no answer.

    >>> accuracy(["Answer: 1000001", "Answer: 1e400", "so it is 7", "Answer: 3.33"], answer=["1000000", "5", "7", "10/3"])
    [0.0, 0.0, 1.0, 0.0]
    """
    if answer is None:
        return [None] * len(completions)
    return [None if gold is None else float(answers_match(extract_final_answer(c), gold))
            for c, gold in zip(completions, answer)]


# The whole last non-blank line: "Answer:" then at least one non-space character.
FORMAT_LINE = re.compile(r"[ \t]*Answer:[ \t]*\S.*")


def format_reward(completions: list[str], **columns) -> list[float]:
    """1.0 when the completion ends with a line ``Answer: <something>`` (trailing whitespace allowed).

    The test: the last non-blank line matches :data:`FORMAT_LINE`,
    ``[ \\t]*Answer:[ \\t]*\\S.*`` (case-sensitive, nothing but whitespace after it).
    """
    out = []
    for c in completions:
        last = next((ln for ln in reversed(str(c).splitlines()) if ln.strip()), None)
        out.append(1.0 if last is not None and FORMAT_LINE.fullmatch(last.rstrip()) else 0.0)
    return out


BUILTIN_REWARDS: dict[str, Callable[..., Any]] = {
    "accuracy": accuracy,
    "format": format_reward,
}


# ---------------------------------------------------------------------------
# Loading and parsing
# ---------------------------------------------------------------------------


def load_reward(spec: str | Callable, *, base_dir: str | Path | None = None) -> Callable:
    """The reward function for a built-in name, ``path/to/file.py:name`` or ``package.module:name``.

    A callable is returned as it is. Relative file paths are taken from
    ``base_dir`` when given (e.g. the recipe's folder), else from the current
    directory. Raises :class:`MlxpostError` for a missing file or module, a
    missing name, or something that is not callable.
    """
    return load_callable(spec, kind="reward", builtins=BUILTIN_REWARDS, base_dir=base_dir)


def _check_weight(weight: Any, spec: Any) -> float:
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(float(weight)):
        raise MlxpostError(f"reward {spec!r}: the weight must be a finite number, got {weight!r}")
    return float(weight)


def parse_reward_option(text: str) -> tuple[str, float]:
    """``SPEC[@WEIGHT]`` → ``(spec, weight)``; the weight defaults to 1.0.

    ``accuracy`` → ``("accuracy", 1.0)``; ``format@0.2`` → ``("format", 0.2)``;
    ``my.py:fmt@-0.5`` → ``("my.py:fmt", -0.5)``. The weight is what follows
    the last ``@``; a path that itself contains ``@`` still works when the
    text after the last ``@`` holds a ``/`` or ``:`` (then there is no weight).
    Weights may be negative (penalties) or 0 (logged, not optimized).
    """
    if not isinstance(text, str) or not text.strip():
        raise MlxpostError(f"--reward: expected NAME, FILE.py:FUNCTION or MODULE:FUNCTION, optionally "
                           f"followed by @WEIGHT, got {text!r}")
    text = text.strip()
    spec, at, weight = text.rpartition("@")
    if not at:
        return text, 1.0
    weight = weight.strip()
    if "/" in weight or ":" in weight or "\\" in weight:
        return text, 1.0  # the '@' belongs to a path
    try:
        w = float(weight)
    except ValueError:
        raise MlxpostError(f"--reward {text!r}: the weight after '@' must be a number, got {weight!r}") from None
    if not spec.strip():
        raise MlxpostError(f"--reward {text!r}: missing the reward before '@'")
    return spec.strip(), _check_weight(w, spec)


# ---------------------------------------------------------------------------
# Scoring a batch
# ---------------------------------------------------------------------------


@dataclass
class RewardScores:
    """Rewards of one batch.

    ``total[i]``: the weighted sum over functions for completion ``i`` (None
    counts as 0). ``per_function[name][i]``: that function's raw value
    (unweighted; None where it does not apply). ``weights[name]``: its weight.
    """

    total: list[float]
    per_function: dict[str, list[float | None]] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)

    def means(self) -> dict[str, float | None]:
        """Mean of each function's values, None left out (None when no row applies)."""
        out: dict[str, float | None] = {}
        for name, vals in self.per_function.items():
            xs = [v for v in vals if v is not None]
            out[name] = sum(xs) / len(xs) if xs else None
        return out


@dataclass
class _Reward:
    spec: str
    name: str
    fn: Callable
    weight: float
    args: ColumnArgs


def _short_name(spec: str) -> str:
    return spec.rpartition(":")[2] if ":" in spec else spec


class RewardSet:
    """Weighted reward functions, scored together with validation.

    ``specs``: ``(spec, weight)`` pairs, where spec is a built-in name,
    ``file.py:name``, ``module:name`` or a callable; a plain string is parsed
    with :func:`parse_reward_option` (``"format@0.2"``). Each function is named
    by its built-in name or its function name (the spec when two would share
    a name); ``names`` lists them in order.
    """

    def __init__(self, specs: Sequence[str | Callable | tuple[str | Callable, float]], *,
                 base_dir: str | Path | None = None):
        if isinstance(specs, (str, tuple)) or callable(specs):
            specs = [specs]  # type: ignore[list-item]
        pairs: list[tuple[Any, float]] = []
        for s in specs:
            if isinstance(s, str):
                pairs.append(parse_reward_option(s))
            elif callable(s):
                pairs.append((s, 1.0))
            elif isinstance(s, (tuple, list)) and len(s) == 2:
                pairs.append((s[0], _check_weight(s[1], s[0])))
            else:
                raise MlxpostError(f"reward: expected a spec string or a (spec, weight) pair, got {s!r}")
        if not pairs:
            raise MlxpostError("no reward functions given (e.g. --reward accuracy)")
        specs_text = [s if isinstance(s, str) else getattr(s, "__name__", type(s).__name__) for s, _ in pairs]
        seen: set[str] = set()
        for t in specs_text:
            if t in seen:
                raise MlxpostError(f"reward {t!r} is given twice; give it once with the summed weight")
            seen.add(t)
        short = [_short_name(t) for t in specs_text]
        self.rewards: list[_Reward] = []
        for (spec, weight), text, name in zip(pairs, specs_text, short):
            if short.count(name) > 1:
                name = text
            fn = load_reward(spec, base_dir=base_dir)
            self.rewards.append(_Reward(text, name, fn, weight, ColumnArgs(fn, kind="reward", name=name)))

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    @property
    def weights(self) -> dict[str, float]:
        return {r.name: r.weight for r in self.rewards}

    def __len__(self) -> int:
        return len(self.rewards)

    def __repr__(self) -> str:
        return "RewardSet([" + ", ".join(f"({r.spec!r}, {r.weight})" for r in self.rewards) + "])"

    def score(self, completions: Sequence[str], columns: Mapping[str, Sequence[Any]] | None = None, *,
              prompts: Sequence[str] | None = None, sources: Sequence[str] | None = None) -> RewardScores:
        """Score a batch.

        ``columns``: dataset columns as lists aligned with ``completions``;
        ``prompts`` (rendered prompt text), when given, is passed as the
        ``prompts`` column. ``sources`` (e.g. ``"train.jsonl:12"`` per
        completion) only make error messages point at the data.

        Raises :class:`MlxpostError` naming the function when it raises (with
        the first row that fails on its own and the exception), returns the
        wrong number of values, or returns something that is not a finite
        number or None (with the row and the value).
        """
        completions = list(completions)
        n = len(completions)
        cols: dict[str, list] = {}
        for k, v in (columns or {}).items():
            if k == "completions":
                continue
            if isinstance(v, (str, bytes)) or not hasattr(v, "__len__") or len(v) != n:
                got = f"{len(v)} values" if hasattr(v, "__len__") and not isinstance(v, (str, bytes)) \
                    else f"a {type(v).__name__}"
                raise MlxpostError(f"rewards: column {k!r} has {got} for {n} completions")
            cols[k] = list(v)
        if prompts is not None:
            if len(prompts) != n:
                raise MlxpostError(f"rewards: {len(prompts)} prompts for {n} completions")
            cols["prompts"] = list(prompts)
        per_function: dict[str, list[float | None]] = {}
        total = [0.0] * n
        for r in self.rewards:
            values = self._call(r, completions, cols, sources) if n else []
            per_function[r.name] = values
            for i, v in enumerate(values):
                if v is not None:
                    total[i] += r.weight * v
        return RewardScores(total, per_function, self.weights)

    def _call(self, r: _Reward, completions: list[str], cols: dict[str, list],
              sources: Sequence[str] | None) -> list[float | None]:
        n = len(completions)
        r.args.check(cols)
        kwargs = r.args.select(cols)
        label = f"reward {r.name}" + (f" ({r.spec})" if r.spec != r.name else "")
        try:
            out = r.fn(list(completions), **{k: list(v) for k, v in kwargs.items()})
        except MlxpostError:
            raise
        except Exception as batch_error:  # noqa: BLE001 - user code: find the row that breaks it
            for i in range(n):
                try:
                    r.fn([completions[i]], **{k: [v[i]] for k, v in kwargs.items()})
                except Exception as e:  # noqa: BLE001
                    raise MlxpostError(f"{label} raised on {where_label(i, sources)}: "
                                       f"{describe_exception(e)}") from e
            raise MlxpostError(f"{label} raised on the batch of {n} (but on no row alone): "
                               f"{describe_exception(batch_error)}") from batch_error
        if isinstance(out, (str, bytes, Mapping)) or not hasattr(out, "__len__") or not hasattr(out, "__iter__"):
            raise MlxpostError(f"{label} returned {type(out).__name__}; expected a list of {n} numbers "
                               f"(one per completion)")
        out = list(out)
        if len(out) != n:
            raise MlxpostError(f"{label} returned {len(out)} values for {n} completions; expected {n}")
        values: list[float | None] = []
        for i, v in enumerate(out):
            if v is None:
                values.append(None)
                continue
            if isinstance(v, (bool, np.bool_)):
                values.append(float(v))
                continue
            if not isinstance(v, numbers.Real):
                raise MlxpostError(f"{label} returned {v!r} for {where_label(i, sources)}; expected a number "
                                   f"or None")
            x = float(v)
            if not math.isfinite(x):
                raise MlxpostError(f"{label} returned {v!r} for {where_label(i, sources)}; rewards must be "
                                   f"finite")
            values.append(x)
        return values
