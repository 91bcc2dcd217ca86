"""``mlxpost chat``: the conversation kept and rendered with the chat template, commands, a run's whole stack."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from mlxpost.cli.chat import chat
from mlxpost.core.generate import generate_text
from mlxpost.tools.chat import ChatSession, load_for_generation

MAX = 8
TEMP = 1.0  # the tiny models answer greedily with whitespace only; sampled (and seeded) they write tokens


def reply(session: ChatSession, text: str) -> str:
    "".join(session.reply(text))
    return session.messages[-1]["content"]


@pytest.fixture(scope="module")
def dpo_model(demo_runs):
    loaded, what = load_for_generation(adapter=demo_runs / "dpo")
    assert what.endswith(f"with the adapter of {demo_runs / 'dpo'} ← sft")  # the stack it loaded, named
    assert load_for_generation(adapter=demo_runs / "rlvr")[1].endswith("rlvr ← grpo ← dpo ← sft")
    return loaded


def test_each_reply_answers_the_whole_conversation_with_the_template(dpo_model):
    s = ChatSession(dpo_model, max_tokens=MAX, temperature=TEMP, seed=5)
    first = reply(s, "What is 2 plus 3?")
    assert first == generate_text(dpo_model.model, dpo_model.tokenizer, "What is 2 plus 3?", max_tokens=MAX,
                                  temperature=TEMP, seed=5) and first
    s.command("/system Be brief.")
    second = reply(s, "And 4 plus 4?")
    conversation = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "And 4 plus 4?"}]
    # The reply to the whole conversation (system message first, through the chat template), turn 1: seed 5 + 1.
    assert second == generate_text(dpo_model.model, dpo_model.tokenizer, conversation, max_tokens=MAX,
                                   temperature=TEMP, system="Be brief.", seed=6)
    alone = generate_text(dpo_model.model, dpo_model.tokenizer, "And 4 plus 4?", max_tokens=MAX, temperature=TEMP,
                          system="Be brief.", seed=6)
    assert second != alone  # the earlier turns count
    assert [m["role"] for m in s.messages] == ["user", "assistant", "user", "assistant"]
    assert s.command("/reset") == "conversation reset (system: Be brief.)" and s.messages == []
    s.command("/system")
    assert reply(s, "What is 2 plus 3?") == first  # the same conversation again: the same reply


def test_commands(dpo_model):
    s = ChatSession(dpo_model)
    assert s.command("/temp 0.7") == "temperature = 0.7" and s.temperature == 0.7
    assert s.command("/top-p 0.9") == "top-p = 0.9" and s.command("/max-tokens 16") == "max-tokens = 16"
    assert "needs a number" in s.command("/temp hot") and "out of range" in s.command("/top-p 0")
    assert "needs an integer" in s.command("/max-tokens 1.5") and s.max_tokens == 16
    assert "unknown command /nope" in s.command("/nope")
    assert "/reset" in s.command("/help") and s.command("/history") == "(no conversation yet)"
    assert s.command("/quit") == "bye" and s.ended


def test_the_command_streams_replies_from_stdin_until_quit(demo_runs, dpo_model):
    s = ChatSession(dpo_model, max_tokens=MAX, temperature=TEMP, seed=3)
    first = reply(s, "What is 2 plus 3?")
    second = reply(s, "And 4 plus 4?")
    assert first and second and first != second
    lines = "What is 2 plus 3?\nAnd 4 plus 4?\n\n/history\n/reset\nWhat is 2 plus 3?\n/quit\nnever read\n"
    r = CliRunner().invoke(chat, ["--adapter", str(demo_runs / "dpo"), "--max-tokens", str(MAX), "--temp", str(TEMP),
                                  "--seed", "3"], input=lines)
    assert r.exit_code == 0, r.output
    out = r.output
    # Piped: each line read is echoed after the prompt, the reply under it; the reset started it again.
    assert out.count(f"you> What is 2 plus 3?\n{first}\n") == 2 and f"you> And 4 plus 4?\n{second}\n" in out
    assert f"user: And 4 plus 4?\nassistant: {second}" in out and "conversation reset" in out
    assert "never read" not in out and out.rstrip().endswith("bye")
    # End of input ends it too.
    r = CliRunner().invoke(chat, ["--adapter", str(demo_runs / "dpo"), "--max-tokens", "2"], input="hi\n")
    assert r.exit_code == 0 and r.output.count("you> ") == 2


def test_help_has_an_example_and_the_commands():
    text = CliRunner().invoke(chat, ["--help"]).output
    assert "mlxpost chat --adapter runs/demo/dpo" in text and "/system TEXT" in text and "/reset" in text
