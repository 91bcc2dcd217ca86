"""Small file helpers every layer uses: atomic writes, strict JSON, file hashes and checks, the cache directory.

A write goes to a temporary file beside the target, is flushed to disk and
renamed over the target, so a reader (or a run killed mid-write) sees the old
file or the new one, never half of one. JSON is written strictly (no bare
``NaN``, which strict readers reject). A file written for later use can be
recorded (:func:`file_record`: size and sha256) and checked against that
record (:func:`record_problem`); a safetensors file can be checked against
its own header (:func:`safetensors_problem`): a file cut short is found
before a loader fails on it with a message that names no file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import mlx.core as mx

from .errors import MlxpostError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by its name, so that it is strict JSON.

    Python's json writes a bare ``NaN`` or ``Infinity``, which JSON itself
    (and most readers outside Python) rejects; a string keeps what happened.

    >>> strict_json({"loss": float("nan"), "steps": [1.5, float("-inf")], "ok": True})
    {'loss': 'NaN', 'steps': [1.5, '-Infinity'], 'ok': True}
    """
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def json_text(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj`` (see :func:`strict_json`)."""
    return json.dumps(strict_json(obj), indent=indent, allow_nan=False)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json_text(obj) + "\n").encode())


def save_safetensors_atomic(path: Path, arrays: dict[str, mx.array], metadata: dict | None = None) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.safetensors")
    mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | Path) -> dict:
    """What :func:`record_problem` checks a file against later: its size and sha256."""
    return {"size": Path(path).stat().st_size, "sha256": file_sha256(path)}


def record_problem(path: str | Path, record: dict) -> str | None:
    """Why ``path`` no longer matches ``record`` (missing, cut short, changed), or None when it does."""
    path = Path(path)
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if size != record.get("size"):
        return f"{path.name} has {size:,} bytes, {record.get('size'):,} were written"
    if file_sha256(path) != record.get("sha256"):
        return f"{path.name} does not match its checksum (the file changed after it was written)"
    return None


def safetensors_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a complete safetensors file, or None when its header and size agree.

    A safetensors file is an 8-byte little-endian header length N, N bytes of
    JSON header naming each tensor's ``data_offsets`` (from the end of the
    header), then the data: a file shorter than the largest offset was cut
    short (an interrupted download or copy). The data itself is not read.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if size == 0:
                return f"{path.name} is empty"
            if len(head) < 8:
                return f"{path.name} is cut short ({size} bytes, not even a header)"
            n = int.from_bytes(head, "little")
            if n > min(size - 8, 100 << 20):
                return f"{path.name} is cut short or not a safetensors file (its header claims {n:,} bytes)"
            header = json.loads(f.read(n))
    except OSError as e:
        return f"{path.name} cannot be read ({e.strerror or e})"
    except (ValueError, RecursionError):
        return f"{path.name} is damaged (its header is not valid JSON)"
    if not isinstance(header, dict):
        return f"{path.name} is damaged (its header is not a JSON object)"
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        offsets = t.get("data_offsets") if isinstance(t, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"{path.name} is damaged (tensor {name!r} has no valid data_offsets)"
        end = max(end, offsets[1])
    if 8 + n + end > size:
        return f"{path.name} is cut short: {size:,} of {8 + n + end:,} bytes"
    return None


def shown_path(path: str | Path) -> str:
    """``path`` as messages show it: relative to the current directory when it lies below it.

    Run directories store absolute paths (they must mean the same from
    anywhere); people read shorter ones. A name that is not an absolute
    path (a Hugging Face repo id) is shown as it is.

    >>> shown_path(Path.cwd() / "runs" / "sft-1") == str(Path("runs") / "sft-1")
    True
    >>> shown_path("HuggingFaceTB/SmolLM2-135M-Instruct"), shown_path("/")
    ('HuggingFaceTB/SmolLM2-135M-Instruct', '/')
    """
    p = Path(path)
    if not p.is_absolute():
        return str(path)
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def cache_root() -> Path:
    """mlxpost's cache directory: ``$MLXPOST_CACHE`` or ``~/.cache/mlxpost``."""
    env = os.environ.get("MLXPOST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mlxpost"


def read_json(path: Path) -> Any:
    """A JSON file's content; a file that is not valid JSON (or not UTF-8, or nested too deep) is an error naming it."""
    try:
        return json.loads(Path(path).read_bytes())
    except json.JSONDecodeError as e:
        raise MlxpostError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise MlxpostError(f"{path}: not UTF-8 text (byte {e.start + 1})") from None
    except RecursionError:
        raise MlxpostError(f"{path}: JSON nested too deep to read") from None
