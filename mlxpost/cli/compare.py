"""``mlxpost compare``: runs side by side, as a table, Markdown or JSON, and their curves."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..tools.compare import PLOT_HINT, collect_runs, compare, default_png_path, plot_available, plot_curves
from ..tools.table import Block


def _echo_err(msg: str, **style) -> None:
    click.secho(msg, err=True, **style)


def terminal_width(width: int | None) -> int | None:
    """``--width``; else the terminal's (``COLUMNS`` or the terminal itself, 100 when neither says); 0: unlimited."""
    if width is not None:
        return width or None
    return shutil.get_terminal_size((100, 24)).columns


def rich_block(block: Block, style=None) -> Table:
    """A text block as a Rich table of the same widths (columns two spaces apart, no borders): marked (best)
    cells in green without their ``*``; ``style(row, column)``: any other cell's style (or None)."""
    t = Table(title=block.title, title_justify="left", box=None, pad_edge=False, padding=(0, 1),
              header_style="bold", show_edge=False)
    for h, a in zip(block.header, block.align):
        t.add_column(h, justify="right" if a == "r" else "left", no_wrap=True)
    for i, row in enumerate(block.rows):
        t.add_row(*[Text(c.removesuffix(" *"), style="bold green") if (i, j) in block.marked
                    else Text(c, style=(style(i, j) if style else None) or "") for j, c in enumerate(row)])
    return t


def show_comparison(comp, fmt: str, out: str | None, rich: bool, width: int | None = None) -> None:
    """Print the comparison (and write it to ``out``); tables laid out for ``width`` columns (None: unlimited)."""
    if fmt == "json":
        text = json.dumps(comp.to_json(), indent=2, default=str) + "\n"
    elif fmt == "markdown":
        text = comp.to_markdown()
    else:
        text = comp.to_text(width) + "\n"
    if fmt == "table" and rich:
        console = Console(width=width) if width else Console()
        for block in comp.text_blocks(width):
            console.print(rich_block(block))
            console.print()
        for line in comp.notes(width):
            verdict = line.strip().partition(": ")[2]
            style = ("dim" if not verdict else "green" if verdict.startswith("ok")
                     else "red" if verdict.startswith(("failed", "gate fail")) else "yellow")
            console.print(Text(line, style=style if line.startswith("  ") else "dim"), soft_wrap=True)
    else:
        click.echo(text, nl=False)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        _echo_err(f"comparison written to {out}")


def write_png(runs, metrics, png: Path) -> None:
    if not plot_available():
        _echo_err(f"no figure of the curves: matplotlib is not installed ({PLOT_HINT})", fg="yellow")
        return
    try:
        plot_curves(runs, metrics, png)
    except OSError as e:
        _echo_err(f"no figure of the curves: cannot write {png} ({e.strerror or e}); choose a place with --png",
                  fg="yellow")
        return
    _echo_err(f"curves written to {png}")


@click.command("compare")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False),
                metavar="RUN_OR_SWEEP...")
@click.option("--metric", "metrics", multiple=True,
              help="A metric column and curve: loss, val_loss, rewards/margins, val_rewards/accuracies, "
                   "eval_after.reward, ... (repeatable).")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "json"]), default="table", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the output to this file.")
@click.option("--png", type=click.Path(dir_okay=False),
              help="Where to draw the curves (default: SWEEP_DIR/compare.png or the runs' parent directory).")
@click.option("--no-png", is_flag=True, help="Do not draw the curves.")
@click.option("--per-run", is_flag=True, help="One row per run, also for runs that differ only in train.seed.")
@click.option("--width", type=click.IntRange(min=0),
              help="Lay the table out for this many columns (default: the terminal's; 0: no limit).")
def compare_command(paths, metrics, fmt, out, png, no_png, per_run, width):
    """Runs side by side: final and best metrics, speed, memory, verdicts, and the settings that differ.

    \b
    Examples:
      mlxpost compare runs/demo/sft runs/demo/dpo runs/demo/grpo runs/demo/rlvr
      mlxpost compare runs/sweep-20261122-101500
      mlxpost compare runs/dpo-a runs/dpo-b --metric val_loss --metric val_rewards/margins --format markdown
    \b
    The table fits the terminal: metrics first (those runs of several methods
    share, then each method's own), then the settings that apply to at least
    two runs and differ, one row per setting when a row per run is too wide.
    Markdown and JSON keep every setting that differs. The best value of each
    metric is marked among runs of the same method (lowest for losses, memory
    and time; highest for rewards, accuracies, margins, tokens/s and MFU). Runs that
    differ only in train.seed are grouped: mean ± std over the seeds. After tok/s
    comes MFU (model FLOPs over the matmul peak mlxpost doctor measured), or
    model FLOP/s when no run has an MFU.
    """

    runs = collect_runs(list(paths))
    comp = compare(runs, list(metrics) or None, group_seeds=not per_run)
    show_comparison(comp, fmt, out, rich=fmt == "table" and sys.stdout.isatty(),
                    width=terminal_width(width) if fmt == "table" else None)
    if not no_png:
        write_png(runs, list(metrics) or None, Path(png) if png else default_png_path(list(paths)))
