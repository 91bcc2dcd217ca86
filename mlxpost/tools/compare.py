"""Compare runs side by side: what differs in their configurations, and how they ended.

``mlxpost compare RUN_OR_SWEEP ...`` reads each run directory's
``config.yaml``, ``summary.json`` and ``metrics.jsonl`` (a sweep directory
stands for all its points) and shows:

* the configuration keys whose values differ between the runs (dotted keys;
  ``output.*`` left out), nothing else;
* final and best metrics (final train loss, validation loss and its best,
  the method's validation metrics, or any ``--metric``), tokens/s, peak
  memory and wall time, with the best value of each column marked by the
  rule of :data:`RULES` (among runs of the same method: the losses of two
  methods measure different things);
* runs that differ only in ``train.seed`` as one row per group, ``mean ± std``
  over the seeds (``--per-run`` to see them one by one);
* the capability metrics of ``mlxpost eval`` (``RUN/eval/*.json``, the newest
  result of each task) as columns ``eval:TASK/METRIC``, their direction
  from the evaluation itself (higher or lower is better);
* a verdict per run (``ok``, ``failed: reason``, ``gate fail: ...``);
* a figure of the metric curves (one panel per metric, one line per run),
  written as PNG when matplotlib is installed.

Outputs: text for a terminal, Markdown (for notes) or JSON. Markdown and JSON
keep everything; the text is laid out for the terminal's width
(:meth:`Comparison.text_blocks`): metrics first (one table of the metrics
runs share, then one per method for the metrics only its runs have), then
the settings that apply to at least two of the runs and differ between them
(:func:`terminal_settings`), beside the metrics when one table fits, else in
their own table, turned to one row per setting when too wide
(:mod:`mlxpost.tools.table`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import MlxpostError
from .table import Block, fit

# Which value of a column is best: the first rule whose pattern occurs in the
# metric's name decides (None: the column is not marked).
RULES: list[tuple[str, str | None]] = [
    ("behaviour.", "max"),  # rates of what the bundled data teaches (JSON answers, correct, explanation first)
    ("rewards/chosen", None), ("rewards/rejected", None), ("logps", None), ("log_odds", None),
    ("_std", None), ("grad_norm", None), ("lr", None), ("epoch", None), ("len", None),
    ("per_s", "max"), ("tok_s", "max"), ("mfu", "max"),
    ("loss", "min"), ("ppl", "min"), ("nll", "min"), ("kl", "min"), ("memory", "min"), ("seconds", "min"),
    ("step_s", "min"), ("truncated", "min"), ("all_equal", "min"),
    ("accurac", "max"), ("margin", "max"), ("_acc", "max"), ("reward", "max"), ("_rate", "max"),
]


DEFAULT_METRICS = ["loss", "val_loss", "best_val_loss"]


# Shown by default when some run has them.
EXTRA_METRICS = ["behaviour.json.after", "behaviour.correct.after", "behaviour.explanation_first.after",
                 "val_rewards/margins", "val_rewards/accuracies", "eval_after.reward", "eval_after.final_acc",
                 "eval_after.step_acc"]


PERF_METRICS = ["tokens_per_s", "peak_memory_gb", "wall_seconds"]

EVAL_PREFIX = "eval:"  # columns of mlxpost eval's results: eval:TASK/METRIC

DEFAULT_CURVES = ["loss", "val_loss"]

# The FLOP column: MFU when some run has one (a matmul peak was measured), else model FLOP/s.
FLOP_METRICS = ["mfu", "model_flops_per_s"]

HEADERS = {"loss": "final loss", "tokens_per_s": "tok/s", "mfu": "MFU", "model_flops_per_s": "model FLOP/s",
           "peak_memory_gb": "peak mem GB",
           "wall_seconds": "wall s", "behaviour.json.after": "JSON after", "behaviour.correct.after": "correct after",
           "behaviour.explanation_first.after": "expl. first after"}

# Shorter headers in the text for a terminal (Markdown and JSON keep HEADERS and the metric names).
TEXT_HEADERS = {**HEADERS, "best_val_loss": "best val", "peak_memory_gb": "mem GB"}

IGNORED_PREFIXES = ("output.",)

PLOT_HINT = "pip install matplotlib (or the plot extra of mlxpost)"


def direction(metric: str) -> str | None:
    """``min``, ``max`` or None (not marked), by :data:`RULES`."""
    name = metric.lower()
    for pattern, d in RULES:
        if pattern in name:
            return d
    return None


def flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in config.items():
        if isinstance(v, dict) and not prefix:
            out.update(flatten(v, f"{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@dataclass
class RunInfo:
    name: str
    path: Path
    config: dict  # flattened dotted keys
    summary: dict | None
    status: str | None = None  # the sweep's status of this point (None: not from a sweep)
    reason: str | None = None
    sweep: Path | None = None
    _metrics: list | None = field(default=None, repr=False)
    _evals: dict | None = field(default=None, repr=False)

    @property
    def metrics(self) -> list[dict]:
        if self._metrics is None:
            self._metrics = []
            f = self.path / "metrics.jsonl"
            if f.exists():
                for line in f.read_text().splitlines():
                    try:
                        self._metrics.append(json.loads(line))
                    except json.JSONDecodeError:  # a line cut by a kill
                        pass
        return self._metrics

    @property
    def evals(self) -> dict:
        """``{"eval:TASK/METRIC": (value, higher_is_better)}`` from RUN/eval/*.json, the newest file of a task last."""
        if self._evals is not None:
            return self._evals
        out: dict = {}
        self._evals = out
        d = self.path / "eval"
        files = sorted(d.glob("*.json"), key=lambda f: f.stat().st_mtime) if d.is_dir() else []
        for f in files:
            doc = _read_json(f) or {}
            for task, r in (doc.get("tasks") or {}).items():
                hib = r.get("higher_is_better") or {}
                for m, v in (r.get("metrics") or {}).items():
                    out[f"{EVAL_PREFIX}{task}/{m}"] = ((v or {}).get("value"), hib.get(m))
        return out

    @property
    def verdict(self) -> str:
        return run_verdict(self.summary, status=self.status, reason=self.reason, run_dir=self.path)

    @property
    def seed(self):
        return self.config.get("train.seed")


def _read_json(f: Path) -> dict | None:
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return None


def read_run(path: Path, name: str | None = None, **kw) -> RunInfo:
    try:
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except yaml.YAMLError as e:
        raise MlxpostError(f"{path / 'config.yaml'}: not valid YAML ({e})") from None
    return RunInfo(name or path.name, path, flatten(config), _read_json(path / "summary.json"), **kw)


def collect_runs(paths: list[str | Path]) -> list[RunInfo]:
    """The runs named by ``paths``: run directories, or sweep directories (all their points)."""
    runs: list[RunInfo] = []
    for p in paths:
        p = Path(p)
        if (p / "sweep.json").exists():
            data = _read_json(p / "sweep.json")
            if not data or "points" not in data:
                raise MlxpostError(f"{p / 'sweep.json'}: not a readable sweep file")
            for pt in data["points"]:
                d = p / pt["name"]
                kw = dict(status=pt.get("status"), reason=pt.get("reason"), sweep=p)
                if (d / "config.yaml").exists():
                    runs.append(read_run(d, **kw))
                else:  # never started: its planned configuration
                    runs.append(RunInfo(pt["name"], d, flatten(pt.get("config") or {}), None, **kw))
        elif (p / "config.yaml").exists():
            runs.append(read_run(p))
        elif p.exists():
            raise MlxpostError(f"{p}: neither a run directory (config.yaml) nor a sweep directory (sweep.json)")
        else:
            raise MlxpostError(f"{p}: no such directory")
    if not runs:
        raise MlxpostError("no runs to compare")
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = f"{r.path.parent.name}/{r.path.name}"
    return runs


def run_verdict(summary: dict | None, *, status: str | None = None, reason: str | None = None,
                run_dir: Path | None = None) -> str:
    """One line: ``ok``, ``ok (warnings: drift)``, ``gate fail: ...``, ``failed: reason``, ``interrupted ...``."""
    if status == "failed":
        return f"failed: {reason or 'unknown reason'}"
    if status == "interrupted":
        return reason or "interrupted"
    if status in ("pending", "running") and summary is None:
        return "not run yet" if status == "pending" else "running (or killed while running)"
    failure = _read_json(run_dir / "failure.json") if run_dir is not None else None
    if summary is None:
        if failure:
            return f"failed: {failure.get('reason', 'non-finite loss')} at step {failure.get('step')}"
        return "incomplete (no summary.json)"
    if summary.get("stopped") == "non_finite":
        what = failure.get("reason", "non-finite loss") if failure else "non-finite loss"
        return f"failed: {what} at step {failure.get('step') if failure else summary.get('steps')}"
    notes = []
    health = summary.get("health") or {}
    gate = health.get("quality_gate") or {}
    warned = [c for c, h in health.items() if isinstance(h, dict) and h.get("verdict") == "warn"]
    if summary.get("stopped") == "early_stopping":
        notes.append(f"early stopping at step {summary.get('steps')}")
    if warned:
        notes.append("warnings: " + ", ".join(warned))
    if gate.get("verdict") == "fail":
        if "detail" in gate:
            why = gate["detail"]
        elif "step_acc" in gate:
            why = (f"val step accuracy {_f3(gate['step_acc'])} (> {gate.get('min_step_acc')} needed), "
                   f"final accuracy {_f3(gate.get('final_acc'))} (> {gate.get('min_final_acc')} needed)")
        else:
            why = (f"val margin {_f3(gate.get('margin'))} (> {gate.get('min_margin')} needed), "
                   f"accuracy {_f3(gate.get('accuracy'))} (>= {gate.get('min_accuracy')} needed)")
        return "gate fail: " + why + (f" ({'; '.join(notes)})" if notes else "")
    if gate.get("verdict") == "pass":
        notes.insert(0, "gate pass")
    return "ok" + (f" ({'; '.join(notes)})" if notes else "")


def _f3(v) -> str:
    """A gate's number with 3 decimals; anything else as it is (strict JSON writes a NaN as ``"NaN"``).

    >>> _f3(0.18181), _f3("NaN"), _f3(None)
    ('0.182', 'NaN', 'nan')
    """
    if v is None:
        return "nan"
    return f"{v:.3f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _last(records: list[dict], kind: str, key: str):
    for r in reversed(records):
        if r.get("kind") == kind and key in r:
            return r[key]
    return None


def metric_value(run: RunInfo, name: str):
    """The final value of ``name`` for ``run`` (None when it has none).

    ``loss`` is the final train loss; other names are looked up in
    summary.json (top level, dotted paths such as ``eval_after.reward``,
    ``val_metrics``, ``final_metrics``), then in the last record of
    metrics.jsonl (evaluations for ``val_*`` names, training reports otherwise).
    """
    if name.startswith(EVAL_PREFIX):
        return run.evals.get(name, (None, None))[0]
    s = run.summary or {}
    key = "final_train_loss" if name == "loss" else name
    if key in s and not isinstance(s[key], dict):
        return s[key]
    head, _, rest = key.partition(".")
    if rest and isinstance(s.get(head), dict):
        obj = s[head]
        for part in rest.split("."):
            obj = obj.get(part) if isinstance(obj, dict) else None
        if obj is not None:
            return obj
    for section in ("val_metrics", "final_metrics"):
        if isinstance(s.get(section), dict) and key in s[section]:
            return s[section][key]
    if name.startswith("val_"):
        return _last(run.metrics, "eval", name)
    return _last(run.metrics, "train", "loss" if name in ("loss", "final_train_loss") else name)


def curve(run: RunInfo, name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``name`` in metrics.jsonl: evaluations for ``val_*``, training reports otherwise.

    A resumed run logs again the steps after its last checkpoint; the last value of a step wins.
    """
    kind = "eval" if name.startswith("val_") else "train"
    points: dict[int, float] = {}
    for r in run.metrics:
        if r.get("kind") == kind and name in r and isinstance(r[name], (int, float)) and "step" in r:
            points[int(r["step"])] = float(r[name])
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt_num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if not math.isfinite(v):
        return str(v)
    if abs(v) >= 1e6:  # FLOP/s
        return f"{v:.3g}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.2f}"
    if v != 0 and abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{v:.4f}"


def fmt_value(v: Any) -> str:
    """A configuration value in a cell."""
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "[" + ", ".join(map(str, v)) + "]"
    return "-" if v is None else str(v)


def config_differences(runs: list[RunInfo]) -> list[str]:
    """Dotted keys whose values differ between the runs (``output.*`` left out), in config order."""
    keys = list(dict.fromkeys(k for r in runs for k in r.config))
    out = []
    for k in keys:
        if k.startswith(IGNORED_PREFIXES):
            continue
        values = {json.dumps(r.config[k] if k in r.config else "<unset>", sort_keys=True, default=str) for r in runs}
        if len(values) > 1:
            out.append(k)
    return out


@dataclass
class Cell:
    mean: Any
    std: float | None = None
    n: int = 1

    def text(self) -> str:
        if self.std is None:
            return fmt_num(self.mean)
        return f"{fmt_num(self.mean)} ± {fmt_num(self.std)}"


@dataclass
class Row:
    name: str
    runs: list[RunInfo]
    config: dict  # the differing keys' values (train.seed left out of a seed group)
    cells: dict  # metric -> Cell

    @property
    def verdicts(self) -> list[str]:
        return [r.verdict for r in self.runs]

    @property
    def method(self) -> str | None:
        """The method of the row's runs (None for a sweep point that never started and records none)."""
        m = self.runs[0].config.get("method")
        return str(m) if m is not None else None

    def applies(self, key: str) -> bool:
        """Whether the setting exists for this row's runs (a method's own section exists for its runs only)."""
        return key in self.runs[0].config


NOT_APPLICABLE = "n/a"


def terminal_settings(comp: "Comparison") -> list[str]:
    """The differing settings worth showing on a terminal: those that apply to at least two rows and
    differ between the rows they apply to (``method`` has its own column; a seed group's seeds too)."""
    out = []
    for k in comp.diff_keys:
        if k == "method":
            continue
        rows = [r for r in comp.rows if r.applies(k)]
        values = {json.dumps(r.runs[0].config.get(k), sort_keys=True, default=str) for r in rows}
        if len(rows) >= 2 and len(values) > 1:
            out.append(k)
    return out


@dataclass
class Comparison:
    runs: list[RunInfo]
    diff_keys: list[str]  # columns of configuration values
    metrics: list[str]  # columns of metrics
    rows: list[Row]
    grouped: bool  # rows are seed groups (mean ± std)
    best: dict = field(default_factory=dict)  # metric -> names of the best rows

    def headers(self) -> list[str]:
        h = ["run"] + (["seeds"] if self.grouped else []) + self.diff_keys
        return h + [HEADERS.get(m, m) for m in self.metrics]

    def cell_texts(self, row: Row, mark=lambda s: s + " *") -> list[str]:
        out = [row.name] + ([", ".join(str(r.seed) for r in row.runs)] if self.grouped else [])
        out += [fmt_value(row.config.get(k)) for k in self.diff_keys]
        for m in self.metrics:
            c = row.cells[m]
            t = c.text()
            out.append(mark(t) if row.name in self.best.get(m, ()) else t)
        return out

    # -- outputs ---------------------------------------------------------------
    def verdict_lines(self) -> list[str]:
        return [f"{r.name}: {r.verdict}" for r in self.runs]

    def methods(self) -> list[str]:
        """The rows' methods, in order of appearance."""
        return list(dict.fromkeys(r.method for r in self.rows if r.method is not None))

    def metric_groups(self) -> list[tuple[str | None, list[str]]]:
        """Metric columns for a terminal: ``(None, shared)``, then ``(method, its own)`` per method.

        A metric no row has is left out. With runs of several methods, a
        metric only one method's runs have goes to that method's table.
        """
        has = {m: {r.method for r in self.rows if r.cells[m].mean is not None} for m in self.metrics}
        shown = [m for m in self.metrics if has[m]]
        methods = self.methods()
        if len(methods) <= 1:
            return [(None, shown)]
        out: list[tuple[str | None, list[str]]] = [(None, [m for m in shown if len(has[m] - {None}) > 1])]
        out += [(meth, own) for meth in methods if (own := [m for m in shown if has[m] - {None} == {meth}])]
        return out

    def _ordered_rows(self) -> list[Row]:
        """The rows, runs of one method together (in the order the methods first appear)."""
        order = {m: i for i, m in enumerate(self.methods())}
        return sorted(self.rows, key=lambda r: order.get(r.method, len(order)))

    def _metric_block(self, rows: list[Row], metrics: list[str], title: str | None, method_col: bool) -> Block:
        head = ["run"] + (["seeds"] if self.grouped else []) + (["method"] if method_col else [])
        cells, marked = [], set()
        for i, row in enumerate(rows):
            c = [row.name] + ([", ".join(str(r.seed) for r in row.runs)] if self.grouped else [])
            c += [row.method or "-"] if method_col else []
            for m in metrics:
                if row.name in self.best.get(m, ()):
                    marked.add((i, len(c)))
                    c.append(row.cells[m].text() + " *")
                else:
                    c.append(row.cells[m].text())
            cells.append(c)
        n = len(head)
        return Block(head + [TEXT_HEADERS.get(m, m) for m in metrics], cells, ["l"] * n + ["r"] * len(metrics), title,
                     marked=marked)

    def _with_settings(self, block: Block, rows: list[Row], keys: list[str]) -> Block:
        """``block`` (one row per entry of ``rows``) with a column per setting after its own."""
        n = len(block.header)
        cells = [c + [fmt_value(r.runs[0].config.get(k)) if r.applies(k) else NOT_APPLICABLE for k in keys]
                 for c, r in zip(block.rows, rows)]
        return Block(block.header + keys, cells, block.align + ["l"] * len(keys), block.title,
                     set(range(n, n + len(keys))), block.marked)

    def text_blocks(self, width: int | None = None) -> list[Block]:
        """The tables of the text output, each no wider than ``width`` where that can be done without cutting
        a metric (None: one row per run, every column; see the module's docstring)."""
        rows = self._ordered_rows()
        groups = self.metric_groups()
        keys = terminal_settings(self)
        multi = len(self.methods()) > 1
        shared = self._metric_block(rows, groups[0][1], "metrics" if multi or width else None, multi)
        if not multi:
            one = self._with_settings(shared, rows, keys)
            one.title = None
            fitted = fit(one, width, transpose_ok=False)
            if not width or fitted[0].width() <= width:
                return fitted
        blocks = fit(shared, width)
        for meth, metrics in groups[1:]:
            own = [r for r in rows if r.method == meth]
            blocks += fit(self._metric_block(own, metrics, f"{meth} metrics", False), width)
        if keys:
            settings = self._with_settings(Block(["run"], [[r.name] for r in rows], ["l"]), rows, keys)
            settings.title = "settings that differ" + (f" ({NOT_APPLICABLE}: not a setting of that method)"
                                                       if any(c == NOT_APPLICABLE for r in settings.rows for c in r)
                                                       else "")
            blocks += fit(settings, width)
        return blocks

    def notes(self, width: int | None = None) -> list[str]:
        """The lines under the tables: what the marks mean, settings left out, the verdicts (wrapped to ``width``)."""
        out = []
        if self.best:
            out.append("* best of its column" + (" among runs of the same method" if len(self.methods()) > 1 else "")
                       + f" ({self.rule_text()})")
        hidden = [k for k in self.diff_keys if k != "method" and k not in terminal_settings(self)]
        if hidden:
            out.append(f"{len(hidden)} more setting(s) differ, each a setting of one run's method only "
                       "(--format markdown or json shows them)")
        if not self.diff_keys:
            out.append("(the runs' configurations do not differ)")
        out = [wrapped for line in out for wrapped in _wrap(line, width, "  ")]
        out += ["", "verdicts:"] + [w for v in self.verdict_lines() for w in _wrap("  " + v, width, "    ")]
        return out

    def to_text(self, width: int | None = None) -> str:
        """The comparison as plain text, laid out for a terminal ``width`` columns wide (None: unlimited)."""
        lines: list[str] = []
        for b in self.text_blocks(width):
            lines += b.lines() + [""]
        return "\n".join(lines + self.notes(width))

    def direction(self, metric: str) -> str | None:
        return column_direction(self.runs, metric)

    def rule_text(self) -> str:
        lows = [HEADERS.get(m, m) for m in self.metrics if self.direction(m) == "min"]
        highs = [HEADERS.get(m, m) for m in self.metrics if self.direction(m) == "max"]
        parts = ([f"lowest: {', '.join(lows)}"] if lows else []) + ([f"highest: {', '.join(highs)}"] if highs else [])
        return "; ".join(parts)

    def to_markdown(self) -> str:
        def esc(s: str) -> str:
            return s.replace("|", "\\|")

        head = self.headers()
        n_text = 1 + self.grouped + len(self.diff_keys)
        lines = ["| " + " | ".join(esc(h) for h in head) + " |",
                 "|" + "|".join("---" if i < n_text else "---:" for i in range(len(head))) + "|"]
        for r in self.rows:
            lines.append("| " + " | ".join(esc(c) for c in self.cell_texts(r, mark=lambda s: f"**{s}**")) + " |")
        out = lines
        if self.best:
            out += ["", f"Best of each column in bold ({self.rule_text()})."]
        if self.grouped:
            out += ["", "Rows group runs that differ only in train.seed: mean ± std over the seeds."]
        out += ["", "Verdicts:", ""] + [f"- `{r.name}`: {r.verdict}" for r in self.runs]
        return "\n".join(out) + "\n"

    def to_json(self) -> dict:
        def num(v):
            return v if _is_num(v) or v is None or isinstance(v, (str, bool)) else str(v)

        runs = []
        for r in self.runs:
            runs.append({"name": r.name, "path": str(r.path), "status": r.status or ("done" if r.summary else None),
                         "verdict": r.verdict, "config": {k: r.config.get(k) for k in self.diff_keys},
                         "metrics": {m: num(metric_value(r, m)) for m in self.metrics}})
        out = {"diff_keys": self.diff_keys, "metrics": self.metrics,
               "directions": {m: self.direction(m) for m in self.metrics}, "runs": runs,
               "best": {m: v for m, v in self.best.items()}, "grouped": self.grouped}
        if self.grouped:
            out["groups"] = [{"name": row.name, "runs": [r.name for r in row.runs],
                              "seeds": [r.seed for r in row.runs], "config": row.config,
                              "metrics": {m: {"mean": num(c.mean), "std": c.std, "n": c.n}
                                          for m, c in row.cells.items()}} for row in self.rows]
        return out


def default_metrics(runs: list[RunInfo]) -> list[str]:
    extra = [m for m in EXTRA_METRICS if any(metric_value(r, m) is not None for r in runs)]
    evals = list(dict.fromkeys(k for r in runs for k in r.evals))
    return DEFAULT_METRICS + extra + evals


def column_direction(runs: list[RunInfo], metric: str) -> str | None:
    """``min``, ``max`` or None: an eval column's from the evaluation's ``higher_is_better``, else by :data:`RULES`."""
    if not metric.startswith(EVAL_PREFIX):
        return direction(metric)
    hib = next((r.evals[metric][1] for r in runs if metric in r.evals and r.evals[metric][1] is not None), None)
    return None if hib is None else ("max" if hib else "min")


def _group_name(runs: list[RunInfo]) -> str:
    stems = {re.sub(r"[-_]?s(eed)?[-_]?\d+$", "", r.name) for r in runs}
    if len(stems) == 1 and next(iter(stems)):
        return next(iter(stems))
    prefix = os.path.commonprefix([r.name for r in runs]).rstrip("-_")
    return prefix or runs[0].name


def _stats(values: list) -> Cell:
    nums = [v for v in values if _is_num(v)]
    if not nums:
        other = next((v for v in values if v is not None), None)
        return Cell(other, None, 0)
    if len(nums) == 1:
        return Cell(nums[0], None, 1)
    mean = sum(nums) / len(nums)
    std = math.sqrt(sum((v - mean) ** 2 for v in nums) / (len(nums) - 1))
    return Cell(mean, std, len(nums))


def perf_metrics(runs: list[RunInfo]) -> list[str]:
    """:data:`PERF_METRICS` with the first of :data:`FLOP_METRICS` that some run has after tokens/s."""
    flop = next((m for m in FLOP_METRICS if any(metric_value(r, m) is not None for r in runs)), None)
    return PERF_METRICS[:1] + ([flop] if flop else []) + PERF_METRICS[1:]


def compare(runs: list[RunInfo], metrics: list[str] | None = None, *, group_seeds: bool = True) -> Comparison:
    """The comparison table of ``runs`` (see the module's docstring)."""
    metrics = list(dict.fromkeys((metrics or default_metrics(runs)) + perf_metrics(runs)))
    diff = config_differences(runs)
    grouped = False
    rows: list[Row] = []
    if group_seeds and "train.seed" in diff and len(runs) > 1:
        others = [k for k in diff if k != "train.seed"]
        groups: dict[str, list[RunInfo]] = {}
        for r in runs:
            key = json.dumps([r.config.get(k) for k in others], sort_keys=True, default=str)
            groups.setdefault(key, []).append(r)
        if any(len(g) > 1 for g in groups.values()):
            grouped = True
            diff = others
            for g in groups.values():
                rows.append(Row(_group_name(g) if len(g) > 1 else g[0].name, g,
                                {k: g[0].config.get(k) for k in diff},
                                {m: _stats([metric_value(r, m) for r in g]) for m in metrics}))
    if not grouped:
        rows = [Row(r.name, [r], {k: r.config.get(k) for k in diff}, {m: Cell(metric_value(r, m)) for m in metrics})
                for r in runs]
    names = [r.name for r in rows]
    if len(set(names)) != len(names):  # two groups named alike: number them
        for i, r in enumerate(rows):
            r.name = f"{r.name}#{i}"
    return Comparison(runs, diff, metrics, rows, grouped, best_rows(rows, metrics, runs))


def best_rows(rows: list[Row], metrics: list[str], runs: list[RunInfo] = ()) -> dict[str, list[str]]:
    """metric -> the names of the rows with its best value, by :func:`column_direction`, among the rows of the same
    method (a loss of DPO and one of SFT measure different things); nothing marked where all are equal."""
    best: dict[str, list[str]] = {}
    for m in metrics:
        d = column_direction(list(runs), m)
        if d is None:
            continue
        for method in dict.fromkeys(r.method for r in rows):
            vals = [(row.cells[m].mean, row.name) for row in rows
                    if row.method == method and _is_num(row.cells[m].mean)]
            if len(vals) < 2 or len({v for v, _ in vals}) == 1:  # all equal: nothing to mark
                continue
            target = min(v for v, _ in vals) if d == "min" else max(v for v, _ in vals)
            best.setdefault(m, []).extend(n for v, n in vals if v == target)
    return best


def _wrap(line: str, width: int | None, indent: str) -> list[str]:
    """``line`` wrapped to ``width`` (None: as it is), its leading spaces kept, continuation lines indented.

    >>> _wrap("  r1: gate fail: val margin -0.1", 20, "    ")
    ['  r1: gate fail: val', '    margin -0.1']
    """
    if not width or len(line) <= width:
        return [line]
    lead = line[: len(line) - len(line.lstrip())]
    return textwrap.wrap(line.lstrip(), width, initial_indent=lead, subsequent_indent=indent, break_on_hyphens=False)


def plot_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def plot_curves(runs: list[RunInfo], metrics: list[str] | None = None, path: str | Path | None = None):
    """One panel per metric, one line per run that logged it; saved as PNG at ``path``. Returns the figure.

    Needs matplotlib (rendered off screen, with the Agg canvas).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib: an optional extra (plot)
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise MlxpostError(f"the curves need matplotlib: {PLOT_HINT}") from None

    metrics = list(metrics or DEFAULT_CURVES)
    n = len(metrics)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(6.4 * cols, 4.2 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for i, m in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, i + 1)
        drawn = 0
        for r in runs:
            steps, values = curve(r, m)
            if not steps:
                continue
            ax.plot(steps, values, marker="o" if len(steps) < 12 else None, markersize=3, linewidth=1.4,
                    label=r.name)
            drawn += 1
        ax.set_title(m)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize="small", loc="best")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(str(path), format="png")
    return fig


def default_png_path(paths: list[str | Path]) -> Path:
    """Beside the sweep (``SWEEP/compare.png``) or in the runs' common parent directory."""
    ps = [Path(p) for p in paths]
    if len(ps) == 1 and (ps[0] / "sweep.json").exists():
        return ps[0] / "compare.png"
    parents = [str(p.resolve().parent) if (p / "config.yaml").exists() else str(p.resolve()) for p in ps]
    return Path(os.path.commonpath(parents)) / "compare.png"
