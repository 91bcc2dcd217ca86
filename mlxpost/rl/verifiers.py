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
(:data:`MAX_DIGITS`, :data:`MAX_EXPR_TOKENS`, :data:`MAX_DEPTH`,
:data:`MAX_LINE_CHARS`, :data:`MAX_STEPS`) are not evaluated: they score 0
with a reason saying so.

This module also holds what rewards and verifiers share: final-answer
extraction (:func:`extract_final_answer`), answer comparison
(:func:`answers_match`) and loading user functions (:func:`load_callable`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
import traceback
from dataclasses import asdict, dataclass, field
from decimal import Decimal, localcontext
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import MlxpostError

__all__ = [
    "Step", "Verdict", "StepVerifier", "coerce_verdict", "load_verifier", "load_callable",
    "extract_final_answer", "answers_match", "parse_number", "arithmetic", "exact", "BUILTIN_VERIFIERS",
]


# ---------------------------------------------------------------------------
# Data types
# ---------------------------------------------------------------------------


@dataclass
class Step:
    """One verified step: ``completion[start:end]``, scored in [0, 1] (1 = correct)."""

    start: int
    end: int
    score: float
    reason: str = ""


@dataclass
class Verdict:
    """A verifier's judgement of one completion: its steps and its final answer."""

    steps: list[Step] = field(default_factory=list)
    final_score: float = 0.0
    final_reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def all_correct(self) -> bool:
        return self.final_score == 1.0 and all(s.score == 1.0 for s in self.steps)


# ---------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------

# Completions are untrusted model output: a policy under RL will find any
# input that crashes, stalls or fools a check. Every parse below is bounded.
MAX_DIGITS = 1000  # digits of a number's numerator or denominator (literal, intermediate or result)
MAX_EXPR_TOKENS = 256  # tokens in one side of an equation
MAX_DEPTH = 32  # nesting of parentheses, signs and powers in one expression
MAX_LINE_CHARS = 10_000  # a longer line holding "=" and a digit is a step scored 0, not read
MAX_STEPS = 1000  # steps checked per completion; later calculation lines score 0 unread

_LIMIT = 10**MAX_DIGITS  # a value's numerator and denominator stay below this
_LIMIT_BITS = _LIMIT.bit_length()


def _short(text: Any, limit: int = 60) -> str:
    """``text`` for a reason: at most ``limit`` characters (an ellipsis and the length when cut)."""
    s = str(text)
    return s if len(s) <= limit else f"{s[:limit - 1]}\u2026 ({len(s)} characters)"


# ---------------------------------------------------------------------------
# Numbers and final answers
# ---------------------------------------------------------------------------

# A number as written: "1,234" (thousands separators), "3.5", ".5", "42".
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
_MINUSES = "-\u2212\u2013"  # hyphen-minus, minus sign, en dash
_TO_HYPHEN = str.maketrans({c: "-" for c in _MINUSES[1:]})
# A number in running text: a leading minus only when it is not a binary minus ("10-3").
_NUMBER_IN_TEXT = re.compile(rf"(?<![\w.,/])(?:[{_MINUSES}](?=[\d.]))?"
                             rf"(?:\d+/\d+(?![\d.,/])|{_UNSIGNED}(?:[eE][+-]?\d+)?)")
_NUMBER_FULL = re.compile(r"(?P<sign>[+-]?)(?P<int>\d{1,3}(?:,\d{3})+|\d*)(?:\.(?P<frac>\d+))?"
                          r"(?:[eE](?P<exp>[+-]?\d+))?")
_FRACTION_FULL = re.compile(r"([+-]?\d+)\s*/\s*([+-]?\d+)")

# The final answer line: "Answer: 42" (also "**Answer:** 42", any case); the
# text after the colon, without surrounding spaces and emphasis, is the answer.
# (The stripping is done in Python: a lazy group followed by an optional run
# of spaces backtracks quadratically on a long line of spaces.)
ANSWER_LINE = re.compile(r"^[ \t>*_#]*answer[*_]*[ \t]*[:\uff1a](?P<answer>.*)$", re.IGNORECASE | re.MULTILINE)
_ANSWER_STRIP = " \t\r\n\x0b\x0c*_"


class _Refused(ValueError):
    """A number or expression that is not evaluated (too large, unsupported): the message says why."""


@dataclass(frozen=True)
class _Num:
    """A number read from text: its exact value and how precisely it was written.

    ``half_unit`` is half a unit in the last written digit of a number written
    with a decimal point or an exponent (``3.33`` -> 0.005, ``2e-7`` ->
    5e-8), which its writer may have rounded; None for integers and ``a/b``,
    which are exact. ``point``: written with digits after a decimal point.
    """

    value: Fraction
    half_unit: Fraction | None = None
    point: bool = False


def _too_big(v: Fraction) -> bool:
    return abs(v.numerator) >= _LIMIT or v.denominator >= _LIMIT


def _decimal_literal(m: re.Match, text: str) -> _Num:
    """The exact value of a matched decimal literal, refused beyond :data:`MAX_DIGITS` (no big power is built)."""
    int_part, frac, exp = m.group("int").replace(",", ""), m.group("frac") or "", m.group("exp")
    if len(int_part) + len(frac) > MAX_DIGITS:
        raise _Refused(f"{_short(text)} has more than {MAX_DIGITS} digits")
    digits = (int_part + frac).lstrip("0")
    e = -len(frac)
    if exp is not None:
        magnitude = exp.lstrip("+-").lstrip("0") or "0"
        if len(magnitude) > 6:
            raise _Refused(f"the exponent of {_short(text)} is out of range")
        e += -int(magnitude) if exp.startswith("-") else int(magnitude)
    if abs(e) > MAX_DIGITS or len(digits) + e > MAX_DIGITS:
        raise _Refused(f"{_short(text)} is out of range (more than {MAX_DIGITS} digits)")
    mantissa = int(digits) if digits else 0
    value = Fraction(mantissa * 10**e) if e >= 0 else Fraction(mantissa, 10**-e)
    if m.group("sign") == "-":
        value = -value
    half = Fraction(10)**e / 2 if frac or exp is not None else None
    return _Num(value, half, bool(frac))


def _read_number(x: Any) -> tuple[_Num | None, str | None]:
    """``(number, None)``, or ``(None, why)`` for a number that is refused, or ``(None, None)`` for no number.

    Text: ``"1,234"``, ``"-3.5"``, ``".5"``, ``"7."``, ``"$5"``, ``"2e-7"``,
    ``"3/4"`` (minus signs ``-``, ``−`` and ``–``). A Python int is exact, a
    float is read from its shortest repr (``0.1`` is the decimal 0.1). Refused:
    more than :data:`MAX_DIGITS` digits in the value, an exponent beyond it.
    """
    if isinstance(x, bool):
        return None, None
    if isinstance(x, numbers.Integral):
        v = int(x)
        if abs(v) >= _LIMIT:
            return None, f"an integer of more than {MAX_DIGITS} digits"
        return _Num(Fraction(v)), None
    if isinstance(x, numbers.Rational):
        v = Fraction(x.numerator, x.denominator)
        return (None, f"a fraction of more than {MAX_DIGITS} digits") if _too_big(v) else (_Num(v), None)
    if isinstance(x, numbers.Real):
        f = float(x)
        return _read_number(repr(f)) if math.isfinite(f) else (None, None)
    if not isinstance(x, str):
        return None, None
    s = x.strip().rstrip(".").strip()
    if s.startswith("$"):
        s = s[1:].strip()
    s = s.translate(_TO_HYPHEN)
    try:
        m = _NUMBER_FULL.fullmatch(s)
        if m and (m.group("int") or m.group("frac")):
            return _decimal_literal(m, x.strip()), None
        m = _FRACTION_FULL.fullmatch(s)
        if m:
            a, b = m.group(1), m.group(2)
            if max(len(a), len(b)) > MAX_DIGITS:
                raise _Refused(f"{_short(x.strip())} has more than {MAX_DIGITS} digits")
            if int(b) == 0:
                return None, None
            return _Num(Fraction(int(a), int(b))), None
    except _Refused as e:
        return None, str(e)
    return None, None


def parse_number(text: Any) -> float | None:
    """``"1,234"``, ``"3.0"``, ``"-2"``, ``"3/4"``, ``"$5"``, ``"1e-3"`` → a float; anything else → None.

    ``nan``, ``inf`` and words are not numbers here; neither is a number
    beyond the parsing limits (:data:`MAX_DIGITS`) or beyond the float range
    (``"1e400"``: None, not an OverflowError).
    """
    num, _ = _read_number(text)
    if num is None:
        return None
    try:
        return float(num.value)
    except OverflowError:
        return None


def _numbers_in(text: str) -> list[str]:
    return _NUMBER_IN_TEXT.findall(text)


def extract_final_answer(text: str) -> str | None:
    """The final answer in a completion.

    The text after the colon of the last non-empty ``Answer: X`` line (any
    case, markdown emphasis allowed: ``**Answer:** X``); without one, the
    last number in the text; without any number, None.
    """
    if not isinstance(text, str):
        return None
    found = [a for a in (m.group("answer").strip(_ANSWER_STRIP).strip() for m in ANSWER_LINE.finditer(text)) if a]
    if found:
        return found[-1]
    nums = _numbers_in(text)
    return nums[-1] if nums else None


def _normalize(s: str) -> str:
    return " ".join(s.strip().rstrip(".").split()).casefold()


def _close(p: _Num, g: _Num, rel_tol: float, abs_tol: float) -> bool:
    """Exact equality, or the tolerance of a possibly rounded decimal (see :func:`answers_match`)."""
    if p.value == g.value:
        return True
    halves = [x.half_unit for x in (p, g) if x.half_unit is not None]
    if not halves:
        return False  # integers and fractions are exact: 1000001 is not 1000000
    diff = abs(p.value - g.value)
    a = Fraction(abs_tol)
    return diff <= max(Fraction(rel_tol) * max(abs(p.value), abs(g.value)), a) and diff <= max(max(halves), a)


def _compare(pred: Any, gold: Any, rel_tol: float, abs_tol: float) -> tuple[bool, str | None]:
    """``(match, why)``: ``why`` says why a numeric prediction could not be compared (else None)."""
    if rel_tol < 0 or abs_tol < 0:
        raise ValueError("tolerances must be non-negative")
    if pred is None or gold is None:
        return False, None
    g, _ = _read_number(gold)
    if g is not None:
        p, why = _read_number(pred)
        if p is None and why is None and isinstance(pred, str):
            nums = _numbers_in(pred)
            if len(nums) == 1:
                p, why = _read_number(nums[0])
        if p is None:
            return False, why
        return _close(p, g, rel_tol, abs_tol), None
    return _normalize(str(pred)) == _normalize(str(gold)), None


def answers_match(pred: Any, gold: Any, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """Whether a predicted answer matches the gold one.

    When both are numbers (:func:`parse_number`'s forms) they are compared
    exactly, as fractions: integers and ``a/b`` get no tolerance (``1000001``
    does not match ``1000000``; ``3/4`` matches ``0.75``). A tolerance applies
    only when one of the two is written with a decimal point or an exponent
    (``3.33``, ``2e-7``): a value its writer may have rounded. Then they match
    when their difference is within ``max(rel_tol * max(|p|, |g|), abs_tol)``
    (``math.isclose``) and also within half a unit in the last written digit
    of that decimal (or ``abs_tol``): ``0.3333333`` matches ``1/3``,
    ``1000000.5`` does not match ``1000000``. When the gold is a number and the
    prediction is text holding exactly one number ("9 apples"), that number
    is compared. A number beyond the parsing limits (``1e4999999``: more than
    :data:`MAX_DIGITS` digits) matches nothing. Otherwise the two are compared
    as text, ignoring case, surrounding whitespace, repeated spaces and a
    trailing period. Never raises on any ``pred``.

    >>> answers_match("1000001", "1000000"), answers_match("0.75", "3/4"), answers_match("3.33", "10/3", rel_tol=1e-2)
    (False, True, True)
    """
    return _compare(pred, gold, rel_tol, abs_tol)[0]


# ---------------------------------------------------------------------------
# Loading user functions (shared with rewards)
# ---------------------------------------------------------------------------

_FILE_MODULES: dict[Path, Any] = {}


def _import_file(path: Path, kind: str, spec: str):
    path = path.resolve()
    if path in _FILE_MODULES:
        return _FILE_MODULES[path]
    stem = re.sub(r"\W", "_", path.stem)
    name = f"_mlxpost_user_{stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    ispec = importlib.util.spec_from_file_location(name, path)
    if ispec is None or ispec.loader is None:
        raise MlxpostError(f"{kind} {spec!r}: cannot load {path} as a Python file")
    module = importlib.util.module_from_spec(ispec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    sys.path.insert(0, str(path.parent))  # so the file can import its neighbours
    try:
        ispec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - user code; report where it failed
        sys.modules.pop(name, None)
        raise MlxpostError(f"{kind} {spec!r}: importing {path} failed: {describe_exception(e)}") from e
    finally:
        try:
            sys.path.remove(str(path.parent))
        except ValueError:
            pass
    _FILE_MODULES[path] = module
    return module


def load_callable(spec: str | Callable, *, kind: str, builtins: Mapping[str, Callable],
                  base_dir: str | Path | None = None) -> Callable:
    """Resolve a built-in name, ``path/to/file.py:name`` or ``package.module:name``.

    ``kind`` ("reward", "verifier") is used in error messages. A callable is
    returned as it is. Relative file paths are taken from ``base_dir`` when
    given, else from the current directory. ``name`` may be dotted
    (``file.py:Class.method``).
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise MlxpostError(f"{kind}: expected a name or FILE.py:FUNCTION, got {spec!r}")
    spec = spec.strip()
    if spec in builtins:
        return builtins[spec]
    usage = (f"built-in {kind}s: {', '.join(builtins)}; for your own function write "
             f"path/to/file.py:FUNCTION or package.module:FUNCTION")
    if ":" not in spec:
        if spec.endswith(".py"):
            raise MlxpostError(f"{kind} {spec!r}: name the function in the file, e.g. {spec}:my_{kind}")
        raise MlxpostError(f"unknown {kind} {spec!r} ({usage})")
    where, _, attr = spec.rpartition(":")
    if not where or not attr or not all(p.isidentifier() for p in attr.split(".")):
        raise MlxpostError(f"{kind} {spec!r}: expected FILE.py:FUNCTION or MODULE:FUNCTION ({usage})")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if not path.is_file():
            raise MlxpostError(f"{kind} {spec!r}: file not found: {path}")
        module = _import_file(path, kind, spec)
        origin = str(path)
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise MlxpostError(f"{kind} {spec!r}: no module named {e.name!r} "
                               f"(for a file write path/to/file.py:{attr})") from e
        except Exception as e:  # noqa: BLE001
            raise MlxpostError(f"{kind} {spec!r}: importing {where} failed: {describe_exception(e)}") from e
        origin = f"module {where}"
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                           and getattr(v, "__module__", None) == module.__name__)
            have = f" (functions there: {', '.join(names)})" if names else ""
            raise MlxpostError(f"{kind} {spec!r}: {origin} has no {attr!r}{have}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise MlxpostError(f"{kind} {spec!r}: {attr} is a {type(obj).__name__}, not a function")
    return obj


def describe_exception(e: BaseException) -> str:
    """``ValueError: bad thing (at my_rewards.py:12)`` — the innermost frame is the user's code."""
    text = f"{type(e).__name__}: {e}"
    frames = traceback.extract_tb(e.__traceback__)
    if frames:
        last = frames[-1]
        text += f" (at {Path(last.filename).name}:{last.lineno})"
    return text


class ColumnArgs:
    """Which columns to pass to a user function as keyword arguments.

    A function with ``**kwargs`` gets every column; otherwise only the columns
    it names. A parameter without a default (after the first, positional one)
    is a column the data must have.
    """

    def __init__(self, fn: Callable, *, kind: str, name: str):
        self.kind, self.name = kind, name
        self.takes_all = True
        self.accepted: set[str] = set()
        self.required: list[str] = []
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return  # builtins without a signature: pass everything
        params = list(sig.parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if not positional and not any(p.kind == p.VAR_POSITIONAL for p in params):
            raise MlxpostError(f"{kind} {name}: must take the completion{'s' if kind == 'reward' else ''} "
                               f"as its first argument, got signature {sig}")
        rest = params[1:] if positional and params[0] is positional[0] else params
        self.takes_all = any(p.kind == p.VAR_KEYWORD for p in params)
        for p in rest:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                self.accepted.add(p.name)
                if p.default is p.empty:
                    self.required.append(p.name)

    def check(self, available: Mapping[str, Any]) -> None:
        missing = [r for r in self.required if r not in available]
        if missing:
            cols = ", ".join(sorted(available)) or "none"
            raise MlxpostError(f"{self.kind} {self.name} needs column {missing[0]!r}, which the data does "
                               f"not have (columns: {cols})")

    def select(self, columns: Mapping[str, Any]) -> dict[str, Any]:
        if self.takes_all:
            return dict(columns)
        return {k: v for k, v in columns.items() if k in self.accepted}


def where_label(row: int | str, sources: Any = None) -> str:
    """``row 3`` or ``row 3 (train.jsonl:12)``."""
    label = f"row {row}" if isinstance(row, int) else str(row)
    if sources is not None and isinstance(row, int) and 0 <= row < len(sources) and sources[row]:
        label += f" ({sources[row]})"
    return label


# ---------------------------------------------------------------------------
# Verdict validation
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Built-in verifiers
# ---------------------------------------------------------------------------

_TOLERANCE = (1e-6, 1e-9)  # answers_match's defaults


def _final(completion: str, answer: Any) -> tuple[float, str]:
    if answer is None:
        return 0.0, "the row has no answer to compare with"
    pred = extract_final_answer(completion)
    if pred is None:
        return 0.0, "no final answer found"
    ok, why = _compare(pred, answer, *_TOLERANCE)
    if ok:
        return 1.0, f"answer {_short(pred)} is correct"
    if why:
        return 0.0, f"answer {_short(pred)} cannot be checked: {why}"
    return 0.0, f"answer {_short(pred)} is wrong (expected {_short(answer)})"


def exact(completion: str, answer: Any, **columns) -> Verdict:
    """Final answer only: ``extract_final_answer(completion)`` against column ``answer``; no steps."""
    score, reason = _final(completion, answer)
    return Verdict([], score, reason)


# Operators as written -> the operation. "x" multiplies only between two
# operands (3 x 4, not x = 3 or 2x + 1); the em dash, ":" and "%" are no
# operators (a dash in prose, a ratio or a label, a percentage or a modulo).
_OPS = {"+": "+", "\uff0b": "+",
        "-": "-", "\u2212": "-", "\u2013": "-", "\ufe63": "-", "\uff0d": "-",
        "*": "*", "\u2217": "*", "\u00d7": "*", "\u00b7": "*", "\u22c5": "*", "\u2219": "*", "\uff0a": "*",
        "x": "*", "X": "*", "\\times": "*", "\\cdot": "*",
        "/": "/", "\u00f7": "/", "\u2215": "/", "\uff0f": "/", "\\div": "/",
        "^": "^", "**": "^"}
_OP_CHARS = "".join(re.escape(c) for c in _OPS if len(c) == 1 and c not in "xX")
_SUPERSCRIPT_DIGITS = str.maketrans("\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079", "0123456789")
_POSTFIX_BAD, _PREFIX_BAD = "%!\u2030", "\u221a\u221b\u221c"  # % ! ‰, square/cube/fourth root: not evaluated
_LINE_TOKEN = re.compile(
    r"(?P<sp>\s+)"
    r"|(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)"
    r"|(?P<rel>[<>!]=|=>|[\u2264\u2265\u2260\u2248])"  # <= >= != => ≤ ≥ ≠ ≈: not equations
    r"|(?P<eq>==?|\uff1d)"
    rf"|(?P<op>\*\*|\\times|\\cdot|\\div|[{_OP_CHARS}])"
    r"|(?P<lp>[(\[])|(?P<rp>[)\]])"
    r"|(?P<sup>[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+)"
    rf"|(?P<bad>[{_POSTFIX_BAD}{_PREFIX_BAD}])"
    r"|(?P<cur>[$\u20ac\u00a3\u00a5](?=[\d.]))"
    r"|(?P<word>[^\W\d_]+)"
    r"|(?P<other>.)", re.DOTALL)
_EXPR_KINDS = frozenset(("num", "op", "lp", "rp", "sup", "bad", "eq"))
_LINE_BREAKS = "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines splits on
_DIGIT = re.compile(r"\d")


@dataclass(slots=True)
class _Tok:
    kind: str  # num op lp rp sup bad eq (expression tokens) | word other rel (prose)
    text: str
    glued: bool  # no space between it and the token before
    op: str = ""  # + - * / ^ for an operator


def _line_tokens(line: str) -> list[_Tok]:
    """The tokens of a line, with "x" read as times between operands and ``v2``-like names as words."""
    toks: list[_Tok] = []
    last_end = -1
    for m in _LINE_TOKEN.finditer(line):
        kind = m.lastgroup
        if kind == "sp":
            continue
        if kind == "cur":  # $3: the number without its currency sign
            last_end = -1
            continue
        text = m.group()
        toks.append(_Tok(kind, text, m.start() == last_end, _OPS.get(text, "")))
        last_end = m.end()
    for i, t in enumerate(toks):
        if t.kind == "word" and t.text in ("x", "X") and i and toks[i - 1].kind in ("num", "rp", "sup"):
            nxt = toks[i + 1] if i + 1 < len(toks) else None
            after = toks[i + 2] if i + 2 < len(toks) else None
            if nxt is not None and (nxt.kind in ("num", "lp") or (  # 3 x 4, 3 x (1 + 2), 3 x -2 (not 2x + 3)
                    nxt.kind == "op" and nxt.op in "+-" and not nxt.glued and after is not None
                    and after.kind == "num" and after.glued)):
                t.kind = "op"
        elif t.kind == "num" and t.glued and i and toks[i - 1].kind == "word":
            t.kind = "word"  # x2, v1, step3: part of a name
    return toks


def _ends_operand(t: _Tok) -> bool:
    return t.kind in ("num", "rp", "sup") or (t.kind == "bad" and t.text in _POSTFIX_BAD)


def _starts_operand(t: _Tok) -> bool:
    return t.kind == "num" or (t.kind == "bad" and t.text in _PREFIX_BAD)


def _render(toks: list[_Tok]) -> str:
    """An expression as text for a reason: operators spaced, signs, powers and parentheses tight."""
    out = []
    prev = None
    for i, t in enumerate(toks):
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        if (t.kind in ("op", "eq") and not (t.kind == "op" and t.op in "+-" and (
                prev is None or prev.kind in ("op", "lp", "eq")))) or (
                t.kind == "bad" and t.text in _POSTFIX_BAD and nxt is not None and nxt.kind in ("num", "lp")):
            out.append(f" {t.text} ")  # binary operators (and 3 % 4)
        else:
            out.append(t.text)
        prev = t
    return " ".join("".join(out).split())


class _DivisionByZero(_Refused):
    pass


def _bounded(v: Fraction) -> Fraction:
    if _too_big(v):
        raise _Refused(f"a result would have more than {MAX_DIGITS} digits")
    return v


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    """``base ** exponent`` for an integer exponent, refused before computing a result beyond the limits."""
    if exponent.denominator != 1:
        raise _Refused("a power with a non-integer exponent")
    n = exponent.numerator
    if base == 0:
        if n == 0:
            raise _Refused("0 to the power 0 is undefined")
        if n < 0:
            raise _DivisionByZero("division by zero")
        return Fraction(0)
    if base == 1 or (base == -1 and n % 2 == 0):
        return Fraction(1)
    if base == -1:
        return Fraction(-1)
    # |base| != 0, 1: its larger part has >= 2 bits, so the result has >= (bits - 1) * |n| bits.
    bits = max(abs(base.numerator).bit_length(), base.denominator.bit_length())
    if (bits - 1) * abs(n) >= _LIMIT_BITS:
        raise _Refused(f"the power would have more than {MAX_DIGITS} digits")
    return _bounded(base**n)


def _literal(text: str) -> _Num:
    m = _NUMBER_FULL.fullmatch(text)
    if m is None:  # not reached: the line tokenizer only makes numbers this pattern reads
        raise _Refused(f"{_short(text)} is not a number")
    return _decimal_literal(m, text)


class _Evaluator:
    """Exact evaluation of one side of an equation, bounded in size, depth and magnitude.

    Grammar: sums of products of (signed) powers; ``^`` is right-associative
    and binds tighter than a sign (``-2^2 = -4``); a number or ``)`` right
    before ``(`` multiplies (``2(3 + 4)``); superscript digits are powers
    (``2³``). Numbers in an exponent are not operands. Raises
    :class:`_Refused` (the reason) for anything it does not evaluate.
    """

    def __init__(self, toks: list[_Tok]):
        self.toks, self.i, self.depth, self.in_exponent = toks, 0, 0, 0
        self.operands: list[tuple[Fraction, str]] = []  # (value, text) of each number literal

    def evaluate(self) -> Fraction:
        if len(self.toks) > MAX_EXPR_TOKENS:
            raise _Refused(f"it has {len(self.toks)} tokens, more than {MAX_EXPR_TOKENS}")
        v = self._sum()
        if self.i < len(self.toks):
            raise _Refused(f"unexpected {self.toks[self.i].text!r}")
        return v

    def _peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Refused(f"it is nested more than {MAX_DEPTH} deep")

    def _sum(self) -> Fraction:
        v = self._product()
        while (t := self._peek()) is not None and t.kind == "op" and t.op in "+-":
            self.i += 1
            w = self._product()
            v = _bounded(v + w if t.op == "+" else v - w)
        return v

    def _product(self) -> Fraction:
        v = self._unary()
        while (t := self._peek()) is not None:
            if t.kind == "op" and t.op in "*/":
                self.i += 1
                w = self._unary()
                if t.op == "*":
                    v = _bounded(v * w)
                elif w == 0:
                    raise _DivisionByZero("division by zero")
                else:
                    v = _bounded(v / w)
            elif t.kind == "lp" and _ends_operand(self.toks[self.i - 1]):
                v = _bounded(v * self._unary())  # 2(3 + 4)
            else:
                break
        return v

    def _unary(self) -> Fraction:
        t = self._peek()
        if t is not None and t.kind == "op" and t.op in "+-":
            self.i += 1
            self._enter()
            v = self._unary()
            self.depth -= 1
            return -v if t.op == "-" else v
        return self._power()

    def _power(self) -> Fraction:
        base = self._postfix()
        t = self._peek()
        if t is None or t.kind != "op" or t.op != "^":
            return base
        self.i += 1
        self._enter()
        self.in_exponent += 1
        exponent = self._unary()
        self.in_exponent -= 1
        self.depth -= 1
        return _power(base, exponent)

    def _postfix(self) -> Fraction:
        v = self._primary()
        while (t := self._peek()) is not None and t.kind in ("sup", "bad"):
            if t.kind == "bad":
                raise _Refused(f"{t.text!r} is not supported")
            self.i += 1
            if len(t.text) > 6:
                raise _Refused(f"the power would have more than {MAX_DIGITS} digits")
            v = _power(v, Fraction(int(t.text.translate(_SUPERSCRIPT_DIGITS))))
        return v

    def _primary(self) -> Fraction:
        t = self._peek()
        if t is None:
            raise _Refused("it is incomplete")
        if t.kind == "num":
            self.i += 1
            value = _literal(t.text).value
            if not self.in_exponent:
                self.operands.append((value, t.text))
            return value
        if t.kind == "lp":
            self.i += 1
            self._enter()
            v = self._sum()
            close = self._peek()
            if close is None or close.kind != "rp":
                raise _Refused("unbalanced parentheses")
            self.i += 1
            self.depth -= 1
            return v
        if t.kind == "bad":
            raise _Refused(f"{t.text!r} is not supported")
        raise _Refused(f"unexpected {t.text!r}")


class _Side:
    """One side of an equation: its tokens, and once evaluated its value or why it has none."""

    def __init__(self, toks: list[_Tok], *, skip: bool = False, problem: str | None = None):
        self.toks = toks
        self.text = _short(_render(toks))
        # Not numeric (no number), or part of a formula with words in it: no link to check.
        self.skip = skip or not any(t.kind == "num" for t in toks)
        self.problem = problem
        # A calculation: a binary operator (not a sign: -2 is a number), a power, 2(3), or % ! √ (refused).
        self.has_op = any(t.kind in ("sup", "bad") or (t.kind in ("op", "lp") and i and _ends_operand(toks[i - 1]))
                          for i, t in enumerate(toks)) or problem is not None
        self.value: Fraction | None = None
        self.half: Fraction | None = None  # a decimal literal (3.33) may round the other side
        self.why: str | None = None  # why there is no value (a reason for the step)
        self.operands: list[tuple[Fraction, str]] = []
        self._done = False

    def evaluate(self) -> None:
        if self._done:
            return
        self._done = True
        if self.problem is not None:
            self.why = f"cannot check {self.text}: {self.problem}"
            return
        ev = _Evaluator(self.toks)
        try:
            self.value = ev.evaluate()
        except _DivisionByZero as e:
            self.why = f"{self.text}: {e}"
            return
        except _Refused as e:
            self.why = f"cannot check {self.text}: {e}"
            return
        except (ArithmeticError, ValueError, RecursionError) as e:  # not expected: bounded above; never raise
            self.why = f"cannot check {self.text}: {type(e).__name__}"
            return
        if self.has_op:
            self.operands = ev.operands
        else:
            nums = [t for t in self.toks if t.kind == "num"]
            lit = _literal(nums[0].text) if len(nums) == 1 else None
            if lit is not None and lit.point and len(self.toks) <= 2:
                self.half = lit.half_unit  # "3.33" or "-2.67": the writer's rounding


def _clean_left(toks: list[_Tok], before: str | None) -> _Side:
    """The leftmost side of a chain, after prose (``before``: the kind of token before it)."""
    i = 0
    while i < len(toks) and toks[i].kind == "op" and toks[i].text in ("*", "**"):
        i += 1  # markdown emphasis: **3 + 4 = 7**
    if (before is None and i + 1 < len(toks) and toks[i].kind == "op" and toks[i].text in "-+"
            and not toks[i + 1].glued):
        i += 1  # a list bullet: "- 3 + 4 = 7"
    while i < len(toks) and toks[i].kind == "rp":
        i += 1  # "a) 3 + 4 = 7"
    toks = toks[i:]
    excess = sum(t.kind == "lp" for t in toks) - sum(t.kind == "rp" for t in toks)
    j = 0
    while excess > 0 and j < len(toks) and toks[j].kind == "lp":
        j, excess = j + 1, excess - 1  # "(3 + 4 = 7)"
    toks = toks[j:]
    if toks and toks[0].kind == "op":
        t = toks[0]
        sign = t.op in "+-" and len(toks) > 1 and (before != "word" or (not t.glued and toks[1].glued))
        if not sign:
            if before == "word":  # 2x + 3 = 7: a formula with a variable, not arithmetic
                return _Side(toks, skip=True)
            return _Side(toks, problem="it starts with an operator")
    return _Side(toks)


def _clean_right(toks: list[_Tok], after: str | None) -> _Side:
    """The rightmost side of a chain, before prose (``after``: the kind of token after it)."""
    k = len(toks)
    while k and ((toks[k - 1].kind == "op" and toks[k - 1].text in ("*", "**")) or toks[k - 1].kind == "lp"):
        k -= 1  # emphasis, or "(" opening prose: = 7 (since ...
    excess = sum(t.kind == "rp" for t in toks[:k]) - sum(t.kind == "lp" for t in toks[:k])
    while excess > 0 and k and toks[k - 1].kind == "rp":
        k, excess = k - 1, excess - 1  # "(3 + 4 = 7)"
    toks = toks[:k]
    if toks and toks[-1].kind == "op":
        if after == "word":  # = 2 + x
            return _Side(toks, skip=True)
        return _Side(toks, problem="it ends with an operator")
    return _Side(toks)


def _chains(line: str) -> list[list[_Side]]:
    """The calculation chains of a line: ``S0 = S1 = ... = Sn`` with an operator in some numeric side.

    A chain is a run of numbers, operators, parentheses and ``=`` signs
    between prose (words, punctuation) or where two operands meet without an
    operator (``1) 3 + 4 = 7``).
    """
    toks = _line_tokens(line)
    pieces = []
    cur: list[_Tok] = []
    before: str | None = None
    for t in toks:
        if t.kind not in _EXPR_KINDS:
            if cur:
                pieces.append((cur, before, t.kind))
            cur, before = [], t.kind
            continue
        if cur and cur[-1].kind in ("num", "rp", "sup") and _starts_operand(t):
            pieces.append((cur, before, "split"))
            cur, before = [], "split"
        cur.append(t)
    if cur:
        pieces.append((cur, before, None))
    chains = []
    for piece, before, after in pieces:
        if not any(t.kind == "eq" for t in piece):
            continue
        raw: list[list[_Tok]] = [[]]
        for t in piece:
            if t.kind == "eq":
                raw.append([])
            else:
                raw[-1].append(t)
        raw = [raw[0]] + [s for s in raw[1:-1] if s] + [raw[-1]]  # "= =" is one "="
        sides = [_clean_left(raw[0], before)] + [_Side(s) for s in raw[1:-1]] + [_clean_right(raw[-1], after)]
        if any(s.has_op and not s.skip for s in sides):
            chains.append(sides)
    return chains


def _fmt(v: Fraction) -> str:
    """A value for a reason: integers up to 20 digits exactly, others to 6 significant digits."""
    if v.denominator == 1 and abs(v.numerator) < 10**20:
        return str(v.numerator)
    with localcontext() as ctx:
        ctx.prec = 6
        d = Decimal(v.numerator) / Decimal(v.denominator)
    return f"{d:g}"


def _link_ok(left: _Side, right: _Side) -> bool:
    """Exactly equal, or one side a decimal that the other rounds to (see :func:`arithmetic`)."""
    if left.value == right.value:
        return True
    diff = abs(left.value - right.value)
    return any(s.half is not None and diff <= s.half for s in (left, right))


def _link_error(left: _Side, right: _Side) -> str:
    if left.has_op and right.has_op:
        return f"{left.text} is {_fmt(left.value)} but {right.text} is {_fmt(right.value)}"
    if left.has_op:
        return f"{left.text} is {_fmt(left.value)}, not {right.text}"
    if right.has_op:
        return f"{right.text} is {_fmt(right.value)}, not {left.text}"
    return f"{left.text} = {right.text} is false"


def _text_of(value: Any) -> str:
    """Text of a prompt column: a string, or the contents of a message list."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(m.get("content") or "" for m in value if isinstance(m, dict)
                         and isinstance(m.get("content"), str))
    return ""


def _given_numbers(numbers_col: Any, texts: list[Any]) -> set[Fraction]:
    given: set[Fraction] = set()
    if isinstance(numbers_col, (list, tuple)):
        for x in numbers_col:
            num, _ = _read_number(x)
            if num is not None:
                given.add(abs(num.value))
        return given
    for t in texts:
        for s in _numbers_in(_text_of(t)):
            num, _ = _read_number(s)
            if num is not None:
                given.add(abs(num.value))
    return given


def arithmetic(completion: str, answer: Any, *, numbers: Any = None, question: Any = None, prompt: Any = None,
               prompt_text: Any = None, strict_operands: bool = True, **columns) -> Verdict:
    """Check a worked arithmetic solution line by line.

    Every line holding ``=`` (or ``＝``) between numeric expressions, where
    some expression has an operator, is one step, its span the whole line
    without the line break. Expressions are numbers with ``+ - * / ^``,
    parentheses and signs, in the usual spellings: ``-`` ``−`` ``–`` (en
    dash), ``*`` ``∗`` ``×`` ``·`` ``⋅`` and ``x`` between two operands
    (``3 x 4``), ``/`` ``÷``, ``^`` ``**`` and superscript digits (``2³``),
    full-width forms and LaTeX's ``\\times \\cdot \\div``; ``2(3 + 4)``
    multiplies. A chain ``a = b = c`` is checked link by link (``a = b``, then
    ``b = c``); the step is wrong when any link is, and the reason names it.
    A side that runs into words (``2x + 3 = 7``, ``x = 3``) is a formula, not
    arithmetic: that link is not checked, and a line with no checked link is
    not a step. A step is right (1.0) when every link holds and

    * values are exact: both sides are evaluated as fractions, so an integer
      result must be exactly right (``1000000 * 1000000 = 1000000000001`` is
      wrong). The only tolerance is for a number written with a decimal
      point, which its writer may have rounded: it may differ from the other
      side by half a unit in its last digit (``10 / 3 = 3.33`` and ``3.3``
      are right, ``3.34`` and ``3`` are not);
    * every operand is known: a number given in the task (column ``numbers``
      when the row has it, else every number in ``question``, ``prompt`` or
      the rendered prompt) or the result of an earlier right step. Exponents
      are not operands.

    A step whose operand is the result of an earlier *wrong* step (and not
    otherwise known) is wrong even when its own arithmetic is right: "uses 8,
    the wrong result of step 1". With ``strict_operands`` an operand that is
    neither given nor computed earlier is wrong too. Operands are compared by
    absolute value (``7 + -3`` uses 3).

    What cannot be checked scores 0 with a reason, never an exception:
    division by zero, an unsupported operator (``%``, ``!``, ``√``), an
    incomplete expression, a non-integer exponent, and anything beyond the
    limits: a number or any intermediate result with more than
    :data:`MAX_DIGITS` digits (thirty 11-digit factors are checked; 100 are
    not), more than :data:`MAX_EXPR_TOKENS` tokens in a side, nesting deeper
    than :data:`MAX_DEPTH`. A line longer than :data:`MAX_LINE_CHARS` that
    holds ``=`` and a digit is a step scored 0 without being read, and so is
    every such line after the first :data:`MAX_STEPS` steps. The final answer
    (:func:`extract_final_answer`) is compared with column ``answer``
    (:func:`answers_match`).
    """
    given = _given_numbers(numbers, [question, prompt, prompt_text])
    known = set(given)
    tainted: dict[Fraction, int] = {}  # wrong result -> 1-based step number that produced it
    steps: list[Step] = []
    pos = 0
    for raw in completion.splitlines(keepends=True):
        line = raw.rstrip(_LINE_BREAKS)
        start, end = pos, pos + len(line)
        pos += len(raw)
        if end == start or ("=" not in line and "\uff1d" not in line) or not _DIGIT.search(line):
            continue
        if len(steps) >= MAX_STEPS:
            steps.append(Step(start, end, 0.0, f"not checked: more than {MAX_STEPS} steps"))
            continue
        if len(line) > MAX_LINE_CHARS:
            steps.append(Step(start, end, 0.0, f"a line of {len(line)} characters is too long to check "
                                               f"(limit {MAX_LINE_CHARS})"))
            continue
        number = len(steps) + 1
        problems: list[str] = []
        checked = 0
        for sides in _chains(line):
            for left, right in zip(sides, sides[1:]):
                if left.skip or right.skip:
                    continue
                checked += 1
                left.evaluate()
                right.evaluate()
                bad: list[str] = []
                for side in (left, right):
                    for v, text in side.operands:
                        a = abs(v)
                        if a in known:
                            continue
                        if a in tainted:
                            bad.append(f"uses {text}, the wrong result of step {tainted[a]}")
                        elif strict_operands:
                            bad.append(f"{text} is neither given nor computed earlier")
                if left.why or right.why:
                    bad += [s.why for s in (left, right) if s.why]
                elif not _link_ok(left, right):
                    bad.append(_link_error(left, right))
                results = [abs(s.value) for s in (left, right) if not s.has_op and s.value is not None]
                if bad:
                    for r in results:
                        tainted.setdefault(r, number)
                    problems.extend(b for b in dict.fromkeys(bad) if b not in problems)
                else:
                    known.update(results)
        if checked:
            steps.append(Step(start, end, 0.0 if problems else 1.0, "; ".join(problems) if problems else "ok"))
    final_score, final_reason = _final(completion, answer)
    return Verdict(steps, final_score, final_reason)


def arithmetic_lenient(completion: str, answer: Any, **columns) -> Verdict:
    """:func:`arithmetic` with ``strict_operands=False``: unknown operands are allowed."""
    columns.pop("strict_operands", None)
    return arithmetic(completion, answer, strict_operands=False, **columns)


BUILTIN_VERIFIERS: dict[str, Callable[..., Any]] = {
    "arithmetic": arithmetic,
    "arithmetic_lenient": arithmetic_lenient,
    "exact": exact,
}


# ---------------------------------------------------------------------------
# Running verifiers
# ---------------------------------------------------------------------------


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
