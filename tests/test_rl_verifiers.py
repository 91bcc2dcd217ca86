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
from mlxpost.rl.answers import answers_match, extract_final_answer, parse_number
from mlxpost.rl.arithmetic import arithmetic
from mlxpost.rl.tasks import ARITH_TASKS_DIR, INSTRUCTIONS, generate_tasks, to_sft_rows, write_task_files
from mlxpost.rl.verdict import Step, Verdict
from mlxpost.rl.verifiers import BUILTIN_VERIFIERS, StepVerifier, coerce_verdict, exact, load_verifier

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
# Untrusted completions: exact values, every spelling, bounded parsing
# ---------------------------------------------------------------------------


def step_reasons(c: str, **kw) -> list[tuple[float, str]]:
    kw.setdefault("answer", "0")
    return [(s.score, s.reason) for s in arithmetic(c, **kw).steps]


FACTOR = "12345678901"


def test_wrong_integer_results_are_wrong_however_close():
    lenient = {"strict_operands": False}
    assert step_reasons("1000000 * 1000000 = 1000000000001", **lenient) == [
        (0.0, "1000000 * 1000000 is 1000000000000, not 1000000000001")]
    assert step_reasons("123456789 * 987654321 = 121932631112635270", **lenient) == [
        (0.0, "123456789 * 987654321 is 121932631112635269, not 121932631112635270")]
    assert step_reasons("1000000 * 1000000 = 1000000000000\n123456789 * 987654321 = 121932631112635269",
                        **lenient) == [(1.0, "ok"), (1.0, "ok")]
    # Thirty 11-digit factors: a 303-digit product, checked exactly (it used to raise OverflowError).
    product = " * ".join([FACTOR] * 30)
    exact_value = str(int(FACTOR) ** 30)
    assert len(exact_value) == 303
    assert step_reasons(f"{product} = {exact_value}", numbers=[int(FACTOR)]) == [(1.0, "ok")]
    off_by_one = str(int(FACTOR) ** 30 + 1)
    assert step_reasons(f"{product} = {off_by_one}", numbers=[int(FACTOR)]) == [
        (0.0, f"{FACTOR} * {FACTOR} * {FACTOR} * {FACTOR} * 123\u2026 (417 characters) is 5.56480e+302, "
              f"not {off_by_one[:59]}\u2026 (303 characters)")]
    # Exponent notation in a step is exact; only a decimal point allows the writer's rounding.
    assert step_reasons("3 * 4 = 1e1\n3 * 4 = 1.2e1\n2 / 3 = 0.67\n2 / 3 = 0.66\n3 * 4 = 12.4", **lenient) == [
        (0.0, "3 * 4 is 12, not 1e1"), (1.0, "ok"), (1.0, "ok"), (0.0, "2 / 3 is 0.666667, not 0.66"),
        (0.0, "3 * 4 is 12, not 12.4")]


def test_final_answers_are_exact_for_integers():
    assert not answers_match("1000001", "1000000")
    assert not answers_match("1000001", 1000000)
    assert not answers_match("121932631112635270", "121932631112635269")
    assert answers_match("121932631112635269", 121932631112635269)
    assert not answers_match("1000000.5", "1000000")      # a decimal: within half its last unit only
    assert answers_match("1.0e6", "1000000")
    assert answers_match("0.1", 0.1)                       # a float gold is its shortest decimal
    assert answers_match("3/4", 0.75)
    assert exact("Answer: 1000001", answer="1000000") == Verdict([], 0.0, "answer 1000001 is wrong (expected 1000000)")


def test_overflowing_numbers_score_zero_with_a_reason():
    # Each of these raised OverflowError (or took seconds) inside the verifier.
    assert exact("Answer: 1e400", answer="5") == Verdict([], 0.0, "answer 1e400 is wrong (expected 5)")
    assert exact("Answer: 1e400", answer="1e400").final_score == 1.0   # exact, as a fraction
    assert exact("Answer: 1e4999999", answer="1") == Verdict(
        [], 0.0, "answer 1e4999999 cannot be checked: the exponent of 1e4999999 is out of range")
    assert exact("the result is 1e4999999", answer="1").final_score == 0.0  # not read as "1"
    huge = "9" * 5000  # beyond int()'s 4300-digit limit for strings
    assert exact(f"Answer: {huge}", answer="9") == Verdict(
        [], 0.0, f"answer {huge[:59]}\u2026 (5000 characters) cannot be checked: "
                 f"{huge[:59]}\u2026 (5000 characters) has more than 1000 digits")
    assert parse_number("1e400") is None and parse_number("1e4999999") is None and parse_number(huge) is None
    assert parse_number("1e-400") == 0.0
    lenient = {"strict_operands": False}
    hundred = " * ".join([FACTOR] * 100)
    assert step_reasons(f"{hundred} = 5", **lenient) == [
        (0.0, f"cannot check {FACTOR} * {FACTOR} * {FACTOR} * {FACTOR} * 123\u2026 (1397 characters): "
              "a result would have more than 1000 digits")]
    assert step_reasons("9 ^ 9 ^ 9 = 1", **lenient) == [
        (0.0, "cannot check 9 ^ 9 ^ 9: the power would have more than 1000 digits")]
    assert step_reasons("1e4999999 + 1 = 2", **lenient) == [
        (0.0, "cannot check 1e4999999 + 1: the exponent of 1e4999999 is out of range")]
    assert step_reasons("1e400 * 1e400 = 1e800\n1e400 * 1e400 = 1e801", **lenient) == [
        (1.0, "ok"), (0.0, "1e400 * 1e400 is 1.00000e+800, not 1e801")]
    deep = "(" * 40 + "1" + ")" * 40 + " + 1"
    assert step_reasons(f"{deep} = 2", **lenient) == [
        (0.0, f"cannot check {deep[:59]}\u2026 (85 characters): it is nested more than 32 deep")]
    assert step_reasons("(" * 30 + "1" + ")" * 30 + " + 1 = 2", **lenient) == [(1.0, "ok")]


@pytest.mark.parametrize("expr, value", [
    ("3 x 4", 12), ("3 X 4", 12), ("3x4", 12), ("3 × 4", 12), ("3 · 4", 12), ("3 ⋅ 4", 12), ("3 ∙ 4", 12),
    ("3 * 4", 12), ("3 ∗ 4", 12), ("3 ＊ 4", 12), (r"3 \times 4", 12), (r"3 \cdot 4", 12), ("3 x -4", -12),
    ("12 / 4", 3), ("12 ÷ 4", 3), ("12 ∕ 4", 3), ("12 ／ 4", 3), (r"12 \div 4", 3),
    ("10 - 3", 7), ("10 − 3", 7), ("10 – 3", 7), ("10 － 3", 7), ("10 + 3", 13), ("10 ＋ 3", 13),
    ("3 ^ 2", 9), ("3 ** 2", 9), ("3²", 9), ("2 ^ 3 ^ 2", 512), ("-3 ^ 2", -9), ("(-3) ^ 2", 9), ("2(3 + 4)", 14),
    ("３ × ４", 12),
])
def test_every_operator_spelling_is_a_checked_step(expr, value):
    shown = "3 x 4" if expr == "3x4" else expr  # reasons space binary operators
    assert step_reasons(f"{expr} = {value}", strict_operands=False) == [(1.0, "ok")]
    assert step_reasons(f"{expr} = {value + 1}", strict_operands=False) == [(0.0, f"{shown} is {value}, not {value + 1}")]
    assert step_reasons(f"{expr} \uff1d {value + 1}", strict_operands=False) == [
        (0.0, f"{shown} is {value}, not {value + 1}")]


def test_the_review_spellings_of_a_wrong_step_are_punished():
    c = "3 x 4 = 13\n3 · 4 = 13\n10 – 3 = 8\n3 ** 2 = 10\n3 + 4 = 7 = 8\n3 + 4 ＝ 8\nAnswer: 8"
    v = arithmetic(c, answer="7", numbers=[3, 4, 10, 2])
    assert lines_of(c, v) == c.splitlines()[:6]
    assert [(s.score, s.reason) for s in v.steps] == [
        (0.0, "3 x 4 is 12, not 13"), (0.0, "3 · 4 is 12, not 13"), (0.0, "10 – 3 is 7, not 8"),
        (0.0, "3 ** 2 is 9, not 10"), (0.0, "7 = 8 is false"), (0.0, "3 + 4 is 7, not 8")]


def test_chains_are_checked_link_by_link():
    lenient = {"strict_operands": False}
    assert step_reasons("3 + 4 = 7 = 7", **lenient) == [(1.0, "ok")]
    assert step_reasons("3 + 4 = 8 = 8", **lenient) == [(0.0, "3 + 4 is 7, not 8")]
    assert step_reasons("3 + 4 = 7 = 8", **lenient) == [(0.0, "7 = 8 is false")]
    assert step_reasons("3 + 4 = 2 + 5 = 7", **lenient) == [(1.0, "ok")]
    assert step_reasons("3 + 4 = 2 + 6", **lenient) == [(0.0, "3 + 4 is 7 but 2 + 6 is 8")]
    assert step_reasons("7 = 3 + 5", **lenient) == [(0.0, "3 + 5 is 8, not 7")]
    assert step_reasons("10 / 3 = 3.33 = 3.3", **lenient) == [(1.0, "ok")]  # each link rounds
    assert step_reasons("x = 3 + 4 = 8", **lenient) == [(0.0, "3 + 4 is 7, not 8")]  # x = 3 + 4 is no link
    assert step_reasons("3 + 4 == 8\n3 + 4 = = 8", **lenient) == [(0.0, "3 + 4 is 7, not 8")] * 2
    # The wrong link's value is the step's wrong result: a later step using it is wrong.
    v = arithmetic("3 + 4 = 7 = 8\n8 * 2 = 16", answer="16", numbers=[3, 4, 2])
    assert [(s.score, s.reason) for s in v.steps] == [(0.0, "7 = 8 is false"),
                                                      (0.0, "uses 8, the wrong result of step 1")]


@pytest.mark.parametrize("line, reason", [
    ("3 % 4 = 3", "cannot check 3 % 4: '%' is not supported"),
    ("5! = 120", "cannot check 5!: '!' is not supported"),
    ("√16 = 4", "cannot check √16: '√' is not supported"),
    ("2 ^ 0.5 = 1.41", "cannot check 2 ^ 0.5: a power with a non-integer exponent"),
    ("0 ^ 0 = 1", "cannot check 0 ^ 0: 0 to the power 0 is undefined"),
    ("Step 1: × 4 = 12", "cannot check × 4: it starts with an operator"),
    ("3 + 4 = 7 +", "cannot check 7 +: it ends with an operator"),
    ("3 + (4 = 7", "cannot check 3 + (4: unbalanced parentheses"),
    ("4 / (2 - 2) = 1", "4 / (2 - 2): division by zero"),
    ("2 ^ -1 / 0 = 1", "2 ^ -1 / 0: division by zero"),
    ("x" * 10_001 + " 1 + 1 = 2", "a line of 10011 characters is too long to check (limit 10000)"),
])
def test_what_cannot_be_checked_scores_zero_with_a_reason(line, reason):
    assert step_reasons(line, strict_operands=False) == [(0.0, reason)]


@pytest.mark.parametrize("line", [
    "**3 + 4 = 8**", "- 3 + 4 = 8", "1) 3 + 4 = 8", "a) 3 + 4 = 8", "(3 + 4 = 8)", "$3 + $4 = $8",
    "so 3 + 4 = 8 apples.", "Step 1: 3 + 4 = 8.", "3+4=8", "  3 + 4 = 8  ",
])
def test_steps_inside_prose_and_markup(line):
    c = f"{line}\nAnswer: 8"
    v = arithmetic(c, answer="7", numbers=[3, 4])
    assert lines_of(c, v) == [line]
    assert [(s.score, s.reason) for s in v.steps] == [(0.0, "3 + 4 is 7, not 8")]


@pytest.mark.parametrize("line, reasons", [
    ("3 + 4 equals 8", [(0.0, "3 + 4 is 7, not 8")]),
    ("3 + 4 is 8.", [(0.0, "3 + 4 is 7, not 8")]),
    ("3 + 4 is equal to 8", [(0.0, "3 + 4 is 7, not 8")]),
    ("{\"explanation\": \"3 + 4 equals 8\", \"answer\": 8}", [(0.0, "3 + 4 is 7, not 8")]),
    ("3 x 4 is 12 and 12 + 1 makes 14", [(0.0, "12 + 1 is 13, not 14")]),
    ("3 + 4 gives 7", [(1.0, "ok")]),
    ("3 + 4 Equals 7", [(1.0, "ok")]),
    ("Step 2 is 3 + 4 = 8", [(0.0, "3 + 4 is 7, not 8")]),  # "Step 2 is" follows no calculation
])
def test_words_that_claim_a_result_are_read_as_equals(line, reasons):
    """A model that learns to write "equals" instead of "=" is checked all the same."""
    assert step_reasons(line, strict_operands=False) == reasons


@pytest.mark.parametrize("line", [
    "x = 3", "2x + 3 = 7", "2x+3 = 7", "7 = 8", "3 + 4 <= 8", "3 + 4 ≠ 8", "v2 = 3 + 4", "= 7", "the sum is 7",
    "3 + 4 is the sum", "the answer is 8", "3 is 4", "what 3 + 4 is, is 8",
])
def test_formulas_and_relations_are_not_steps(line):
    assert arithmetic(line, answer="7", numbers=[3, 4]).steps == []


def test_step_limit_per_completion():
    c = "\n".join(["1 + 1 = 2"] * 1001)
    v = arithmetic(c, answer="2", numbers=[1])
    assert len(v.steps) == 1001
    assert [(s.score, s.reason) for s in v.steps[-2:]] == [(1.0, "ok"), (0.0, "not checked: more than 1000 steps")]


def test_a_long_line_of_spaces_in_an_answer_is_read_in_linear_time():
    # The old pattern (a lazy answer then an optional run of spaces) took ~25 s on this line.
    text = "Answer: x" + " " * 100_000 + "y  **"
    assert extract_final_answer(text) == "x" + " " * 100_000 + "y"
    assert extract_final_answer("**Answer:** 42.**  ") == "42."


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
