"""``mlxpost runs``: the runs under a directory, one line each, newest first."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console

from ..tools.runs import list_runs, listing
from .compare import rich_block, terminal_width

_STATUS_STYLE = {"finished": "green", "running": "cyan", "stopped": "yellow", "failed": "red"}


@click.command("runs")
@click.argument("directory", default="runs", type=click.Path(file_okay=False), metavar="[DIR]")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per run (a list), for scripts.")
@click.option("--width", type=click.IntRange(min=0), help="Fit the table to this many columns (0: no limit).")
def runs_command(directory, as_json, width):
    """What has been run under DIR (default: runs), newest first: one line per run.

    \b
    Examples:
      mlxpost runs
      mlxpost runs runs/demo --json
    \b
    Each line: the run, its method, its status and steps (finished 40/40,
    stopped at 7/40, failed at 3/40, running 12/40), its key final metrics and
    quality gate, wall time, base model, and the runs it was trained on top of
    (--from), nearest first: "dpo ← sft".
    """
    entries = list_runs(directory)
    if as_json:
        click.echo(json.dumps([e.to_json() for e in entries], indent=2, default=str))
        return
    if not entries:
        click.echo(f"no runs under {directory}")
        return
    block, note = listing(entries, terminal_width(width))
    if sys.stdout.isatty():
        console = Console(width=terminal_width(width))
        console.print(rich_block(block, lambda i, j: _STATUS_STYLE.get(entries[i].status) if j == 2 else None))
    else:
        click.echo("\n".join(block.lines()))
    if note:
        click.echo(note)
