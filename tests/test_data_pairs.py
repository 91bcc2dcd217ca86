"""Preference pairs: row forms, file:line:field errors, rendering with shared prompts, PairSource batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_jsonl
from mlx_lm.utils import load_tokenizer

from mlxpost.core.pairs import PairSource
from mlxpost.data.load import PairExample, tokenize_pairs_file
from mlxpost.data.render import Renderer, render_pair
from mlxpost.data.rows import normalize_pair_row, validate_pair_row
from mlxpost.errors import DataError, MlxpostError


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


def S(c):
    return {"role": "system", "content": c}


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


def first_target(mask) -> int:
    return list(mask).index(True)


def pair_row(i: int, extra: str = "") -> dict:
    return {"prompt": f"What is {i} plus one?", "chosen": f"It is {i + 1}.{extra}", "rejected": f"No idea {i}."}


# ---------------------------------------------------------------------------
# Row forms
# ---------------------------------------------------------------------------

PROMPT_MSGS = [U("What is two?")]

ACCEPTED = [
    pytest.param({"prompt": "What is two?", "chosen": "Two.", "rejected": "Three."},
                 {"prompt": "What is two?", "chosen": "Two.", "rejected": "Three."}, id="strings"),
    pytest.param({"prompt": [U("What is two?")], "chosen": [A("Two.")], "rejected": [A("Three.")]},
                 {"prompt": [U("What is two?")], "chosen": [A("Two.")], "rejected": [A("Three.")]}, id="messages"),
    pytest.param({"prompt": [S("Be brief."), U("What is two?")], "chosen": [A("Two.")], "rejected": [A("Three.")]},
                 {"prompt": [S("Be brief."), U("What is two?")], "chosen": [A("Two.")], "rejected": [A("Three.")]},
                 id="messages-with-system"),
    pytest.param({"prompt": "What is two?", "chosen": [A("Two.")], "rejected": [A("Three.")]},
                 {"prompt": [U("What is two?")], "chosen": [A("Two.")], "rejected": [A("Three.")]},
                 id="string-prompt-message-completions"),
    pytest.param({"prompt": [U("What is two?")], "chosen": "Two.", "rejected": "Three."},
                 {"prompt": [U("What is two?")], "chosen": [A("Two.")], "rejected": [A("Three.")]},
                 id="message-prompt-string-completions"),
    pytest.param({"prompt": "What is two?", "chosen": "Two.", "rejected": [A("Three.")]},
                 {"prompt": [U("What is two?")], "chosen": [A("Two.")], "rejected": [A("Three.")]},
                 id="mixed-completions"),
    pytest.param({"system": "Be brief.", "prompt": "What is two?", "chosen": "Two.", "rejected": "Three."},
                 {"prompt": [S("Be brief."), U("What is two?")], "chosen": [A("Two.")], "rejected": [A("Three.")]},
                 id="system-field-string-prompt"),
    pytest.param({"system": "Be brief.", "prompt": [U("What is two?")], "chosen": [A("Two.")],
                  "rejected": [A("Three.")]},
                 {"prompt": [S("Be brief."), U("What is two?")], "chosen": [A("Two.")], "rejected": [A("Three.")]},
                 id="system-field-message-prompt"),
    pytest.param({"chosen": [U("What is two?"), A("Two.")], "rejected": [U("What is two?"), A("Three.")]},
                 {"prompt": [U("What is two?")], "chosen": [A("Two.")], "rejected": [A("Three.")]},
                 id="implicit-prompt"),
    pytest.param({"chosen": [S("Be brief."), U("What is two?"), A("Two.")],
                  "rejected": [S("Be brief."), U("What is two?"), A("Three.")]},
                 {"prompt": [S("Be brief."), U("What is two?")], "chosen": [A("Two.")], "rejected": [A("Three.")]},
                 id="implicit-prompt-with-system"),
    pytest.param({"system": "Be brief.", "chosen": [U("What is two?"), A("Two.")],
                  "rejected": [U("What is two?"), A("Three.")]},
                 {"prompt": [S("Be brief."), U("What is two?")], "chosen": [A("Two.")], "rejected": [A("Three.")]},
                 id="implicit-prompt-system-field"),
    pytest.param({"chosen": [U("Hi"), A("Hello."), U("What is two?"), A("Two.")],
                  "rejected": [U("Hi"), A("Hello."), U("What is two?"), A("Three.")]},
                 {"prompt": [U("Hi"), A("Hello."), U("What is two?")], "chosen": [A("Two.")],
                  "rejected": [A("Three.")]}, id="implicit-prompt-multi-turn"),
    pytest.param({"prompt": "What is two?", "chosen": "Two.", "rejected": "Three.", "id": 7, "score_chosen": 9.5,
                  "source": {"name": "x"}, "messages_note": "ignored"},
                 {"prompt": "What is two?", "chosen": "Two.", "rejected": "Three."}, id="extra-columns"),
    pytest.param({"prompt": "What is two?", "chosen": "Two.", "rejected": "Three.", "tools": []},
                 {"prompt": "What is two?", "chosen": "Two.", "rejected": "Three.", "tools": []}, id="tools-kept"),
]


@pytest.mark.parametrize("row,expected", ACCEPTED)
def test_accepted_row_forms_normalize(row, expected):
    before = json.dumps(row, sort_keys=True)
    norm, problems = normalize_pair_row(row)
    assert problems == []
    assert norm == expected
    assert validate_pair_row(row) == []
    assert json.dumps(row, sort_keys=True) == before  # the row itself is not modified


def test_every_accepted_form_renders_prompt_and_completions(tmp_path, tok):
    """All forms in one file: each pair's targets are exactly its two replies, the prompt text precedes them."""
    rows = [p.values[0] for p in ACCEPTED]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    pairs, stats = tokenize_pairs_file(path, Renderer(tok), max_seq_len=256)
    assert len(pairs) == len(rows) and stats.rows == len(rows) and stats.bad_rows == 0
    assert [p.index for p in pairs] == list(range(len(rows)))
    assert [p.source for p in pairs] == [f"{path}:{i}" for i in range(1, len(rows) + 1)]
    hf = tok._tokenizer
    for p, (param, row) in zip(pairs, zip(ACCEPTED, rows)):
        norm = param.values[1]
        assert isinstance(p, PairExample) and len(p) == max(len(p.chosen), len(p.rejected))
        for side, ex in (("chosen", p.chosen), ("rejected", p.rejected)):
            want = norm[side]
            replies = [want] if isinstance(want, str) else [m["content"] for m in want if m["role"] == "assistant"]
            assert decoded_targets(tok, ex.tokens, ex.mask) == "".join(r + "<|im_end|>" for r in replies), param.id
            k = first_target(ex.mask)
            prompt_text = hf.decode(ex.tokens[:k].tolist())
            prompt = norm["prompt"]
            for m in ([U(prompt)] if isinstance(prompt, str) else prompt):
                assert f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>" in prompt_text, param.id
            assert prompt_text.endswith("<|im_start|>assistant\n")
    assert stats.formats == {"strings": 3, "conversation": len(rows) - 3}


def test_system_given_twice_is_an_error():
    row = {"system": "Be brief.", "prompt": [S("Other."), U("q")], "chosen": "a", "rejected": "b"}
    norm, problems = normalize_pair_row(row)
    given_twice = "given twice: as the 'system' field and as the prompt's first message"
    assert norm is None and problems == [("system", given_twice)]
    row = {"system": "Be brief.", "chosen": [S("Other."), U("q"), A("a")], "rejected": [S("Other."), U("q"), A("b")]}
    assert [f for f, _ in validate_pair_row(row)] == ["system"]


# ---------------------------------------------------------------------------
# Bad rows: file:line: field: problem
# ---------------------------------------------------------------------------

BAD_ROWS = [
    pytest.param({"prompt": "q", "rejected": "b"}, "chosen", "missing", id="no-chosen"),
    pytest.param({"prompt": "q", "chosen": "a"}, "rejected", "missing", id="no-rejected"),
    pytest.param({"prompt": "q", "chosen": 5, "rejected": "b"}, "chosen",
                 "expected a string or a list of messages, got int", id="chosen-int"),
    pytest.param({"prompt": "q", "chosen": "a", "rejected": {"content": "b"}}, "rejected",
                 "expected a string or a list of messages, got dict", id="rejected-dict"),
    pytest.param({"prompt": 3, "chosen": "a", "rejected": "b"}, "prompt",
                 "expected a string or a list of messages, got int", id="prompt-int"),
    pytest.param({"system": ["s"], "prompt": "q", "chosen": "a", "rejected": "b"}, "system",
                 "expected a string, got list", id="system-list"),
    pytest.param({"prompt": "q", "chosen": ["a"], "rejected": [A("b")]}, "chosen[0]", "expected an object",
                 id="chosen-list-of-strings"),
    pytest.param({"prompt": "q", "chosen": [A(3)], "rejected": [A("b")]}, "chosen[0].content", "expected a string",
                 id="chosen-content-int"),
    pytest.param({"prompt": "q", "chosen": "a", "rejected": "a"}, "rejected", "identical to chosen",
                 id="identical-strings"),
    pytest.param({"prompt": "q", "chosen": "a", "rejected": [A("a")]}, "rejected", "identical to chosen",
                 id="identical-across-forms"),
    pytest.param({"chosen": [U("q"), A("a")], "rejected": [U("q"), A("a")]}, "rejected", "identical to chosen",
                 id="identical-implicit"),
    pytest.param({"chosen": [U("q"), A("a")], "rejected": [U("other"), A("b")]}, "chosen",
                 "share no leading turns", id="implicit-nothing-shared"),
    pytest.param({"chosen": "a", "rejected": "b"}, "prompt", "missing (without a prompt", id="implicit-strings"),
    pytest.param({"messages": [U("q"), A("a")]}, "", "this looks like an SFT row", id="sft-messages"),
    pytest.param({"prompt": "q", "completion": "a"}, "", "this looks like an SFT row", id="sft-prompt-completion"),
    pytest.param({"text": "hello"}, "chosen", "missing", id="text-row"),
    pytest.param({"prompt": "q", "chosen": "", "rejected": "b"}, "chosen", "empty chosen", id="empty-chosen"),
    pytest.param({"prompt": "q", "chosen": "a", "rejected": "   "}, "rejected", "empty rejected",
                 id="blank-rejected"),
    pytest.param({"prompt": [U("q")], "chosen": [A("")], "rejected": [A("b")]}, "chosen[0].content",
                 "empty assistant turn", id="empty-assistant-turn"),
    pytest.param({"prompt": "q", "chosen": [], "rejected": [A("b")]}, "chosen", "is empty", id="empty-list"),
    pytest.param({"prompt": [U("q"), A("a")], "chosen": [A("b")], "rejected": [A("c")]}, "prompt",
                 "the prompt must not end with an assistant turn", id="prompt-ends-with-assistant"),
    pytest.param({"prompt": [A("q")], "chosen": [A("b")], "rejected": [A("c")]}, "prompt[0].role",
                 "must start with a user turn", id="prompt-starts-with-assistant"),
    pytest.param({"prompt": [], "chosen": [A("b")], "rejected": [A("c")]}, "prompt", "is empty", id="empty-prompt"),
    pytest.param({"prompt": "q", "chosen": [U("b")], "rejected": [A("c")]}, "chosen[0].role",
                 "the chosen answer must start with an assistant turn", id="chosen-starts-with-user"),
    pytest.param({"prompt": "q", "chosen": [A("b"), A("x")], "rejected": [A("c")]}, "chosen[1].role",
                 "two assistant turns in a row", id="chosen-two-assistant-turns"),
    pytest.param({"system": "s", "prompt": [S("t"), U("q")], "chosen": "a", "rejected": "b"}, "system",
                 "given twice", id="system-twice"),
    pytest.param({"prompt": "q", "chosen": "a", "rejected": "b", "tools": "none"}, "tools", "expected a list",
                 id="tools-not-list"),
    pytest.param('{"prompt": "q", "chosen": "a"', "", "not valid JSON", id="not-json"),
    pytest.param('["q", "a", "b"]', "", "expected a JSON object", id="json-array-row"),
]


@pytest.mark.parametrize("row,field,message", BAD_ROWS)
def test_bad_pair_row_is_reported_with_file_line_and_field(tmp_path, tok, row, field, message):
    good = pair_row(1)
    path = write_jsonl(tmp_path / "train.jsonl", [good, pair_row(2), row, pair_row(3)])
    with pytest.raises(DataError) as e:
        tokenize_pairs_file(path, Renderer(tok), max_seq_len=256)
    text = str(e.value)
    prefix = f"{path}:3: " + (f"{field}: " if field else "")
    assert prefix in text, text
    assert message in text, text
    assert "1 of 4 rows are invalid" in text
    assert "--skip-bad-rows" in text
    assert {i.line for i in e.value.issues} == {3}
    # Each problem is listed once even though both sides are checked against the same prompt.
    assert len(e.value.issues) == len({(i.field, i.message) for i in e.value.issues})


def test_identical_message_names_file_line_exactly(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", [pair_row(1), pair_row(2),
                                                 {"prompt": "q", "chosen": "same", "rejected": "same"}])
    with pytest.raises(DataError, match=r"train\.jsonl:3: rejected: identical to chosen"):
        tokenize_pairs_file(path, Renderer(tok), max_seq_len=256)


def test_all_bad_rows_listed_and_skip_counts_them(tmp_path, tok):
    rows = [pair_row(0), {"messages": [U("q"), A("a")]}, pair_row(1), "not json",
            {"prompt": "q", "chosen": "x", "rejected": "x"}, pair_row(2), {"prompt": "q", "chosen": ""}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as e:
        tokenize_pairs_file(path, Renderer(tok), max_seq_len=256)
    assert sorted({i.line for i in e.value.issues}) == [2, 4, 5, 7]
    assert "4 of 7 rows are invalid" in str(e.value)
    pairs, stats = tokenize_pairs_file(path, Renderer(tok), max_seq_len=256, skip_bad_rows=True)
    assert stats.rows == 7 and stats.bad_rows == 4 and stats.valid_rows == 3
    assert [p.source for p in pairs] == [f"{path}:{n}" for n in (1, 3, 6)]
    assert [p.index for p in pairs] == [0, 1, 2]
    assert stats.examples == 6 and len(stats.lengths) == 6


def test_pair_that_renders_to_identical_tokens_is_an_error(tmp_path, tiny_model):
    """Different text, same tokens: a template that trims the content makes 'yes ' and 'yes' one pair side."""
    tok = load_tokenizer(tiny_model)  # a private copy: its template is changed
    hf = tok._tokenizer
    hf.chat_template = hf.chat_template.replace("message['content']", "(message['content'] | trim)")
    path = write_jsonl(tmp_path / "train.jsonl", [pair_row(1), {"prompt": "q", "chosen": "yes ", "rejected": "yes"}])
    with pytest.raises(DataError, match=r"train\.jsonl:2: rejected: renders to the same tokens as chosen"):
        tokenize_pairs_file(path, Renderer(tok), max_seq_len=256)
    pairs, stats = tokenize_pairs_file(path, Renderer(tok), max_seq_len=256, skip_bad_rows=True)
    assert len(pairs) == 1 and stats.bad_rows == 1


# ---------------------------------------------------------------------------
# Rendering: one prompt, two completions
# ---------------------------------------------------------------------------

RENDER_ROWS = [
    {"prompt": "What is two?", "chosen": "Two.", "rejected": "Three, I think."},
    {"system": "be nice", "prompt": "hello world", "chosen": [A("the cat")], "rejected": [A("dog sun")]},
    {"chosen": [U("a"), A("b c"), U("d"), A("the red tree")], "rejected": [U("a"), A("b c"), U("d"), A("no")]},
    {"prompt": [U("What is 12 plus 7?")], "chosen": "The answer is 19.", "rejected": "The answer is 21."},
]


def check_pair_rendering(tok, renderer, row, end: str):
    hf = tok._tokenizer
    norm, _ = normalize_pair_row(row)
    (ci, cm), (ri, rm), _ = render_pair(renderer, row)
    assert len(ci) == len(cm) and len(ri) == len(rm)
    kc, kr = first_target(cm), first_target(rm)
    assert kc == kr > 0
    assert ci[:kc] == ri[:kr]  # the same prompt tokens on both sides
    assert not any(cm[:kc]) and not any(rm[:kr])
    # The prompt tokens are what the template writes for the prompt with the generation prompt.
    prompt = norm["prompt"] if isinstance(norm["prompt"], list) else [U(norm["prompt"])]
    prompt_text = hf.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert hf.decode(ci[:kc]) == prompt_text
    for ids, mask, side in ((ci, cm, norm["chosen"]), (ri, rm, norm["rejected"])):
        reply = side if isinstance(side, str) else side[-1]["content"]
        assert decoded_targets(tok, ids, mask) == reply + end
        # Targets are one contiguous run: the completion and its end-of-turn token.
        last = len(mask) - 1 - list(reversed(mask)).index(True)
        assert all(mask[first_target(mask):last + 1])
    return (ci, cm), (ri, rm)


@pytest.mark.parametrize("row", RENDER_ROWS)
def test_chosen_and_rejected_share_the_prompt_and_train_only_the_completion(tok, tok_gen, row):
    a = check_pair_rendering(tok, Renderer(tok), row, "<|im_end|>")
    b = check_pair_rendering(tok_gen, Renderer(tok_gen), row, "<|im_end|>")
    assert a == b  # {% generation %} markers and the prefix fallback agree


@pytest.mark.parametrize("row", RENDER_ROWS)
def test_bos_tokenizer_gives_exactly_one_bos_on_each_side(tok_bos, row):
    r = Renderer(tok_bos)
    bos = tok_bos._tokenizer.bos_token_id
    assert r.wants_bos
    (ci, cm), (ri, rm) = check_pair_rendering(tok_bos, r, row, "<|eot_id|>")
    for ids, mask in ((ci, cm), (ri, rm)):
        assert ids[0] == bos and ids.count(bos) == 1 and not mask[0]


def test_earlier_assistant_turn_in_the_shared_prompt_is_not_trained(tok):
    row = RENDER_ROWS[2]
    (ci, cm), (ri, rm), fmt = render_pair(Renderer(tok), row)
    assert fmt == "conversation"
    assert "b c" in tok._tokenizer.decode(ci[:first_target(cm)])
    assert decoded_targets(tok, ci, cm) == "the red tree<|im_end|>"
    assert decoded_targets(tok, ri, rm) == "no<|im_end|>"


def test_plain_text_mode_masks_completion_and_eos(tok, tok_bos):
    hf = tok._tokenizer
    raw = Renderer(tok, chat_template="none")
    row = {"prompt": "What is one?", "chosen": " One.", "rejected": " Two, maybe."}
    (ci, cm), (ri, rm), fmt = render_pair(raw, row)
    assert fmt == "strings"
    prompt_ids = hf("What is one?", add_special_tokens=False)["input_ids"]
    assert ci[:len(prompt_ids)] == ri[:len(prompt_ids)] == prompt_ids
    assert first_target(cm) == first_target(rm) == len(prompt_ids)
    assert decoded_targets(tok, ci, cm) == " One.<|im_end|>" and ci[-1] == hf.eos_token_id
    assert decoded_targets(tok, ri, rm) == " Two, maybe.<|im_end|>" and ri[-1] == hf.eos_token_id
    assert hf.decode(ci) == "What is one? One.<|im_end|>"
    assert all(cm[len(prompt_ids):]) and all(rm[len(prompt_ids):])
    # With a BOS tokenizer: one BOS in front, not trained, and the rest as above.
    rawb = Renderer(tok_bos, chat_template="none")
    bos = tok_bos._tokenizer.bos_token_id
    (ci, cm), (ri, rm), _ = render_pair(rawb, row)
    for ids, mask in ((ci, cm), (ri, rm)):
        assert ids[0] == bos and ids.count(bos) == 1 and not mask[0]
    assert decoded_targets(tok_bos, ci, cm) == " One." + tok_bos._tokenizer.eos_token


# ---------------------------------------------------------------------------
# Truncation, dropping, sharding
# ---------------------------------------------------------------------------


def test_truncation_is_per_side_and_counted_once_per_pair(tmp_path, tok):
    rows = [{"prompt": "q", "chosen": "the cat " * 40, "rejected": "no"},  # chosen too long
            {"prompt": "q", "chosen": "the dog " * 40, "rejected": "a red sun " * 40},  # both too long
            {"prompt": "q", "chosen": "yes", "rejected": "no"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    full, _ = tokenize_pairs_file(path, Renderer(tok), max_seq_len=4096)
    pairs, stats = tokenize_pairs_file(path, Renderer(tok), max_seq_len=40)
    assert len(pairs) == 3 and stats.truncated == 2 and stats.dropped_too_long == 0
    assert len(pairs[0].chosen) == 40 and len(pairs[1].chosen) == 40 and len(pairs[1].rejected) == 40
    # An untouched side is exactly as before; a truncated side is the start of the full one.
    for p, f in zip(pairs, full):
        for ex, fx in ((p.chosen, f.chosen), (p.rejected, f.rejected)):
            n = len(ex)
            assert n == min(40, len(fx))
            assert (ex.tokens == fx.tokens[:n]).all() and (ex.mask == fx.mask[:n]).all()
    assert sorted(stats.lengths) == sorted(len(e) for p in pairs for e in (p.chosen, p.rejected))
    assert stats.targets == sum(e.n_targets for p in pairs for e in (p.chosen, p.rejected))

    pairs, stats = tokenize_pairs_file(path, Renderer(tok), max_seq_len=40, overflow="drop")
    assert len(pairs) == 1 and stats.dropped_too_long == 2 and stats.truncated == 0
    assert pairs[0].source == f"{path}:3"
    with pytest.raises(MlxpostError, match="overflow"):
        tokenize_pairs_file(path, Renderer(tok), max_seq_len=40, overflow="cut")


def test_prompt_that_fills_max_seq_len_drops_the_pair(tmp_path, tok):
    rows = [{"prompt": "word " * 80, "chosen": "yes", "rejected": "no"}, pair_row(1)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    pairs, stats = tokenize_pairs_file(path, Renderer(tok), max_seq_len=30)
    assert len(pairs) == 1 and stats.dropped_no_targets == 1
    assert pairs[0].source == f"{path}:2" and pairs[0].index == 1
    # Only one side left without targets is enough to drop the pair.
    prompt = "hello " * 10
    (_, cm), _, _ = render_pair(Renderer(tok), {"prompt": prompt, "chosen": "yes", "rejected": "no"})
    k = first_target(cm)
    rows = [{"prompt": prompt, "chosen": "yes", "rejected": "no"}]
    path = write_jsonl(tmp_path / "e.jsonl", rows)
    pairs, stats = tokenize_pairs_file(path, Renderer(tok), max_seq_len=k + 1)
    assert len(pairs) == 1 and pairs[0].chosen.n_targets == 1 and pairs[0].rejected.n_targets == 1
    pairs, stats = tokenize_pairs_file(path, Renderer(tok), max_seq_len=k)
    assert pairs == [] and stats.dropped_no_targets == 1


def test_pair_identical_after_truncation_is_dropped_and_counted(tmp_path, tok):
    shared = "the cat " * 30
    rows = [{"prompt": "q", "chosen": shared + "yes", "rejected": shared + "no"}, pair_row(1)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    pairs, stats = tokenize_pairs_file(path, Renderer(tok), max_seq_len=40)
    # Both sides are cut inside the shared text: the pair would carry no preference (margin 0 for any model).
    assert all(not np.array_equal(p.chosen.tokens, p.rejected.tokens) for p in pairs)
    assert len(pairs) == 1 and stats.dropped_identical == 1


def test_implicit_prompt_must_share_everything_before_the_answers(tmp_path):
    u = {"role": "user", "content": "Hi"}
    a1 = {"role": "assistant", "content": "Hello."}
    u2c, u2r = {"role": "user", "content": "And?"}, {"role": "user", "content": "So?"}
    a2 = {"role": "assistant", "content": "Fine."}
    _, problems = normalize_pair_row({"chosen": [u, a1, u2c, a2], "rejected": [u, a1, u2r, a2]})
    assert problems and problems[0][0] == "chosen[2]" and "not the assistant's" in problems[0][1]
    _, problems = normalize_pair_row({"chosen": [u, a1, u2c, a2], "rejected": [u, a1]})
    assert problems == [("rejected", "has no turns after the 2 it shares with the other side")]


def test_shards_are_disjoint_and_cover_all_pairs(tmp_path, tok):
    rows = [pair_row(i, extra=" Sure." * (i % 3)) for i in range(22)]
    rows.insert(5, {"prompt": "q", "chosen": "x", "rejected": "x"})  # a bad row, skipped on every rank
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    full, _ = tokenize_pairs_file(path, Renderer(tok), max_seq_len=128, skip_bad_rows=True)
    assert len(full) == 22 and [p.index for p in full] == list(range(22))
    by_source = {p.source: p for p in full}
    seen = []
    for rank in range(3):
        shard, stats = tokenize_pairs_file(path, Renderer(tok), max_seq_len=128, skip_bad_rows=True,
                                           shard=(rank, 3))
        assert stats.valid_rows == 22 and stats.bad_rows == 1  # every rank validates every row
        assert [p.index for p in shard] == list(range(rank, 22, 3))
        for p in shard:
            f = by_source[p.source]
            assert p.index == f.index
            assert (p.chosen.tokens == f.chosen.tokens).all() and (p.rejected.mask == f.rejected.mask).all()
        seen += [p.source for p in shard]
    assert len(seen) == len(set(seen)) == 22 and set(seen) == set(by_source)
    limited, _ = tokenize_pairs_file(path, Renderer(tok), max_seq_len=128, skip_bad_rows=True, limit=6)
    assert [p.index for p in limited] == list(range(6))


# ---------------------------------------------------------------------------
# PairSource
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs(tok, tmp_path_factory):
    rows = [pair_row(i, extra=" Indeed it is." * (i % 4)) for i in range(10)]
    path = write_jsonl(tmp_path_factory.mktemp("pairs") / "train.jsonl", rows)
    out, _ = tokenize_pairs_file(path, Renderer(tok), max_seq_len=128)
    assert len(out) == 10
    return out


PAD = 0


def make_source(pairs, **kw):
    kw = {"batch_size": 4, "max_len": 128, "pad_id": PAD, "seed": 3, "pad_multiple": 8, **kw}
    return PairSource(pairs, **kw)


def fake_ref(pairs):
    """Distinct values per pair, side and position: pair i, side s, k-th trained position -> 1000 i + 100 s + k + 1."""
    return [tuple(np.arange(1, ex.n_targets + 1, dtype=np.float32) + 1000 * i + 100 * s
                  for s, ex in enumerate((p.chosen, p.rejected))) for i, p in enumerate(pairs)]


def check_batch(batch, pairs, P: int, ref=None):
    """Layout: rows k / P + k are pair k's chosen / rejected sides; empty padding pairs after the real ones."""
    index = {p.source: i for i, p in enumerate(pairs)}
    n = batch.n_examples
    inputs, targets, weights = (np.array(x) for x in (batch.inputs, batch.targets, batch.weights))
    B, L = inputs.shape
    assert B == 2 * P and L % 8 == 0
    assert len(batch.sources) == 2 * n and batch.sources[:n] == batch.sources[n:]
    got = [index[s] for s in batch.sources[:n]]
    assert L == -(-max(len(pairs[i]) - 1 for i in got) // 8) * 8
    refs = np.array(batch.extra["ref_logps"]) if ref is not None else None
    if ref is None:
        assert not batch.extra
    for k, i in enumerate(got):
        for row, side, ex in ((k, 0, pairs[i].chosen), (P + k, 1, pairs[i].rejected)):
            m = len(ex) - 1
            assert (inputs[row, :m] == ex.tokens[:-1]).all() and (inputs[row, m:] == PAD).all()
            assert (targets[row, :m] == ex.tokens[1:]).all()
            assert (weights[row, :m] == ex.mask[1:]).all() and (weights[row, m:] == 0).all()
            assert weights[row].sum() == ex.n_targets
            if refs is not None:
                trained = weights[row] > 0
                assert (refs[row, trained] == ref[i][side]).all()
                assert (refs[row, ~trained] == 0).all()
    for row in list(range(n, P)) + list(range(P + n, 2 * P)):  # padding pairs
        assert (weights[row] == 0).all() and (inputs[row] == PAD).all()
        if refs is not None:
            assert (refs[row] == 0).all()
    assert batch.n_targets == int(weights.sum())
    assert batch.n_targets == sum(pairs[i].chosen.n_targets + pairs[i].rejected.n_targets for i in got)
    assert batch.n_tokens == sum(len(pairs[i].chosen) - 1 + len(pairs[i].rejected) - 1 for i in got)
    return got


def test_batch_layout_and_short_last_batch(pairs):
    src = make_source(pairs, shuffle=False)
    assert src.batches_per_epoch() == 3
    batches = list(src)  # one pass without shuffling
    assert [b.n_examples for b in batches] == [4, 4, 2]
    seen = [i for b in batches for i in check_batch(b, pairs, 4)]
    assert sorted(seen) == list(range(10))
    # Unshuffled order: shortest pairs first.
    assert [len(pairs[i]) for i in seen] == sorted(len(p) for p in pairs)
    last = np.array(batches[-1].weights)
    assert (last[2:4] == 0).all() and (last[6:8] == 0).all() and (last[[0, 1, 4, 5]].sum(axis=1) > 0).all()


def test_every_pair_once_per_epoch_when_shuffled(pairs):
    src = make_source(pairs, shuffle=True)
    it = iter(src)
    orders = []
    for epoch in range(3):
        order = [i for _ in range(3) for i in check_batch(next(it), pairs, 4)]
        assert sorted(order) == list(range(10)), epoch
        orders.append(order)
    assert src.epoch == 2
    assert len({tuple(o) for o in orders}) > 1  # a new order each epoch
    again = make_source(pairs, shuffle=True)  # the plan is a function of (seed, epoch)
    assert [i for _, b in zip(range(3), again) for i in check_batch(b, pairs, 4)] == orders[0]


@pytest.mark.parametrize("consumed", [1, 3, 4])
def test_resume_reproduces_the_next_batches(pairs, consumed):
    ref = fake_ref(pairs)
    a = make_source(pairs, ref=ref)
    it = iter(a)
    for _ in range(consumed):
        next(it)
    state = a.state()
    expected = [next(it) for _ in range(4)]  # across an epoch boundary
    b = make_source(pairs, ref=ref)
    b.load_state(json.loads(json.dumps(state)))
    got = [x for _, x in zip(range(4), b)]
    for x, y in zip(expected, got):
        assert x.sources == y.sources and x.n_examples == y.n_examples
        for key in ("inputs", "targets", "weights"):
            assert np.array_equal(np.array(getattr(x, key)), np.array(getattr(y, key)))
        assert np.array_equal(np.array(x.extra["ref_logps"]), np.array(y.extra["ref_logps"]))
        check_batch(y, pairs, 4, ref)


def test_reference_values_land_on_trained_positions(pairs):
    ref = fake_ref(pairs)
    src = make_source(pairs, ref=ref, shuffle=False)
    seen = [i for b in src for i in check_batch(b, pairs, 4, ref)]
    assert sorted(seen) == list(range(10))
    # set_reference on a source built without one.
    src = make_source(pairs, shuffle=False)
    assert next(iter(src)).extra is None
    src.set_reference(ref)
    src.load_state({"epoch": 0, "index": 0})
    check_batch(next(iter(src)), pairs, 4, ref)
    src.set_reference(None)
    assert not next(iter(src)).extra
    # One batch of chosen pairs, by position.
    b = src.build_pairs([9, 0])
    assert b.n_examples == 2 and np.array(b.inputs).shape[0] == 8


def test_reference_length_must_match_the_pairs(pairs):
    ref = fake_ref(pairs)
    with pytest.raises(MlxpostError, match="reference log-probs for 9 pairs, but there are 10 pairs"):
        make_source(pairs, ref=ref[:9])
    src = make_source(pairs)
    with pytest.raises(MlxpostError, match="reference log-probs for 11 pairs, but there are 10 pairs"):
        src.set_reference(ref + ref[:1])
    assert src.ref is None
    with pytest.raises(MlxpostError, match="batching=pad or pack"):
        make_source(pairs, mode="bogus")


def test_packed_pair_batches_hold_every_sequence_once_isolated(pairs):
    """Packing: each side of each pair is in exactly one row, contiguous, in its own segment, with its
    reference values on its trained positions; fewer positions than padding both sides to the longest."""
    ref = fake_ref(pairs)
    packed = make_source(pairs, mode="pack", ref=ref, shuffle=False)
    padded = make_source(pairs, ref=ref, shuffle=False)
    seen = []
    for b, b_pad in zip(packed, padded):
        P = 4
        inputs, targets, weights, segments = (np.array(x) for x in (b.inputs, b.targets, b.weights, b.segments))
        seq, refs = np.array(b.extra["seq"]), np.array(b.extra["ref_logps"])
        assert np.array(b.extra["seq_ids"]).tolist() == list(range(2 * P))
        assert inputs.size <= np.array(b_pad.inputs).size and inputs.shape[1] % 8 == 0
        assert b.sources == b_pad.sources and b.n_examples == b_pad.n_examples
        idx = {p.source: i for i, p in enumerate(pairs)}
        for k, src in enumerate(b.sources[:b.n_examples]):
            i = idx[src]
            seen.append(i)
            for key, ex, side in ((k, pairs[i].chosen, 0), (P + k, pairs[i].rejected, 1)):
                rows, cols = np.nonzero(seq == key)
                assert len(set(rows)) == 1, "a sequence is never split across rows"
                r = rows[0]
                assert cols.tolist() == list(range(cols[0], cols[0] + len(ex) - 1)), "contiguous"
                assert inputs[r, cols].tolist() == ex.tokens[:-1].tolist()
                assert targets[r, cols].tolist() == ex.tokens[1:].tolist()
                assert weights[r, cols].tolist() == ex.mask[1:].astype(np.float32).tolist()
                assert len(set(segments[r, cols].tolist())) == 1
                # No other sequence shares its segment id in that row.
                assert set(seq[r][segments[r] == segments[r, cols[0]]].tolist()) == {key}
                np.testing.assert_array_equal(refs[r, cols[0] + np.flatnonzero(ex.mask[1:])], ref[i][side])
        # Padding and the empty pairs of a short batch: no weight, no reference value, segment -1.
        assert np.all(weights[seq < 0] == 0) and np.all(refs[seq < 0] == 0) and np.all(segments[seq < 0] == -1)
        assert weights.sum() == np.array(b_pad.weights).sum()
    assert sorted(seen) == list(range(10))
    # The precomputation reads one sequence per row: build_pairs(packed=False) ignores the mode.
    b = packed.build_pairs([9, 0], packed=False)
    assert np.array(b.inputs).shape[0] == 8 and b.segments is None and "seq" not in b.extra


def test_shared_prompt_batches_hold_each_prompt_once(pairs):
    """Sharing: a pair is one segment, prompt then chosen reply then rejected reply, each token at its own
    sequence's position; entries list every trained (position, target) of each side once, in order, the
    prompt's last position once per side, with the reference values aligned."""
    from mlxpost.core.forward import segment_mask, tree_mask
    from mlxpost.core.pairs import shared_prefix

    ref = fake_ref(pairs)
    shared = make_source(pairs, mode="pack", ref=ref, shuffle=False, select_bucket=16, share_prompt=True)
    plain = make_source(pairs, mode="pack", ref=ref, shuffle=False, select_bucket=16)
    idx = {p.source: i for i, p in enumerate(pairs)}
    seen = []
    for plan in plain._plan_for_epoch():
        P = 4
        b, b0 = shared.build_pairs([r[0] for r in plan], shared=True), plain.build_pairs([r[0] for r in plan])
        assert b.entries and not b0.entries and b.sources == b0.sources
        inputs, segments, branches, positions = (np.array(x) for x in (b.inputs, b.segments, b.branches, b.positions))
        index, valid, targets = (np.array(x) for x in b.select)
        seq, refs = np.array(b.extra["seq"]), np.array(b.extra["ref_logps"])
        W = inputs.shape[1]
        assert len(index) % 16 == 0 and (valid[seq < 0] == 0).all() and (refs[seq < 0] == 0).all()
        assert b.n_targets == b0.n_targets == int(valid.sum())
        assert b.n_tokens == b0.n_tokens - sum(shared_prefix(pairs[idx[s]].chosen, pairs[idx[s]].rejected)
                                               for s in b.sources[:b.n_examples])
        for k, source in enumerate(b.sources[:b.n_examples]):
            i = idx[source]
            seen.append(i)
            c, r = pairs[i].chosen, pairs[i].rejected
            p = shared_prefix(c, r)
            assert p > 1 and (c.tokens[:p] == r.tokens[:p]).all() and not c.mask[1:p].any()
            for key, ex, side in ((k, c, 0), (P + k, r, 1)):
                at = index[seq == key]
                assert len(at) == ex.n_targets
                row = set((at // W).tolist())
                assert len(row) == 1
                row = row.pop()
                # Walking the sequence's own positions through the segment gives back its tokens.
                j = np.flatnonzero(ex.mask[1:])
                assert targets[seq == key].tolist() == ex.tokens[1:][j].tolist()
                assert positions[row, at % W].tolist() == j.tolist()
                assert inputs[row, at % W].tolist() == ex.tokens[:-1][j].tolist()
                assert set(branches[row, at % W].tolist()) <= {0, side + 1}
                np.testing.assert_array_equal(refs[seq == key], ref[i][side])
            # The last prompt position predicts the first token of both replies.
            last = index[seq == k][0]
            assert index[seq == P + k][0] == last and branches[last // W, last % W] == 0
            # The whole segment: prompt, chosen reply, rejected reply, each token at its sequence's position.
            row, start = last // W, last % W - (p - 1)
            n = len(c) + len(r) - 2 - p
            assert (segments[row, start:start + n] == segments[row, start]).all()
            assert np.sum(segments[row] == segments[row, start]) == n
            assert inputs[row, start:start + n].tolist() == (c.tokens[:-1].tolist() + r.tokens[p:-1].tolist())
            assert positions[row, start:start + n].tolist() == list(range(len(c) - 1)) + list(range(p, len(r) - 1))
            nc = len(c) - 1 - p
            assert branches[row, start:start + n].tolist() == [0] * p + [1] * nc + [2] * (n - p - nc)
        # Causal within a segment; a reply sees the prompt and itself, never the other reply.
        m = np.array(tree_mask(b.segments, b.branches))[:, 0]
        bq, bk = branches[:, :, None], branches[:, None, :]
        want = np.array(segment_mask(b.segments))[:, 0] & ((bk == 0) | (bk == bq))
        np.testing.assert_array_equal(m, want)
        assert m[segments >= 0].any(axis=-1).all()  # every real position sees at least itself
    assert sorted(seen) == list(range(10))
    with pytest.raises(MlxpostError, match="share their prompt only in packed batches"):
        make_source(pairs, share_prompt=True, select_bucket=16)


def test_shared_prompt_layout_only_where_it_costs_less():
    """A segment holds both replies: with long replies after a short prompt and costly attention, the
    ordinary packing of the same pairs is cheaper and is kept; with a long prompt, sharing wins."""
    from mlxpost.data.load import Example

    def pair(n_prompt, n_reply, seed):
        rng = np.random.default_rng(seed)
        prompt = rng.integers(10, 500, n_prompt)
        sides = [np.concatenate([prompt, rng.integers(10, 500, n_reply)]).astype(np.int32) for _ in range(2)]
        sides[1][n_prompt] = sides[0][n_prompt] + 1  # the replies differ from their first token
        return PairExample(*(Example(t, np.arange(len(t)) >= n_prompt, "x:1") for t in sides), source="x:1")

    for n_prompt, n_reply, span, want in ((4, 60, 20.0, False), (60, 8, 20.0, True), (4, 60, None, True)):
        src = PairSource([pair(n_prompt, n_reply, 0), pair(n_prompt, n_reply, 1)], mode="pack", batch_size=2,
                         max_len=128, pad_id=PAD, pad_multiple=8, select_bucket=16, share_prompt=True, span=span)
        assert src.build_pairs([0, 1]).entries == want, (n_prompt, n_reply, span)
        assert src.build_pairs([0, 1], shared=True).entries and not src.build_pairs([0, 1], shared=False).entries
        assert src.shared_batches() == (int(want), 1)


def test_pair_layout_chooses_the_fewest_positions():
    from mlxpost.core.pairs import pair_layout

    # Width 104 (the longest, 100, rounded to 8) needs 3 rows (312 positions);
    # width 120 takes 100 + 20 and 60 + 60 in 2 rows (240).
    width, rows = pair_layout([100, 60, 60, 20], 8, 1000)
    assert (width, sorted(sorted(r) for r in rows)) == (120, [[0, 3], [1, 2]])
    # 300 positions of sequences: 2 rows of 152, against 5 padded rows of 104.
    width, rows = pair_layout([50, 50, 50, 50, 100], 8, 1000)
    assert (width, len(rows)) == (152, 2)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    # Never wider than the cap: 30 + 10 share a row of 40 (2 x 40 < 3 x 32), unless the cap is 36.
    assert pair_layout([30, 30, 10], 8, 64)[0] == 40 and len(pair_layout([30, 30, 10], 8, 64)[1]) == 2
    width, rows = pair_layout([30, 30, 10], 8, 36)
    assert (width, len(rows)) == (32, 3)


def test_pair_layout_weighs_attention_against_positions():
    """A row of ``w`` positions costs ``w * (1 + w / span)``: wide rows pay for attention over the whole row."""
    from mlxpost.core.pairs import pair_layout

    # Positions alone: 2 rows of 152 (100 + 50, 50 + 50 + 50: 304 positions) beat 3 rows of 104 (312).
    assert pair_layout([50, 50, 50, 50, 100], 8, 1000) == (152, [[4, 0], [1, 2, 3]])
    # Attention as costly as the linear layers at 20 positions: 3 * 104 * (1 + 104/20) = 1934 beats
    # 2 * 152 * (1 + 152/20) = 2614.
    assert pair_layout([50, 50, 50, 50, 100], 8, 1000, span=20) == (104, [[4], [0, 1], [2, 3]])
    # 60 + 44 share one row of 104 (104 positions against 2 x 64 = 128) until attention weighs:
    # at span 40, 104 * (1 + 104/40) = 374 > 128 * (1 + 64/40) = 333.
    assert pair_layout([60, 44], 8, 1000)[0] == 104
    assert pair_layout([60, 44], 8, 1000, span=40) == (64, [[0], [1]])
    # Query chunks compute (n + 1) / (2n) of a row's scores: 2 rows of 576 (6 chunks of 96) then beat
    # 4 rows of 352 (3 chunks), which cost less when every score is counted.
    from mlxpost.core.pairs import layout_cost

    assert layout_cost(576, 2, 448.0) > layout_cost(352, 4, 448.0)
    assert layout_cost(576, 2, 448.0, 96) < layout_cost(352, 4, 448.0, 96)
    assert layout_cost(576, 2, 448.0, 96) == pytest.approx(2 * 576 * (1 + 576 / 448 * 7 / 12))
    assert layout_cost(100, 3, None, 96) == 300 and layout_cost(100, 3, 448.0, 96) == layout_cost(100, 3, 448.0)
    # When one width wins on both counts the span changes nothing.
    assert pair_layout([100, 60, 60, 20], 8, 1000, span=20) == pair_layout([100, 60, 60, 20], 8, 1000)


def test_attention_span_from_the_model_blocks(tiny_model):
    from mlxpost.core.forward import attention_span
    from mlxpost.model.load import load_model

    model = load_model(str(tiny_model)).model
    args = model.args
    d = args.hidden_size // args.num_attention_heads
    kv = args.num_key_value_heads * d
    weights = 2 * args.hidden_size * args.hidden_size + 2 * args.hidden_size * kv + 3 * args.hidden_size * \
        args.intermediate_size
    cpu = attention_span(model, cpu=True)
    assert cpu == pytest.approx(2 * weights / (4 * args.hidden_size + 1500 * args.num_attention_heads))
    assert attention_span(model, cpu=False) > 10 * cpu  # on a GPU the softmax is cheap
