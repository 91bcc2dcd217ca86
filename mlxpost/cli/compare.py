"""``mlxpost compare``: runs side by side, as a table, Markdown or JSON, and their curves."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..tools.compare import PLOT_HINT, collect_runs, compare, default_png_path, plot_available, plot_curves


def _echo_err(msg: str, **style) -> None:
    click.secho(msg, err=True, **style)


def show_comparison(comp, fmt: str, out: str | None, rich: bool) -> None:
    """Print the comparison (and write it to ``out``)."""
    if fmt == "json":
        text = json.dumps(comp.to_json(), indent=2, default=str) + "\n"
    elif fmt == "markdown":
        text = comp.to_markdown()
    else:
        text = comp.to_text() + "\n"
    if fmt == "table" and rich:
        console = Console()
        t = Table(title="comparison" + (" (mean ± std over seeds)" if comp.grouped else ""), title_justify="left")
        n_text = 1 + comp.grouped + len(comp.diff_keys)
        for i, h in enumerate(comp.headers()):
            t.add_column(h, justify="left" if i < n_text else "right")
        best = "\0"  # marks a best cell (no markup: values may hold brackets)
        for row in comp.rows:
            t.add_row(*[Text(c[1:], style="bold green") if c.startswith(best) else Text(c)
                        for c in comp.cell_texts(row, mark=lambda c: best + c)])
        console.print(t)
        if comp.best:
            console.print(Text(f"best of each column in green ({comp.rule_text()})", style="dim"))
        if not comp.diff_keys:
            console.print(Text("(the runs' configurations do not differ)", style="dim"))
        for r in comp.runs:
            v = r.verdict
            style = "green" if v.startswith("ok") else "red" if v.startswith(("failed", "gate fail")) else "yellow"
            console.print(Text(f"  {r.name}: ") + Text(v, style=style))
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
def compare_command(paths, metrics, fmt, out, png, no_png, per_run):
    """Runs side by side: the settings that differ, final and best metrics, speed, memory, verdicts.

    \b
    Examples:
      mlxpost compare runs/sweep-20261122-101500
      mlxpost compare runs/dpo-a runs/dpo-b --metric val_loss --metric val_rewards/margins --format markdown
    \b
    The best value of each column is marked (lowest for losses, memory and
    time; highest for rewards, accuracies, margins and tokens/s). Runs that
    differ only in train.seed are grouped: mean ± std over the seeds.
    """

    runs = collect_runs(list(paths))
    comp = compare(runs, list(metrics) or None, group_seeds=not per_run)
    show_comparison(comp, fmt, out, rich=fmt == "table" and sys.stdout.isatty())
    if not no_png:
        write_png(runs, list(metrics) or None, Path(png) if png else default_png_path(list(paths)))
