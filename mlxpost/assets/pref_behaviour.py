"""The behaviour taught by the bundled example preference dataset, and how to measure it.

:data:`DATASET_DIR` (``train.jsonl`` and ``valid.jsonl``, made by
``examples/make_preference_dataset.py``) pairs a *chosen* reply, the correct
one-line JSON answer with a concise explanation::

    {"answer": 85, "explanation": "56 plus 29 equals 85."}

with a *rejected* one that shows a typical failure of a small model: a
slightly wrong answer, a long rambling explanation, or the JSON wrapped in
chatty text or a code fence (column ``kind``).

:data:`PREF_SAMPLE_PROMPTS` are held-out questions (in neither this dataset
nor the SFT one) whose answers are easy to check; :data:`PREF_SAMPLE_ANSWERS`
holds those answers. :func:`pref_behaviour_scores` measures generated replies:
the JSON-format rate, the correct-answer rate and the mean explanation length.

This module uses only the standard library.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .behaviour import check_json_answer, extract_answer_object, same_answer

DATASET_DIR = Path(__file__).parent / "pref_json_answers"

# Arithmetic and parity only, so the right answer is easy to recompute
# (expected_answer). examples/make_preference_dataset.py never generates these
# problems (HELD_OUT_PROMPTS); examples/make_sft_dataset.py does not either.
PREF_SAMPLE_PROMPTS = (
    "What is 56 + 29?",
    "What's 93 minus 48?",
    "What is 7 × 14?",
    "Is 731 even or odd?",
    "Is 2046 an even number?",
)
PREF_SAMPLE_ANSWERS = {
    "What is 56 + 29?": 85,
    "What's 93 minus 48?": 45,
    "What is 7 × 14?": 98,
    "Is 731 even or odd?": "odd",
    "Is 2046 an even number?": "yes",
}

_OPS = {"+": int.__add__, "plus": int.__add__, "-": int.__sub__, "minus": int.__sub__,
        "×": int.__mul__, "*": int.__mul__, "x": int.__mul__, "times": int.__mul__}
_ARITH = re.compile(r"(?<![\d.])(\d+) ?(\+|-|×|\*|x|plus|minus|times) ?(\d+)(?![\d.])")
_EVEN_OR_ODD = re.compile(r"(?<![\d.])(\d+) (?:even or odd|odd or even)\b|\bEven or odd: (\d+)\b", re.IGNORECASE)
_IS_PARITY = re.compile(r"\bIs (\d+) (?:an )?(even|odd)\b", re.IGNORECASE)


def expected_answer(prompt: str) -> Any:
    """The right answer to an arithmetic or parity question, or None.

    The stored answers are the recomputed ones:

    >>> all(expected_answer(p) == PREF_SAMPLE_ANSWERS[p] for p in PREF_SAMPLE_PROMPTS)
    True
    >>> expected_answer("What's 12 times 3?"), expected_answer("Is 9 odd?"), expected_answer("Even or odd: 10?")
    (36, 'yes', 'even')
    >>> expected_answer("Reverse the word 'garden'.") is None
    True
    """
    if prompt in PREF_SAMPLE_ANSWERS:
        return PREF_SAMPLE_ANSWERS[prompt]
    if m := _ARITH.search(prompt):
        return _OPS[m[2]](int(m[1]), int(m[3]))
    if m := _EVEN_OR_ODD.search(prompt):
        return "even" if int(m[1] or m[2]) % 2 == 0 else "odd"
    if m := _IS_PARITY.search(prompt):
        is_even = int(m[1]) % 2 == 0
        return "yes" if is_even == (m[2].lower() == "even") else "no"
    return None


def pref_behaviour_scores(replies: list[str], prompts: list[str]) -> dict:
    """Scores of generated ``replies`` to ``prompts`` (one reply per prompt).

    * ``n``: the number of replies;
    * ``json_rate``: the share that pass :func:`~mlxpost.assets.behaviour.check_json_answer`
      (exactly one JSON object, nothing around it);
    * ``correct_rate``: the share with the right answer, among the replies to
      prompts whose answer :func:`expected_answer` knows (None when there are
      none). The answer is read from the first JSON object with an ``answer``
      key anywhere in the reply, so it is measured apart from the format;
    * ``mean_explanation_words``: the mean number of words of the string
      ``explanation`` of those objects (None when no reply has one).

    >>> prompts = list(PREF_SAMPLE_PROMPTS)
    >>> replies = [
    ...     '{"answer": 85, "explanation": "56 plus 29 equals 85."}',
    ...     '{"answer": 44, "explanation": "93 minus 48 equals 44."}',
    ...     'Sure! {"answer": 98, "explanation": "7 times 14 is 98."} Hope this helps!',
    ...     '{"answer": "odd", "explanation": "731 ends in 1, so it is odd, which is why the answer is odd."}',
    ...     'Yes, 2046 is even.',
    ... ]
    >>> pref_behaviour_scores(replies, prompts)
    {'n': 5, 'json_rate': 0.6, 'correct_rate': 0.6, 'mean_explanation_words': 7.5}
    >>> pref_behaviour_scores([], [])
    {'n': 0, 'json_rate': 0.0, 'correct_rate': None, 'mean_explanation_words': None}
    """
    replies, prompts = list(replies), list(prompts)
    if len(replies) != len(prompts):
        raise ValueError(f"{len(replies)} replies for {len(prompts)} prompts")
    n = len(replies)
    json_ok = sum(check_json_answer(r) for r in replies)
    checked = correct = 0
    lengths = []
    for reply, prompt in zip(replies, prompts):
        obj = extract_answer_object(reply)
        want = expected_answer(prompt)
        if want is not None:
            checked += 1
            correct += obj is not None and same_answer(obj["answer"], want)
        if obj is not None and isinstance(obj.get("explanation"), str):
            lengths.append(len(obj["explanation"].split()))
    return {
        "n": n,
        "json_rate": json_ok / n if n else 0.0,
        "correct_rate": correct / checked if checked else None,
        "mean_explanation_words": sum(lengths) / len(lengths) if lengths else None,
    }
