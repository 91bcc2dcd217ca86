"""mlxpost data convert: every layout to exact rows, detection, dedupe, splits, errors with file:row, Parquet input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_jsonl

from mlxpost.data.convert import CONVERSION_FILE, convert
from mlxpost.data.formats import completion_rating
from mlxpost.errors import DataError, MlxpostError


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def s(text):
    return {"role": "system", "content": text}


def write_parquet(path: Path, rows: list[dict], row_group_size: int | None = None) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


# ---------------------------------------------------------------------------
# Each layout, exact rows
# ---------------------------------------------------------------------------


ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    {"instruction": "Be terse.", "output": "Ok.", "system": "You are a bot."},
    {"instruction": "", "input": "Only an input", "output": "Fine."},
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},  # exact duplicate of row 2
]


def test_alpaca(tmp_path):
    src = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    logs = []
    res = convert(src, tmp_path / "out", log=logs.append)
    assert read(tmp_path / "out/train.jsonl") == [
        {"messages": [u("Add the numbers.\n\n2 and 3"), a("5")]},
        {"messages": [u("Say hi."), a("Hi!")]},
        {"messages": [s("You are a bot."), u("Be terse."), a("Ok.")]},
        {"messages": [u("Only an input"), a("Fine.")]},
    ]
    assert logs == [f"{src}: detected layout alpaca (columns: input, instruction, output)"]
    assert res.kind == "sft" and res.rows_in == 5 and res.rows_out == 4
    assert res.dropped == {"duplicate": 1}
    assert not (tmp_path / "out/test.jsonl").exists()


def test_system_option_fills_rows_without_one(tmp_path):
    src = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA[:3])
    convert(src, tmp_path / "out", system="Be brief.")
    assert read(tmp_path / "out/train.jsonl") == [
        {"messages": [s("Be brief."), u("Add the numbers.\n\n2 and 3"), a("5")]},
        {"messages": [s("Be brief."), u("Say hi."), a("Hi!")]},
        {"messages": [s("You are a bot."), u("Be terse."), a("Ok.")]},  # the row's own system message wins
    ]


def test_sharegpt(tmp_path):
    rows = [
        {"id": "x1", "conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Hi"},
                                       {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Bye"},
                                       {"from": "gpt", "value": "Bye!"}]},
        {"conversations": [{"from": "user", "value": "Q"}, {"from": "assistant", "value": "A"}], "system": "Sys"},
        {"conversations": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]},
    ]
    src = write_jsonl(tmp_path / "sg.jsonl", rows)
    convert(src, tmp_path / "out", layout="sharegpt", system="Default")
    assert read(tmp_path / "out/train.jsonl") == [
        {"messages": [s("S"), u("Hi"), a("Hello"), u("Bye"), a("Bye!")]},
        {"messages": [s("Sys"), u("Q"), a("A")]},
        {"messages": [s("Default"), u("Q2"), a("A2")]},
    ]


def test_openai_json_with_data_key(tmp_path):
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}]
    rows = [
        {"messages": [{"role": "developer", "content": "Dev"},
                      {"role": "user", "content": [{"type": "text", "text": "Part 1"}, {"type": "text", "text": "Part 2"}]},
                      {"role": "assistant", "content": "Done", "weight": 1}]},
        {"messages": [u("Weather?"), {"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "c1", "content": "Sunny"}, a("It is sunny.")], "tools": tools},
    ]
    src = tmp_path / "chat.json"
    src.write_text(json.dumps({"data": rows}))
    res = convert(src, tmp_path / "out")
    assert res.sources == [{"file": "chat.json", "layout": "openai", "rows": 2}]
    assert read(tmp_path / "out/train.jsonl") == [
        {"messages": [s("Dev"), u("Part 1\nPart 2"), a("Done")]},
        {"messages": [u("Weather?"), {"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "content": "Sunny", "tool_call_id": "c1"}, a("It is sunny.")], "tools": tools},
    ]


HH_CHOSEN = ("\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke."
             "\n\nAssistant: Why did the chicken cross the road?")


def test_hh_rlhf(tmp_path):
    rows = [
        {"chosen": HH_CHOSEN, "rejected": HH_CHOSEN.rsplit("Assistant:", 1)[0] + "Assistant: No."},
        {"chosen": "\n\nHuman: Same\n\nAssistant: Same.", "rejected": "\n\nHuman: Same\n\nAssistant: Same."},
        {"chosen": "Human: What is 2+2?\n\nAssistant: 4", "rejected": "Human: What is 2+2?\n\nAssistant: 5"},
    ]
    src = write_jsonl(tmp_path / "hh.jsonl", rows)
    res = convert(src, tmp_path / "out")
    assert res.kind == "preference" and res.dropped == {"identical chosen and rejected": 1}
    assert read(tmp_path / "out/train.jsonl") == [
        {"prompt": [u("Hi there"), a("Hello! How can I help?"), u("Tell me a joke.")],
         "chosen": [a("Why did the chicken cross the road?")], "rejected": [a("No.")]},
        {"prompt": [u("What is 2+2?")], "chosen": [a("4")], "rejected": [a("5")]},
    ]
    # The same pairs as SFT rows: the prompt and the chosen answer.
    convert(src, tmp_path / "sft", to="sft")
    assert read(tmp_path / "sft/train.jsonl")[1] == {"messages": [u("What is 2+2?"), a("4")]}


def test_hh_rlhf_pair_differing_before_the_answer_is_an_error(tmp_path):
    rows = [{"chosen": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: D",
             "rejected": "\n\nHuman: A\n\nAssistant: B\n\nHuman: X\n\nAssistant: D"}]
    src = write_jsonl(tmp_path / "hh.jsonl", rows)
    with pytest.raises(DataError) as e:
        convert(src, tmp_path / "out")
    assert [str(i) for i in e.value.issues] == [
        f"{src}:1: chosen: chosen and rejected first differ at turn 3, which is not the assistant's: "
        "a pair must share everything before its answers"]


def test_ultrafeedback_ratings_rule(tmp_path):
    rows = [
        {"source": "x", "instruction": "Q1", "models": ["a", "b", "c", "d"], "completions": [
            {"model": "a", "response": "R-a", "fine-grained_score": 4.5, "overall_score": 7,
             "annotations": {"helpfulness": {"Rating": "1", "Rationale": "..."}}},
            {"model": "b", "response": "R-b", "fine-grained_score": 2.0, "overall_score": 9},
            {"model": "c", "response": "R-c", "fine-grained_score": 4.5},
            {"model": "d", "response": "R-d", "fine-grained_score": 2.0}]},
        {"instruction": "Q2", "completions": [
            {"response": "x", "annotations": {"helpfulness": {"Rating": "3"}, "honesty": {"Rating": "N/A"}}},
            {"response": "y", "annotations": {"helpfulness": {"Rating": "5"}, "honesty": {"Rating": "4"}}},
            {"response": "", "overall_score": 10}]},  # no response: ignored
        {"instruction": "Q3", "completions": [{"response": "p", "overall_score": 6}, {"response": "q", "overall_score": 6}]},
        {"prompt": "Q4", "completions": [{"response": "low", "overall_score": 2}, {"response": "high", "score": 8},
                                         {"response": "unrated"}]},
    ]
    src = write_jsonl(tmp_path / "uf.jsonl", rows)
    res = convert(src, tmp_path / "out")
    assert read(tmp_path / "out/train.jsonl") == [
        {"prompt": [u("Q1")], "chosen": [a("R-a")], "rejected": [a("R-b")]},  # first of the tied best / worst
        {"prompt": [u("Q2")], "chosen": [a("y")], "rejected": [a("x")]},
        {"prompt": [u("Q4")], "chosen": [a("high")], "rejected": [a("low")]},
    ]
    assert res.dropped == {"no two completions with different ratings": 1}
    assert completion_rating({"annotations": {"h": {"Rating": "3"}, "k": {"Rating": "4"}}}) == 3.5
    assert completion_rating({"fine-grained_score": True}) is None


BINARIZED = [
    {"prompt": "Q1", "prompt_id": "1",
     "chosen": [u("Q1"), a("good")], "rejected": [u("Q1"), a("bad")],
     "messages": [u("Q1"), a("good")], "score_chosen": 8.0, "score_rejected": 4.0},
    {"prompt": "Q2", "prompt_id": "2",
     "chosen": [u("Q2"), a("one")], "rejected": [u("Q2"), a("two")],
     "messages": [u("Q2"), a("one")], "score_chosen": 5.0, "score_rejected": 5.0},  # tie
    {"prompt": "Q3", "prompt_id": "3",
     "chosen": [u("Q3"), a("yes"), u("more?"), a("sure")], "rejected": [u("Q3"), a("yes"), u("more?"), a("no")],
     "messages": [u("Q3")], "score_chosen": 9.0, "score_rejected": 1.0},
]


def test_ultrafeedback_binarized_from_parquet(tmp_path):
    src = write_parquet(tmp_path / "train_prefs-00000-of-00001.parquet", BINARIZED)
    logs = []
    res = convert(src, tmp_path / "out", log=logs.append)
    assert logs == [f"{src}: detected layout ultrafeedback (columns: chosen, messages, prompt, prompt_id, rejected, "
                    "score_chosen, score_rejected)"]
    assert read(tmp_path / "out/train.jsonl") == [
        {"prompt": [u("Q1")], "chosen": [a("good")], "rejected": [a("bad")]},
        {"prompt": [u("Q3"), a("yes"), u("more?")], "chosen": [a("sure")], "rejected": [a("no")]},
    ]
    assert res.dropped == {"tied ratings": 1}


def test_ultrafeedback_answers_only_with_prompt_column(tmp_path):
    rows = [{"prompt": "Q", "chosen": [a("good")], "rejected": [a("bad")]}]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    convert(src, tmp_path / "out", layout="ultrafeedback", system="S")
    assert read(tmp_path / "out/train.jsonl") == [{"prompt": [s("S"), u("Q")], "chosen": [a("good")],
                                                   "rejected": [a("bad")]}]


# ---------------------------------------------------------------------------
# Detection, inputs, errors
# ---------------------------------------------------------------------------


def test_detection_errors(tmp_path):
    amb = write_jsonl(tmp_path / "amb.jsonl", [{"instruction": "a", "output": "b",
                                                "conversations": [{"from": "human", "value": "x"}]}])
    with pytest.raises(MlxpostError, match=r"amb.jsonl:1: ambiguous layout: the columns \(conversations, "
                                           r"instruction, output\) fit alpaca and sharegpt; pass --from alpaca"):
        convert(amb, tmp_path / "o1")
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(MlxpostError, match=r"unknown.jsonl:1: cannot tell the layout from the columns "
                                           r"\(answer, question\)\. Known layouts: alpaca: "):
        convert(unknown, tmp_path / "o2")
    ours = write_jsonl(tmp_path / "ours.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(MlxpostError, match="looks like mlxpost's own format already"):
        convert(ours, tmp_path / "o3")


def test_mixed_layouts_in_one_file_are_an_error_even_when_skipping(tmp_path):
    rows = [ALPACA[0], ALPACA[1], {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
            {"instruction": "no output here"}]
    src = write_jsonl(tmp_path / "mixed.jsonl", rows)
    for skip in (False, True):
        with pytest.raises(DataError) as e:
            convert(src, tmp_path / "out", skip_bad_rows=skip)
        assert [str(i) for i in e.value.issues] == [
            f"{src}:3: mixed layouts in one file: the file is alpaca, this row looks like sharegpt (conversations)",
            f"{src}:4: missing column output of the alpaca layout (the row has: instruction)"]
        assert "Each input file must hold one layout" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_wrong_columns_with_an_explicit_layout(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", ALPACA[:1])
    with pytest.raises(DataError, match=r"a.jsonl:1: not a row of the sharegpt layout: this row looks like alpaca"):
        convert(src, tmp_path / "out", layout="sharegpt")
    with pytest.raises(MlxpostError, match="--to preference needs a preference layout"):
        convert(src, tmp_path / "out", to="preference")


def test_row_errors_name_the_input_file_line_and_field(tmp_path):
    src = tmp_path / "sg.jsonl"
    good = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    src.write_text("\n".join([
        json.dumps(good),
        "",  # blank lines keep the numbering
        json.dumps({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "  "}]}),
        "{not json",
        json.dumps({"conversations": [{"from": "human", "value": "Q"}, {"from": "bot", "value": "A"}]}),
        json.dumps({"conversations": [{"from": "gpt", "value": "A"}]}),
        json.dumps({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "A"}]}),
    ]) + "\n")
    with pytest.raises(DataError) as e:
        convert(src, tmp_path / "out")
    assert [str(i) for i in e.value.issues] == [
        f"{src}:3: conversations[1].value: empty assistant turn",
        f"{src}:4: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        f"{src}:5: conversations[1].from: unknown speaker 'bot' (expected human, gpt or system)",
        f"{src}:6: conversations[0].from: the conversation must start with a user turn (after an optional system "
        "message)",
        f"{src}:7: conversations[0].value: expected a string, got int",
    ]
    assert str(e.value).startswith("5 of 6 rows are invalid:")
    assert "pass --skip-bad-rows" in str(e.value)

    res = convert(src, tmp_path / "out", skip_bad_rows=True)
    assert read(tmp_path / "out/train.jsonl") == [{"messages": [u("Q"), a("A")]}]
    assert res.rows_in == 6 and res.rows_out == 1
    assert res.dropped == {
        "invalid: empty assistant turn": 1,
        "invalid: not valid JSON (Expecting property name enclosed in double quotes at column 2)": 1,
        "invalid: unknown speaker 'bot' (expected human, gpt or system)": 1,
        "invalid: the conversation must start with a user turn (after an optional system message)": 1,
        "invalid: expected a string, got int": 1,
    }


def test_alpaca_errors_name_alpaca_fields(tmp_path):
    src = tmp_path / "a.json"
    src.write_text(json.dumps([ALPACA[0], {"instruction": "x", "output": ""}, {"instruction": "x", "output": 5}, 7]))
    with pytest.raises(DataError) as e:
        convert(src, tmp_path / "out")
    assert [str(i) for i in e.value.issues] == [
        f"{src}:2: output: empty assistant turn",
        f"{src}:3: output: expected a string, got int",
        f"{src}:4: expected a JSON object, got int",
    ]
    assert "(.json and .parquet rows are counted from 1)" in str(e.value)


def test_json_inputs(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a", "output": "b"},\n  {"instruction": ]')
    with pytest.raises(MlxpostError, match=r"bad.json:2: not valid JSON \(Expecting value at column 19\)"):
        convert(bad, tmp_path / "o1")
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"rows": []}))
    with pytest.raises(MlxpostError, match="expected a JSON array of rows or an object with a 'data' array, got an "
                                           "object with keys rows"):
        convert(obj, tmp_path / "o2")
    lines = tmp_path / "lines.json"  # JSON Lines named .json
    lines.write_text(json.dumps(ALPACA[0]) + "\n" + json.dumps(ALPACA[1]) + "\n")
    assert convert(lines, tmp_path / "o3").rows_out == 2
    with pytest.raises(MlxpostError, match="expected a .jsonl, .json or .parquet file"):
        convert(write_jsonl(tmp_path / "x.txt", ALPACA), tmp_path / "o4")


def test_directory_input_reads_every_file(tmp_path):
    d = tmp_path / "in"
    write_jsonl(d / "a.jsonl", ALPACA[:2])
    (d / "sub").mkdir()
    (d / "sub/b.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": "Q"},
                                                                 {"from": "gpt", "value": "A"}]}]))
    write_jsonl(d / ".hidden/c.jsonl", [{"nonsense": 1}])
    res = convert(d, d / "out")
    assert res.sources == [{"file": "a.jsonl", "layout": "alpaca", "rows": 2},
                           {"file": "b.json", "layout": "sharegpt", "rows": 1}]
    assert res.rows_out == 3
    # The output inside the input directory is not read back on a second run.
    res2 = convert(d, d / "out", overwrite=True)
    assert [x["file"] for x in res2.sources] == ["a.jsonl", "b.json"]


def test_parquet_input_and_its_errors(tmp_path):
    rows = [{"instruction": f"Q{i}", "input": None, "output": f"A{i}"} for i in range(5)]
    src = write_parquet(tmp_path / "alpaca.parquet", rows, row_group_size=2)
    res = convert(src, tmp_path / "out")
    assert read(tmp_path / "out/train.jsonl") == [{"messages": [u(f"Q{i}"), a(f"A{i}")]} for i in range(5)]
    assert res.sources == [{"file": "alpaca.parquet", "layout": "alpaca", "rows": 5}]

    # A null in a required column is a row error (rows counted from 1 across row groups).
    rows[3]["output"] = None
    src2 = write_parquet(tmp_path / "nulls.parquet", rows, row_group_size=2)
    with pytest.raises(DataError) as e:
        convert(src2, tmp_path / "o2")
    assert [str(i) for i in e.value.issues] == [f"{src2}:4: output: missing"]

    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(MlxpostError) as e:
        convert(truncated, tmp_path / "o3")
    assert str(e.value).startswith(f"{truncated}: not a readable Parquet file (")
    assert "truncated" in str(e.value)


def test_dedupe_after_conversion(tmp_path):
    # Different input rows that convert to the same row are duplicates too.
    rows = [{"instruction": "Hi", "output": "Yo"}, {"instruction": "Hi", "input": "", "output": "Yo"},
            {"instruction": "Hi", "output": "Yo!"}]
    res = convert(write_jsonl(tmp_path / "a.jsonl", rows), tmp_path / "out")
    assert res.rows_out == 2 and res.dropped == {"duplicate": 1}


def test_split_is_seeded_and_keeps_order(tmp_path):
    rows = [{"instruction": f"Q{i}", "output": f"A{i}"} for i in range(50)]
    src = write_jsonl(tmp_path / "a.jsonl", rows)
    r1 = convert(src, tmp_path / "s0", split=0.2, seed=0)
    convert(src, tmp_path / "s0b", split=0.2, seed=0)
    convert(src, tmp_path / "s1", split=0.2, seed=1)
    assert r1.splits == {"train.jsonl": 40, "test.jsonl": 10}
    for f in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / "s0" / f).read_bytes() == (tmp_path / "s0b" / f).read_bytes()
    assert (tmp_path / "s0/test.jsonl").read_bytes() != (tmp_path / "s1/test.jsonl").read_bytes()
    train, test = read(tmp_path / "s0/train.jsonl"), read(tmp_path / "s0/test.jsonl")
    index = [int(r["messages"][0]["content"][1:]) for r in train], [int(r["messages"][0]["content"][1:]) for r in test]
    assert index[0] == sorted(index[0]) and index[1] == sorted(index[1])
    assert sorted(index[0] + index[1]) == list(range(50))
    with pytest.raises(MlxpostError, match="too few to hold out"):
        convert(write_jsonl(tmp_path / "one.jsonl", rows[:1]), tmp_path / "s2", split=0.5)


def test_overwrite_and_conversion_record(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"Q{i}", "output": f"A{i}"} for i in range(10)])
    convert(src, tmp_path / "out", split=0.2, seed=3, system="S")
    meta = json.loads((tmp_path / "out" / CONVERSION_FILE).read_text())
    assert meta == {"format": "mlxpost", "kind": "sft",
                    "command": "mlxpost data convert a.jsonl --to sft --from auto --out out --split 0.2 --seed 3 "
                               "--system S",
                    "sources": [{"file": "a.jsonl", "layout": "alpaca", "rows": 10}], "rows_in": 10,
                    "splits": {"train.jsonl": 8, "test.jsonl": 2}, "dropped": {}, "split": 0.2, "seed": 3,
                    "system": "S"}
    with pytest.raises(MlxpostError, match="train.jsonl exists; pass --overwrite"):
        convert(src, tmp_path / "out")
    convert(src, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out/test.jsonl").exists()  # no stale split left behind
    assert len(read(tmp_path / "out/train.jsonl")) == 10


# ---------------------------------------------------------------------------
# The output trains: mlxpost's own loader reads it; token lengths
# ---------------------------------------------------------------------------


def test_converted_output_loads_with_mlxpost_data(tmp_path, tiny_model):
    from mlx_lm.utils import load_tokenizer

    from mlxpost.data.load import tokenize_file, tokenize_pairs_file
    from mlxpost.data.render import Renderer

    renderer = Renderer(load_tokenizer(tiny_model))
    d = tmp_path / "in"
    write_jsonl(d / "alpaca.jsonl", ALPACA)
    write_jsonl(d / "sg.jsonl", [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"},
                                                    {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Ok"}]}])
    res = convert(d, tmp_path / "sft", system="Be brief.")
    examples, stats = tokenize_file(tmp_path / "sft/train.jsonl", renderer, max_seq_len=512)
    assert len(examples) == res.rows_out == 5 and stats.bad_rows == 0

    p = tmp_path / "p"
    write_jsonl(p / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_CHOSEN.rsplit("Assistant:", 1)[0] + "Assistant: No."}])
    write_jsonl(p / "uf.jsonl", BINARIZED)
    res = convert(p, tmp_path / "pref")
    pairs, stats = tokenize_pairs_file(tmp_path / "pref/train.jsonl", renderer, max_seq_len=512)
    assert len(pairs) == res.rows_out == 3 and stats.bad_rows == 0


def test_token_length_percentiles(tmp_path, tiny_model):
    from mlx_lm.utils import load_tokenizer

    from mlxpost.data.render import Renderer

    rows = [{"instruction": "Q" * n, "output": "A"} for n in (1, 20, 60)]
    res = convert(write_jsonl(tmp_path / "a.jsonl", rows), tmp_path / "out", tokenizer=str(tiny_model))
    renderer = Renderer(load_tokenizer(tiny_model))
    lengths = sorted(len(renderer.render(r)[0]) for r in read(tmp_path / "out/train.jsonl"))
    assert lengths[0] < lengths[1] < lengths[2]
    assert res.lengths == {"p50": lengths[1], "p90": lengths[2], "p99": lengths[2], "max": lengths[2]}
    table = dict(res.table_rows())
    assert table["tokens p50"] == lengths[1] and table["tokenizer"] == str(tiny_model)
    meta = json.loads((tmp_path / "out" / CONVERSION_FILE).read_text())
    assert meta["tokens"] == {"tokenizer": tiny_model.name, **res.lengths}


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def cli_group():
    from mlxpost.cli.data import data, push
    from mlxpost.cli.main import _Group

    return _Group(name="mlxpost", commands={"data": data, "push": push})


def test_cli_convert(tmp_path):
    src = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    out = CliRunner().invoke(cli_group(), ["data", "convert", str(src), "--out", str(tmp_path / "out"),
                                           "--split", "0.25", "--plain"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0] == f"{src}: detected layout alpaca (columns: input, instruction, output)"
    assert "== data convert" in lines
    table = {line.split()[0] + " " + line.split()[1] if line.strip().startswith(("rows", "dropped")) else "":
             line.split()[-1] for line in lines if line.startswith("  ")}
    assert table["rows in"] == "5" and table["rows out"] == "4" and table["dropped: duplicate"] == "1"
    assert any(line.split() == ["train.jsonl", "3"] for line in lines)
    assert any(line.split() == ["test.jsonl", "1"] for line in lines)

    bad = CliRunner().invoke(cli_group(), ["data", "convert", str(src), "--out", str(tmp_path / "out"), "--plain"])
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines()[-1].startswith("error: ") and "--overwrite" in bad.output
