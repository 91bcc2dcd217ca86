"""Run directories and atomic checkpoints.

A run directory holds::

    config.yaml                 the resolved configuration
    metrics.jsonl               one JSON object per report / evaluation / event
    adapter_config.json         the final adapter (mlx-lm layout: mlx_lm.generate
    adapters.safetensors          --adapter-path RUN_DIR works)
    best/                       the adapter with the lowest validation loss
    checkpoints/step-0000100/   adapter, optimizer state, trainer state (step,
                                data position; the random stream is derived
                                from seed and step); written to a temporary
                                directory and renamed, so a kill never leaves a
                                half-written checkpoint
    checkpoints/latest          name of the newest complete checkpoint
    summary.json                final metrics (also after a failure)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import MlxpostError
from ..files import atomic_write_bytes, atomic_write_json
from ..model.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_weights, load_adapter_weights, save_adapters

STATE_FILE = "trainer_state.json"

OPTIMIZER_FILE = "optimizer.safetensors"


class RunDir:
    def __init__(self, path: str | Path, *, writer: bool = True):
        self.path = Path(path)
        self.writer = writer  # only rank 0 writes
        self.ckpt_dir = self.path / "checkpoints"
        if writer:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            self._recover()

    def _recover(self) -> None:
        """Undo what a kill in the middle of a save can leave behind."""
        for parent in (self.path, self.ckpt_dir):
            for old in parent.glob(".old-*"):  # killed between the two renames of _replace_dir
                final = old.with_name(old.name[len(".old-"):])
                if final.exists():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(old, final)
            for tmp in list(parent.glob(".tmp-*")) + list(parent.glob(".best.tmp")):
                shutil.rmtree(tmp, ignore_errors=True)

    # -- small files ------------------------------------------------------------
    def write_text(self, name: str, text: str) -> None:
        if self.writer:
            atomic_write_bytes(self.path / name, text.encode())

    def write_json(self, name: str, obj: Any) -> None:
        if self.writer:
            atomic_write_json(self.path / name, obj)

    def read_json(self, name: str) -> Any:
        """A JSON file of the run directory, or None when it is missing or unreadable."""
        try:
            return json.loads((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def log(self, record: dict) -> None:
        """Append one line to metrics.jsonl (flushed at once: survives a kill)."""
        if not self.writer:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict]:
        f = self.path / "metrics.jsonl"
        if not f.exists():
            return []
        out = []
        for line in f.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                pass
        return out

    # -- adapters -------------------------------------------------------------
    def save_final(self, model, adapter_cfg: dict) -> None:
        if self.writer:
            save_adapters(model, self.path, adapter_cfg)

    def save_best(self, model, adapter_cfg: dict, info: dict) -> None:
        if not self.writer:
            return
        tmp = self.path / ".best.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapters(model, tmp, adapter_cfg)
        atomic_write_json(tmp / "best.json", info)
        _replace_dir(tmp, self.path / "best")

    # -- checkpoints ------------------------------------------------------------
    def save_checkpoint(self, step: int, model, optimizer, adapter_cfg: dict, state: dict, keep: int) -> Path:
        name = f"step-{step:07d}"
        final = self.ckpt_dir / name
        if not self.writer:
            return final
        tmp = self.ckpt_dir / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        mx.save_safetensors(str(tmp / ADAPTER_WEIGHTS), adapter_weights(model))
        atomic_write_json(tmp / ADAPTER_CONFIG, adapter_cfg)
        opt_state = dict(tree_flatten(optimizer.state))
        mx.save_safetensors(str(tmp / OPTIMIZER_FILE), opt_state)
        atomic_write_json(tmp / STATE_FILE, state)  # written last: marks the checkpoint complete
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _replace_dir(tmp, final)
        atomic_write_bytes(self.ckpt_dir / "latest", name.encode())
        # Prune old checkpoints (never the one just written).
        if keep > 0:
            done = sorted(p for p in self.ckpt_dir.glob("step-*") if (p / STATE_FILE).exists())
            for old in done[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def latest_checkpoint(self) -> Path | None:
        pointer = self.ckpt_dir / "latest"
        if pointer.exists():
            p = self.ckpt_dir / pointer.read_text().strip()
            if (p / STATE_FILE).exists():
                return p
        done = sorted(p for p in self.ckpt_dir.glob("step-*") if (p / STATE_FILE).exists())
        return done[-1] if done else None


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``; an existing ``final`` is swapped out first."""
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore adapter weights and optimizer state; return the trainer state."""
    state = json.loads((path / STATE_FILE).read_text())
    try:
        load_adapter_weights(model, path / ADAPTER_WEIGHTS)
    except MlxpostError as e:
        raise MlxpostError(f"checkpoint {path.name} does not match this run's adapters: {e}") from None
    opt = mx.load(str(path / OPTIMIZER_FILE))
    # Assign leaf by leaf, in place: compiled steps hold references to these
    # containers, and the state tree has non-array leaves a flat file lacks.
    current = dict(tree_flatten(optimizer.state))
    missing = sorted(set(current) - set(opt))
    if missing:
        raise MlxpostError(f"{path / OPTIMIZER_FILE}: optimizer state does not match this run "
                           f"(missing {missing[0]}{' and more' if len(missing) > 1 else ''})")
    for key, value in opt.items():
        _assign(optimizer.state, key.split("."), value)
    mx.eval(model.parameters(), optimizer.state)
    return state


def _assign(tree, parts: list[str], value) -> None:
    for p in parts[:-1]:
        tree = tree[int(p)] if isinstance(tree, list) else tree[p]
    last = parts[-1]
    if isinstance(tree, list):
        tree[int(last)] = value
    else:
        tree[last] = value


def new_run_dir(root: str | Path, name: str | None, method: str, overwrite: bool) -> Path:
    root = Path(root)
    if name is None:
        name = f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = root / name
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not overwrite:
            raise MlxpostError(f"run directory {path} exists; resume it with --resume {path}, "
                               "pick another --name, or pass --overwrite")
        if not (path / "config.yaml").exists() and not (path / "metrics.jsonl").exists():
            raise MlxpostError(f"{path} exists and is not an mlxpost run directory; --overwrite only "
                               "replaces run directories")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path
