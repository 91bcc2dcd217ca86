"""The ``arithmetic`` step verifier: every calculation line of a completion checked exactly.

See :func:`arithmetic` for the rules. Expressions are tokenized per line,
evaluated with exact fractions under the limits of :mod:`mlxpost.rl.answers`,
and chains ``a = b = c`` are checked link by link.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, localcontext
from fractions import Fraction
from typing import Any

from .answers import (
    _LIMIT_BITS,
    _NUMBER_FULL,
    MAX_DEPTH,
    MAX_DIGITS,
    MAX_EXPR_TOKENS,
    MAX_LINE_CHARS,
    MAX_STEPS,
    _decimal_literal,
    _Num,
    _numbers_in,
    _read_number,
    _Refused,
    _short,
    _too_big,
    score_final_answer,
)
from .verdict import Step, Verdict

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


# Words that claim a result when they stand between a calculation and a number ("15 + 52 equals 67",
# "3 x 4 is 12", "7 + 5 is equal to 12"): read as "=", so that writing words instead of "=" dodges no check.
_WORD_EQ = frozenset(("equals", "is", "makes", "gives", "yields"))
_WORD_EQ_RE = re.compile(r"(?i)\b(?:equals|is|makes|gives|yields)\b")


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
    return _word_relations(toks)


def _word_relations(toks: list[_Tok]) -> list[_Tok]:
    """Read "equals", "is", "is equal to", "makes", "gives", "yields" as ``=`` after a calculation.

    Only between an expression that holds an operator and ends with an
    operand, and a number or an opening parenthesis (``15 + 52 equals 67``),
    so prose stays prose: "step 2 is 5 + 3" (no operator before "is") and
    "the answer is 7" are no claims.
    """
    out: list[_Tok] = []
    i = 0
    while i < len(toks):
        t = toks[i]
        word = t.text.lower() if t.kind == "word" else ""
        span = 3 if (word == "is" and [x.text.lower() for x in toks[i + 1:i + 3]] == ["equal", "to"]) else 1
        nxt = toks[i + span] if i + span < len(toks) else None
        if word in _WORD_EQ and out and _ends_operand(out[-1]) and nxt is not None and (
                nxt.kind in ("num", "lp") or (nxt.kind == "op" and nxt.op in "+-")):
            j = len(out)
            while j and out[j - 1].kind in _EXPR_KINDS and out[j - 1].kind != "eq":
                j -= 1
            if any(x.kind == "op" for x in out[j:]):
                out.append(_Tok("eq", " ".join(x.text for x in toks[i:i + span]), t.glued))
                i += span
                continue
        out.append(t)
        i += 1
    return out


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
    without the line break. A word that claims a result after a calculation
    counts as ``=``: ``15 + 52 equals 67``, ``3 x 4 is 12``, ``is equal to``,
    ``makes``, ``gives``, ``yields`` (not "the answer is 7": no calculation
    before it). Expressions are numbers with ``+ - * / ^``,
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
        if end == start or not _DIGIT.search(line) or (
                "=" not in line and "\uff1d" not in line and not _WORD_EQ_RE.search(line)):
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
    final_score, final_reason = score_final_answer(completion, answer)
    return Verdict(steps, final_score, final_reason)


def arithmetic_lenient(completion: str, answer: Any, **columns) -> Verdict:
    """:func:`arithmetic` with ``strict_operands=False``: unknown operands are allowed."""
    columns.pop("strict_operands", None)
    return arithmetic(completion, answer, strict_operands=False, **columns)
