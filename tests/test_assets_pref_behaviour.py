"""The bundled example preference dataset (mlxpost/assets/pref_json_answers) and its behaviour scores."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from mlxpost.assets.behaviour import DATASET_DIR as SFT_DIR
from mlxpost.assets.behaviour import SAMPLE_PROMPTS, check_json_answer, explanation_first, heldout_questions
from mlxpost.assets.pref_behaviour import (
    DATASET_DIR,
    PREF_SAMPLE_ANSWERS,
    PREF_SAMPLE_PROMPTS,
    expected_answer,
    extract_answer_object,
    pref_behaviour_scores,
)
from mlxpost.data.rows import validate_sft_row

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = ROOT / "examples" / "make_preference_dataset.py"
SPLITS = ("train", "valid")
SIZES = {"train": 480, "valid": 48}
KINDS = ("answer_first", "wrong_answer", "long_explanation", "wrapped")
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def load(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert all(line.strip() for line in lines), f"{path}: blank line"
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    return {s: load(DATASET_DIR / f"{s}.jsonl") for s in SPLITS}


def text(reply) -> str:
    """The content of a chosen/rejected reply in either row form."""
    return reply if isinstance(reply, str) else reply[0]["content"]


def prompt_messages(row) -> list[dict]:
    p = row["prompt"]
    return [{"role": "user", "content": p}] if isinstance(p, str) else p


def question(row) -> str:
    """The question the chosen/rejected replies answer (the last user turn)."""
    return prompt_messages(row)[-1]["content"]


def user_turns(rows) -> list[str]:
    return [m["content"] for r in rows for m in prompt_messages(r) if m["role"] == "user"]


def test_files_parse_and_have_expected_size(data):
    for split, rows in data.items():
        assert len(rows) == SIZES[split]
        assert all(set(r) == {"prompt", "chosen", "rejected", "kind"} for r in rows)


def test_both_row_forms_are_valid(data):
    forms = Counter()
    for split, rows in data.items():
        for i, r in enumerate(rows, start=1):
            where = f"{split}.jsonl:{i}"
            if isinstance(r["prompt"], str):
                forms["string"] += 1
                assert isinstance(r["chosen"], str) and isinstance(r["rejected"], str), where
            else:
                forms["messages"] += 1
                for key in ("chosen", "rejected"):
                    assert len(r[key]) == 1 and r[key][0]["role"] == "assistant", where
            for key in ("chosen", "rejected"):
                assert validate_sft_row({"prompt": r["prompt"], "completion": r[key]}) == [], (where, key)
    share = forms["string"] / sum(forms.values())
    assert 0.15 <= share <= 0.25


def test_conversation_shapes(data):
    rows = [r for split in SPLITS for r in data[split] if isinstance(r["prompt"], list)]
    n_user = [sum(m["role"] == "user" for m in r["prompt"]) for r in rows]
    assert 0.10 <= sum(n > 1 for n in n_user) / len(rows) <= 0.20
    assert max(n_user) == 3
    assert 0.25 <= sum(r["prompt"][0]["role"] == "system" for r in rows) / len(rows) <= 0.35
    for r in rows:  # earlier assistant turns use the (concise) format
        for m in r["prompt"]:
            if m["role"] == "assistant":
                assert check_json_answer(m["content"]), m
                assert len(json.loads(m["content"])["explanation"].split()) <= 10, m


def test_chosen_is_concise_json_and_differs_from_rejected(data):
    for split, rows in data.items():
        for i, r in enumerate(rows, start=1):
            chosen, rejected = text(r["chosen"]), text(r["rejected"])
            assert chosen != rejected, f"{split}.jsonl:{i}"
            assert check_json_answer(chosen) and "\n" not in chosen, f"{split}.jsonl:{i}"
            assert len(json.loads(chosen)["explanation"].split()) <= 10, f"{split}.jsonl:{i}"


def test_rejected_shows_its_failure_kind(data):
    """Chosen replies give the explanation first; every rejected one answers first, and shows its kind."""
    for split, rows in data.items():
        for i, r in enumerate(rows, start=1):
            where = f"{split}.jsonl:{i}"
            assert explanation_first(text(r["chosen"])), where
            chosen, rejected = json.loads(text(r["chosen"])), text(r["rejected"])
            obj = extract_answer_object(rejected)
            assert obj is not None and next(iter(obj)) == "answer", where
            if r["kind"] == "answer_first":
                assert check_json_answer(rejected) and json.loads(rejected) == chosen, where  # same content
            elif r["kind"] == "wrong_answer":
                assert check_json_answer(rejected), where
                assert json.loads(rejected)["answer"] != chosen["answer"], where
            elif r["kind"] == "long_explanation":
                assert check_json_answer(rejected), where
                bad = json.loads(rejected)
                assert bad["answer"] == chosen["answer"], where
                assert 25 <= len(bad["explanation"].split()) <= 45, where
            elif r["kind"] == "wrapped":
                assert not check_json_answer(rejected), where
                assert obj == chosen, where
            else:
                pytest.fail(f"{where}: unknown kind {r['kind']!r}")


def test_kinds_are_balanced(data):
    for split, rows in data.items():
        counts = Counter(r["kind"] for r in rows)
        assert set(counts) == set(KINDS)
        for k in KINDS:
            assert abs(counts[k] / len(rows) - 1 / len(KINDS)) <= 0.05, (split, counts)


def test_heldout_questions_are_new_and_answered():
    """The held-out questions (the bundled behaviour is measured on them) appear in no training or validation
    row of either example, come from every family, and have their answers."""
    rows = heldout_questions()
    assert len(rows) == 60 and {r["family"] for r in rows} == {"arithmetic", "units", "strings", "comparisons",
                                                                 "parity", "days", "lists"}
    seen = set()
    for folder in (DATASET_DIR, SFT_DIR):
        for name in ("train.jsonl", "valid.jsonl"):
            for line in (folder / name).read_text().splitlines():
                seen |= set(re.findall(r'"content": "((?:[^"\\]|\\.)*)"', line))
                seen |= {json.loads(line).get("prompt")} if isinstance(json.loads(line).get("prompt"), str) else set()
    assert not {r["prompt"] for r in rows} & seen
    assert all(r["answer"] is not None for r in rows)


_WORD = r"['\"](\w+)['\"]"
_NUMS = re.compile(r"\d+")


def recompute(q: str):
    """The right answer to question ``q`` for the families that are easy to parse, else None."""
    want = expected_answer(q)  # arithmetic with an operator, even/odd
    if want is not None:
        return want
    if m := re.search(r"\badd (\d+) and (\d+)\b|\bsum of (\d+) and (\d+)\?", q, re.IGNORECASE):
        a, b = (m[1], m[2]) if m[1] else (m[3], m[4])
        return int(a) + int(b)
    if m := re.search(r"\bSubtract (\d+) from (\d+)|\btake (\d+) away from (\d+)", q, re.IGNORECASE):
        b, a = (m[1], m[2]) if m[1] else (m[3], m[4])
        return int(a) - int(b)
    if m := re.search(r"\bMultiply (\d+) by (\d+)|\bproduct of (\d+) and (\d+)", q, re.IGNORECASE):
        a, b = (m[1], m[2]) if m[1] else (m[3], m[4])
        return int(a) * int(b)
    if m := re.search(r"(\d+) days? (after|from now|before|ago)|in (\d+) days?\?", q):
        day = re.search(r"\b(" + "|".join(DAYS) + r")\b", q)[1]
        k = -int(m[1]) if m[2] in ("before", "ago") else int(m[1] or m[3])
        return DAYS[(DAYS.index(day) + k) % 7]
    if re.search(r"[Rr]everse|backwards", q) and (m := re.search(_WORD, q)):
        return m[1][::-1]
    if m := re.search(r"letters (?:are in the word|in|does) " + _WORD, q):
        return len(m[1])
    if m := re.search(r"(?:sum|total) of ([\d, \[\]and]+)[?.]|Add up these numbers: ([\d, \[\]and]+)\.", q):
        return sum(map(int, _NUMS.findall(m[1] or m[2])))
    if m := re.search(r"(?:largest number in this list|biggest of these|maximum of|highest value among):? "
                      r"([\d, \[\]and]+)[?.]", q):
        return max(map(int, _NUMS.findall(m[1])))
    return None


def test_chosen_answers_are_correct(data):
    checked = 0
    for split, rows in data.items():
        for i, r in enumerate(rows, start=1):
            q = question(r)
            want = recompute(q)
            if want is None:
                continue
            assert json.loads(text(r["chosen"]))["answer"] == want, (f"{split}.jsonl:{i}", q)
            checked += 1
    assert checked >= 150


def test_arithmetic_answers_are_correct(data):
    checked = 0
    for rows in data.values():
        for r in rows:
            q = question(r)
            if expected_answer(q) is None or "even" in q or "odd" in q:
                continue
            assert json.loads(text(r["chosen"]))["answer"] == expected_answer(q), q
            checked += 1
    assert checked >= 50


def test_no_question_overlap(data):
    train, valid = user_turns(data["train"]), user_turns(data["valid"])
    assert not set(train) & set(valid)
    assert len(set(train)) == len(train)
    assert len(set(valid)) == len(valid)
    # Nor with the SFT example's questions.
    sft = {m["content"] for s in SPLITS for r in load(SFT_DIR / f"{s}.jsonl") for m in r["messages"]
           if m["role"] == "user"}
    assert not sft & set(train + valid)


def test_sample_prompts_are_held_out(data):
    assert len(PREF_SAMPLE_PROMPTS) == 5
    assert set(PREF_SAMPLE_ANSWERS) == set(PREF_SAMPLE_PROMPTS)
    everything = [u.lower() for u in user_turns(data["train"] + data["valid"])]
    for p in PREF_SAMPLE_PROMPTS + tuple(SAMPLE_PROMPTS):
        assert not any(p.lower() in u for u in everything), p
    sft = [m["content"].lower() for s in SPLITS for r in load(SFT_DIR / f"{s}.jsonl") for m in r["messages"]]
    for p in PREF_SAMPLE_PROMPTS:
        assert not any(p.lower() in u for u in sft), p


def _generator_module():
    name = "make_preference_dataset"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, GENERATOR)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def test_generator_holds_out_the_sample_prompts():
    assert tuple(_generator_module().HELD_OUT_PROMPTS) == tuple(PREF_SAMPLE_PROMPTS)


def test_rows_are_short(data):
    gen = _generator_module()
    for rows in data.values():
        for r in rows:
            for key in ("chosen", "rejected"):
                reply = [{"role": "assistant", "content": text(r[key])}]
                assert gen.sft.conversation_tokens(prompt_messages(r) + reply) <= gen.MAX_TOKENS


def test_generator_reproduces_bundled_files(tmp_path):
    subprocess.run([sys.executable, str(GENERATOR), "--out", str(tmp_path)], check=True, capture_output=True)
    for split in SPLITS:
        name = f"{split}.jsonl"
        assert (tmp_path / name).read_bytes() == (DATASET_DIR / name).read_bytes(), name


def test_pref_behaviour_scores_on_hand_written_replies():
    prompts = list(PREF_SAMPLE_PROMPTS)
    perfect = [json.dumps({"answer": PREF_SAMPLE_ANSWERS[p], "explanation": "It is four words."}) for p in prompts]
    assert pref_behaviour_scores(perfect, prompts) == {
        "n": 5, "json_rate": 1.0, "correct_rate": 1.0, "mean_explanation_words": 4.0}

    replies = [
        '{"answer": 85, "explanation": "56 plus 29 equals 85."}',  # right, 5 words
        '```json\n{"answer": 45, "explanation": "93 minus 48 is 45."}\n```',  # fenced: right, not the format
        '{"answer": 97, "explanation": "7 times 14 equals 97."}',  # wrong answer
        '{"answer": "ODD", "explanation": "' + " ".join(["odd"] * 30) + '"}',  # right (any case), 30 words
        "2046 is even, so yes.",  # no JSON at all
    ]
    scores = pref_behaviour_scores(replies, prompts)
    assert scores["n"] == 5
    assert scores["json_rate"] == pytest.approx(3 / 5)
    assert scores["correct_rate"] == pytest.approx(3 / 5)
    assert scores["mean_explanation_words"] == pytest.approx((5 + 5 + 5 + 30) / 4)

    # Prompts whose answer is unknown count for the format and length only.
    other = pref_behaviour_scores(['{"answer": "nedrag", "explanation": "Backwards."}'], ["Reverse 'garden'."])
    assert other == {"n": 1, "json_rate": 1.0, "correct_rate": None, "mean_explanation_words": 1.0}
    with pytest.raises(ValueError):
        pref_behaviour_scores(["x"], [])
