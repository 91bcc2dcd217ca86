"""``mlxpost runs [DIR]``: what has been run under a directory, one line per run, newest first.

Every run directory (one holding ``config.yaml``) under ``DIR`` is read from
its files alone (config.yaml, summary.json, failure.json, the first and last
records of metrics.jsonl, the checkpoints' names); no model is loaded, so
listing hundreds of runs takes a moment. Per run: its method, its status, its
steps, its key final metrics and quality gate, its wall time, its base model
and the run it was trained on top of (``--from``), with the whole chain
(``dpo ← sft``).

Status (:meth:`RunEntry.progress`): ``finished N/M``; ``stopped at N/M``
(killed or interrupted: ``--resume`` continues it); ``failed at N/M`` (a
non-finite loss: failure.json); ``running N/M`` (a process holds the run's
lock: :func:`mlxpost.training.rundir.is_locked`); ``not started``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import MlxpostError
from ..files import shown_path
from ..methods import METHODS
from ..training.rundir import is_locked
from .compare import RunInfo, _read_json, metric_value, read_run
from .table import Block, fit

# (metric, label): a run's key final metrics are the first SHOWN_METRICS of these it has.
KEY_METRICS = [
    ("val_loss", "val_loss"), ("val_rewards/margins", "margin"), ("val_rewards/accuracies", "pref_acc"),
    ("eval_after.final_acc", "final_acc"), ("eval_after.step_acc", "step_acc"),
    ("behaviour.correct.after", "correct"), ("behaviour.json.after", "json"),
    ("behaviour.explanation_first.after", "expl_first"), ("eval_after.reward", "reward"), ("loss", "loss"),
]

SHOWN_METRICS = 3

SKIPPED_DIRS = {"checkpoints", "best", "own", "__pycache__"}  # never hold runs of their own

MAX_DEPTH = 4  # DIR/sweep/point is depth 2; deeper trees are not looked into

TAIL_BYTES = 1 << 16  # the end of metrics.jsonl read for the last step (a long run's file is large)


@dataclass
class RunEntry:
    """One run as the listing shows it."""

    path: Path
    name: str  # relative to the listed directory
    method: str | None
    status: str  # finished | stopped | failed | running | not started
    step: int | None  # steps done
    total: int | None  # steps planned
    started: float | None  # epoch seconds (the first record of metrics.jsonl)
    wall_seconds: float | None
    base: str | None
    parent: str | None  # the --from run or adapter directory (absolute, as config.yaml records it)
    metrics: dict[str, float] = field(default_factory=dict)  # label -> value
    gate: str | None = None  # pass | fail | skip | None
    warnings: list[str] = field(default_factory=list)
    reason: str | None = None  # why it failed
    chain: list[str] = field(default_factory=list)  # the --from ancestors' names, parent first

    def progress(self) -> str:
        """Status and steps: ``finished 40/40``, ``stopped at 7/40``, ``failed at 3/40 (non-finite loss)``,
        ``running 12/40``, ``not started``."""
        of = f"/{self.total}" if self.total else ""
        step = self.step if self.step is not None else 0
        if self.status == "finished":
            return f"finished {step}{of}" + (" (early stop)" if self.total and step < self.total else "")
        if self.status in ("stopped", "failed"):
            return f"{self.status} at {step}{of}" + (f" ({self.reason})" if self.reason else "")
        if self.status == "running":
            return f"running {step}{of}"
        return self.status

    def to_json(self) -> dict:
        return {**asdict(self), "path": str(self.path), "progress": self.progress()}


def find_runs(root: str | Path, max_depth: int = MAX_DEPTH) -> list[Path]:
    """Run directories under ``root`` (itself, when it is one); a run's own subdirectories are not searched."""
    root = Path(root)
    if not root.is_dir():
        raise MlxpostError(f"{root}: no such directory")
    found: list[Path] = []

    def walk(d: Path, depth: int) -> None:
        if (d / "config.yaml").is_file():
            found.append(d)
            return
        if depth >= max_depth:
            return
        try:
            subdirs = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:  # unreadable: nothing to list there
            return
        for p in subdirs:
            if p.name not in SKIPPED_DIRS:
                walk(p, depth + 1)

    walk(root, 0)
    return found


def _records_at_ends(path: Path) -> tuple[dict | None, list[dict]]:
    """The first record of metrics.jsonl and the records of its last :data:`TAIL_BYTES` (lines cut by a kill
    or by the window are skipped)."""
    try:
        with open(path, "rb") as f:
            first_line = f.readline()
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read()
    except OSError:
        return None, []

    def parse(line: bytes) -> dict | None:
        try:
            r = json.loads(line)
        except ValueError:
            return None
        return r if isinstance(r, dict) else None

    return parse(first_line), [r for r in map(parse, tail.splitlines()) if r is not None]


def _last_step(run: Path, records: list[dict]) -> int | None:
    steps = [int(r["step"]) for r in records if r.get("kind") in ("train", "step") and isinstance(r.get("step"), int)]
    ckpts = [int(m.group(1)) for p in (run / "checkpoints").glob("step-*")
             if (m := re.fullmatch(r"step-(\d+)", p.name))]
    return max(steps + ckpts, default=None)


def _status(run: RunInfo, records: list[dict], first: dict | None) -> tuple[str, int | None, str | None]:
    """(status, steps done, failure reason) of a run, from its files."""
    s = run.summary or {}
    failure = _read_json(run.path / "failure.json")
    last = _last_step(run.path, records)
    if is_locked(run.path):
        return "running", last, None
    if failure or s.get("stopped") == "non_finite":
        reason = (failure or {}).get("reason") or "non-finite loss"
        return "failed", (failure or {}).get("step", s.get("steps", last)), reason
    if run.summary is not None:
        return "finished", s.get("steps"), None
    if first is None:
        return "not started", None, None
    return "stopped", last or 0, None


def parent_of(config: dict) -> str | None:
    """The ``--from`` run of a run's flattened configuration: its method's ``from_key``, else any ``*.from_run``."""
    method = METHODS.get(str(config.get("method")))
    keys = [method.from_key] if method is not None and method.from_key else []
    keys += [k for k in config if k.endswith(".from_run")]
    return next((str(config[k]) for k in keys if config.get(k)), None)


def _key_metrics(run: RunInfo) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, label in KEY_METRICS:
        if name == "loss" and out:
            continue  # the train loss only when nothing better was measured
        v = metric_value(run, name)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[label] = v
        if len(out) == SHOWN_METRICS:
            break
    return out


def read_entry(path: Path, root: Path) -> RunEntry:
    """One run directory as a :class:`RunEntry` (``root``: the listed directory, for its name)."""
    run = read_run(path)
    first, records = _records_at_ends(path / "metrics.jsonl")
    status, step, reason = _status(run, records, first)
    setup = first if first and first.get("kind") == "setup" else {}
    total = run.config.get("train.steps") or setup.get("steps")
    s = run.summary or {}
    started = first.get("time") if first else None
    wall = s.get("wall_seconds")
    if wall is None and started is not None and records:
        wall = max(0.0, float(records[-1].get("time", started)) - float(started))
    health = s.get("health") or {}
    gate = (health.get("quality_gate") or {}).get("verdict")
    warnings = [c for c, h in health.items() if isinstance(h, dict) and h.get("verdict") == "warn"]
    try:
        name = str(path.resolve().relative_to(root.resolve())) if path.resolve() != root.resolve() else path.name
    except ValueError:
        name = shown_path(path)
    return RunEntry(path.resolve(), name, run.config.get("method"), status, step, total, started, wall,
                    run.config.get("model.path"), parent_of(run.config), _key_metrics(run), gate, warnings, reason)


def list_runs(root: str | Path = "runs") -> list[RunEntry]:
    """The runs under ``root``, newest first, each with its ``--from`` chain named (see the module's docstring)."""
    root = Path(root)
    entries = []
    for p in find_runs(root):
        try:
            entries.append(read_entry(p, root))
        except MlxpostError:  # a damaged config.yaml: listed as such rather than hiding the others
            entries.append(RunEntry(p.resolve(), p.name, None, "unreadable config.yaml", None, None, None, None, None,
                                    None))
    by_path = {str(e.path): e for e in entries}
    for e in entries:
        seen, parent = {str(e.path)}, e.parent
        while parent and parent not in seen:
            seen.add(parent)
            known = by_path.get(str(Path(parent).resolve())) or by_path.get(parent)
            e.chain.append(known.name if known else shown_path(parent))
            parent = known.parent if known else None
    entries.sort(key=lambda e: e.started if e.started is not None else _mtime(e.path), reverse=True)
    return entries


def _mtime(path: Path) -> float:
    try:
        return (path / "config.yaml").stat().st_mtime
    except OSError:
        return 0.0


def _duration(seconds: float | None) -> str:
    """Wall time in a few characters.

    >>> [_duration(x) for x in (None, 42.4, 754, 7300)]
    ['-', '42s', '12m34s', '2h01m']
    """
    if seconds is None:
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _base_name(base: str | None) -> str:
    return shown_path(base) if base else "-"


def _number(v: float) -> str:
    """A metric in a few characters.

    >>> [_number(x) for x in (0.0, 0.18181818, 0.6786144, 0.0302447, 12.3456, 1234.5)]
    ['0', '0.182', '0.679', '0.0302', '12.3', '1.23e+03']
    """
    return f"{v:.3g}"


def entries_block(entries: list[RunEntry], metrics: int = SHOWN_METRICS, base: bool = True,
                  cut_chain: bool = True) -> Block:
    """The listing as a table: run, method, status and steps, ``metrics`` key final metrics, gate, wall time,
    base model (``base``), the ``--from`` chain (cut in the middle to fit only when ``cut_chain``)."""
    rows = []
    for e in entries:
        shown = "  ".join(f"{k} {_number(v)}" for k, v in list(e.metrics.items())[:metrics]) or "-"
        warned = len(e.warnings)
        gate = (e.gate or "-") + (f", {warned} warn" if warned else "")  # health warnings: summary.json names them
        rows.append([e.name, e.method or "-", e.progress(), shown, gate, _duration(e.wall_seconds)]
                    + ([_base_name(e.base)] if base else []) + [" ← ".join(e.chain) or "-"])
    header = ["run", "method", "status", "final metrics", "gate", "wall"] + (["base"] if base else []) + ["from"]
    n = len(header)
    return Block(header, rows, ["l", "l", "l", "l", "l", "r"] + ["l"] * (n - 6),
                 shrink={4} | ({n - 2} if base else set()) | ({n - 1} if cut_chain else set()))


def listing(entries: list[RunEntry], width: int | None) -> tuple[Block, str | None]:
    """The table for a terminal ``width`` columns wide (None: no limit), and a note under it.

    One line per run. When all runs share a base model it is said once under
    the table instead of on every line. The ``--from`` chain is what ties
    stacked runs together, so it is kept whole as long as anything else can
    give: lines too wide get their gate and base cut in the middle, then show
    fewer key metrics (numbers are never cut; ``--json`` has them all); only
    when one metric still does not fit is the chain cut too.
    """
    bases = {e.base for e in entries}
    same = len(bases) == 1
    note = f"base model of every run: {_base_name(next(iter(bases)))}" if same and entries else None
    for cut_chain in (False, True):
        for n in range(SHOWN_METRICS, 0, -1):
            block = fit(entries_block(entries, n, base=not same, cut_chain=cut_chain), width, transpose_ok=False)[0]
            if not width or block.width() <= width:
                return block, note
    return block, note
