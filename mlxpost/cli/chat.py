"""``mlxpost chat``: a multi-turn conversation in the terminal with a model or a trained run."""

from __future__ import annotations

import sys

import click

from ..tools.chat import ChatSession, help_text, load_for_generation


@click.command("chat")
@click.option("--adapter", type=click.Path(file_okay=False, exists=True),
              help="A run or adapter directory (its whole --from stack is loaded, as trained).")
@click.option("--model", help="Base model (default: the one the run trained on, else the built-in default).")
@click.option("--best", is_flag=True, help="Use the run's best/ adapter (lowest validation loss).")
@click.option("--system", help="A system message (change it with /system TEXT).")
@click.option("--temp", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Sampling temperature (0 = greedy; change it with /temp X).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True, help="Longest reply.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the sampling (turn k uses seed + k: a conversation replays alike).")
def chat(adapter, model, best, system, temp, top_p, max_tokens, seed):
    """Talk with a model or a trained run: the chat template, streamed replies, the conversation kept.

    \b
    Examples:
      mlxpost chat --adapter runs/demo/dpo
      mlxpost chat --model HuggingFaceTB/SmolLM2-135M-Instruct --system "Be brief." --temp 0.7
    \b
    Commands during the chat:"""
    loaded, what = load_for_generation(model, adapter, best)
    session = ChatSession(loaded, system=system, temperature=temp, top_p=top_p, max_tokens=max_tokens,
                          seed=seed)
    click.secho(f"chatting with {what}; /help for commands, /quit or Ctrl-D to end", fg="cyan", err=True)
    _loop(session)


def _loop(session: ChatSession) -> None:
    """Read a line, answer it; until /quit, end of input or Ctrl-C at the prompt.

    With stdin piped (``printf 'Hi\\n/quit\\n' | mlxpost chat ...``) the line
    read is echoed after the prompt, as a terminal would show it, so that the
    output reads as a transcript: ``you> Hi`` then the reply on its own line."""
    try:
        import readline  # noqa: F401 - line editing and history for input(), where the platform has it
    except ImportError:
        pass
    terminal = sys.stdin.isatty() and sys.stdout.isatty()
    prompt = click.style("you> ", fg="green", bold=True) if terminal else "you> "  # no escape codes into a pipe
    while not session.ended:
        try:
            line = input(prompt)
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        if not sys.stdin.isatty():
            click.echo(line)
        if not line.strip():
            continue
        if line.startswith("/"):
            click.secho(session.command(line), fg="cyan")
            continue
        stream = session.reply(line)
        try:
            for piece in stream:
                click.echo(piece, nl=False)
        except KeyboardInterrupt:
            stream.close()  # the reply joins the conversation as far as it got
            click.secho(" [stopped]", fg="yellow", nl=False)
        click.echo()


chat.help = chat.help.rstrip() + "\n" + help_text()
