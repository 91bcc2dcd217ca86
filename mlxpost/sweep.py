"""Ablation sweeps: one base configuration, a grid of overrides, every point an ordinary run.

``mlxpost ablate --config recipe.yaml --grid lora.rank=4,8,16 --grid dpo.beta=0.05,0.1 --seeds 3``
expands the cartesian product of the grid (or ``--random N`` points of it,
drawn without replacement), times the seeds, checks every point's
configuration before anything runs, and trains the points one after the
other in this process. The sweep directory holds ``sweep.json`` (the grid,
the points, their overrides, run names and status, rewritten atomically at
every change of status) and one ordinary run directory per point::

    runs/sweep-20261122-101500/
      sweep.json
      r04-b0.05-s0/      config.yaml, metrics.jsonl, adapters, summary.json, ...
      r04-b0.05-s1/
      ...

A point that fails (bad data for that setting, a non-finite loss, any
exception) is recorded with its reason and the sweep goes on; Ctrl-C marks
the running point interrupted and stops. ``--resume SWEEP_DIR`` runs only
what is missing: finished points are skipped, an interrupted or failed point
continues from its last checkpoint when it has one and starts over
otherwise.

Work shared between points (:class:`RunCache`): the base model is loaded
once; every run gets it back with the weights and module tree it had right
after loading (adapters of the previous run removed), and tokenized data is
kept by (files, tokenizer, data settings). Reference log-probs
(``--precompute-ref``) are cached on disk already (:mod:`mlxpost.reference`).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math
import random
import re
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .config import RunConfig, _fields, parse_set, set_value, validate
from .errors import ConfigError, MlxpostError

SWEEP_FILE = "sweep.json"
STATUSES = ("pending", "running", "done", "failed", "interrupted")
# Sections a grid may not vary: the sweep decides where runs go.
_FORBIDDEN = ("output.", "method")


# ---------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------


@dataclass
class GridAxis:
    """One ``--grid KEY=V1,V2,...`` option: a key and its values (with their text)."""

    key: str
    values: list
    raws: list[str]
    option: str  # as typed, for messages

    @property
    def where(self) -> str:
        return f"--grid {self.option}"


def split_values(text: str) -> list[str]:
    """Split at the commas outside brackets and quotes: ``4,[q_proj,v_proj],'a,b'`` -> 3 items."""
    items, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    items.append("".join(cur))
    return [i.strip() for i in items]


def parse_grid(option: str) -> GridAxis:
    """``KEY=V1,V2,...``; each value is read as ``--set KEY=V`` reads its value (YAML: numbers, booleans, lists)."""
    if "=" not in option:
        raise ConfigError(f"--grid {option}: expected KEY=V1,V2,... (e.g. --grid lora.rank=4,8,16)")
    key, raw = option.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--grid {option}: no key before '='")
    if key == "method" or key.startswith("output."):
        raise ConfigError(f"--grid {option}: {key} cannot vary within a sweep "
                          f"({'one method per sweep' if key == 'method' else 'the sweep names its run directories'})")
    raws = split_values(raw)
    if any(r == "" for r in raws):
        raise ConfigError(f"--grid {option}: empty value (values are separated by commas: {key}=1,2,3)")
    values = [parse_set(f"{key}={r}")[1] for r in raws]
    seen: dict[str, str] = {}
    for r, v in zip(raws, values):
        canon = json.dumps(v, sort_keys=True, default=str)
        if canon in seen:
            raise ConfigError(f"--grid {option}: the value {r!r} is listed twice")
        seen[canon] = r
    return GridAxis(key, values, raws, option)


def grid_size(axes: list[GridAxis]) -> int:
    return math.prod(len(a.values) for a in axes) if axes else 1


def _combination(axes: list[GridAxis], i: int) -> list[int]:
    """The ``i``-th combination of the cartesian product (last axis fastest), as value indices."""
    idx = []
    for a in reversed(axes):
        i, r = divmod(i, len(a.values))
        idx.append(r)
    return list(reversed(idx))


def expand(axes: list[GridAxis], *, seeds: int = 1, base_seed: int = 0, random_n: int | None = None,
           random_seed: int = 0) -> list[list[tuple[str, Any, str]]]:
    """The points of a sweep: each a list of (key, value, raw text) overrides.

    The cartesian product of the axes in order (the last axis varies
    fastest), or ``random_n`` of its combinations drawn without replacement
    with ``random_seed`` (kept in grid order), each repeated for ``seeds``
    seeds (``train.seed = base_seed + s``).
    """
    n = grid_size(axes)
    if random_n is not None:
        if random_n <= 0:
            raise ConfigError(f"--random {random_n}: must be positive")
        chosen = sorted(random.Random(random_seed).sample(range(n), min(random_n, n)))
    else:
        chosen = range(n)
    points = []
    for c in chosen:
        combo = [(a.key, a.values[j], a.raws[j]) for a, j in zip(axes, _combination(axes, c))]
        if seeds > 1:
            for s in range(seeds):
                seed = base_seed + s
                points.append(combo + [("train.seed", seed, str(seed))])
        else:
            points.append(combo)
    return points


# ---------------------------------------------------------------------------
# Point names
# ---------------------------------------------------------------------------


def _abbrev(key: str, level: int) -> str:
    section, _, name = key.rpartition(".")
    words = [w for w in name.split("_") if w]
    if level == 0:
        return "".join(w[0] for w in words)
    if level == 1:
        return words[0][:2] + "".join(w[0] for w in words[1:])
    if level == 2:
        return name.replace("_", "")
    if level == 3:
        return (section[:1] + name).replace("_", "")
    return key.replace(".", "_")


def _abbreviations(keys: list[str]) -> dict[str, str]:
    for level in range(5):
        ab = {k: _abbrev(k, level) for k in keys}
        if len(set(ab.values())) == len(keys):
            return ab
    return {k: k.replace(".", "_") for k in keys}


def _value_text(v: Any, width: int = 0) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"{v:0{width}d}" if v >= 0 else str(v)
    if isinstance(v, float):
        return f"{v:g}".replace("e-0", "e-").replace("e+0", "e").replace("e+", "e")
    if v is None:
        return "none"
    if isinstance(v, (list, tuple)):
        return "+".join(_value_text(x) for x in v)
    return str(v)


def point_names(points: list[list[tuple[str, Any, str]]], max_len: int = 40) -> list[str]:
    """Short readable names, ``r08-b0.05-s0``: an abbreviation of each key and its value.

    Integers are zero-padded to the widest value of their key so that names
    sort in grid order; when names would collide or grow too long, ``p000``, ``p001``, ...
    """
    if not points:
        return []
    keys = list(dict.fromkeys(k for p in points for k, _, _ in p))
    if not keys:
        return [f"p{i:03d}" for i in range(len(points))]
    ab = _abbreviations(keys)
    width = {k: max((len(str(v)) for p in points for kk, v, _ in p if kk == k and isinstance(v, int)
                     and not isinstance(v, bool) and v >= 0), default=0) for k in keys}
    names = []
    for p in points:
        parts = [ab[k] + _value_text(v, width[k]) for k, v, _ in p]
        name = re.sub(r"[^A-Za-z0-9.+_-]", "_", "-".join(parts))
        names.append(name)
    digits = max(3, len(str(len(points) - 1)))
    if len(set(names)) != len(names) or any(len(n) > max_len for n in names):
        return [f"p{i:0{digits}d}" for i in range(len(points))]
    return names


# ---------------------------------------------------------------------------
# Planning: every point's configuration, checked before anything runs
# ---------------------------------------------------------------------------


@dataclass
class Point:
    index: int
    name: str
    overrides: dict  # dotted key -> value
    sets: list  # the same as --set KEY=VALUE strings
    config: dict  # the resolved configuration (RunConfig.to_dict())
    status: str = "pending"
    reason: str | None = None
    error_type: str | None = None
    exit_code: int | None = None
    traceback: str | None = None
    verdict: str | None = None
    attempts: int = 0
    started: float | None = None
    finished: float | None = None
    seconds: float | None = None
    # Live progress (also written, so sweep.json shows how far a point got).
    step: int = 0
    total: int | None = None
    loss: float | None = None
    val_loss: float | None = None
    best_val: float | None = None
    warnings: int = 0

    @property
    def label(self) -> str:
        return " ".join(f"{k}={_short(v)}" for k, v in self.overrides.items())

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Point":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _short(v: Any) -> str:
    if isinstance(v, float):
        return _value_text(v)
    if isinstance(v, list):
        return "[" + ",".join(map(str, v)) + "]"
    return str(v)


def _jsonable(v: Any) -> Any:
    """YAML may read dates and other objects; sweep.json keeps them as text."""
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


@dataclass
class SweepPlan:
    method: str
    base: RunConfig
    axes: list[GridAxis]
    seeds: int
    random_n: int | None
    random_seed: int
    points: list[Point]
    recipe: str | None = None
    sets: list = field(default_factory=list)
    cli: dict = field(default_factory=dict)


def recipe_method(recipe: str | Path | None) -> str | None:
    """The ``method:`` a recipe declares (None: the recipe says nothing; it is then sft)."""
    if not recipe:
        return None
    p = Path(recipe)
    if not p.exists():
        raise ConfigError(f"recipe not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError:
        return None  # build_config reports it with the line
    return data.get("method") if isinstance(data, dict) and isinstance(data.get("method"), str) else None


def plan_sweep(*, method: str | None = None, recipe: str | Path | None = None, sets: list[str] = (),
               cli: dict | None = None, grid: list[str] = (), seeds: int = 1, random_n: int | None = None,
               random_seed: int = 0) -> SweepPlan:
    """Parse the grid, expand the points and build (and check) every point's configuration.

    Errors name the option at fault: ``--grid lora.rank=4,0: lora.rank: must be positive, got 0``;
    a problem only a combination has names the point.
    """
    from .config import build_config

    declared = recipe_method(recipe)
    method = method or declared or "sft"
    base = build_config(recipe, list(sets), cli=cli, method=method)
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: must be 1 or more")
    axes = [parse_grid(g) for g in grid]
    keys = [a.key for a in axes]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup:
        raise ConfigError(f"--grid {dup}: given twice; list all its values in one option ({dup}=V1,V2,...)")
    if not axes and seeds <= 1:
        raise ConfigError("nothing to sweep: give at least one --grid KEY=V1,V2,... or --seeds N (N > 1)")
    if seeds > 1 and "train.seed" in keys:
        raise ConfigError("--seeds and --grid train.seed=...: give one or the other")
    fixed = {parse_set(s)[0]: f"--set {s}" for s in sets}
    fixed.update({k: f"--{k.split('.')[-1].replace('_', '-')}" for k, v in (cli or {}).items() if v is not None})
    for a in axes:
        if a.key in fixed:
            raise ConfigError(f"{a.where}: {a.key} is also fixed by {fixed[a.key]}; drop one of them")
    # Each value alone on the base: a bad key or value is blamed on its own --grid option.
    for a in axes:
        for v, r in zip(a.values, a.raws):
            cfg = copy.deepcopy(base)
            set_value(cfg, a.key, v, a.where, raw=r)
            try:
                validate(cfg)
            except ConfigError as e:
                raise ConfigError(f"{a.where}: value {r!r}: {e}") from None
    raw_points = expand(axes, seeds=seeds, base_seed=base.train.seed, random_n=random_n, random_seed=random_seed)
    names = point_names(raw_points)
    points = []
    where = {a.key: a.where for a in axes}
    where["train.seed"] = "--seeds"
    for i, (ov, name) in enumerate(zip(raw_points, names)):
        cfg = copy.deepcopy(base)
        for k, v, r in ov:
            set_value(cfg, k, v, where[k], raw=r)
        label = " ".join(f"{k}={r}" for k, _, r in ov)
        try:
            validate(cfg)
        except ConfigError as e:
            raise ConfigError(f"sweep point {name} ({label}): {e}") from None
        points.append(Point(index=i, name=name, overrides={k: _jsonable(v) for k, v, _ in ov},
                            sets=[f"{k}={r}" for k, _, r in ov], config=_jsonable(cfg.to_dict())))
    return SweepPlan(method, base, axes, seeds, random_n, random_seed, points,
                     recipe=str(recipe) if recipe else None, sets=list(sets),
                     cli={k: _jsonable(v) for k, v in (cli or {}).items() if v is not None})


def config_from_dict(d: dict, where: str) -> RunConfig:
    """A RunConfig from its ``to_dict()`` form (as stored in sweep.json), type-checked again."""
    cfg = RunConfig(method=d.get("method", "sft"))
    for section, values in d.items():
        if section == "method":
            continue
        if isinstance(values, dict) and dataclasses.is_dataclass(getattr(cfg, section, None)):
            known = _fields(getattr(cfg, section))
            for k, v in values.items():
                if k in known:
                    set_value(cfg, f"{section}.{k}", v, where)
        else:
            set_value(cfg, section, values, where)
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------
# Reuse across the runs of one process
# ---------------------------------------------------------------------------


def _copy_tree(v: Any) -> Any:
    """A copy of the containers (lists, tuples, plain dicts) around modules and arrays, which are kept."""
    import mlx.nn as nn

    if isinstance(v, nn.Module):
        return v
    if isinstance(v, list):
        return [_copy_tree(x) for x in v]
    if isinstance(v, tuple):
        return tuple(_copy_tree(x) for x in v)
    if isinstance(v, dict):
        return {k: _copy_tree(x) for k, x in v.items()}
    return v


def _modules_in(v: Any):
    import mlx.nn as nn

    if isinstance(v, nn.Module):
        yield v
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from _modules_in(x)
    elif isinstance(v, dict):
        for x in v.values():
            yield from _modules_in(x)


def _copy_attrs(attrs: dict) -> dict:
    return {k: (copy.copy(v) if isinstance(v, (set, list, dict)) else v) for k, v in attrs.items()}


class ModelSnapshot:
    """The module tree of a model as loaded: restoring it undoes everything a run did.

    A run attaches adapters by replacing linear layers with LoRA layers (which
    keep the original layer inside), freezes and unfreezes parameters,
    switches train/eval mode, may swap block classes (gradient checkpointing)
    and, with ``--from``, replaces layers by merged ones. The base weights
    themselves are never changed in place: the optimizer updates adapter
    leaves only, and frozen arrays are immutable. So restoring means putting
    back, in every module of the original tree, its children and arrays
    (the very same objects), its class and its attributes.
    """

    def __init__(self, model):
        self.entries = []
        seen: set[int] = set()
        stack = [model]
        while stack:
            m = stack.pop()
            if id(m) in seen:
                continue
            seen.add(id(m))
            items = {k: _copy_tree(v) for k, v in dict.items(m)}
            self.entries.append((m, type(m), items, _copy_attrs(vars(m))))
            for v in dict.values(m):
                stack.extend(_modules_in(v))

    def restore(self) -> None:
        for m, cls, items, attrs in self.entries:
            if type(m) is not cls:
                m.__class__ = cls
            dict.clear(m)
            dict.update(m, {k: _copy_tree(v) for k, v in items.items()})
            vars(m).clear()
            vars(m).update(_copy_attrs(attrs))


def _file_key(path: Path) -> tuple:
    try:
        st = path.stat()
        return (str(path.resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        return (str(path),)


class RunCache:
    """What consecutive runs in one process share: the loaded base model and tokenized data.

    Passed to :func:`mlxpost.runner.run` (``cache=``). ``model()`` returns
    the cached model restored to its state right after loading (one model is
    kept: a sweep over ``model.path`` loads each in turn); ``data()`` returns
    the tokenized examples of a (files, tokenizer, data settings, seed) seen before.
    """

    def __init__(self, max_data: int = 4):
        self._model_key = None
        self._model = None
        self._snapshot: ModelSnapshot | None = None
        self._data: OrderedDict = OrderedDict()
        self.max_data = max_data
        self.stats = {"model_hits": 0, "model_loads": 0, "data_hits": 0, "data_reads": 0}

    @staticmethod
    def model_key(m) -> tuple:
        p = Path(str(m.path)).expanduser()
        where = _file_key(p / "config.json" if p.is_dir() else p) if p.exists() else (m.path,)
        return (m.path, where, m.revision, m.dtype, m.quantize, m.quantize_group_size if m.quantize else None,
                m.trust_remote_code)

    def model(self, m, load: Callable):
        key = self.model_key(m)
        if self._model is not None and key == self._model_key:
            self._snapshot.restore()
            self.stats["model_hits"] += 1
            return self._model
        self.clear_model()  # never two models in memory at once
        loaded = load()
        self._model_key, self._model, self._snapshot = key, loaded, ModelSnapshot(loaded.model)
        self.stats["model_loads"] += 1
        return loaded

    def clear_model(self) -> None:
        self._model_key = self._model = self._snapshot = None
        gc.collect()

    def data(self, cfg: RunConfig, loaded, kind: str, rank: int, world: int, read: Callable):
        from .data import resolve_data_files
        from .runner import default_data_dir

        d = cfg.data
        files = resolve_data_files(d.path or default_data_dir(kind), d.valid)
        # The seed picks the held-out validation rows when there is no validation file.
        seed = cfg.train.seed if "valid" not in files else None
        key = (kind, rank, world, str(Path(loaded.path).resolve()), json.dumps(dataclasses.asdict(d), default=str),
               seed, tuple(sorted((k, _file_key(v)) for k, v in files.items())))
        if key in self._data:
            self._data.move_to_end(key)
            self.stats["data_hits"] += 1
        else:
            self._data[key] = read()
            self.stats["data_reads"] += 1
            while len(self._data) > self.max_data:
                self._data.popitem(last=False)
        train, valid, stats, tstats = self._data[key]
        return list(train), (list(valid) if valid is not None else None), copy.deepcopy(stats), tstats


# ---------------------------------------------------------------------------
# Reporting: a wrapper per point, and the sweep's own view
# ---------------------------------------------------------------------------


class PlainView:
    """The sweep as lines: a point starts, a point ends (the run's own lines come from its reporter)."""

    def __init__(self, stream=None):
        import sys

        self.stream = stream or sys.stdout
        self.sweep: Sweep | None = None

    def _print(self, msg: str) -> None:
        print(msg, file=self.stream, flush=True)

    def start(self, sweep: "Sweep") -> None:
        self.sweep = sweep
        todo = sum(p.status != "done" for p in sweep.points)
        self._print(f"sweep {sweep.path}: {len(sweep.points)} points, {todo} to run")

    def point_started(self, p: Point) -> None:
        n = len(self.sweep.points) if self.sweep else "?"
        self._print(f"[{p.index + 1}/{n}] {p.name}: started ({p.label})")

    def update(self, p: Point) -> None: ...

    def point_finished(self, p: Point) -> None:
        n = len(self.sweep.points) if self.sweep else "?"
        extra = f" in {p.seconds:.1f}s" if p.seconds is not None else ""
        self._print(f"[{p.index + 1}/{n}] {p.name}: {p.status}{extra}: {p.verdict or p.reason or ''}")

    def log(self, msg: str) -> None:
        self._print(msg)

    def stop(self) -> None: ...


class _Prefixed:
    """Plain lines of one point's run, prefixed with the point's name."""

    def __init__(self, name: str, stream=None):
        from .ui import PlainReporter

        class Reporter(PlainReporter):
            def _print(self, msg: str) -> None:
                for line in str(msg).splitlines() or [""]:
                    super()._print(f"[{name}] {line}")

        self.reporter = Reporter(stream)

    def __getattr__(self, item):
        return getattr(self.reporter, item)


class ViewOnlyReporter:
    """For the live table: the run says nothing itself; its warnings and errors go to the view."""

    def __init__(self, view, name: str):
        self.view, self.name = view, name

    def __getattr__(self, item):  # info, tables, samples, progress: shown by the table, not here
        return lambda *a, **k: None

    def status(self, msg: str):
        import contextlib

        return contextlib.nullcontext()

    def warn(self, msg: str) -> None:
        self.view.log(f"[{self.name}] warning: {msg}")

    def error(self, msg: str) -> None:
        self.view.log(f"[{self.name}] error: {msg}")


class PointReporter:
    """Wraps the reporter of one point's run: forwards every call, and keeps the point's progress."""

    def __init__(self, inner, point: Point, view):
        self.inner, self.point, self.view = inner, point, view
        self._last = 0.0

    def __getattr__(self, item):
        return getattr(self.inner, item)

    def _changed(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last > 0.2:
            self._last = now
            self.view.update(self.point)

    def begin(self, total: int, start: int = 0, display: tuple = ()) -> None:
        self.point.total, self.point.step = total, start
        self.inner.begin(total, start, display)
        self._changed(force=True)

    def advance(self, step: int) -> None:
        self.point.step = step
        self.inner.advance(step)
        self._changed()

    def report(self, step: int, metrics: dict) -> None:
        self.point.step = step
        if metrics.get("loss") is not None:
            self.point.loss = float(metrics["loss"])
        self.inner.report(step, metrics)
        self._changed(force=True)

    def eval(self, step: int, val: dict, best: float | None = None, improved: bool = False) -> None:
        self.point.val_loss = val.get("val_loss")
        self.point.best_val = best
        self.inner.eval(step, val, best=best, improved=improved)
        self._changed(force=True)

    def warn(self, msg: str) -> None:
        self.point.warnings += 1
        self.inner.warn(msg)


# ---------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------


class SweepInterrupted(Exception):
    pass


def _first_line(text: str, limit: int = 300) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


class Sweep:
    def __init__(self, path: Path, meta: dict, points: list[Point]):
        self.path = Path(path)
        self.meta = meta
        self.points = points

    # -- creation and storage ------------------------------------------------
    @classmethod
    def create(cls, plan: SweepPlan, out: str | Path | None = None, name: str | None = None) -> "Sweep":
        root = Path(out) if out else Path(plan.base.output.dir)
        name = name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
        if "/" in name or name in (".", ".."):
            raise ConfigError(f"--name {name}: a directory name, not a path (use --out for the parent)")
        path = root / name
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            hint = f"resume it with --resume {path}" if (path / SWEEP_FILE).exists() else "pick another --name"
            raise MlxpostError(f"{path} exists; {hint}")
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "kind": "mlxpost-sweep", "version": 1, "name": name, "method": plan.method,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "status": "pending",
            "recipe": plan.recipe, "sets": plan.sets, "cli": plan.cli,
            "grid": {a.key: [_jsonable(v) for v in a.values] for a in plan.axes},
            "grid_options": [a.option for a in plan.axes], "seeds": plan.seeds,
            "random": plan.random_n, "random_seed": plan.random_seed, "grid_size": grid_size(plan.axes),
        }
        sweep = cls(path, meta, plan.points)
        sweep.save()
        return sweep

    @classmethod
    def load(cls, path: str | Path) -> "Sweep":
        path = Path(path)
        f = path / SWEEP_FILE
        if not f.exists():
            raise MlxpostError(f"{path}: no {SWEEP_FILE} (not a sweep directory)")
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise MlxpostError(f"{f}:{e.lineno}: not valid JSON ({e.msg})") from None
        if data.get("kind") != "mlxpost-sweep":
            raise MlxpostError(f"{f}: not an mlxpost sweep file")
        points = [Point.from_json(p) for p in data.pop("points")]
        return cls(path, data, points)

    def save(self) -> None:
        from .model import atomic_write_json

        self.meta["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_json(self.path / SWEEP_FILE, {**self.meta, "points": [p.to_json() for p in self.points]})

    def run_dir(self, p: Point) -> Path:
        return self.path / p.name

    def counts(self) -> dict:
        return {s: sum(p.status == s for p in self.points) for s in STATUSES}

    def exit_code(self) -> int:
        c = self.counts()
        if c["interrupted"] or self.meta.get("status") == "interrupted":
            return 130
        if c["failed"]:
            return 1
        return 0 if c["done"] == len(self.points) else 1

    # -- running --------------------------------------------------------------
    def _point_config(self, p: Point, restart: bool) -> RunConfig:
        cfg = config_from_dict(p.config, f"{self.path / SWEEP_FILE} ({p.name})")
        cfg.output.dir = str(self.path)
        cfg.output.name = p.name
        cfg.output.overwrite = restart
        return cfg

    def _how_to_start(self, p: Point) -> tuple[str, Path | None]:
        """``fresh``, ``restart`` (a run directory without a usable checkpoint), ``resume`` or ``finished``."""
        d = self.run_dir(p)
        if not d.exists() or not any(d.iterdir()):
            return "fresh", None
        summary = d / "summary.json"
        if summary.exists():
            try:
                s = json.loads(summary.read_text())
            except json.JSONDecodeError:
                s = {}
            if s.get("stopped") in ("completed", "early_stopping"):
                return "finished", None
        if not (d / "config.yaml").exists():
            return "restart", None
        ckpt_dir = d / "checkpoints"
        latest = None
        pointer = ckpt_dir / "latest"
        if pointer.exists() and (ckpt_dir / pointer.read_text().strip() / "trainer_state.json").exists():
            latest = ckpt_dir / pointer.read_text().strip()
        if latest is None:
            done = sorted(c for c in ckpt_dir.glob("step-*") if (c / "trainer_state.json").exists())
            latest = done[-1] if done else None
        if latest is None:
            return "restart", None
        state = json.loads((latest / "trainer_state.json").read_text())
        if state.get("stopped") or state.get("step", 0) >= state.get("total_steps", math.inf):
            return "restart", None  # trained to the end but killed before its summary: cheaper to redo than patch
        return "resume", d

    def run(self, *, view=None, inner_reporter: Callable[[Point], Any] | None = None,
            cache: RunCache | None = None, run_fn: Callable | None = None) -> int:
        """Run every point that is not done; returns the exit code (0 all done, 1 some failed, 130 interrupted).

        ``inner_reporter(point)``: the reporter the point's run talks to
        (wrapped to track progress); default: the view's choice.
        ``run_fn``: :func:`mlxpost.runner.run` (tests may wrap it).
        """
        import mlx.core as mx

        from .runner import run as runner_run

        if mx.distributed.init().size() > 1:
            raise MlxpostError("a sweep runs in one process; start it without mpirun / mlx.launch")
        run_fn = run_fn or runner_run
        view = view or PlainView()
        cache = cache if cache is not None else RunCache()
        if inner_reporter is None:
            inner_reporter = getattr(view, "reporter_for", None) or (lambda p: _Prefixed(p.name))
        self.meta["status"] = "running"
        self.save()
        view.start(self)
        try:
            for p in self.points:
                if p.status == "done":
                    continue
                self._run_point(p, view, inner_reporter, cache, run_fn)
        except (SweepInterrupted, KeyboardInterrupt):
            for p in self.points:  # Ctrl-C outside a run (between points): nothing half-done is left "running"
                if p.status == "running":
                    p.status, p.reason, p.exit_code = "interrupted", "interrupted (Ctrl-C)", 130
            self.meta["status"] = "interrupted"
        else:
            self.meta["status"] = "done" if self.exit_code() == 0 else "failed"
        finally:
            self.save()
            view.stop()
        return self.exit_code()

    def _run_point(self, p: Point, view, inner_reporter, cache: RunCache, run_fn) -> None:
        import mlx.core as mx

        from .runner import resume_config
        from .train import NonFiniteError

        how, resume = self._how_to_start(p)
        if how == "finished":  # finished, but the sweep was stopped before it could say so
            p.status, p.reason = "done", None
            p.verdict = point_verdict(p, self.run_dir(p))
            self.save()
            view.point_finished(p)
            return
        p.status, p.reason, p.error_type, p.exit_code, p.traceback = "running", None, None, None, None
        p.started, p.finished, p.seconds = time.time(), None, None
        p.attempts += 1
        p.step, p.loss, p.val_loss, p.best_val, p.warnings = 0, None, None, None, 0
        self.save()
        view.point_started(p)
        rep = PointReporter(inner_reporter(p), p, view)
        try:
            if how == "resume":
                rep.info(f"continuing {resume} from its last checkpoint")
                cfg = resume_config(resume, [])
            else:
                cfg = self._point_config(p, restart=how == "restart")
            mx.reset_peak_memory()  # the summary's peak memory is this run's, not the process's
            run_fn(cfg, reporter=rep, resume=resume, cache=cache)
        except KeyboardInterrupt:
            p.status = "interrupted"
            p.reason = f"interrupted (Ctrl-C) at step {p.step}" + (f" of {p.total}" if p.total else "")
            p.exit_code = 130
            self._finish(p, view)
            raise SweepInterrupted from None
        except NonFiniteError as e:
            self._failed(p, e, 3)
        except MlxpostError as e:
            self._failed(p, e, 2)
        except Exception as e:  # noqa: BLE001 - one point's bug must not end the sweep; recorded below
            self._failed(p, e, 1, tb=traceback.format_exc())
        else:
            p.status, p.exit_code = "done", 0
        finally:
            mx.clear_cache()
        if p.status != "interrupted":
            self._finish(p, view)

    def _failed(self, p: Point, e: BaseException, code: int, tb: str | None = None) -> None:
        p.status, p.exit_code, p.error_type = "failed", code, type(e).__name__
        msg = _first_line(str(e)) or type(e).__name__
        p.reason = msg if isinstance(e, MlxpostError) else f"{type(e).__name__}: {msg}"
        if tb:
            p.traceback = tb[-4000:]

    def _finish(self, p: Point, view) -> None:
        p.finished = time.time()
        p.seconds = round(p.finished - (p.started or p.finished), 1)
        p.verdict = point_verdict(p, self.run_dir(p))
        self.save()
        view.point_finished(p)


def point_verdict(p: Point, run_dir: Path) -> str:
    from .compare import run_verdict

    summary = None
    f = run_dir / "summary.json"
    if f.exists():
        try:
            summary = json.loads(f.read_text())
        except json.JSONDecodeError:
            summary = None
    return run_verdict(summary, status=p.status, reason=p.reason, run_dir=run_dir)
