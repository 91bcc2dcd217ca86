"""Reward functions (mlxpost.rl.rewards): built-ins, loading, weights, and every error case."""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest

from mlxpost.errors import MlxpostError
from mlxpost.rl.rewards import (
    BUILTIN_REWARDS,
    RewardScores,
    RewardSet,
    accuracy,
    format_reward,
    load_reward,
    parse_reward_option,
)


def write(path, text):
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# Built-ins
# ---------------------------------------------------------------------------


def test_accuracy_on_exact_examples():
    completions = [
        "3 + 4 = 7\n7 * 2 = 14\nAnswer: 14",   # right
        "3 + 4 = 7\nAnswer: 8",                # wrong
        "so the result is 14",                  # no Answer line: the last number
        "I do not know",                        # nothing to compare
        "Answer: 1,234.",                       # thousands separator and a period
        "**Answer:** 0.75",                     # markdown, numeric tolerance vs a fraction
        "Answer: Paris",                        # text answers, case-insensitive
    ]
    answers = ["14", "9", 14, "14", "1234", "3/4", "paris"]
    assert accuracy(completions, answer=answers) == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0]


def test_accuracy_none_without_answer():
    assert accuracy(["Answer: 3", "Answer: 4"], answer=["3", None]) == [1.0, None]
    assert accuracy(["Answer: 3"]) == [None]
    assert accuracy(["Answer: 3"], prompt=["p"]) == [None]


@pytest.mark.parametrize("text, expected", [
    ("3 + 4 = 7\nAnswer: 7", 1.0),
    ("Answer: 7", 1.0),
    ("Answer: 7\n\n  \n", 1.0),            # trailing blank lines are fine
    ("  Answer:seven", 1.0),
    ("Answer: 7\nThanks!", 0.0),           # something after the answer line
    ("answer: 7", 0.0),                    # case-sensitive
    ("Answer:", 0.0),                      # nothing after the colon
    ("Answer:   \n", 0.0),
    ("The Answer: 7", 0.0),
    ("", 0.0),
])
def test_format_reward(text, expected):
    assert format_reward([text]) == [expected]


def test_accuracy_is_exact_and_never_raises_on_untrusted_completions():
    completions = [
        "Answer: 1e400",            # used to raise OverflowError and stop the run
        "Answer: 1e400",
        "Answer: 1e4999999",        # used to take seconds (10**4999999), then raise
        "the total is 1e4999999",   # not read as "1"
        "Answer: 1000001",          # used to match 1000000 (relative tolerance 1e-6)
        "Answer: 1000000",
        "Answer: " + "9" * 5000,    # beyond int()'s 4300-digit limit for strings
        "Answer: 0.3333333",        # a rounded decimal keeps its tolerance
        "Answer: \x00\ud800 7",    # NUL and a lone surrogate around one number
    ]
    answers = ["5", "1e400", "1", "1", "1000000", "1000000", "9", "1/3", "7"]
    assert accuracy(completions, answer=answers) == [0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    scores = RewardSet(["accuracy", "format@0.5"]).score(completions, {"answer": answers})
    assert scores.per_function["format"] == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert scores.total == [0.5, 1.5, 0.5, 0.0, 0.5, 1.5, 0.5, 1.5, 1.5]


def test_format_reward_on_long_and_odd_lines():
    assert format_reward(["Answer: " + "*" * 100_000, "Answer:" + " " * 100_000, "x\n" * 50_000 + "Answer: 1",
                          "Answer: 1\n\x00", "\ud800Answer: 1"]) == [1.0, 0.0, 1.0, 0.0, 0.0]


def test_builtin_names():
    assert set(BUILTIN_REWARDS) == {"accuracy", "format"}
    assert load_reward("accuracy") is accuracy
    assert load_reward("format") is format_reward


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def test_load_from_file(tmp_path):
    f = write(tmp_path / "my_rewards.py", """
        LIMIT = 10
        def brevity(completions, **kw):
            return [1.0 if len(c) < LIMIT else 0.0 for c in completions]
    """)
    fn = load_reward(f"{f}:brevity")
    assert fn(["short", "a long completion"]) == [1.0, 0.0]
    # The same file twice: loaded once.
    assert load_reward(f"{f}:brevity") is fn
    # Relative to base_dir.
    assert load_reward("my_rewards.py:brevity", base_dir=tmp_path) is fn


def test_load_file_can_import_its_neighbours(tmp_path):
    write(tmp_path / "helper_mod_xyz.py", "def half(x):\n    return x / 2\n")
    f = write(tmp_path / "uses_helper.py", """
        from helper_mod_xyz import half
        def r(completions, **kw):
            return [half(len(c)) for c in completions]
    """)
    assert load_reward(f"{f}:r")(["abcd"]) == [2.0]


def test_load_from_module(tmp_path, monkeypatch):
    pkg = tmp_path / "rewardpkg_abc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    write(pkg / "funcs.py", """
        def ones(completions, **kw):
            return [1.0] * len(completions)
        class Scorer:
            @staticmethod
            def zeros(completions, **kw):
                return [0.0] * len(completions)
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward("rewardpkg_abc.funcs:ones")(["a", "b"]) == [1.0, 1.0]
    assert load_reward("rewardpkg_abc.funcs:Scorer.zeros")(["a"]) == [0.0]


def test_load_callable_passes_through():
    def mine(completions, **kw):
        return [0.0] * len(completions)
    assert load_reward(mine) is mine


def test_load_errors(tmp_path):
    f = write(tmp_path / "r.py", """
        NOT_A_FUNCTION = 3
        def good(completions, **kw):
            return [0.0] * len(completions)
    """)
    with pytest.raises(MlxpostError, match="file not found"):
        load_reward(f"{tmp_path / 'missing.py'}:good")
    with pytest.raises(MlxpostError, match=r"has no 'nope' \(functions there: good\)"):
        load_reward(f"{f}:nope")
    with pytest.raises(MlxpostError, match="NOT_A_FUNCTION is a int, not a function"):
        load_reward(f"{f}:NOT_A_FUNCTION")
    with pytest.raises(MlxpostError, match="unknown reward 'acuracy'.*accuracy, format"):
        load_reward("acuracy")
    with pytest.raises(MlxpostError, match="name the function"):
        load_reward(str(f))
    with pytest.raises(MlxpostError, match="no module named 'no_such_module_qq'"):
        load_reward("no_such_module_qq:fn")
    broken = write(tmp_path / "broken.py", "x = 1\nraise RuntimeError('boom at import')\n")
    with pytest.raises(MlxpostError, match=r"importing .*broken.py failed: RuntimeError: boom at import "
                                           r"\(at broken.py:2\)"):
        load_reward(f"{broken}:x")


@pytest.mark.parametrize("text, expected", [
    ("accuracy", ("accuracy", 1.0)),
    ("format@0.2", ("format", 0.2)),
    ("my.py:fmt@-0.5", ("my.py:fmt", -0.5)),
    ("path/to/r.py:fn", ("path/to/r.py:fn", 1.0)),
    ("/home/me@host/r.py:fn", ("/home/me@host/r.py:fn", 1.0)),
    ("/home/me@host/r.py:fn@2", ("/home/me@host/r.py:fn", 2.0)),
    ("pkg.mod:fn@0", ("pkg.mod:fn", 0.0)),
])
def test_parse_reward_option(text, expected):
    assert parse_reward_option(text) == expected


@pytest.mark.parametrize("text, match", [
    ("format@heavy", "must be a number"),
    ("format@nan", "finite"),
    ("@1", "missing the reward"),
    ("", "expected NAME"),
])
def test_parse_reward_option_errors(text, match):
    with pytest.raises(MlxpostError, match=match):
        parse_reward_option(text)


# ---------------------------------------------------------------------------
# RewardSet: weights, None, columns
# ---------------------------------------------------------------------------


def test_weights_and_none():
    def sometimes(completions, **kw):
        return [None, 1.0, 0.5]

    rs = RewardSet([("accuracy", 1.0), ("format", 0.5), (sometimes, -2.0)])
    assert rs.names == ["accuracy", "format", "sometimes"]
    scores = rs.score(["Answer: 3", "3", "Answer: 4"], {"answer": ["3", "3", None]})
    assert isinstance(scores, RewardScores)
    assert scores.per_function == {"accuracy": [1.0, 1.0, None], "format": [1.0, 0.0, 1.0],
                                   "sometimes": [None, 1.0, 0.5]}
    # None counts as 0 in the total.
    assert scores.total == pytest.approx([1.0 + 0.5, 1.0 - 2.0, 0.5 - 1.0])
    assert scores.means() == {"accuracy": 1.0, "format": pytest.approx(2 / 3), "sometimes": 0.75}
    assert scores.weights == {"accuracy": 1.0, "format": 0.5, "sometimes": -2.0}


def test_string_specs_and_names(tmp_path):
    a = write(tmp_path / "a.py", "def fn(completions, **kw):\n    return [1] * len(completions)\n")
    b = write(tmp_path / "b.py", "def fn(completions, **kw):\n    return [2] * len(completions)\n")
    rs = RewardSet(["accuracy@2", f"{a}:fn@0.5", f"{b}:fn"])
    # Two functions called fn: named by their specs.
    assert rs.names == ["accuracy", f"{a}:fn", f"{b}:fn"]
    assert rs.weights == {"accuracy": 2.0, f"{a}:fn": 0.5, f"{b}:fn": 1.0}
    s = rs.score(["x"], {"answer": ["y"]})
    assert s.total == [0.0 * 2 + 1 * 0.5 + 2 * 1.0]
    with pytest.raises(MlxpostError, match="given twice"):
        RewardSet(["accuracy", "accuracy@0.5"])
    with pytest.raises(MlxpostError, match="no reward functions"):
        RewardSet([])


def test_columns_and_prompts_reach_the_function():
    seen = {}

    def spy(completions, **columns):
        seen.update(columns)
        return [0.0] * len(completions)

    def only_answer(completions, answer):
        return [float(c == a) for c, a in zip(completions, answer)]

    rs = RewardSet([spy, only_answer])
    s = rs.score(["a", "b"], {"answer": ["a", "c"], "level": [1, 2], "completions": ["x", "y"]},
                 prompts=["P1", "P2"])
    assert seen == {"answer": ["a", "c"], "level": [1, 2], "prompts": ["P1", "P2"]}
    assert s.per_function["only_answer"] == [1.0, 0.0]
    with pytest.raises(MlxpostError, match=r"reward only_answer needs column 'answer'.*columns: level"):
        rs.score(["a"], {"level": [1]})


def test_empty_batch():
    s = RewardSet(["accuracy"]).score([], {"answer": []})
    assert s.total == [] and s.per_function == {"accuracy": []}


def test_bool_and_numpy_values_are_numbers():
    def mixed(completions, **kw):
        return [True, False, np.float32(0.25), np.int64(2), np.bool_(True)]

    s = RewardSet([mixed]).score(["a"] * 5)
    assert s.per_function["mixed"] == [1.0, 0.0, 0.25, 2.0, 1.0]
    assert all(type(v) is float for v in s.per_function["mixed"])


def test_column_length_mismatch():
    with pytest.raises(MlxpostError, match=r"column 'answer' has 1 values for 2 completions"):
        RewardSet(["accuracy"]).score(["a", "b"], {"answer": ["a"]})


# ---------------------------------------------------------------------------
# RewardSet: errors from user functions
# ---------------------------------------------------------------------------


def test_raising_reward_names_function_row_and_exception(tmp_path):
    f = write(tmp_path / "fragile.py", """
        def fragile(completions, answer, **kw):
            out = []
            for c, a in zip(completions, answer):
                out.append(float(int(a) == len(c)))
            return out
    """)
    rs = RewardSet([f"{f}:fragile"])
    with pytest.raises(MlxpostError) as e:
        rs.score(["a", "bb", "ccc"], {"answer": ["1", "two", "3"]}, sources=["t.jsonl:1", "t.jsonl:2", "t.jsonl:3"])
    msg = str(e.value)
    assert "reward fragile" in msg and f"{f}:fragile" in msg
    assert "row 1 (t.jsonl:2)" in msg
    assert "ValueError: invalid literal for int() with base 10: 'two'" in msg
    assert "(at fragile.py:5)" in msg


def test_raising_only_on_the_batch():
    def batch_only(completions, **kw):
        if len(completions) > 1:
            raise RuntimeError("needs one at a time")
        return [0.0]

    with pytest.raises(MlxpostError, match=r"reward batch_only raised on the batch of 2 \(but on no row alone\): "
                                           r"RuntimeError: needs one at a time"):
        RewardSet([batch_only]).score(["a", "b"])


def test_wrong_length():
    def short(completions, **kw):
        return [1.0]

    with pytest.raises(MlxpostError, match=r"reward short returned 1 values for 3 completions; expected 3"):
        RewardSet([short]).score(["a", "b", "c"])


def test_not_a_list():
    def scalar(completions, **kw):
        return 1.0

    def text(completions, **kw):
        return "1.0"

    with pytest.raises(MlxpostError, match=r"reward scalar returned float; expected a list of 2 numbers"):
        RewardSet([scalar]).score(["a", "b"])
    with pytest.raises(MlxpostError, match=r"reward text returned str"):
        RewardSet([text]).score(["a", "b"])


@pytest.mark.parametrize("bad, shown, why", [
    ("1.0", "'1.0'", "expected a number or None"),
    ([1], r"\[1\]", "expected a number or None"),
    (float("nan"), "nan", "rewards must be finite"),
    (float("inf"), "inf", "rewards must be finite"),
    (np.float64("nan"), "nan", "rewards must be finite"),
])
def test_non_numbers(bad, shown, why):
    def r(completions, **kw):
        return [0.0, 0.0, bad]

    with pytest.raises(MlxpostError, match=rf"reward r returned .*{shown}.* for row 2; {why}"):
        RewardSet([r]).score(["a", "b", "c"])


def test_bad_weights():
    with pytest.raises(MlxpostError, match="weight must be a finite number"):
        RewardSet([("accuracy", math.inf)])
    with pytest.raises(MlxpostError, match="weight must be a finite number"):
        RewardSet([("accuracy", "1")])


def test_function_without_a_completions_argument():
    def nothing():
        return []

    with pytest.raises(MlxpostError, match="must take the completions as its first argument"):
        RewardSet([nothing])
