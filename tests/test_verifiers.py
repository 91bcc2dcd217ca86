"""Step verifiers (mlxpost.rl.verifiers) and the arithmetic task generator (mlxpost.rl.tasks)."""

from __future__ import annotations

import importlib.util
import json
import math
import textwrap
from pathlib import Path

import pytest

from mlxpost.data.rows import validate_sft_row
from mlxpost.errors import MlxpostError
from mlxpost.rl.tasks import ARITH_TASKS_DIR, INSTRUCTIONS, generate_tasks, to_sft_rows, write_task_files
from mlxpost.rl.verifiers import (
    BUILTIN_VERIFIERS,
    Step,
    StepVerifier,
    Verdict,
    answers_match,
    arithmetic,
    coerce_verdict,
    exact,
    extract_final_answer,
    load_verifier,
    parse_number,
)

ROOT = Path(__file__).resolve().parent.parent


def lines_of(completion: str, verdict: Verdict) -> list[str]:
    return [completion[s.start:s.end] for s in verdict.steps]


# ---------------------------------------------------------------------------
# Final answers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("3 + 4 = 7\nAnswer: 7", "7"),
    ("Answer: 5\nwait\nAnswer: 6\n", "6"),           # the last Answer line
    ("**Answer:** 42.", "42."),
    ("answer:  Paris  ", "Paris"),
    ("Answer:\nso it is 12", "12"),                  # an empty Answer line does not count
    ("first 3, then 10-4 gives 6", "6"),             # no Answer line: the last number
    ("it is -2.5 degrees", "-2.5"),
    ("10-3", "3"),                                   # a binary minus is not a sign
    ("a total of 1,234", "1,234"),
    ("no numbers here", None),
    ("", None),
])
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize("text, value", [
    ("42", 42.0), ("1,234", 1234.0), ("3.0", 3.0), ("-2", -2.0), ("3/4", 0.75), ("-3/4", -0.75),
    ("$5", 5.0), ("7.", 7.0), ("\u22124", -4.0), (".5", 0.5), (12, 12.0),
    ("nan", None), ("inf", None), ("1_000", None), ("seven", None), ("3/0", None), (True, None), (None, None),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_answers_match():
    assert answers_match("3.0", "3")
    assert answers_match("1,234", 1234)
    assert answers_match("3/4", "0.75")
    assert answers_match("0.3333333", "1/3")             # within rel_tol 1e-6
    assert not answers_match("0.333", "1/3")
    assert answers_match("0.333", "1/3", rel_tol=1e-2)
    assert answers_match("1e-12", "0")                   # abs_tol
    assert answers_match("9 apples", "9")                # one number in the text
    assert not answers_match("7 or 9", "9")              # two numbers: no match
    assert answers_match("  The   Eiffel tower. ", "the eiffel tower")
    assert not answers_match("Paris", "London")
    assert not answers_match(None, "1")
    assert not answers_match("1", None)


# ---------------------------------------------------------------------------
# The arithmetic verifier
# ---------------------------------------------------------------------------

GOOD = "Let me compute.\n3 + 4 = 7\n7 * 2 = 14\n14 - 5 = 9\nAnswer: 9"
ROW = {"answer": "9", "numbers": [3, 4, 2, 5]}


def test_all_correct():
    v = arithmetic(GOOD, **ROW)
    assert [s.score for s in v.steps] == [1.0, 1.0, 1.0]
    assert [s.reason for s in v.steps] == ["ok"] * 3
    assert lines_of(GOOD, v) == ["3 + 4 = 7", "7 * 2 = 14", "14 - 5 = 9"]  # non-step lines have no Step
    assert (v.final_score, v.final_reason) == (1.0, "answer 9 is correct")
    assert v.all_correct


def test_spans_cover_lines_exactly_with_crlf_and_indentation():
    c = "  3 + 4 = 7  \r\nthen:\r\n7 * 2 = 14\r\n14 - 5 = 9"
    v = arithmetic(c, **ROW)
    assert lines_of(c, v) == ["  3 + 4 = 7  ", "7 * 2 = 14", "14 - 5 = 9"]
    assert v.final_score == 1.0  # the last number


def test_wrong_step():
    c = "3 + 4 = 8\nAnswer: 8"
    v = arithmetic(c, answer="7", numbers=[3, 4])
    assert [s.score for s in v.steps] == [0.0]
    assert v.steps[0].reason == "3 + 4 is 7, not 8"
    assert (v.final_score, v.final_reason) == (0.0, "answer 8 is wrong (expected 7)")


def test_step_using_a_wrong_earlier_result_is_wrong():
    c = "3 + 4 = 8\n8 * 2 = 16\n16 - 5 = 11\nAnswer: 11"
    v = arithmetic(c, **ROW)
    assert [s.score for s in v.steps] == [0.0, 0.0, 0.0]
    assert v.steps[0].reason == "3 + 4 is 7, not 8"
    # Its own arithmetic is right, but it builds on step 1's wrong result.
    assert v.steps[1].reason == "uses 8, the wrong result of step 1"
    assert v.steps[2].reason == "uses 16, the wrong result of step 2"
    assert v.final_score == 0.0


def test_a_given_number_equal_to_a_wrong_result_is_still_known():
    v = arithmetic("3 + 4 = 5\n5 * 2 = 10", answer="10", numbers=[3, 4, 2, 5])
    assert [s.score for s in v.steps] == [0.0, 1.0]


def test_recovery_after_a_wrong_step():
    c = "3 + 4 = 8\n3 + 4 = 7\n7 * 2 = 14\n14 - 5 = 9\nAnswer: 9"
    v = arithmetic(c, **ROW)
    assert [s.score for s in v.steps] == [0.0, 1.0, 1.0, 1.0]
    assert v.final_score == 1.0


def test_operand_neither_given_nor_computed():
    c = "3 + 4 = 7\n7 * 9 = 63\nAnswer: 63"
    v = arithmetic(c, answer="63", numbers=[3, 4, 2])
    assert [s.score for s in v.steps] == [1.0, 0.0]
    assert v.steps[1].reason == "9 is neither given nor computed earlier"
    lenient = arithmetic(c, answer="63", numbers=[3, 4, 2], strict_operands=False)
    assert [s.score for s in lenient.steps] == [1.0, 1.0]
    assert BUILTIN_VERIFIERS["arithmetic_lenient"](c, answer="63", numbers=[3, 4, 2]).steps[1].score == 1.0


def test_given_numbers_from_the_prompt_when_no_numbers_column():
    c = "12 - 9 = 3\n3 + 1 = 4\nAnswer: 4"
    v = arithmetic(c, answer="4", prompt="Compute 12 - 9 + 1.")
    assert v.all_correct
    v = arithmetic(c, answer="4", question="What is 12 - 9 + 2?")
    assert [s.reason for s in v.steps] == ["ok", "1 is neither given nor computed earlier"]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compute 12 - 9 + 1."}]
    assert arithmetic(c, answer="4", prompt=msgs).all_correct
    assert arithmetic(c, answer="4", prompt_text="<|user|>Compute 12 - 9 + 1.<|assistant|>").all_correct


def test_negative_numbers_decimals_division_and_unicode_ops():
    c = ("3 - 5 = -2\n"
         "-2 × 4 = -8\n"
         "-8 ÷ 3 = -2.67\n"        # rounded to the decimals written: right
         "10 / 3 = 3.3\n"
         "10 / 3 = 3.34\n"         # wrongly rounded
         "10 / 3 = 3\n"            # not integer division
         "4 / 0 = 0\n"
         "1.5 + 2.25 = 3.75")
    v = arithmetic(c, answer="3.75", numbers=[3, 5, 4, 10, 0, 1.5, 2.25])
    assert [s.score for s in v.steps] == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert v.steps[4].reason == "10 / 3 is 3.33333, not 3.34"
    assert v.steps[5].reason == "10 / 3 is 3.33333, not 3"
    assert v.steps[6].reason == "4 / 0: division by zero"


def test_longer_expressions_and_several_equations_on_one_line():
    c = "Step 1: (3 + 4) * 2 = 14\nStep 2: 14 - 5 = 9, so 9 * 2 = 18 = 18\nAnswer: 18"
    v = arithmetic(c, answer="18", numbers=[3, 4, 2, 5])
    assert lines_of(c, v) == c.splitlines()[:2]
    assert [s.score for s in v.steps] == [1.0, 1.0]
    bad = "14 - 5 = 9, so 9 * 2 = 19\n"
    v = arithmetic(bad, answer="18", numbers=[14, 5, 2])
    assert [s.reason for s in v.steps] == ["9 * 2 is 18, not 19"]


def test_non_step_lines_are_not_scored():
    c = "x = 3\nWe have 3 + 4\n= 7\nthe sum is 7\n"
    assert arithmetic(c, answer="7", numbers=[3, 4]).steps == []


def test_final_without_answer_text():
    v = arithmetic("3 + 4 = 7\nNo final line, sorry", answer="7", numbers=[3, 4])
    assert v.final_score == 1.0  # the last number
    v = arithmetic("I cannot", answer="7", numbers=[3, 4])
    assert (v.steps, v.final_score, v.final_reason) == ([], 0.0, "no final answer found")
    v = arithmetic("Answer: 7", answer=None)
    assert (v.final_score, v.final_reason) == (0.0, "the row has no answer to compare with")


def test_exact_verifier():
    assert exact("3 + 4 = 8\nAnswer: 7", answer="7") == Verdict([], 1.0, "answer 7 is correct")
    assert exact("Answer: 8", answer=7).final_score == 0.0


# ---------------------------------------------------------------------------
# Verdict validation and user verifiers
# ---------------------------------------------------------------------------


def test_coerce_verdict_accepts_dicts_tuples_and_steps():
    c = "abcdefghij"
    v = coerce_verdict({"steps": [{"start": 0, "end": 3, "score": 1}, (3, 5, 0.5, "half"),
                                  Step(6, 10, False, "no")], "final_score": True}, "v", 0, c)
    assert v == Verdict([Step(0, 3, 1.0, ""), Step(3, 5, 0.5, "half"), Step(6, 10, 0.0, "no")], 1.0, "")
    assert coerce_verdict(Verdict([], 0.0, "x"), "v", 0, c) == Verdict([], 0.0, "x")
    assert coerce_verdict({"final_score": 0.25, "steps": None}, "v", 0, "").final_score == 0.25


@pytest.mark.parametrize("obj, match", [
    ({"steps": [(0, 11, 1.0)], "final_score": 1}, r"span \[0, 11\) is empty or outside the completion \(length 10\)"),
    ({"steps": [(-1, 2, 1.0)], "final_score": 1}, r"outside the completion"),
    ({"steps": [(3, 3, 1.0)], "final_score": 1}, r"span \[3, 3\) is empty"),
    ({"steps": [(0, 5, 1.0), (4, 6, 1.0)], "final_score": 1}, r"steps\[1\]: span \[4, 6\) overlaps"),
    ({"steps": [(5, 6, 1.0), (0, 2, 1.0)], "final_score": 1}, r"steps\[1\]: span \[0, 2\) overlaps or comes before"),
    ({"steps": [(0, 2, 1.5)], "final_score": 1}, r"steps\[0\].score must be a number in \[0, 1\], got 1.5"),
    ({"steps": [(0, 2, math.nan)], "final_score": 1}, r"steps\[0\].score must be a number in \[0, 1\], got nan"),
    ({"steps": [(0, 2, "1")], "final_score": 1}, r"steps\[0\].score must be a number"),
    ({"steps": [(0.0, 2, 1)], "final_score": 1}, r"steps\[0\].start must be an integer character offset"),
    ({"steps": [{"start": 0, "end": 2}], "final_score": 1}, r"steps\[0\]: missing 'score'"),
    ({"steps": [{"start": 0, "end": 2, "score": 1, "why": ""}], "final_score": 1}, r"unknown key 'why'"),
    ({"steps": [(0, 2)], "final_score": 1}, r"expected a Step, a dict or a \(start, end, score\[, reason\]\) tuple"),
    ({"steps": [(0, 2, 1, 5)], "final_score": 1}, r"steps\[0\].reason must be a string"),
    ({"steps": "0-2", "final_score": 1}, r"steps must be a list"),
    ({"steps": []}, r"the verdict has no 'final_score'"),
    ({"final_score": 2}, r"final_score must be a number in \[0, 1\], got 2"),
    ({"final_score": math.inf}, r"final_score must be a number"),
    ({"final_score": 1, "score": 1}, r"unknown key 'score' in the verdict"),
    ({"final_score": 1, "final_reason": 3}, r"final_reason must be a string"),
    (0.5, r"expected a Verdict or a dict with 'steps' and 'final_score', got float"),
])
def test_coerce_verdict_errors(obj, match):
    with pytest.raises(MlxpostError, match=r"verifier myv, row 3: .*" + match):
        coerce_verdict(obj, "myv", 3, "abcdefghij")


def write(path, text):
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_user_verifier_from_a_file(tmp_path):
    f = write(tmp_path / "my_verifiers.py", """
        def first_word(completion, answer):
            end = completion.find(" ")
            end = len(completion) if end < 0 else end
            ok = completion[:end] == answer
            return {"steps": [{"start": 0, "end": end, "score": float(ok), "reason": "first word"}],
                    "final_score": float(ok)}

        def broken(completion, **columns):
            return {"steps": [(0, 100, 1.0)], "final_score": 1.0}

        def raises(completion, **columns):
            if "bad" in completion:
                raise KeyError("level")
            return {"final_score": 1.0}
    """)
    v = StepVerifier(f"{f}:first_word")
    assert v.name == f"{f}:first_word"
    out = v.verify_batch(["yes please", "no"], {"answer": ["yes", "yes"], "level": [1, 2]}, prompts=["p", "q"])
    assert out == [Verdict([Step(0, 3, 1.0, "first word")], 1.0, ""), Verdict([Step(0, 2, 0.0, "first word")], 0.0, "")]
    with pytest.raises(MlxpostError, match=r"verifier .*first_word needs column 'answer'.*columns: level"):
        v.verify_batch(["x"], {"level": [1]})
    with pytest.raises(MlxpostError, match=r"verifier .*broken, row 0 \(t.jsonl:8\): steps\[0\]: span \[0, 100\)"):
        StepVerifier(f"{f}:broken").verify_batch(["a", "b"], {}, sources=["t.jsonl:8", "t.jsonl:9"])
    with pytest.raises(MlxpostError, match=r"verifier .*raises raised on row 1: KeyError: 'level' "
                                           r"\(at my_verifiers.py:14\)"):
        StepVerifier(f"{f}:raises").verify_batch(["good", "bad"], {})
    with pytest.raises(MlxpostError, match=r"column 'answer' has 1 values for 2 completions"):
        v.verify_batch(["a", "b"], {"answer": ["x"]})


def test_verifier_gets_prompt_text_and_not_a_completion_column():
    seen = {}

    def spy(completion, **columns):
        seen.update(columns)
        return Verdict([], 1.0, "")

    StepVerifier(spy).verify_batch(["c"], {"answer": ["1"], "completion": ["gold"]}, prompts=["P"])
    assert seen == {"answer": "1", "prompt_text": "P"}


def test_load_verifier():
    assert load_verifier("arithmetic") is arithmetic
    assert load_verifier("exact") is exact
    assert StepVerifier("arithmetic").verify("3 + 4 = 7\nAnswer: 7", {"answer": "7", "numbers": [3, 4]}).all_correct
    with pytest.raises(MlxpostError, match=r"unknown verifier 'arith' \(built-in verifiers: arithmetic, "
                                           r"arithmetic_lenient, exact"):
        load_verifier("arith")
    with pytest.raises(MlxpostError, match=r"verifier arithmetic needs column 'answer'"):
        StepVerifier("arithmetic").verify("1 + 1 = 2", {"numbers": [1]})


# ---------------------------------------------------------------------------
# The task generator
# ---------------------------------------------------------------------------


def test_generator_is_deterministic_and_distinct():
    a = generate_tasks(200, seed=5)
    assert a == generate_tasks(200, seed=5)
    assert a != generate_tasks(200, seed=6)
    assert len({t["prompt"] for t in a}) == 200
    assert generate_tasks(50, seed=5) == a[:50]  # a prefix: more tasks do not change the first ones


@pytest.mark.parametrize("kw", [
    {},
    {"steps": 1, "max_operand": 12},
    {"steps": (3, 5), "ops": "+-*/", "max_operand": 30},
    {"steps": (2, 4), "ops": "-/", "allow_negative": True, "seed": 3},
])
def test_every_solution_verifies(kw):
    tasks = generate_tasks(300, **kw)
    steps = kw.get("steps", (2, 3))
    lo, hi = (steps, steps) if isinstance(steps, int) else steps
    for t in tasks:
        assert set(t) == {"prompt", "answer", "numbers", "solution"}
        assert t["prompt"].endswith(INSTRUCTIONS)
        expr = t["prompt"].split("\n")[0][len("Compute "):-1]
        assert int(t["answer"]) == eval(expr)  # noqa: S307 - our own generated expression
        assert all(1 <= x <= kw.get("max_operand", 20) for x in t["numbers"])
        work = t["solution"].splitlines()
        assert work[-1] == f"Answer: {t['answer']}"
        assert lo <= len(work) - 1 <= hi
        if not kw.get("allow_negative"):
            assert all(int(line.split(" = ")[1]) > 0 for line in work[:-1])
        for cols in ({"numbers": t["numbers"]}, {"prompt": t["prompt"]}):
            v = arithmetic(t["solution"], answer=t["answer"], **cols)
            assert v.all_correct, (t, v)
            assert lines_of(t["solution"], v) == work[:-1]
        assert exact(t["solution"], answer=t["answer"]).final_score == 1.0


def test_a_corrupted_solution_fails_in_exactly_the_corrupted_step():
    for t in generate_tasks(200, steps=3, seed=2):
        work = t["solution"].splitlines()
        # Corrupt one step's result and keep the rest as it was: that step fails, and
        # (for the last step, whose result no later step uses) only that one.
        lhs, res = work[2].split(" = ")
        bad = "\n".join(work[:2] + [f"{lhs} = {int(res) + 1}", work[3]])
        v = arithmetic(bad, answer=t["answer"], numbers=t["numbers"])
        assert [s.score for s in v.steps] == [1.0, 1.0, 0.0]
        assert v.steps[2].reason == f"{lhs} is {res}, not {int(res) + 1}"
        assert v.final_score == 1.0  # the Answer line was left right
        # Any step k, when later steps may use numbers not computed before: exactly step k fails.
        for k in range(3):
            lhs, res = work[k].split(" = ")
            bad = "\n".join(work[:k] + [f"{lhs} = {int(res) + 1}"] + work[k + 1:])
            v = arithmetic(bad, answer=t["answer"], numbers=t["numbers"], strict_operands=False)
            assert [s.score for s in v.steps] == [float(i != k) for i in range(3)]

    # Corrupt step 1 and carry its wrong result on: the steps that use it are
    # wrong although their own arithmetic is right.
    v = arithmetic("3 + 4 = 8\n8 * 2 = 16\n16 - 5 = 11", answer="9", numbers=[3, 4, 2, 5])
    assert [(s.score, s.reason) for s in v.steps] == [
        (0.0, "3 + 4 is 7, not 8"),
        (0.0, "uses 8, the wrong result of step 1"),
        (0.0, "uses 16, the wrong result of step 2"),
    ]
    # A step that uses a wrong result twice names it once.
    v = arithmetic("3 + 4 = 8\n8 * 8 = 64", answer="64", numbers=[3, 4])
    assert v.steps[1].reason == "uses 8, the wrong result of step 1"


def test_generator_errors():
    with pytest.raises(MlxpostError, match="ops must be"):
        generate_tasks(1, ops="+^")
    with pytest.raises(MlxpostError, match="steps"):
        generate_tasks(1, steps=(3, 2))
    with pytest.raises(MlxpostError, match="max_operand"):
        generate_tasks(1, max_operand=1)
    with pytest.raises(MlxpostError, match="ran out of distinct tasks"):
        generate_tasks(500, steps=1, max_operand=3, ops="+")


def test_sft_rows_validate():
    rows = to_sft_rows(generate_tasks(20))
    assert all(set(r) == {"prompt", "completion"} and validate_sft_row(r) == [] for r in rows)


def test_bundled_files_are_reproduced_by_the_script(tmp_path):
    spec = importlib.util.spec_from_file_location("make_arithmetic_tasks", ROOT / "examples" / "make_arithmetic_tasks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--out", str(tmp_path)]) == 0
    for name in ("train.jsonl", "valid.jsonl"):
        assert (tmp_path / name).read_bytes() == (ARITH_TASKS_DIR / name).read_bytes(), name
    train = [json.loads(x) for x in (ARITH_TASKS_DIR / "train.jsonl").read_text().splitlines()]
    valid = [json.loads(x) for x in (ARITH_TASKS_DIR / "valid.jsonl").read_text().splitlines()]
    assert (len(train), len(valid)) == (512, 64)
    assert not {t["prompt"] for t in train} & {t["prompt"] for t in valid}
    # valid.jsonl does not depend on the number of training tasks.
    write_task_files(tmp_path / "small", n_train=10, n_valid=64)
    assert (tmp_path / "small" / "valid.jsonl").read_bytes() == (ARITH_TASKS_DIR / "valid.jsonl").read_bytes()
    # --sft writes prompt/completion rows.
    assert mod.main(["--out", str(tmp_path / "sft"), "--n", "5", "--valid", "2", "--sft"]) == 0
    row = json.loads((tmp_path / "sft" / "train.jsonl").read_text().splitlines()[0])
    assert set(row) == {"prompt", "completion"} and row["completion"].endswith(f"Answer: {row['completion'].split()[-1]}")
