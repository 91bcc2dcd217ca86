"""``mlxpost ablate`` (a sweep over a grid of settings) and ``mlxpost compare`` (runs side by side).

The live sweep table is drawn with Rich here; the sweep itself
(:mod:`mlxpost.tools.sweep`) and the comparison (:mod:`mlxpost.tools.compare`) know nothing of it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..config import parse_set
from ..errors import MlxpostError
from ..methods import METHODS
from ..methods import get as get_method
from ..tools.compare import collect_runs, compare, default_png_path, fmt_num
from ..tools.sweep import PlainView, Sweep, ViewOnlyReporter
from ..tools.sweep_plan import Point, plan_sweep, recipe_method
from .compare import _echo_err, show_comparison, terminal_width, write_png

_STYLES = {"done": "green", "failed": "red", "running": "yellow", "interrupted": "magenta", "pending": "dim"}


class RichSweepView(PlainView):
    """One row per point (name, overrides, status, step/total, loss, best val loss, time), kept live."""

    def __init__(self, console=None):
        super().__init__()
        self.console = console or Console()
        self.live = None

    def reporter_for(self, p: Point):
        return ViewOnlyReporter(self, p.name)

    def _table(self):
        s = self.sweep
        c = s.counts()
        title = (f"sweep {s.path}: {c['done']} done, {c['failed']} failed"
                 + (f", {c['interrupted']} interrupted" if c["interrupted"] else "") + f" of {len(s.points)}")
        t = Table(title=title, title_justify="left", expand=False)
        for h, j in (("#", "right"), ("point", "left"), ("overrides", "left"), ("status", "left"),
                     ("step", "right"), ("loss", "right"), ("best val", "right"), ("time", "right")):
            t.add_column(h, justify=j)
        now = time.time()
        for p in s.points:
            secs = p.seconds if p.seconds is not None else (now - p.started if p.status == "running" and p.started
                                                            else None)
            step = f"{p.step}/{p.total}" if p.total else ("-" if p.status == "pending" else str(p.step))
            status = Text(p.status, style=_STYLES.get(p.status, ""))
            if p.status == "failed" and p.reason:
                status.append(f" {p.reason[:60]}", style="dim")
            t.add_row(str(p.index + 1), Text(p.name), Text(p.label), status, step, fmt_num(p.loss),
                      fmt_num(p.best_val), f"{secs:.0f}s" if secs is not None else "-")
        return t

    def start(self, sweep) -> None:
        self.sweep = sweep
        self.live = Live(self._table(), console=self.console, refresh_per_second=4, transient=False)
        self.live.start()

    def update(self, p: Point) -> None:
        if self.live is not None:
            self.live.update(self._table())

    point_started = point_finished = update

    def log(self, msg: str) -> None:
        self.console.print(msg, highlight=False, markup=False)

    def stop(self) -> None:
        if self.live is not None:
            self.live.update(self._table())
            self.live.stop()
            self.live = None


@click.command("ablate")
@click.option("--method", type=click.Choice(list(METHODS)),
              help="The training method (default: the recipe's method:, else sft).")
@click.option("--config", type=click.Path(dir_okay=False), help="The base recipe YAML.")
@click.option("--grid", "grid", multiple=True, metavar="KEY=V1,V2,...",
              help="A setting to vary and its values, parsed as --set parses them (repeatable: cartesian product).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="A fixed override of the base (repeatable).")
@click.option("--seeds", type=int, default=1, show_default=True,
              help="Run every point with train.seed = seed, seed+1, ... (seed: the base's, default 0).")
@click.option("--steps", type=int, help="Optimizer steps of every run.")
@click.option("--model", help="Base model of every run (as for mlxpost sft).")
@click.option("--data", help="Data of every run (as for mlxpost sft).")
@click.option("--random", "random_n", type=int, metavar="N", help="Run N points drawn from the grid instead of all.")
@click.option("--random-seed", type=int, default=0, show_default=True, help="Seed of the --random draw.")
@click.option("--out", type=click.Path(file_okay=False), help="Parent of the sweep directory (default: runs).")
@click.option("--name", help="Sweep directory name (default: sweep-<timestamp>).")
@click.option("--resume", type=click.Path(file_okay=False, exists=True), metavar="SWEEP_DIR",
              help="Finish a stopped sweep: run only the points that are not done.")
@click.option("--metric", "metrics", multiple=True, help="Metric of the final comparison and curves (repeatable).")
@click.option("--plain", is_flag=True, default=False, help="One line per event instead of the live table.")
def ablate(method, config, grid, sets, seeds, steps, model, data, random_n, random_seed, out, name, resume, metrics,
           plain):
    """Train every point of a grid of settings (times seeds), then compare them.

    \b
    Examples:
      mlxpost ablate --config recipes/smollm2-135m-dpo.yaml --grid lora.rank=4,8,16 --grid dpo.beta=0.05,0.1,0.5
      mlxpost ablate --grid train.lr=1e-4,3e-4 --seeds 3 --steps 200
      mlxpost ablate --config recipes/x.yaml --grid lora.rank=4,8,16,32 --grid train.lr=1e-4,2e-4,5e-4 --random 5
      mlxpost ablate --resume runs/sweep-20261122-101500
    \b
    Exit code: 0 when every point is done, 1 when some failed, 130 when interrupted.
    """
    if resume:
        given = [opt for opt, v in (("--method", method), ("--config", config), ("--grid", grid), ("--set", sets),
                                    ("--seeds", seeds != 1), ("--steps", steps), ("--model", model), ("--data", data),
                                    ("--random", random_n), ("--out", out), ("--name", name)) if v]
        if given:
            raise MlxpostError(f"--resume continues the sweep as it was planned (its sweep.json); drop "
                               f"{', '.join(given)}")
        sweep = Sweep.load(resume)
    else:
        cli_values = {"train.steps": steps, "model.path": model, "data.path": data}
        given = {**cli_values, **dict(parse_set(s) for s in sets)}
        m = get_method(method or recipe_method(config) or "sft")
        if config is None and given.get("data.path") is None and m.bundled is not None:
            if m.bundled.recipe is not None:
                config = str(m.bundled.recipe)
                click.echo(f"no --data and no --config: the built-in default run ({Path(config).name}) is the base")
            filled = dict(given)
            m.without_data(filled)
            cli_values.update({k: v for k, v in filled.items() if k not in given})
        plan = plan_sweep(method=method, recipe=config, sets=list(sets), cli=cli_values, grid=list(grid),
                          seeds=seeds, random_n=random_n, random_seed=random_seed)
        sweep = Sweep.create(plan, out=out, name=name)

    use_rich = not plain and sys.stdout.isatty()
    view = RichSweepView() if use_rich else PlainView()
    code = sweep.run(view=view)

    runs = collect_runs([sweep.path])
    comp = compare(runs, list(metrics) or None)
    show_comparison(comp, "table", None, rich=use_rich, width=terminal_width(None))
    write_png(runs, list(metrics) or None, default_png_path([sweep.path]))
    c = sweep.counts()
    if code == 130:
        _echo_err(f"\ninterrupted. Finish the sweep with: mlxpost ablate --resume {sweep.path}", fg="yellow")
    elif code:
        _echo_err(f"\n{c['failed']} of {len(sweep.points)} points failed (reasons above and in "
                  f"{sweep.path / 'sweep.json'}). Retry them with: mlxpost ablate --resume {sweep.path}", fg="red")
    else:
        click.echo(f"\nall {len(sweep.points)} points done: {sweep.path}")
    if code:
        sys.exit(code)
