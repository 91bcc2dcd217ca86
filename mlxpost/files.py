"""Small file helpers every layer uses: atomic writes, file hashes, the cache directory.

A write goes to a temporary file beside the target, is flushed to disk and
renamed over the target, so a reader (or a run killed mid-write) sees the old
file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
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


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2) + "\n").encode())


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


def cache_root() -> Path:
    """mlxpost's cache directory: ``$MLXPOST_CACHE`` or ``~/.cache/mlxpost``."""
    env = os.environ.get("MLXPOST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mlxpost"


def read_json(path: Path) -> Any:
    """A JSON file's content; a file that is not valid JSON is an error naming its line."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise MlxpostError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
