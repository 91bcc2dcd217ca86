"""Row validation (file:line:field errors) and rendering with assistant-only loss masks."""

from __future__ import annotations

import json

import pytest
from conftest import chat, write_jsonl
from mlx_lm.utils import load_tokenizer

from mlxpost.data.load import split_examples, tokenize_file
from mlxpost.data.render import Renderer
from mlxpost.data.rows import validate_sft_row
from mlxpost.errors import DataError, MlxpostError


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(tiny_model)


@pytest.fixture(scope="module")
def tok_gen(tiny_model_generation):
    return load_tokenizer(tiny_model_generation)


@pytest.fixture(scope="module")
def tok_bos(tiny_model_bos):
    return load_tokenizer(tiny_model_bos)


def decoded_targets(tok, ids, mask) -> str:
    return "".join(tok._tokenizer.decode([i]) for i, m in zip(ids, mask) if m)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------

BAD_ROWS = [
    ('{"messages": [{"role": "user", "content": "hi"}', "", "not valid JSON"),
    ('[1, 2]', "", "expected a JSON object"),
    ({"msgs": []}, "", "unknown row format"),
    ({"messages": "hello"}, "messages", "expected a list"),
    ({"messages": []}, "messages", "is empty"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}, "messages[1].role",
     "expected one of"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
     "messages[1].content", "empty assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}]},
     "messages[1].content", "expected a string"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages[0].role", "must start with a user turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "messages[1].role", "two user turns"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "system", "content": "c"}]}, "messages[2].role", "may only come first"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}]}, "messages[2].role", "must end with an assistant turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}, "messages[1].role",
     "must follow an assistant turn with tool_calls"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}, "messages[0].content", "missing"),
    ({"prompt": "a"}, "completion", "missing"),
    ({"prompt": "a", "completion": ""}, "completion", "empty completion"),
    ({"prompt": "a", "completion": ["x"]}, "completion", "both be strings or both be message lists"),
    ({"text": 5}, "text", "expected a string"),
    ({"text": ""}, "text", "is empty"),
]


@pytest.mark.parametrize("row,field,message", BAD_ROWS)
def test_bad_row_is_reported_with_file_line_and_field(tmp_path, tok, row, field, message):
    good = chat("What is 2 plus 2?", "4.")
    path = write_jsonl(tmp_path / "train.jsonl", [good, good, row, good])
    with pytest.raises(DataError) as e:
        tokenize_file(path, Renderer(tok), max_seq_len=256)
    text = str(e.value)
    prefix = f"{path}:3: " + (f"{field}: " if field else "")
    assert prefix in text, text
    assert message in text
    assert "1 of 4 rows are invalid" in text
    assert "--skip-bad-rows" in text


def test_all_bad_rows_listed_and_skip_counts_them(tmp_path, tok):
    rows = [chat("q1", "a1"), {"text": ""}, chat("q2", "a2"), "not json", {"prompt": "p"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as e:
        tokenize_file(path, Renderer(tok), max_seq_len=256)
    assert [i.line for i in e.value.issues] == [2, 4, 5]
    examples, stats = tokenize_file(path, Renderer(tok), max_seq_len=256, skip_bad_rows=True)
    assert len(examples) == 2 and stats.bad_rows == 3 and stats.rows == 5


def test_valid_rows_pass_validation():
    assert validate_sft_row(chat("a", "b", system="s")) == []
    assert validate_sft_row({"prompt": "a", "completion": "b"}) == []
    assert validate_sft_row({"text": "hello"}) == []
    tool_row = {"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "w"}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."}], "tools": []}
    assert validate_sft_row(tool_row) == []


# ---------------------------------------------------------------------------
# Masks, token by token
# ---------------------------------------------------------------------------


def test_every_assistant_turn_is_trained_and_nothing_else(tok):
    msgs = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hello world"},
            {"role": "assistant", "content": "the cat"}, {"role": "user", "content": "more"},
            {"role": "assistant", "content": "dog sun"}]
    ids, mask, fmt = Renderer(tok).render({"messages": msgs})
    assert fmt == "messages"
    text = tok._tokenizer.decode(ids)
    assert text.count("<|im_start|>") == 5
    # Exactly the two replies and their end-of-turn tokens are targets.
    assert decoded_targets(tok, ids, mask) == "the cat<|im_end|>dog sun<|im_end|>"
    # Token by token: a target is inside an assistant reply, everything else is not.
    pieces = [(tok._tokenizer.decode([i]), m) for i, m in zip(ids, mask)]
    im_end = [k for k, (p, _) in enumerate(pieces) if p == "<|im_end|>"]
    assert [pieces[k][1] for k in im_end] == [False, False, True, False, True]  # system, user, asst, user, asst
    assert not any(m for p, m in pieces if p in ("<|im_start|>", "\n"))


def test_generation_markers_and_prefix_fallback_agree(tok, tok_gen):
    """The two ways of finding assistant tokens give identical masks on the same conversation."""
    rows = [
        chat("hello world", "the cat"),
        chat("x", "  spaced reply  ", system="sys"),
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}, {"role": "assistant", "content": "d e f"}]},
    ]
    plain, marked = Renderer(tok), Renderer(tok_gen)
    assert not plain.generation_markers and marked.generation_markers
    for row in rows:
        ids_a, mask_a, _ = plain.render(row)
        ids_b, mask_b, _ = marked.render(row)
        assert ids_a == ids_b
        assert mask_a == mask_b


def test_bos_is_never_duplicated(tok_bos):
    """The Llama-3 template writes BOS and the tokenizer would add another one."""
    r = Renderer(tok_bos)
    bos = tok_bos._tokenizer.bos_token_id
    assert r.wants_bos
    naive = tok_bos._tokenizer(tok_bos.apply_chat_template(chat("hi", "yo")["messages"], tokenize=False))["input_ids"]
    assert naive[:2] == [bos, bos]  # what a careless pipeline gets
    for row in (chat("hi", "yo"), {"prompt": "p", "completion": "c"}, {"text": "plain text"}):
        ids, mask, _ = r.render(row)
        assert ids[0] == bos and ids[1] != bos, row
        assert not mask[0]
    ids, mask, _ = Renderer(tok_bos, chat_template="none").render({"prompt": "p", "completion": "c"})
    assert ids.count(bos) == 1


def test_prompt_completion_and_text_rows(tok):
    r = Renderer(tok)
    ids, mask, fmt = r.render({"prompt": "What is one?", "completion": "One."})
    assert fmt == "prompt_completion"
    assert decoded_targets(tok, ids, mask) == "One.<|im_end|>"  # via the chat template
    raw = Renderer(tok, chat_template="none")
    ids, mask, _ = raw.render({"prompt": "What is one?", "completion": " One."})
    assert decoded_targets(tok, ids, mask) == " One.<|im_end|>"  # plain text, EOS appended
    assert tok._tokenizer.decode(ids) == "What is one? One.<|im_end|>"
    ids, mask, fmt = r.render({"text": "the cat"})
    assert fmt == "text" and all(mask) and ids[-1] == tok._tokenizer.eos_token_id
    conv = {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a1"},
                       {"role": "user", "content": "q2"}],
            "completion": [{"role": "assistant", "content": "a2"}]}
    ids, mask, _ = r.render(conv)
    assert decoded_targets(tok, ids, mask) == "a2<|im_end|>"  # earlier turns are prompt


def test_tools_are_passed_to_the_template(tmp_path, tok):
    """A template that renders the tools list sees the row's tools."""
    hf = tok._tokenizer
    saved = hf.chat_template
    hf.chat_template = ("{% if tools %}TOOLS:{{ tools | length }}\n{% endif %}" + saved)
    try:
        row = chat("hi", "yo")
        row["tools"] = [{"type": "function", "function": {"name": "f"}}]
        ids, mask, _ = Renderer(tok).render(row)
        assert hf.decode(ids).startswith("TOOLS:1")
        assert decoded_targets(tok, ids, mask) == "yo<|im_end|>"
    finally:
        hf.chat_template = saved


def test_overflow_truncate_and_drop(tmp_path, tok):
    long = chat("q " * 5, "the cat " * 60)
    path = write_jsonl(tmp_path / "d.jsonl", [long, chat("a", "b")])
    ex, stats = tokenize_file(path, Renderer(tok), max_seq_len=40, overflow="truncate")
    assert len(ex) == 2 and stats.truncated == 1 and max(len(e) for e in ex) == 40
    ex, stats = tokenize_file(path, Renderer(tok), max_seq_len=40, overflow="drop")
    assert len(ex) == 1 and stats.dropped_too_long == 1
    # Truncation that leaves no trained token drops the example (and counts it).
    prompt_heavy = chat("word " * 80, "yes")
    path = write_jsonl(tmp_path / "p.jsonl", [prompt_heavy, chat("a", "b")])
    ex, stats = tokenize_file(path, Renderer(tok), max_seq_len=30, overflow="truncate")
    assert len(ex) == 1 and stats.dropped_no_targets == 1
    with pytest.raises(MlxpostError, match="overflow"):
        tokenize_file(path, Renderer(tok), max_seq_len=30, overflow="cut")


def test_messages_rows_need_a_chat_template(tmp_path, models_dir):
    from mlxpost.model.tiny import build_tiny_model

    d = build_tiny_model(models_dir / "no-template", template=None)
    tok = load_tokenizer(d)
    path = write_jsonl(tmp_path / "d.jsonl", [chat("a", "b")])
    with pytest.raises(DataError, match="need a tokenizer with a chat template"):
        tokenize_file(path, Renderer(tok), max_seq_len=64)
    ids, mask, _ = Renderer(tok).render({"prompt": "a", "completion": " b"})  # plain text still works
    assert any(mask)


def test_split_and_shard(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [chat(f"q{i}", f"a{i}") for i in range(40)])
    ex, _ = tokenize_file(path, Renderer(tok), max_seq_len=64)
    train, valid = split_examples(ex, 0.1, seed=3)
    assert len(valid) == 4 and len(train) == 36
    assert not {e.source for e in train} & {e.source for e in valid}
    assert split_examples(ex, 0.1, seed=3)[1][0].source == valid[0].source  # repeatable
    shards = [tokenize_file(path, Renderer(tok), max_seq_len=64, shard=(r, 3))[0] for r in range(3)]
    sources = [e.source for s in shards for e in s]
    assert sorted(sources) == sorted(e.source for e in ex) and len(set(sources)) == 40
    limited, _ = tokenize_file(path, Renderer(tok), max_seq_len=64, limit=5)
    assert [e.source for e in limited] == [f"{path}:{i}" for i in range(1, 6)]
    assert json.loads(path.read_text().splitlines()[0])["messages"][0]["content"] == "q0"
