"""Numbers and final answers in model output, read exactly and within limits.

Rewards and verifiers share these: :func:`extract_final_answer` (the text
after the last ``Answer:`` line, else the last number), :func:`parse_number`
and :func:`answers_match` (integers and fractions compare exactly; a decimal
keeps a tolerance only for the rounding its writer may have done). Model
output is untrusted input: a number beyond :data:`MAX_DIGITS` digits, or an
exponent that would make one, is refused (scored 0 with a reason by the
callers), never computed.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

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
    ``answer`` field of the last JSON object that has one (a reply such as
    ``{"explanation": "7 × 4 = 28.", "answer": 28}``); without either, the
    last number in the text; without any number, None.

    >>> extract_final_answer('7 × 4 = 28\\nAnswer: 28')
    '28'
    >>> extract_final_answer('{"answer": 20, "explanation": "7 × 4 = 28."}')  # the field, not the last number
    '20'
    >>> extract_final_answer('so it is 12.') , extract_final_answer('no idea')
    ('12', None)
    """
    if not isinstance(text, str):
        return None
    found = [a for a in (m.group("answer").strip(_ANSWER_STRIP).strip() for m in ANSWER_LINE.finditer(text)) if a]
    if found:
        return found[-1]
    field = _json_answer(text)
    if field is not None:
        return field
    nums = _numbers_in(text)
    return nums[-1] if nums else None


_JSON_CANDIDATES = 50  # "{" positions tried per completion: parsing stays bounded whatever the text


def _json_answer(text: str) -> str | None:
    """The ``answer`` of the last JSON object holding one, as text; None when there is none.

    Bounded: completions over :data:`MAX_LINE_CHARS` characters are not
    parsed, and at most :data:`_JSON_CANDIDATES` opening braces are tried.
    """
    if len(text) > MAX_LINE_CHARS or "answer" not in text:
        return None
    decoder = json.JSONDecoder()
    starts = [i for i, ch in enumerate(text) if ch == "{"][-_JSON_CANDIDATES:]
    value = None
    for i in starts:
        try:
            obj, _ = decoder.raw_decode(text, i)
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict) and "answer" in obj:
            value = obj["answer"]
    if value is None or isinstance(value, (dict, list)):
        return None
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value).strip() or None


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


_TOLERANCE = (1e-6, 1e-9)  # answers_match's defaults


def score_final_answer(completion: str, answer: Any) -> tuple[float, str]:
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
