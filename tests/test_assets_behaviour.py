"""The bundled example dataset (mlxpost/assets/sft_json_answers) and its behaviour check."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlxpost.assets.behaviour import DATASET_DIR, SAMPLE_PROMPTS, check_json_answer, json_answer_rate
from mlxpost.data.rows import validate_sft_row

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = ROOT / "examples" / "make_sft_dataset.py"
SPLITS = ("train", "valid")
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def load(split: str) -> list[dict]:
    path = DATASET_DIR / f"{split}.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert all(line.strip() for line in lines), f"{path}: blank line"
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    return {s: load(s) for s in SPLITS}


def user_turns(rows):
    return [m["content"] for r in rows for m in r["messages"] if m["role"] == "user"]


def qa_pairs(rows):
    """(user question, parsed assistant reply) for every exchange."""
    for r in rows:
        msgs = r["messages"]
        for i, m in enumerate(msgs):
            if m["role"] == "user":
                yield m["content"], json.loads(msgs[i + 1]["content"])


def test_files_parse_and_have_expected_size(data):
    assert len(data["train"]) == 480
    assert len(data["valid"]) == 48
    for rows in data.values():
        assert all(set(r) == {"messages"} for r in rows)


def test_rows_validate(data):
    for split, rows in data.items():
        for i, row in enumerate(rows, start=1):
            assert validate_sft_row(row) == [], f"{split}.jsonl:{i}"


def test_every_assistant_turn_follows_the_format(data):
    for split, rows in data.items():
        for i, row in enumerate(rows, start=1):
            for m in row["messages"]:
                if m["role"] == "assistant":
                    assert check_json_answer(m["content"]), f"{split}.jsonl:{i}: {m['content']!r}"
                    assert "\n" not in m["content"]


def test_mix_of_conversation_shapes(data):
    rows = data["train"] + data["valid"]
    n_user = [sum(m["role"] == "user" for m in r["messages"]) for r in rows]
    multi = sum(n > 1 for n in n_user) / len(rows)
    system = sum(r["messages"][0]["role"] == "system" for r in rows) / len(rows)
    assert 0.10 <= multi <= 0.20
    assert max(n_user) == 3
    assert 0.25 <= system <= 0.35


_ARITH = [
    (re.compile(r"(?<![\d.])(\d+) ?([+\-×*x]) ?(\d+)(?!\d|\.\d)"), None),
    (re.compile(r"(\d+) (plus|minus|times) (\d+)"), None),
    (re.compile(r"\badd (\d+) and (\d+)\b(?!,)", re.I), "+"),
    (re.compile(r"\bsum of (\d+) and (\d+)\b(?!,)"), "+"),
    (re.compile(r"\bproduct of (\d+) and (\d+)"), "*"),
    (re.compile(r"\bMultiply (\d+) by (\d+)", re.I), "*"),
    (re.compile(r"\bSubtract (\d+) from (\d+)", re.I), "-r"),
    (re.compile(r"\btake (\d+) away from (\d+)"), "-r"),
]
_OPS = {"+": lambda a, b: a + b, "plus": lambda a, b: a + b, "-": lambda a, b: a - b, "minus": lambda a, b: a - b,
        "×": lambda a, b: a * b, "*": lambda a, b: a * b, "x": lambda a, b: a * b, "times": lambda a, b: a * b,
        "-r": lambda a, b: b - a}


def arithmetic_value(question: str) -> int | None:
    """The value of the arithmetic problem in ``question``, or None if it is not one."""
    for pat, op in _ARITH:
        m = pat.search(question)
        if not m:
            continue
        if op is None:
            a, sym, b = m.groups()
            return _OPS[sym](int(a), int(b))
        a, b = m.groups()
        return _OPS[op](int(a), int(b))
    return None


def test_arithmetic_answers_are_correct(data):
    checked = 0
    for q, reply in qa_pairs(data["train"] + data["valid"]):
        want = arithmetic_value(q)
        if want is None:
            continue
        assert reply["answer"] == want, (q, reply)
        assert isinstance(reply["answer"], int)
        checked += 1
    assert checked >= 100  # about a quarter of the questions are arithmetic


_WORD = r"['\"](\w+)['\"]"


def test_other_computed_answers_are_correct(data):
    checked = 0
    for q, reply in qa_pairs(data["train"] + data["valid"]):
        ans = reply["answer"]
        if m := re.search(r"(\d+) days? (after|from now|before|ago)", q):
            day = re.search(r"\b(" + "|".join(DAYS) + r")\b", q)[1]
            k = int(m[1]) if m[2] in ("after", "from now") else -int(m[1])
            assert ans == DAYS[(DAYS.index(day) + k) % 7], q
        elif m := re.search(r"in (\d+) days?\?", q):
            day = re.search(r"\b(" + "|".join(DAYS) + r")\b", q)[1]
            assert ans == DAYS[(DAYS.index(day) + int(m[1])) % 7], q
        elif re.search(r"[Rr]everse|backwards", q) and (m := re.search(_WORD, q)):
            assert ans == m[1][::-1], q
        elif m := re.search(r"letters (?:are in the word|in|does) " + _WORD, q):
            assert ans == len(m[1]), q
        elif m := re.search(_WORD + r" (?:in uppercase|in all caps|uppercase|to capital letters)", q):
            assert ans == m[1].upper(), q
        elif m := re.search(r"first letter of " + _WORD, q):
            assert ans == m[1][0], q
        elif m := re.search(r"(\d+) (?:even or odd|odd or even)|(?:Even or odd: )(\d+)", q):
            n = int(m[1] or m[2])
            assert ans == ("even" if n % 2 == 0 else "odd"), q
        elif m := re.search(r"([\d.]+) (?:km|kilometers)\b", q):
            assert ans == float(m[1]) * 1000, q
        elif m := re.search(r"([\d.]+) (?:kg|kilograms)\b", q):
            assert ans == float(m[1]) * 1000, q
        elif m := re.search(r"([\d.]+) hours\b", q):
            assert ans == float(m[1]) * 60, q
        else:
            continue
        checked += 1
    assert checked >= 80


def test_no_overlap_between_train_and_valid(data):
    train, valid = user_turns(data["train"]), user_turns(data["valid"])
    assert not set(train) & set(valid)
    # Not even within a split: every user question is new.
    assert len(set(train)) == len(train)
    assert len(set(valid)) == len(valid)


def test_sample_prompts_are_held_out(data):
    assert len(SAMPLE_PROMPTS) == 5
    everything = user_turns(data["train"] + data["valid"])
    for p in SAMPLE_PROMPTS:
        assert not any(p.lower() in u.lower() for u in everything), p


def _generator_module():
    name = "make_sft_dataset"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, GENERATOR)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up here
        spec.loader.exec_module(mod)
    return sys.modules[name]


def test_generator_holds_out_the_sample_prompts():
    assert tuple(_generator_module().HELD_OUT_PROMPTS) == tuple(SAMPLE_PROMPTS)


def test_conversations_are_short(data):
    gen = _generator_module()
    for rows in data.values():
        for r in rows:
            assert gen.conversation_tokens(r["messages"]) <= gen.MAX_TOKENS


def test_generator_reproduces_bundled_files(tmp_path):
    subprocess.run([sys.executable, str(GENERATOR), "--out", str(tmp_path)], check=True, capture_output=True)
    for split in SPLITS:
        name = f"{split}.jsonl"
        assert (tmp_path / name).read_bytes() == (DATASET_DIR / name).read_bytes(), name


def test_generator_is_deterministic_and_valid_split_is_stable(tmp_path):
    gen = _generator_module()
    train_a, valid_a = gen.generate(40, 10, seed=3)
    train_b, valid_b = gen.generate(40, 10, seed=3)
    assert (train_a, valid_a) == (train_b, valid_b)
    _, valid_c = gen.generate(60, 10, seed=3)
    assert valid_c == valid_a
    train_d, _ = gen.generate(40, 10, seed=4)
    assert train_d != train_a


def test_check_json_answer():
    assert check_json_answer('{"answer": 42, "explanation": "17 plus 25 equals 42."}')
    assert check_json_answer('{"answer": "Tuesday", "explanation": "Four days after Friday."}\n')
    assert not check_json_answer('Sure! {"answer": 42, "explanation": "x"}')
    assert not check_json_answer('{"answer": 42, "explanation": " "}')
    assert not check_json_answer('{"explanation": "x"}')
    assert not check_json_answer("")
    assert json_answer_rate(['{"answer": 1, "explanation": "One."}', "1", "{}", "nope"]) == 0.25
