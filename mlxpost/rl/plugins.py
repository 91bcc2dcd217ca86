"""User functions for rewards and verifiers: loaded by name, called with the columns they ask for.

:func:`load_callable` resolves ``path/to/file.py:function``,
``package.module:function`` or a built-in name; :class:`ColumnArgs` passes a
function only the dataset columns its signature names; errors name the
function, the row and its source (:func:`where_label`, :func:`describe_exception`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import MlxpostError

_FILE_MODULES: dict[Path, Any] = {}


def _import_file(path: Path, kind: str, spec: str):
    path = path.resolve()
    if path in _FILE_MODULES:
        return _FILE_MODULES[path]
    stem = re.sub(r"\W", "_", path.stem)
    name = f"_mlxpost_user_{stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    ispec = importlib.util.spec_from_file_location(name, path)
    if ispec is None or ispec.loader is None:
        raise MlxpostError(f"{kind} {spec!r}: cannot load {path} as a Python file")
    module = importlib.util.module_from_spec(ispec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    sys.path.insert(0, str(path.parent))  # so the file can import its neighbours
    try:
        ispec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - user code; report where it failed
        sys.modules.pop(name, None)
        raise MlxpostError(f"{kind} {spec!r}: importing {path} failed: {describe_exception(e)}") from e
    finally:
        try:
            sys.path.remove(str(path.parent))
        except ValueError:
            pass
    _FILE_MODULES[path] = module
    return module


def load_callable(spec: str | Callable, *, kind: str, builtins: Mapping[str, Callable],
                  base_dir: str | Path | None = None) -> Callable:
    """Resolve a built-in name, ``path/to/file.py:name`` or ``package.module:name``.

    ``kind`` ("reward", "verifier") is used in error messages. A callable is
    returned as it is. Relative file paths are taken from ``base_dir`` when
    given, else from the current directory. ``name`` may be dotted
    (``file.py:Class.method``).
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise MlxpostError(f"{kind}: expected a name or FILE.py:FUNCTION, got {spec!r}")
    spec = spec.strip()
    if spec in builtins:
        return builtins[spec]
    usage = (f"built-in {kind}s: {', '.join(builtins)}; for your own function write "
             f"path/to/file.py:FUNCTION or package.module:FUNCTION")
    if ":" not in spec:
        if spec.endswith(".py"):
            raise MlxpostError(f"{kind} {spec!r}: name the function in the file, e.g. {spec}:my_{kind}")
        raise MlxpostError(f"unknown {kind} {spec!r} ({usage})")
    where, _, attr = spec.rpartition(":")
    if not where or not attr or not all(p.isidentifier() for p in attr.split(".")):
        raise MlxpostError(f"{kind} {spec!r}: expected FILE.py:FUNCTION or MODULE:FUNCTION ({usage})")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if not path.is_file():
            raise MlxpostError(f"{kind} {spec!r}: file not found: {path}")
        module = _import_file(path, kind, spec)
        origin = str(path)
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise MlxpostError(f"{kind} {spec!r}: no module named {e.name!r} "
                               f"(for a file write path/to/file.py:{attr})") from e
        except Exception as e:  # noqa: BLE001
            raise MlxpostError(f"{kind} {spec!r}: importing {where} failed: {describe_exception(e)}") from e
        origin = f"module {where}"
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                           and getattr(v, "__module__", None) == module.__name__)
            have = f" (functions there: {', '.join(names)})" if names else ""
            raise MlxpostError(f"{kind} {spec!r}: {origin} has no {attr!r}{have}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise MlxpostError(f"{kind} {spec!r}: {attr} is a {type(obj).__name__}, not a function")
    return obj


def describe_exception(e: BaseException) -> str:
    """``ValueError: bad thing (at my_rewards.py:12)`` — the innermost frame is the user's code."""
    text = f"{type(e).__name__}: {e}"
    frames = traceback.extract_tb(e.__traceback__)
    if frames:
        last = frames[-1]
        text += f" (at {Path(last.filename).name}:{last.lineno})"
    return text


class ColumnArgs:
    """Which columns to pass to a user function as keyword arguments.

    A function with ``**kwargs`` gets every column; otherwise only the columns
    it names. A parameter without a default (after the first, positional one)
    is a column the data must have.
    """

    def __init__(self, fn: Callable, *, kind: str, name: str):
        self.kind, self.name = kind, name
        self.takes_all = True
        self.accepted: set[str] = set()
        self.required: list[str] = []
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return  # builtins without a signature: pass everything
        params = list(sig.parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if not positional and not any(p.kind == p.VAR_POSITIONAL for p in params):
            raise MlxpostError(f"{kind} {name}: must take the completion{'s' if kind == 'reward' else ''} "
                               f"as its first argument, got signature {sig}")
        rest = params[1:] if positional and params[0] is positional[0] else params
        self.takes_all = any(p.kind == p.VAR_KEYWORD for p in params)
        for p in rest:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                self.accepted.add(p.name)
                if p.default is p.empty:
                    self.required.append(p.name)

    def check(self, available: Mapping[str, Any]) -> None:
        missing = [r for r in self.required if r not in available]
        if missing:
            cols = ", ".join(sorted(available)) or "none"
            raise MlxpostError(f"{self.kind} {self.name} needs column {missing[0]!r}, which the data does "
                               f"not have (columns: {cols})")

    def select(self, columns: Mapping[str, Any]) -> dict[str, Any]:
        if self.takes_all:
            return dict(columns)
        return {k: v for k, v in columns.items() if k in self.accepted}


def where_label(row: int | str, sources: Any = None) -> str:
    """``row 3`` or ``row 3 (train.jsonl:12)``."""
    label = f"row {row}" if isinstance(row, int) else str(row)
    if sources is not None and isinstance(row, int) and 0 <= row < len(sources) and sources[row]:
        label += f" ({sources[row]})"
    return label
