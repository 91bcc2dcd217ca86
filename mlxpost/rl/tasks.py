"""Multi-step arithmetic tasks with checkable answers, for RL (and SFT) on a small scale.

Each task is one expression to compute step by step, e.g. ::

    {"prompt": "Compute (3 + 4) * 2 - 5.\nWork step by step: ...",
     "answer": "9",
     "numbers": [3, 4, 2, 5],
     "solution": "3 + 4 = 7\n7 * 2 = 14\n14 - 5 = 9\nAnswer: 9"}

The prompt asks for one calculation ``a op b = c`` per line and a last line
``Answer: N``, the convention of the built-in ``format`` reward and the
``arithmetic`` step verifier (:mod:`mlxpost.rl.verifiers`). ``numbers`` are the
numbers given in the task (the verifier's known values); ``solution`` is a
correct worked solution, so the same rows serve SFT (:func:`to_sft_rows`).

All results are integers: division is only generated when it is exact, no
intermediate result is zero (it would make the rest trivial), and none is
negative unless ``allow_negative``. Output is
deterministic for given arguments (``random.Random(seed)``). The bundled set
(``mlxpost/assets/arith_tasks``) is made by ``examples/make_arithmetic_tasks.py``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..assets import ARITH_TASKS_DIR
from ..errors import MlxpostError

__all__ = ["ARITH_TASKS_DIR", "INSTRUCTIONS", "fact_questions", "generate_tasks", "to_sft_rows", "write_task_files"]


INSTRUCTIONS = ("Work step by step: write each calculation on its own line as `a op b = c`, "
                "then finish with the line `Answer: N`.")

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


@dataclass
class _Node:
    value: int
    text: str
    prec: int  # 3 for a number, else the precedence of its top operator


def _combine(left: _Node, op: str, right: _Node, value: int) -> _Node:
    p = _PREC[op]
    lt = f"({left.text})" if left.prec < p else left.text
    rt = f"({right.text})" if right.prec < 3 else right.text  # a compound right side: always bracketed
    return _Node(value, f"{lt} {op} {rt}", p)


def _apply(x: int, op: str, y: int) -> int:
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    return x // y


def _steps_range(steps: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(steps, int):
        lo = hi = steps
    else:
        s = list(steps)
        if len(s) == 1:
            lo = hi = s[0]
        elif len(s) == 2:
            lo, hi = s
        else:
            raise MlxpostError(f"steps: expected N or (MIN, MAX), got {steps!r}")
    if not (isinstance(lo, int) and isinstance(hi, int)) or lo < 1 or hi < lo:
        raise MlxpostError(f"steps: expected 1 <= MIN <= MAX, got {steps!r}")
    return lo, hi


class _Maker:
    def __init__(self, rng: random.Random, max_operand: int, ops: str, allow_negative: bool, max_result: int):
        self.rng, self.max_operand, self.ops = rng, max_operand, ops
        self.allow_negative, self.max_result = allow_negative, max_result

    def operand(self, x: int, op: str) -> int | None:
        """A number n for ``x op n`` that keeps the result valid, or None."""
        rng, hi = self.rng, self.max_operand
        if op == "+":
            cands = range(1, min(hi, self.max_result - x) + 1)
        elif op == "-":
            cands = range(1, hi + 1) if self.allow_negative else range(1, min(hi, x - 1) + 1)
            cands = [n for n in cands if n != x and abs(x - n) <= self.max_result]
        elif op == "*":
            cands = [n for n in range(2, hi + 1) if abs(x * n) <= self.max_result]
        else:
            cands = [n for n in range(2, hi + 1) if x != 0 and x % n == 0]
        return rng.choice(cands) if len(cands) else None

    def step(self, left: _Node, right_literal: bool = True, right: _Node | None = None):
        """Combine ``left`` with a new number (or ``right``): (node, (x, op, y, result)) or None."""
        for op in self.rng.sample(self.ops, len(self.ops)):
            if right is None:
                n = self.operand(left.value, op)
                if n is None:
                    continue
                r = _Node(n, str(n), 3)
            else:
                r = right
                if op == "/" and (r.value == 0 or left.value % r.value or r.value == 1):
                    continue
                if op == "-" and not self.allow_negative and left.value < r.value:
                    continue
            v = _apply(left.value, op, r.value)
            if v == 0 or abs(v) > self.max_result:  # a zero makes the rest trivial
                continue
            return _combine(left, op, r, v), (left.value, op, r.value, v)
        return None

    def pair(self):
        a = self.rng.randint(1, self.max_operand)
        return self.step(_Node(a, str(a), 3))

    def task(self, n_steps: int):
        """(expression node, [(x, op, y, result), ...] in solution order), or None to retry."""
        first = self.pair()
        if first is None:
            return None
        node, lines = first[0], [first[1]]
        # With 3+ steps, sometimes combine two separate pairs: (a + b) * (c - d).
        if n_steps >= 3 and self.rng.random() < 0.3:
            second = self.pair()
            if second is None:
                return None
            both = self.step(node, right=second[0])
            if both is None:
                return None
            node, lines = both[0], lines + [second[1], both[1]]
        while len(lines) < n_steps:
            nxt = self.step(node)
            if nxt is None:
                return None
            node, lines = nxt[0], lines + [nxt[1]]
        return node, lines


def generate_tasks(n: int, *, steps: int | Sequence[int] = (2, 3), max_operand: int = 20, ops: str = "+-*",
                   seed: int = 0, allow_negative: bool = False, max_result: int | None = None) -> list[dict]:
    """``n`` distinct arithmetic tasks (see the module docstring for a row).

    ``steps``: the number of calculations, N or (MIN, MAX) inclusive.
    ``max_operand``: numbers in the task are 1..max_operand. ``ops``: any of
    ``+-*/`` (division only when exact). ``allow_negative``: let
    intermediate results go below zero. ``max_result``: bound on every
    result's size (default ``2 * max_operand**2``).
    """
    lo, hi = _steps_range(steps)
    if not isinstance(max_operand, int) or max_operand < 2:
        raise MlxpostError(f"max_operand must be an integer >= 2, got {max_operand!r}")
    if not ops or any(o not in _PREC for o in ops) or len(set(ops)) != len(ops):
        raise MlxpostError(f"ops must be distinct characters from '+-*/', got {ops!r}")
    if max_result is None:
        max_result = 2 * max_operand**2
    rng = random.Random(seed)
    maker = _Maker(rng, max_operand, "".join(sorted(ops, key="+-*/".index)), allow_negative, max_result)
    out: list[dict] = []
    seen: set[str] = set()
    misses = 0
    while len(out) < n:
        made = maker.task(rng.randint(lo, hi))
        if made is None or made[0].text in seen:
            misses += 1
            if misses > 1000 + 20 * n:
                raise MlxpostError(f"ran out of distinct tasks after {len(out)} (asked for {n}); allow more "
                                   f"steps, larger operands or more operators")
            continue
        node, lines = made
        seen.add(node.text)
        numbers = [int(t) for t in node.text.replace("(", " ").replace(")", " ").split() if t.isdigit()]
        work = [f"{x} {op} {y} = {r}" for x, op, y, r in lines]
        out.append({
            "prompt": f"Compute {node.text}.\n{INSTRUCTIONS}",
            "answer": str(node.value),
            "numbers": numbers,
            "solution": "\n".join(work + [f"Answer: {node.value}"]),
        })
    return out


def to_sft_rows(tasks: Sequence[dict]) -> list[dict]:
    """``{"prompt": ..., "completion": solution}`` rows for SFT on the worked solutions."""
    return [{"prompt": t["prompt"], "completion": t["solution"]} for t in tasks]


def write_task_files(out_dir: str | Path, *, n_train: int = 512, n_valid: int = 64, sft: bool = False,
                     **kwargs) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``valid.jsonl`` (as SFT rows when ``sft``); return their paths.

    The validation tasks are generated first, so ``n_train`` does not change
    ``valid.jsonl``; no task appears in both. ``kwargs`` go to :func:`generate_tasks`.
    """
    tasks = generate_tasks(n_valid + n_train, **kwargs)
    valid, train = tasks[:n_valid], tasks[n_valid:]
    if sft:
        valid, train = to_sft_rows(valid), to_sft_rows(train)
    return write_split(out_dir, train, valid)


def write_split(out_dir: str | Path, train: list[dict], valid: list[dict]) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``valid.jsonl`` (one JSON object a line, UTF-8) into ``out_dir``; their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in (("train", train), ("valid", valid)):
        p = out / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        paths.append(p)
    return paths[0], paths[1]


_FACT_SYMBOLS = {"+": "+", "-": "-", "*": "\u00d7"}


def fact_questions(*, ops: str = "+*", max_operand: int = 9, n_valid: int = 48, seed: int = 0,
                   min_operand: int | None = None, n_train: int | None = None) -> tuple[list[dict], list[dict]]:
    """Every one-step question ``What is a op b?`` with small operands, split into train and valid rows.

    Addition takes ``a, b`` in 1..``max_operand``, multiplication 2..``max_operand``
    (no ``× 1``), subtraction ``a > b``; ``min_operand`` raises the lower
    end. ``n_train`` keeps that many training questions (default: all). Rows: ``{"prompt", "answer",
    "numbers"}``. The ``n_valid`` validation questions (drawn with ``seed``)
    are facts the training rows never show, so a model's accuracy on them
    measures how reliably it computes, not what it memorized.

    >>> train, valid = fact_questions(n_valid=48)
    >>> len(train), len(valid), valid[0]["prompt"], valid[0]["answer"]
    (97, 48, 'What is 4 + 1?', '5')
    """
    rows = []
    for op in ops:
        if op not in _FACT_SYMBOLS:
            raise MlxpostError(f"ops must be characters from '+-*', got {ops!r}")
        lo = min_operand if min_operand is not None else (2 if op == "*" else 1)
        for a in range(lo, max_operand + 1):
            for b in range(lo, max_operand + 1):
                if op == "-" and a <= b:
                    continue
                value = a + b if op == "+" else a - b if op == "-" else a * b
                rows.append({"prompt": f"What is {a} {_FACT_SYMBOLS[op]} {b}?", "answer": str(value),
                             "numbers": [a, b]})
    if not 0 < n_valid < len(rows):
        raise MlxpostError(f"n_valid must be between 1 and {len(rows) - 1}, got {n_valid}")
    random.Random(seed).shuffle(rows)
    return rows[n_valid:][:n_train], rows[:n_valid]
