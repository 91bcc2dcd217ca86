"""Progress display. The only module that imports Rich.

``make_reporter()`` returns a live Rich display on a terminal, plain one-line
logs otherwise (CI, pipes, files), and a silent reporter on ranks other than
0. The training loop talks to all three through the same methods.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text


def _fmt(v: Any, key: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if key in ("lr",):
            return f"{v:.2e}"
        if key.endswith("per_s"):
            return f"{v:,.0f}"
        if key.endswith("seconds"):
            return f"{v:,.1f}"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


class NullReporter:
    """Ranks other than 0 say nothing."""

    def info(self, msg: str) -> None: ...
    def warn(self, msg: str) -> None: ...

    @contextmanager
    def status(self, msg: str) -> Iterator[None]:
        yield

    def begin(self, total: int, start: int = 0, display: tuple = ()) -> None: ...
    def advance(self, step: int) -> None: ...
    def report(self, step: int, metrics: dict) -> None: ...
    def eval(self, step: int, val: dict, best: float | None = None, improved: bool = False) -> None: ...
    def event(self, msg: str, step: int | None = None, transient: bool = False) -> None: ...
    def end(self) -> None: ...
    def table(self, title: str, rows: list[tuple[str, Any]]) -> None: ...
    def samples(self, rows: list[dict]) -> None: ...
    def grid(self, title: str, header: list[str], rows: list[list[Any]]) -> None: ...
    def error(self, msg: str) -> None: ...

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator["Bar"]:
        """A progress bar of ``total`` items for one piece of work (an evaluation task); ``advance(n)`` moves it."""
        yield Bar()


class Bar:
    """A progress bar's handle: :meth:`advance` by ``n`` items. This one shows nothing."""

    def __init__(self, total: int = 0):
        self.total, self.done = total, 0

    def advance(self, n: int = 1) -> None:
        self.done += n


class _LineBar(Bar):
    """Plain progress: a line at about every tenth of the work, with the time left at the rate so far."""

    def __init__(self, total: int, description: str, out):
        super().__init__(total)
        self.description, self.out = description, out
        self.t0 = time.time()
        self.next = max(1, total // 10)

    def advance(self, n: int = 1) -> None:
        super().advance(n)
        if self.done >= self.next or self.done >= self.total:
            dt = time.time() - self.t0
            eta = dt / self.done * (self.total - self.done) if self.done else 0.0
            self.out(f"{self.description}: {self.done}/{self.total} ({dt:.0f}s, eta {eta:.0f}s)")
            self.next = self.done + max(1, self.total // 10)


class _RichBar(Bar):
    def __init__(self, total: int, progress: Progress, task):
        super().__init__(total)
        self.bar, self.task = progress, task

    def advance(self, n: int = 1) -> None:
        super().advance(n)
        self.bar.update(self.task, completed=self.done)


class PlainReporter(NullReporter):
    """One line per event: for logs, pipes and CI."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.total = 0
        self.t0 = time.time()

    def _print(self, msg: str) -> None:
        print(msg, file=self.stream, flush=True)

    def info(self, msg: str) -> None:
        self._print(msg)

    def warn(self, msg: str) -> None:
        self._print(f"warning: {msg}")

    def error(self, msg: str) -> None:
        self._print(f"error: {msg}")

    @contextmanager
    def status(self, msg: str) -> Iterator[None]:
        self._print(f"{msg} ...")
        t = time.time()
        yield
        self._print(f"{msg}: done in {time.time() - t:.1f}s")

    def begin(self, total: int, start: int = 0, display: tuple = ()) -> None:
        self.total = total
        self.display = tuple(display)
        self.t0 = time.time()
        self._print(f"training: {total} steps" + (f" (resuming at {start})" if start else ""))

    def report(self, step: int, metrics: dict) -> None:
        keys = ["loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens_per_s", "peak_memory_gb"]
        parts = [f"{k} {_fmt(metrics.get(k), k)}" for k in keys if k in metrics]
        shown = list(getattr(self, "display", ())) + [k for k in metrics if "/" in k]
        parts += [f"{k} {_fmt(metrics[k], k)}" for k in dict.fromkeys(shown) if k in metrics]
        self._print(f"step {step}/{self.total} | " + " | ".join(parts))

    def eval(self, step: int, val: dict, best: float | None = None, improved: bool = False) -> None:
        shown = ["val_ppl"] + [f"val_{k}" for k in getattr(self, "display", ())]
        extra = " | ".join(f"{k} {_fmt(val[k], k)}" for k in shown if k in val)
        mark = " (best)" if improved else f" (best {best:.4f})" if best is not None else ""
        self._print(f"eval step {step} | val_loss {val['val_loss']:.4f}{mark}" + (f" | {extra}" if extra else ""))

    def event(self, msg: str, step: int | None = None, transient: bool = False) -> None:
        if not transient:
            self._print(msg if step is None else f"step {step}: {msg}")

    def table(self, title: str, rows: list[tuple[str, Any]]) -> None:
        self._print(f"== {title}")
        width = max((len(k) for k, _ in rows), default=0)
        for k, v in rows:
            self._print(f"  {k.ljust(width)}  {_fmt(v, k)}")

    def grid(self, title: str, header: list[str], rows: list[list[Any]]) -> None:
        """A table with a header row (cells already formatted as text)."""
        cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
        self._print(f"== {title}")
        for r in cells:
            self._print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator[Bar]:
        yield _LineBar(total, description, self._print)

    def samples(self, rows: list[dict]) -> None:
        for r in rows:
            self._print(f"== prompt: {r['prompt']}")
            for k in ("before", "after"):
                if k in r:
                    self._print(f"  [{k}] {r[k]}")


class RichReporter(PlainReporter):
    """A live progress bar with the current metrics, for terminals."""

    def __init__(self, console: Console | None = None):
        super().__init__()
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(bar_width=None), MofNCompleteColumn(),
            TextColumn("•"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console, expand=True,
        )
        self.task = None
        self.metrics: dict = {}
        self.val: dict = {}
        self.best: float | None = None
        self.note = ""
        self.display: tuple = ()
        self.live: Live | None = None

    def _print(self, msg: str) -> None:
        self.console.print(msg, highlight=False, markup=False)

    def warn(self, msg: str) -> None:
        self.console.print(Text("warning: ", style="yellow bold") + Text(msg))

    def error(self, msg: str) -> None:
        self.console.print(Text("error: ", style="red bold") + Text(msg))

    @contextmanager
    def status(self, msg: str) -> Iterator[None]:
        t = time.time()
        with self.console.status(msg):
            yield
        self.console.print(Text("✓ ", style="green") + Text(f"{msg} ({time.time() - t:.1f}s)"))

    def _panel(self):
        m = self.metrics
        grid = Table.grid(padding=(0, 2))
        cols = [("loss", m.get("loss")), ("val loss", self.val.get("val_loss")), ("best val", self.best),
                ("lr", m.get("lr")), ("tok/s", m.get("tokens_per_s")), ("trained tok/s", m.get("trained_tokens_per_s")),
                ("peak mem GB", m.get("peak_memory_gb")), ("epoch", m.get("epoch"))]
        keys = ["loss", "val_loss", "val_loss", "lr", "tokens_per_s", "trained_tokens_per_s", "peak_memory_gb", "epoch"]
        for k in self.display:  # the method's own columns (e.g. reward margins), after the loss
            cols.insert(3, (k.split("/")[-1].replace("accuracies", "accuracy"), m.get(k)))
            keys.insert(3, k)
        for _ in cols:
            grid.add_column(justify="right")
        grid.add_row(*[Text(c, style="dim") for c, _ in cols])
        grid.add_row(*[_fmt(v, k) for (_, v), k in zip(cols, keys)])
        parts = [self.progress, grid]
        if self.note:
            parts.append(Text(self.note, style="dim italic"))
        return Group(*parts)

    def begin(self, total: int, start: int = 0, display: tuple = ()) -> None:
        self.total = total
        self.display = tuple(reversed(display))  # inserted one by one at the same place
        self.task = self.progress.add_task("training", total=total, completed=start)
        self.live = Live(self._panel(), console=self.console, refresh_per_second=4, transient=False)
        self.live.start()

    def advance(self, step: int) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=step)
            self.note = ""
            self.live.update(self._panel())

    def report(self, step: int, metrics: dict) -> None:
        self.metrics = metrics
        if self.live:
            self.live.update(self._panel())

    def eval(self, step: int, val: dict, best: float | None = None, improved: bool = False) -> None:
        self.val, self.best = val, best
        mark = " [green](best)[/green]" if improved else ""
        self.console.print(f"eval step {step}: val_loss {val['val_loss']:.4f}"
                           + (f", ppl {val['val_ppl']:.2f}" if "val_ppl" in val else "")
                           + "".join(f", {k} {_fmt(val[f'val_{k}'], k)}" for k in reversed(self.display)
                                     if f"val_{k}" in val) + mark)
        if self.live:
            self.live.update(self._panel())

    def event(self, msg: str, step: int | None = None, transient: bool = False) -> None:
        if transient:
            self.note = msg + " ..."
            if self.live:
                self.live.update(self._panel())
        else:
            self._print(msg if step is None else f"step {step}: {msg}")

    def end(self) -> None:
        if self.live:
            self.live.update(self._panel())
            self.live.stop()
            self.live = None

    def table(self, title: str, rows: list[tuple[str, Any]]) -> None:
        t = Table(title=title, show_header=False, title_justify="left")
        t.add_column(style="bold")
        t.add_column(justify="right")
        for k, v in rows:
            t.add_row(k, _fmt(v, k))
        self.console.print(t)

    def grid(self, title: str, header: list[str], rows: list[list[Any]]) -> None:
        t = Table(title=title, title_justify="left")
        for h in header:
            t.add_column(str(h))
        for r in rows:
            t.add_row(*[str(c) for c in r])
        self.console.print(t)

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator[Bar]:
        if self.live is not None:  # inside training's live display (evaluation hooks): plain lines
            yield _LineBar(total, description, self._print)
            return
        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=None), MofNCompleteColumn(),
                       TextColumn("•"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                       console=self.console, expand=True)
        with bar:
            yield _RichBar(total, bar, bar.add_task(description, total=total))

    def samples(self, rows: list[dict]) -> None:
        for r in rows:
            t = Table(title=f"prompt: {r['prompt']}", show_header=True, title_justify="left", expand=True)
            t.add_column("before", ratio=1)
            t.add_column("after", ratio=1)
            t.add_row(r.get("before", "-"), r.get("after", "-"))
            self.console.print(t)


def make_reporter(rank: int = 0, plain: bool | None = None):
    if rank != 0:
        return NullReporter()
    if plain is None:
        plain = not sys.stdout.isatty()
    return PlainReporter() if plain else RichReporter()
