"""Fuzzing the data readers: malformed rows of every format end in the project's own errors, never a traceback.

Every data file is untrusted input. Each test writes a few hundred rows made
by damaging valid rows of one format (wrong types, missing and extra keys,
deep nesting, lone surrogates, NaN, huge numbers, cut JSON, stray bytes,
BOMs, blank and enormous lines) and feeds them to the reader that format
goes through: SFT rows, preference pairs, RL prompts, and ``data convert``
for each dataset layout. The only exceptions allowed out are
:class:`~mlxpost.errors.MlxpostError` (``DataError`` is one); the tests also
check that each bad row is reported by its line, and that with
``skip_bad_rows`` the valid rows still come through.
"""

from __future__ import annotations

import json
import random
import re

import pytest
from mlx_lm.utils import load_tokenizer

from mlxpost.data.convert import convert
from mlxpost.data.load import load_prompts, tokenize_file, tokenize_pairs_file
from mlxpost.data.render import Renderer
from mlxpost.data.rows import read_jsonl
from mlxpost.errors import DataError, MlxpostError

N_ROWS = 300  # malformed rows per format


def junk(rng: random.Random, depth: int = 0):
    """A random JSON-ish value: any type, odd strings and numbers, sometimes nested."""
    kinds = ["none", "bool", "int", "float", "str", "list", "dict", "nan", "big", "surrogate", "empty"]
    kind = rng.choice(kinds if depth < 3 else kinds[:5])
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, -1, 7, 2**63, -(2**70)])
    if kind == "float":
        return rng.choice([0.5, -1e308, 1e-320, 3.0])
    if kind == "str":
        return rng.choice(["", " ", "hi", "\u0000", "é" * 50, "<|im_end|>", "{% raw %}", "\n\n", "x" * 3000])
    if kind == "list":
        return [junk(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == "dict":
        keys = ["role", "content", "from", "value", "text", "prompt", "tool_calls", "x"]
        return {rng.choice(keys): junk(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    if kind == "nan":
        return float("nan")
    if kind == "big":
        return 10**400 if rng.random() < 0.5 else "9" * 5000
    if kind == "surrogate":
        return "\ud800 lone surrogate"
    return {}


ODD_TEXT = ["\ud800", "\udfff end", "", "   ", "\x00", "<|im_start|>assistant\n", "{{ raise_exception('x') }}",
            "\u202e\u200b", "e\u0301" * 20, "1e400", "NaN", "z" * 20_000]


def damage_text(node, rng: random.Random) -> bool:
    """Replace one string somewhere inside ``node`` (a dict or list) by an odd one; False when it holds none."""
    slots = []
    stack = [node]
    while stack:
        n = stack.pop()
        items = n.items() if isinstance(n, dict) else enumerate(n) if isinstance(n, list) else ()
        for k, v in items:
            if isinstance(v, str):
                slots.append((n, k))
            else:
                stack.append(v)
    if not slots:
        return False
    parent, key = rng.choice(slots)
    parent[key] = rng.choice(ODD_TEXT)
    return True


def mutate(row: dict, rng: random.Random):
    """A damaged copy of ``row``: fields replaced, dropped or added, a string made odd, a value nested deep."""
    row = json.loads(json.dumps(row))
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(["replace", "drop", "add", "inner", "deep", "wrap", "text", "text"])
        keys = list(row)
        if op == "text":
            damage_text(row, rng)
        elif op == "replace" and keys:
            row[rng.choice(keys)] = junk(rng)
        elif op == "drop" and keys:
            row.pop(rng.choice(keys))
        elif op == "add":
            row[rng.choice(["messages", "prompt", "chosen", "rejected", "text", "tools", "system", "x"])] = junk(rng)
        elif op == "inner":
            for v in row.values():
                if isinstance(v, list) and v:
                    i = rng.randrange(len(v))
                    if isinstance(v[i], dict) and v[i] and rng.random() < 0.7:
                        v[i][rng.choice(list(v[i]))] = junk(rng)
                    else:
                        v[i] = junk(rng)
                    break
        elif op == "deep" and keys:  # written as nested brackets by dumps()
            row[rng.choice(keys)] = f"__DEEP_{rng.choice([50, 200, 5000])}__"
        elif op == "wrap":
            return rng.choice([[row], "row", 3, None])
    return row


def dumps(value) -> str:
    """JSON text of ``value``; a ``"__DEEP_n__"`` placeholder becomes a string nested in n lists."""
    text = json.dumps(value, allow_nan=True)
    return re.sub(r'"__DEEP_(\d+)__"', lambda m: "[" * int(m[1]) + '"x"' + "]" * int(m[1]), text)


def raw_damage(text: str, rng: random.Random) -> bytes:
    """Damage a line's bytes: cut it, add invalid UTF-8 or a BOM, or make it enormous."""
    op = rng.choice(["cut", "bytes", "bom", "none", "none", "none", "huge"])
    data = text.encode("utf-8", "surrogatepass")
    if op == "cut":
        return data[: rng.randint(0, max(len(data) - 1, 0))]
    if op == "bytes":
        i = rng.randint(0, len(data))
        return data[:i] + rng.choice([b"\xff", b"\xc3", b"\x00", b"\xed\xa0\x80"]) + data[i:]
    if op == "bom":
        return b"\xef\xbb\xbf" + data
    if op == "huge":
        return data[:-1] + b', "pad": "' + b"y" * 200_000 + b'"}' if data.endswith(b"}") else data
    return data


def write_fuzz(path, valid_rows: list[dict], seed: int, n: int = N_ROWS) -> tuple[int, int]:
    """Write ``n`` rows, a quarter of them valid; return (rows written, valid rows written)."""
    rng = random.Random(seed)
    lines, n_valid = [], 0
    for i in range(n):
        base = rng.choice(valid_rows)
        if i % 4 == 0:
            lines.append(json.dumps(base).encode())
            n_valid += 1
        else:
            lines.append(raw_damage(dumps(mutate(base, rng)), rng))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return n, n_valid


def only_own_errors(fn):
    """Run ``fn``; an MlxpostError is an answer, anything else fails the test (with the exception shown)."""
    try:
        return fn()
    except MlxpostError as e:
        return e


@pytest.fixture(scope="module")
def renderer(tiny_model):
    return Renderer(load_tokenizer(tiny_model))


SFT_ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                  {"role": "assistant", "content": "4."}]},
    {"messages": [{"role": "user", "content": "Weather?"},
                  {"role": "assistant", "content": "", "tool_calls": [{"name": "w", "arguments": {"c": "x"}}]},
                  {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}],
     "tools": [{"name": "w"}]},
    {"prompt": "Translate: cat", "completion": "chat"},
    {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}]},
    {"text": "Plain text to train on."},
]

PAIR_ROWS = [
    {"prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "5."},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
     "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": [{"role": "assistant", "content": "Go."}]},
    {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
     "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]},
    {"system": "Be kind.", "prompt": "Hi", "chosen": "Hello", "rejected": "No"},
]

PROMPT_ROWS = [
    {"prompt": "What is 3 + 4?", "answer": "7"},
    {"prompt": [{"role": "system", "content": "Think."}, {"role": "user", "content": "5 * 6?"}], "answer": 30},
]


@pytest.mark.parametrize("kind", ["sft", "pairs"])
def test_training_readers_raise_only_their_own_errors(tmp_path, renderer, kind):
    rows, read = (SFT_ROWS, tokenize_file) if kind == "sft" else (PAIR_ROWS, tokenize_pairs_file)
    path = tmp_path / "train.jsonl"
    n, n_valid = write_fuzz(path, rows, seed=1 if kind == "sft" else 2)
    strict = only_own_errors(lambda: read(path, renderer, max_seq_len=256))
    assert isinstance(strict, DataError)
    lines = {i.line for i in strict.issues}
    assert len(lines) >= n - n_valid - n // 10  # (some damage leaves a row valid: dropping an optional key)
    assert all(i.path == str(path) and 1 <= i.line <= n for i in strict.issues)
    examples, stats = read(path, renderer, max_seq_len=256, skip_bad_rows=True)
    assert len(examples) >= n_valid and stats.bad_rows == len(lines)


def test_prompt_reader_raises_only_its_own_errors(tmp_path, renderer):
    path = tmp_path / "prompts.jsonl"
    n, n_valid = write_fuzz(path, PROMPT_ROWS, seed=3)
    strict = only_own_errors(lambda: load_prompts(path, renderer, max_prompt_len=512))
    assert isinstance(strict, DataError) and all(1 <= i.line <= n for i in strict.issues)
    prompts, stats = load_prompts(path, renderer, max_prompt_len=512, skip_bad_rows=True)
    assert len(prompts) >= n_valid


LAYOUT_ROWS = {
    "alpaca": [{"instruction": "Add.", "input": "2 and 3", "output": "5"}, {"instruction": "Hi", "output": "Hey"}],
    "sharegpt": [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
                 {"conversations": [{"from": "system", "value": "Be kind"}, {"from": "human", "value": "Hi"},
                                    {"from": "gpt", "value": "Hey"}]}],
    "openai": [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
               {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                             {"role": "assistant", "content": "Yo"}]}],
    "hh-rlhf": [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go"}],
    "ultrafeedback": [
        {"instruction": "Hi", "completions": [{"response": "Hello", "overall_score": 9},
                                              {"response": "Go", "overall_score": 2}]},
        {"prompt": "Hi", "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
         "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go"}]}],
}


@pytest.mark.parametrize("layout", sorted(LAYOUT_ROWS))
def test_data_convert_raises_only_its_own_errors(tmp_path, layout):
    rows = LAYOUT_ROWS[layout]
    src = tmp_path / f"{layout}.jsonl"
    n, n_valid = write_fuzz(src, rows, seed=len(layout))
    strict = only_own_errors(lambda: convert(src, tmp_path / "out", layout=layout))
    assert isinstance(strict, MlxpostError) and str(src) in str(strict)
    # With skip_bad_rows, rows of another layout still stop a conversion (by design); what is written reads back.
    done = only_own_errors(lambda: convert(src, tmp_path / "out2", layout=layout, skip_bad_rows=True))
    if not isinstance(done, MlxpostError):
        assert done.rows_out >= 1
        for line in (tmp_path / "out2" / "train.jsonl").read_text().splitlines():
            json.loads(line)
    # Rows of the right layout whose strings are odd (lone surrogates, template syntax, ...): the conversion
    # goes through to writing its output.
    rng = random.Random(7)
    odd = []
    for i in range(100):
        row = json.loads(json.dumps(rng.choice(rows)))
        if i % 3:
            damage_text(row, rng)
        odd.append(json.dumps(row))
    src.write_text("\n".join(odd) + "\n")
    done = only_own_errors(lambda: convert(src, tmp_path / "out3", layout=layout, skip_bad_rows=True))
    assert not isinstance(done, MlxpostError) or "no rows left" in str(done), done
    if not isinstance(done, MlxpostError):
        for line in (tmp_path / "out3" / "train.jsonl").read_text(encoding="utf-8").splitlines():
            json.loads(line)


def test_json_array_files_with_deep_rows_are_row_errors(tmp_path):
    """A .json file (one array) goes through convert's reader: a deep row is that row's error; a file nested
    deeper than the parser goes is one error naming the file."""
    from mlxpost.data.convert import read_rows

    nested = "x"
    for _ in range(300):
        nested = [nested]
    f = tmp_path / "rows.json"
    f.write_text(json.dumps([LAYOUT_ROWS["alpaca"][0], {"instruction": nested, "output": "y"}]))
    got = list(read_rows(f))
    assert got[0][2] is None and got[1][1] is None and "nested deeper than 100 levels" in got[1][2].message
    f.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(MlxpostError, match="nested deeper"):
        list(read_rows(f))


def test_jsonl_reader_limits_and_bom(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\n' + b'{"text": "' + b"z" * 5000 + b'"}\n{"text": "b"}\n')
    got = list(read_jsonl(f, max_line_bytes=1000))
    assert [(i, r) for i, r, _ in got if r] == [(1, {"text": "a"}), (3, {"text": "b"})]  # BOM skipped
    assert got[1][2].line == 2 and "longer than 1,000 bytes" in got[1][2].message
    f.write_bytes("\ufeff".encode("utf-16"))
    with pytest.raises(MlxpostError, match="UTF-16"):
        list(read_jsonl(f))
    f.write_bytes(b"\xef\xbb\xbf[{\"text\": \"a\"}]")
    with pytest.raises(MlxpostError, match="one JSON array"):
        list(read_jsonl(f))
