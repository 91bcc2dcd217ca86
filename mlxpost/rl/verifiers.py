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

* ``arithmetic``: every line with a calculation ``a op b = c`` is a step
  (see :func:`arithmetic`); the final answer is compared with column ``answer``.
* ``arithmetic_lenient``: the same, but an operand that is neither given nor
  computed earlier is allowed.
* ``exact``: no steps; only the final answer against column ``answer``.

Your own: ``path/to/file.py:function`` or ``package.module:function``.

This module also holds what rewards and verifiers share: final-answer
extraction (:func:`extract_final_answer`), answer comparison
(:func:`answers_match`) and loading user functions (:func:`load_callable`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
import traceback
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import MlxpostError

__all__ = [
    "Step", "Verdict", "StepVerifier", "coerce_verdict", "load_verifier", "load_callable",
    "extract_final_answer", "answers_match", "parse_number", "arithmetic", "exact", "BUILTIN_VERIFIERS",
]


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


# A number as written: "1,234" (thousands separators), "3.5", ".5", "42".
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"


_MINUSES = "-\u2212\u2013"  # hyphen-minus, minus sign, en dash


# A number in running text: a leading minus only when it is not a binary minus ("10-3").
_NUMBER_IN_TEXT = re.compile(rf"(?<![\w.,/])(?:[{_MINUSES}](?=[\d.]))?(?:\d+/\d+(?![\d.,/])|{_UNSIGNED})")


_NUMBER_FULL = re.compile(rf"[+{_MINUSES}]?{_UNSIGNED}(?:[eE][+-]?\d+)?")

_FRACTION_FULL = re.compile(rf"([+{_MINUSES}]?\d+)\s*/\s*([+{_MINUSES}]?\d+)")


# The final answer line: "Answer: 42" (also "**Answer:** 42", any case); the
# text after the colon is the answer.
ANSWER_LINE = re.compile(r"^[ \t>*_#]*answer[*_]*[ \t]*[:\uff1a][ \t*_]*(?P<answer>.*?)[ \t*_]*$",
                         re.IGNORECASE | re.MULTILINE)


def _to_fraction(text: Any) -> Fraction | None:
    """The exact value of a number written as text (or given as a number), else None."""
    if isinstance(text, bool):
        return None
    if isinstance(text, numbers.Integral):
        return Fraction(int(text))
    if isinstance(text, numbers.Real):
        x = float(text)
        return Fraction(x) if math.isfinite(x) else None
    if not isinstance(text, str):
        return None
    s = text.strip().rstrip(".").strip()
    if s.startswith("$"):
        s = s[1:].strip()
    for m in _MINUSES[1:]:
        s = s.replace(m, "-")
    if _NUMBER_FULL.fullmatch(s):
        return Fraction(s.replace(",", ""))
    m = _FRACTION_FULL.fullmatch(s)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    return None


def parse_number(text: Any) -> float | None:
    """``"1,234"``, ``"3.0"``, ``"-2"``, ``"3/4"``, ``"$5"``, ``"1e-3"`` → a float; anything else → None.

    ``nan``, ``inf`` and words are not numbers here.
    """
    f = _to_fraction(text)
    return None if f is None else float(f)


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
    found = [m.group("answer").strip() for m in ANSWER_LINE.finditer(text)]
    found = [a for a in found if a]
    if found:
        return found[-1]
    nums = _numbers_in(text)
    return nums[-1] if nums else None


def _normalize(s: str) -> str:
    return " ".join(s.strip().rstrip(".").split()).casefold()


def answers_match(pred: Any, gold: Any, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """Whether a predicted answer matches the gold one.

    When both parse as numbers (:func:`parse_number`) they are compared with
    ``math.isclose(rel_tol, abs_tol)``. When the gold is a number and the
    prediction is text holding exactly one number ("9 apples"), that number
    is compared. Otherwise the two are compared as text, ignoring case,
    surrounding whitespace, repeated spaces and a trailing period.
    """
    if pred is None or gold is None:
        return False
    g = parse_number(gold)
    if g is not None:
        p = parse_number(pred)
        if p is None and isinstance(pred, str):
            nums = _numbers_in(pred)
            p = parse_number(nums[0]) if len(nums) == 1 else None
        return p is not None and math.isclose(p, g, rel_tol=rel_tol, abs_tol=abs_tol)
    return _normalize(str(pred)) == _normalize(str(gold))


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


def _final(completion: str, answer: Any) -> tuple[float, str]:
    if answer is None:
        return 0.0, "the row has no answer to compare with"
    pred = extract_final_answer(completion)
    if pred is None:
        return 0.0, "no final answer found"
    if answers_match(pred, answer):
        return 1.0, f"answer {pred} is correct"
    return 0.0, f"answer {pred} is wrong (expected {answer})"


def exact(completion: str, answer: Any, **columns) -> Verdict:
    """Final answer only: ``extract_final_answer(completion)`` against column ``answer``; no steps."""
    score, reason = _final(completion, answer)
    return Verdict([], score, reason)


# Tokens of an arithmetic expression.
_OPS = {"+": "+", "-": "-", "\u2212": "-", "*": "*", "\u00d7": "*", "/": "/", "\u00f7": "/"}


_TOKEN = re.compile(rf"\s*(?:(?P<num>{_UNSIGNED})|(?P<op>[-+*/\u2212\u00d7\u00f7])|(?P<par>[()])|(?P<junk>\S))")


class _Expr:
    """A tiny recursive-descent evaluator: + - * / × ÷, unary minus, parentheses."""

    def __init__(self, tokens: list[tuple[str, str]]):
        self.toks, self.i = tokens, 0
        self.operands: list[tuple[Fraction, str]] = []  # (value, text) of each number literal
        self.n_ops = 0
        self.div_zero = False

    def parse(self) -> Fraction | None:
        try:
            v = self._sum()
        except (IndexError, ValueError, RecursionError):
            return None
        return v if self.i == len(self.toks) else None

    def _peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else ("", "")

    def _sum(self) -> Fraction:
        v = self._product()
        while self._peek()[0] == "op" and _OPS[self._peek()[1]] in "+-":
            op = _OPS[self.toks[self.i][1]]
            self.i += 1
            self.n_ops += 1
            w = self._product()
            v = v + w if op == "+" else v - w
        return v

    def _product(self) -> Fraction:
        v = self._unary()
        while self._peek()[0] == "op" and _OPS[self._peek()[1]] in "*/":
            op = _OPS[self.toks[self.i][1]]
            self.i += 1
            self.n_ops += 1
            w = self._unary()
            if op == "*":
                v = v * w
            elif w == 0:
                self.div_zero = True
                v = Fraction(0)
            else:
                v = v / w
        return v

    def _unary(self) -> Fraction:
        kind, text = self._peek()
        if kind == "op" and _OPS[text] == "-":
            self.i += 1
            return -self._unary()
        if kind == "par" and text == "(":
            self.i += 1
            v = self._sum()
            if self._peek() != ("par", ")"):
                raise ValueError("unbalanced parentheses")
            self.i += 1
            return v
        if kind == "num":
            self.i += 1
            v = Fraction(text.replace(",", ""))
            self.operands.append((v, text))
            return v
        raise ValueError(f"unexpected {text!r}")


@dataclass
class _Equation:
    expr_text: str
    value: Fraction | None  # None: division by zero
    operands: list[tuple[Fraction, str]]
    result: Fraction
    result_text: str


_MAX_EXPR_TOKENS = 64  # longer runs before "=" are cut to their last 64 tokens


def _equations(line: str) -> list[_Equation]:
    """Every ``EXPR = NUMBER`` in a line, where EXPR has at least one operator.

    EXPR is the longest run of tokens before the ``=`` (after the last other
    character, e.g. the ``:`` of ``Step 1:``) that parses; NUMBER the signed
    number right after it.
    """
    tokens = []
    for m in _TOKEN.finditer(line):
        kind = m.lastgroup
        tokens.append((kind, m.group(kind)))
    found = []
    run_start = 0  # first token after the last junk token
    for j, (kind, text) in enumerate(tokens):
        if kind != "junk":
            continue
        left = tokens[max(run_start, j - _MAX_EXPR_TOKENS):j]
        run_start = j + 1
        if text != "=" or not left:
            continue
        right = tokens[j + 1:j + 3]
        negative = bool(right) and right[0][0] == "op" and _OPS[right[0][1]] == "-"
        if negative:
            right = right[1:]
        if not right or right[0][0] != "num":
            continue
        for start in range(len(left)):
            ex = _Expr(left[start:])
            value = ex.parse()
            if value is not None and ex.n_ops:
                expr_text = "".join(t if k != "op" else f" {t} " for k, t in left[start:])
                expr_text = re.sub(r"\s+", " ", expr_text).replace("( ", "(").replace(" )", ")").strip()
                num = right[0][1]
                result = Fraction(num.replace(",", "")) * (-1 if negative else 1)
                found.append(_Equation(expr_text, None if ex.div_zero else value, ex.operands, result,
                                       ("-" if negative else "") + num))
                break
    return found


def _fmt(v: Fraction) -> str:
    if v.denominator == 1:
        return str(v.numerator)
    return f"{float(v):.6g}"


def _result_ok(value: Fraction, result: Fraction, result_text: str) -> bool:
    if value == result:
        return True
    decimals = len(result_text.split(".")[1]) if "." in result_text else 0
    if decimals:  # a rounded result: 10 / 3 = 3.33 is right, 3.3 too, 3.34 is not
        return abs(value - result) <= Fraction(1, 2 * 10**decimals)
    return math.isclose(float(value), float(result), rel_tol=1e-12, abs_tol=0.0)


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
            f = _to_fraction(x)
            if f is not None:
                given.add(abs(f))
        return given
    for t in texts:
        for s in _numbers_in(_text_of(t)):
            f = _to_fraction(s)
            if f is not None:
                given.add(abs(f))
    return given


def arithmetic(completion: str, answer: Any, *, numbers: Any = None, question: Any = None, prompt: Any = None,
               prompt_text: Any = None, strict_operands: bool = True, **columns) -> Verdict:
    """Check a worked arithmetic solution line by line.

    Every line holding a calculation ``EXPR = c`` (EXPR: numbers with
    ``+ - * / × ÷``, unary minus and parentheses; usually ``a op b``) is one
    step, its span the whole line without the newline. A step is right (1.0)
    when

    * EXPR computes to ``c`` (exactly; a ``c`` written with decimals may be
      rounded to those decimals, so ``10 / 3 = 3.33`` is right), and
    * every operand is known: a number given in the task (column ``numbers``
      when the row has it, else every number in ``question``, ``prompt`` or
      the rendered prompt) or the result of an earlier right step.

    A step whose operand is the result of an earlier *wrong* step (and not
    otherwise known) is wrong even when its own arithmetic is right: "uses 8,
    the wrong result of step 1". With ``strict_operands`` an operand that is
    neither given nor computed earlier is wrong too. Operands are compared by
    absolute value (``7 + -3`` uses 3). Lines without a calculation are not
    steps. The final answer (:func:`extract_final_answer`) is compared with
    column ``answer``.
    """
    given = _given_numbers(numbers, [question, prompt, prompt_text])
    known = set(given)
    tainted: dict[Fraction, int] = {}  # wrong result -> 1-based step number that produced it
    steps: list[Step] = []
    pos = 0
    for raw in completion.splitlines(keepends=True):
        line = raw.rstrip("\r\n")
        start, end = pos, pos + len(line)
        pos += len(raw)
        eqs = _equations(line)
        if not eqs:
            continue
        number = len(steps) + 1
        problems: list[str] = []
        for eq in eqs:
            bad: list[str] = []
            for v, text in eq.operands:
                a = abs(v)
                if a in known:
                    continue
                if a in tainted:
                    bad.append(f"uses {text}, the wrong result of step {tainted[a]}")
                elif strict_operands:
                    bad.append(f"{text} is neither given nor computed earlier")
            if eq.value is None:
                bad.append(f"{eq.expr_text}: division by zero")
            elif not _result_ok(eq.value, eq.result, eq.result_text):
                bad.append(f"{eq.expr_text} is {_fmt(eq.value)}, not {eq.result_text}")
            if bad:
                tainted.setdefault(abs(eq.result), number)
                problems.extend(b for b in dict.fromkeys(bad) if b not in problems)
            else:
                known.add(abs(eq.result))
        if end > start:
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
