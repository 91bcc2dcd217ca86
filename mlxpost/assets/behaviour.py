"""The behaviour taught by the bundled example dataset, and how to check it.

``mlxpost sft`` with no data fine-tunes on :data:`DATASET_DIR`
(``train.jsonl`` and ``valid.jsonl``, made by ``examples/make_sft_dataset.py``),
in which the assistant always answers with a single-line JSON object::

    {"answer": 42, "explanation": "17 plus 25 equals 42."}

:data:`SAMPLE_PROMPTS` are held-out questions (none occurs in the data) that
are generated before and after training; :func:`json_answer_rate` is the
share of those generations that follow the format.

This module uses only the standard library.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

DATASET_DIR = Path(__file__).parent / "sft_json_answers"

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
