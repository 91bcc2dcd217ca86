"""The behaviour taught by the bundled example datasets, and how to check it.

``mlxpost sft`` with no data fine-tunes on :data:`DATASET_DIR`
(``train.jsonl`` and ``valid.jsonl``, made by ``examples/make_sft_dataset.py``),
in which the assistant always answers with a single-line JSON object::

    {"answer": 42, "explanation": "17 plus 25 equals 42."}

:data:`SAMPLE_PROMPTS` are a few held-out questions to show; the
questions of :data:`HELDOUT` (in neither the SFT nor the preference data,
with their answers) are answered before and after training, and
:func:`reply_checks` says of each reply whether it follows the format
(``json``), has the right answer (``correct``) and, as the preference
example teaches, gives its explanation before its answer
(``explanation_first``).

This module uses only the standard library.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

DATASET_DIR = Path(__file__).parent / "sft_json_answers"
# Questions with their answers in neither example dataset (examples/make_preference_dataset.py writes them).
HELDOUT = Path(__file__).parent / "pref_json_answers" / "heldout.jsonl"

# One per family: arithmetic, units, strings, days of the week, lists.
# examples/make_sft_dataset.py never generates these problems (HELD_OUT_PROMPTS).
SAMPLE_PROMPTS = (
    "What is 38 + 47?",
    "How many minutes are in 3 hours?",
    "Reverse the word 'garden'.",
    "What day comes 4 days after Friday?",
    "What is the largest number in this list: 12, 7, 31, 5?",
)

_KEYS = {"answer", "explanation"}


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise _DuplicateKey(k)
        obj[k] = v
    return obj


def check_json_answer(text: str) -> bool:
    """True when ``text`` (stripped) is exactly one JSON object with the keys
    ``answer`` and ``explanation`` and nothing else, ``answer`` not null and
    ``explanation`` a non-empty string.

    >>> check_json_answer('{"answer": 42, "explanation": "17 plus 25 equals 42."}')
    True
    >>> check_json_answer('  {"answer": "Tuesday", "explanation": "Count four days on."}\\n')
    True
    >>> check_json_answer('{"answer": [1, 2, 3], "explanation": "Sorted."}')
    True

    Anything around the object, other keys, or a missing part fails:

    >>> check_json_answer('The answer is 42.')
    False
    >>> check_json_answer('```json\\n{"answer": 42, "explanation": "x"}\\n```')
    False
    >>> check_json_answer('{"answer": 42, "explanation": "x"} Hope this helps!')
    False
    >>> check_json_answer('{"answer": 42}')
    False
    >>> check_json_answer('{"answer": 42, "explanation": ""}')
    False
    >>> check_json_answer('{"answer": 42, "explanation": 7}')
    False
    >>> check_json_answer('{"answer": null, "explanation": "none"}')
    False
    >>> check_json_answer('{"answer": 42, "explanation": "x", "confidence": 1}')
    False
    >>> check_json_answer('{"answer": 1, "answer": 2, "explanation": "x"}')
    False
    >>> check_json_answer('[{"answer": 42, "explanation": "x"}]')
    False
    """
    if not isinstance(text, str):
        return False
    try:
        obj = json.loads(text.strip(), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError):  # JSONDecodeError and _DuplicateKey are ValueErrors
        return False
    if not isinstance(obj, dict) or set(obj) != _KEYS:
        return False
    explanation = obj["explanation"]
    return obj["answer"] is not None and isinstance(explanation, str) and bool(explanation.strip())


def json_answer_rate(texts: Iterable[str]) -> float:
    """The share of ``texts`` that pass :func:`check_json_answer` (0.0 when empty).

    >>> json_answer_rate(['{"answer": 5, "explanation": "Two plus three."}', "5"])
    0.5
    >>> json_answer_rate([])
    0.0
    """
    texts = list(texts)
    if not texts:
        return 0.0
    return sum(check_json_answer(t) for t in texts) / len(texts)


def extract_answer_object(text: str) -> dict | None:
    """The first JSON object with an ``answer`` key in ``text``, even inside
    chatty text or a code fence; None when there is none.

    >>> extract_answer_object('Sure! {"answer": 5, "explanation": "2 + 3 = 5."} Hope this helps!')
    {'answer': 5, 'explanation': '2 + 3 = 5.'}
    >>> extract_answer_object('```json\\n{"answer": "odd"}\\n```')
    {'answer': 'odd'}
    >>> extract_answer_object('The answer is 5.') is None
    True
    """
    if not isinstance(text, str):
        return None
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch != "{":
            continue
        try:
            obj, _ = decoder.raw_decode(text, i)
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict) and "answer" in obj:
            return obj
    return None


def same_answer(got: Any, want: Any) -> bool:
    """Whether a reply's ``answer`` equals ``want``: numbers by value (a numeric
    string counts), words case-insensitively.

    >>> same_answer(85, 85), same_answer(85.0, 85), same_answer("85", 85), same_answer(84, 85)
    (True, True, True, False)
    >>> same_answer("Odd", "odd"), same_answer("even", "odd"), same_answer(True, 1)
    (True, False, False)
    """
    if isinstance(got, bool) or isinstance(want, bool):
        return got is want
    if isinstance(want, (int, float)):
        if isinstance(got, str):
            try:
                got = float(got.strip())
            except ValueError:
                return False
        return isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=0, abs_tol=1e-9)
    if isinstance(want, str):
        return isinstance(got, str) and got.strip().lower() == want.strip().lower()
    return got == want


def explanation_first(text: str) -> bool:
    """True when ``text`` follows the format (:func:`check_json_answer`) with ``explanation`` before ``answer``.

    >>> explanation_first('{"explanation": "2 + 3 = 5.", "answer": 5}')
    True
    >>> explanation_first('{"answer": 5, "explanation": "2 + 3 = 5."}')
    False
    """
    if not check_json_answer(text):
        return False
    return next(iter(json.loads(text.strip()))) == "explanation"


def reply_checks(text: str, answer: Any = None) -> dict[str, bool]:
    """What one reply does: ``json`` (the format), ``explanation_first``, and ``correct`` (its JSON object's
    answer equals ``answer``, read even from chatty text; only when ``answer`` is given).

    >>> reply_checks('{"explanation": "2 + 3 = 5.", "answer": 5}', 5)
    {'json': True, 'explanation_first': True, 'correct': True}
    >>> reply_checks('Sure! {"answer": 6, "explanation": "2 + 3 = 6."}', 5)
    {'json': False, 'explanation_first': False, 'correct': False}
    """
    out = {"json": check_json_answer(text), "explanation_first": explanation_first(text)}
    if answer is not None:
        obj = extract_answer_object(text)
        out["correct"] = obj is not None and same_answer(obj["answer"], answer)
    return out


def heldout_questions(path: Path = HELDOUT) -> list[dict]:
    """The held-out questions: ``{"prompt", "answer", "family"}`` rows."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
