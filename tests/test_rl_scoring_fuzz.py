"""Fuzzing the scoring path: random and adversarial completions through every built-in reward and verifier.

A policy under RL searches the space of completions for whatever raises,
stalls or fools a score, so every built-in must take any string. Each case
here is a completion with a row of columns; every reward must return None or
a number in [0, 1], every verifier a valid verdict (checked by
:func:`mlxpost.rl.verifiers.coerce_verdict`: spans inside the completion, in
order, scores in [0, 1]), and nothing may raise. The cases come from a fixed
seed (:func:`fuzz_cases`); ``benchmarks/bench_scoring.py`` times the same
cases per completion.
"""

from __future__ import annotations

import math
import random

import numpy as np

from mlxpost.rl.answers import answers_match, extract_final_answer, parse_number
from mlxpost.rl.rewards import BUILTIN_REWARDS, RewardSet
from mlxpost.rl.tasks import generate_tasks
from mlxpost.rl.verifiers import BUILTIN_VERIFIERS, StepVerifier

SEED = 20240607
N_RANDOM = 3000

FACTOR = "12345678901"
# Pieces that completions are assembled from: numbers of every size and form, every operator
# spelling (and some that are not operators), prose, markup, control and odd code points.
NUMBERS = ["0", "7", "-3", "12", "1,234", "3.5", ".5", "0.333", "10/3", "1e400", "1e-400", "1e4999999", "-1e309",
           "9" * 400, "9" * 1001, FACTOR, "１２", "٣", "0.0000001", "1.5e3", "2e", "1e+", "0" * 30 + "7", "3/0"]
OPERATORS = ["+", "-", "\u2212", "\u2013", "\u2014", "*", "\u2217", "\u00d7", "\u00b7", "\u22c5", "\u2219", "x", "X",
             "/", "\u00f7", "\u2215", "^", "**", "%", "!", "\u221a", "\u00b2", "\u00b3", "\u2079", "\\times", "\\div",
             "mod", ":", "\uff0b", "\uff0d", "\uff0a", "\uff0f"]
GLUE = ["=", "\uff1d", "==", "= =", "<=", "\u2260", "\u2248", "(", ")", "[", "]", " ", "", "\n", "\r\n", "\t",
        "Answer:", "**Answer:**", "answer\uff1a", "$", "\u20ac", "Step 1:", "so", "apples", ",", ".", ";", "\x00",
        "\ud800", "\udfff", "\u2028", "\x85", "\U0001f642", "\u8ba1\u7b97", "\u0301", "\x0c"]
UNICODE_RANGES = [(0x20, 0x7E), (0x0, 0x1F), (0xA0, 0xFF), (0x2000, 0x22FF), (0x3000, 0x30FF), (0x4E00, 0x4FFF),
                  (0xD800, 0xDFFF), (0xFF00, 0xFFEF), (0x1F300, 0x1F64F), (0x300, 0x36F), (0x660, 0x669),
                  (0x2070, 0x209F), (0xE000, 0xE0FF)]


def adversarial_completions() -> list[str]:
    """Hand-made worst cases: huge numbers and exponents, deep nesting, 100k-character lines, many ``=``."""
    return [
        "Answer: 1e400", "Answer: 1e4999999", "Answer: -1e4999999", "1e4999999", "Answer: 1e" + "9" * 5000,
        "Answer: " + "9" * 100_000, "Answer: " + "1," * 30_000 + "000",
        " * ".join([FACTOR] * 30) + " = 5", " * ".join([FACTOR] * 100) + " = 5", "9 ^ 9 ^ 9 ^ 9 = 1",
        "2 ** 100000 = 1", "2 ^ 2 ^ 2 ^ 2 ^ 2 ^ 2 = 1", "(-1) ^ 999999999999 = -1", "1e999 * 1e999 = 1",
        "1e-999 / 1e999 = 0", "0.5 ^ 5000 = 0", "1 / 0 = 1\n0 ^ -1 = 0\n0 ^ 0 = 1\n4 / (2 - 2) = 0",
        "(" * 100_000, "(" * 5000 + "1" + ")" * 5000 + " = 1", "(" * 3000 + "1" + ")" * 3000 + " = 1",
        "((((1)))) = 1" * 1000, "- " * 3000 + "1 = 1", "-" * 9000 + "1 = 1", "1 + " * 2000 + "1 = 2001",
        "=" * 100_000, "1=" * 50_000, "1=" * 4000, "1+1=" * 2000, "1 = " * 2500 + "1 + 1", "1 + 1 = " * 12_000,
        "1 + 1 = 2\n" * 5000, "x" * 100_000, "1" * 100_000 + " = 1", "1" * 9000 + " + 1 = 2",
        "Answer: x" + " " * 100_000 + "y", "answer:" * 20_000, "Answer:" + "*" * 100_000 + "7",
        "\n".join("Answer: " + "*" * 100 + str(i) for i in range(1000)),
        "1," * 50_000 + "1 = 1", "." * 100_000, "0." + "0" * 100_000 + "1 = 1", "0." + "0" * 5000 + "1 = 1",
        "2" + "\u2079" * 10_000 + " = 1", "1" + "\u00b2" * 50 + " = 1", "\x00" * 1000 + "3 + 4 = 8\x00",
        "3 + 4 = 8\ud800\udfff", "\ud800" * 1000, "3 x x x 4 = 12", "\\times" * 10_000 + " = 1",
        "3 \u00d7 4 = 13 \U0001f642\n12 \u2212 5 = 8\n\u7b54\u6848\uff1a7", "\u2028".join(["3 + 4 = 8"] * 100),
        "\r" * 1000 + "3 + 4 = 7", "$" * 10_000 + "1 = 1", "\u221a" * 10_000 + "4 = 2", "%" * 10_000 + " = 1",
        "1e" + "9" * 100_000 + " = 1", "1.5e-999999 + 1 = 1", "".join(f"{i} + 1 = {i + 1}\n" for i in range(3000)),
        "", " ", "\n" * 10_000, "=", "\uff1d", "Answer:", "**Answer:**", "Answer: \x00",
    ]


def _random_unicode(rng: random.Random, n: int) -> str:
    return "".join(chr(rng.randint(*rng.choice(UNICODE_RANGES))) for _ in range(n))


def _random_math(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 30)):
        r = rng.random()
        parts.append(rng.choice(NUMBERS) if r < 0.4 else rng.choice(OPERATORS) if r < 0.7 else rng.choice(GLUE))
        parts.append(rng.choice([" ", "", "  "]))
    return "".join(parts)


def _mutated(rng: random.Random, text: str) -> str:
    s = list(text)
    for _ in range(rng.randint(1, 6)):
        i = rng.randrange(len(s) + 1)
        r = rng.random()
        if r < 0.4 or not s:
            s.insert(i, rng.choice(OPERATORS + NUMBERS + GLUE))
        elif r < 0.7:
            s[min(i, len(s) - 1)] = rng.choice(OPERATORS + NUMBERS + GLUE)
        else:
            del s[min(i, len(s) - 1)]
    return "".join(s)


def fuzz_cases(n_random: int = N_RANDOM, seed: int = SEED) -> list[tuple[str, dict]]:
    """``(completion, row columns)`` pairs: the adversarial ones, then ``n_random`` from ``seed``.

    Random ones are a third random code points, a third random arithmetic
    made of :data:`NUMBERS`, :data:`OPERATORS` and :data:`GLUE`, and a third
    mutations of right solutions from the task generator. Rows vary the
    ``answer`` (numbers in every form, text, huge, missing) and ``numbers``.
    """
    rng = random.Random(seed)
    tasks = generate_tasks(200, seed=seed % 1000, ops="+-*/")
    answers = ["7", "12", "1/3", "0.5", "1e400", "Paris", 7, 0.1, None, "1" * 2000, "-3", "1,234"]
    completions = adversarial_completions()
    for i in range(n_random):
        kind = i % 3
        if kind == 0:
            completions.append(_random_unicode(rng, rng.randint(0, 200)))
        elif kind == 1:
            completions.append("\n".join(_random_math(rng) for _ in range(rng.randint(1, 5))))
        else:
            completions.append(_mutated(rng, rng.choice(tasks)["solution"]))
    cases = []
    for c in completions:
        if rng.random() < 0.3:
            task = rng.choice(tasks)
            row = {"answer": task["answer"], "numbers": task["numbers"]}
        else:
            row = {"answer": rng.choice(answers),
                   "numbers": rng.choice([None, [3, 4, 7, 12], [int(FACTOR)], [2**70, 1.5, "x", None]])}
        cases.append((c, row))
    return cases


CASES = fuzz_cases()


def test_the_fuzz_cases_cover_the_adversarial_and_random_kinds():
    assert len(CASES) == len(adversarial_completions()) + N_RANDOM
    assert fuzz_cases(30) == fuzz_cases(30)  # seeded
    assert max(len(c) for c, _ in CASES) >= 100_000
    assert any("\ud800" in c for c, _ in CASES) and any("\x00" in c for c, _ in CASES)


def test_every_builtin_reward_scores_every_completion_in_range():
    completions = [c for c, _ in CASES]
    answers = [row["answer"] for _, row in CASES]
    scores = RewardSet(list(BUILTIN_REWARDS)).score(completions, {"answer": answers,
                                                                  "numbers": [row["numbers"] for _, row in CASES]},
                                                    prompts=["Compute 3 + 4."] * len(CASES))
    assert set(scores.per_function) == set(BUILTIN_REWARDS)
    for name, values in scores.per_function.items():
        assert len(values) == len(CASES)
        assert all(v is None or (type(v) is float and 0.0 <= v <= 1.0) for v in values), name
    assert [v is None for v in scores.per_function["accuracy"]] == [a is None for a in answers]
    assert all(v is not None for v in scores.per_function["format"])
    assert all(math.isfinite(t) for t in scores.total)


def test_every_builtin_verifier_returns_a_valid_verdict_for_every_completion():
    completions = [c for c, _ in CASES]
    columns = {"answer": [row["answer"] for _, row in CASES], "numbers": [row["numbers"] for _, row in CASES]}
    prompts = ["Compute 3 + 4 * 12 - 7."] * len(CASES)
    for name in BUILTIN_VERIFIERS:
        # verify_batch checks each verdict: spans inside the completion, in order, scores in [0, 1].
        verdicts = StepVerifier(name).verify_batch(completions, columns, prompts=prompts)
        assert len(verdicts) == len(CASES)
        for (c, _), v in zip(CASES, verdicts):
            assert 0.0 <= v.final_score <= 1.0 and isinstance(v.final_reason, str) and v.final_reason
            assert all(0.0 <= s.score <= 1.0 and s.reason for s in v.steps)
            assert all(c[s.start:s.end].strip() for s in v.steps)  # a step is a non-blank line
            if name == "exact":
                assert v.steps == []


def test_answer_helpers_never_raise():
    for c, row in CASES:
        pred = extract_final_answer(c)
        assert pred is None or isinstance(pred, str)
        for x in (pred, c[:200], row["answer"]):
            f = parse_number(x)
            assert f is None or (type(f) is float and math.isfinite(f))
        assert isinstance(answers_match(pred, row["answer"]), bool)
        assert isinstance(answers_match(c, c), bool)


def test_token_char_ends_on_random_unicode():
    """Every token of a byte-level BPE spans exactly the characters it holds bytes of, for any text."""
    from mlxpost.model.tiny import default_corpus, train_tokenizer
    from mlxpost.rl.source import token_char_ends

    tok = train_tokenizer(300, ["<|endoftext|>"], default_corpus(300))
    byte_of = {c: b for b, c in _byte_level_alphabet().items()}
    rng = random.Random(SEED)
    ranges = [r for r in UNICODE_RANGES if r != (0xD800, 0xDFFF)]  # a lone surrogate has no UTF-8 encoding
    for _ in range(300):
        text = "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(0, 40)))
        ids = tok.encode(text).ids
        if tok.decode(ids) != text:  # a special-token string, or normalization: not this test's subject
            continue
        ends = token_char_ends(tok, ids)
        starts = np.cumsum([0] + [len(ch.encode()) for ch in text])
        lo, pos = 0.0, 0
        for k, i in enumerate(ids):
            b0, pos = pos, pos + len(bytes(byte_of[c] for c in tok.id_to_token(i)))
            held = {c for c in range(len(text)) if starts[c] < pos and starts[c + 1] > b0}
            spanned = {c for c in range(math.floor(lo), math.ceil(ends[k])) if lo < c + 1 and ends[k] > c}
            assert spanned == held, (text, k)
            lo = ends[k]
        assert not ids or ends[-1] == len(text)


def test_token_char_ends_on_random_token_ids():
    """Random ids (invalid UTF-8 in between): spans in order, inside the text, covering it, never raising."""
    from mlxpost.model.tiny import default_corpus, train_tokenizer
    from mlxpost.rl.source import token_char_ends

    tok = train_tokenizer(300, ["<|endoftext|>"], default_corpus(300))
    rng = random.Random(SEED)
    for _ in range(300):
        ids = [rng.randrange(1, tok.get_vocab_size()) for _ in range(rng.randint(0, 60))]
        ends = token_char_ends(tok, ids)
        n = len(tok.decode(ids))
        assert len(ends) == len(ids) and all(0 <= a <= b <= n for a, b in zip([0, *ends], ends))
        assert not ids or ends[-1] == n


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte -> the character that stands for it in a token."""
    table = {b: chr(b) for b in [*range(33, 127), *range(161, 173), *range(174, 256)]}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table
