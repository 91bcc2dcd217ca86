"""Sweep plans: the grid of overrides, its points, their names and configurations."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import RunConfig, _fields, build_config, parse_set, set_value, validate
from ..errors import ConfigError

# Sections a grid may not vary: the sweep decides where runs go.
_FORBIDDEN = ("output.", "method")


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
