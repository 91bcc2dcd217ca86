"""Run directories: atomic, verified checkpoints, and one process at a time.

A run directory holds::

    config.yaml                 the resolved configuration
    metrics.jsonl               one JSON object per report / evaluation / event
    adapter_config.json         the final adapter in mlx-lm's layout (mlx_lm.generate
    adapters.safetensors          --adapter-path RUN_DIR works); for a run trained
                                  --from others, the whole stack as one adapter
    own/                        only for a run trained --from others: its own
                                  adapter (what --from, exports and mlxpost read)
    best/                       the adapter with the lowest validation loss (same layout)
    checkpoints/step-0000100/   adapter, optimizer state, trainer state (step,
                                data position; the random stream is derived
                                from seed and step); written to a temporary
                                directory and renamed, so a kill never leaves a
                                half-written checkpoint
    checkpoints/latest          name of the newest complete checkpoint
    checkpoints/damaged/        checkpoints a resume found damaged (kept, never used)
    summary.json                final metrics (also after a failure)
    .lock                       the pid of the process training here

A kill cannot leave a checkpoint half written, but a disk can: the trainer
state (written last) records each file's size and sha256, and
:func:`verify_checkpoint` checks them before a resume trusts a checkpoint.
The process that trains holds an OS lock on ``.lock`` (``flock``: the kernel
drops it when the process dies, however it dies), so a second ``--resume`` or
an ``--overwrite`` of a live run is refused instead of mixing two runs.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import shutil
import time
from pathlib import Path
from typing import IO, Any

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import MlxpostError
from ..files import (
    atomic_write_bytes,
    atomic_write_json,
    file_record,
    json_text,
    record_problem,
    safetensors_problem,
    save_safetensors_atomic,
    shown_path,
)
from ..hub.export import write_combined_adapter
from ..model.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    OWN_DIR,
    adapter_weights,
    load_adapter_weights,
    save_adapters,
)
from .faults import fault_point

STATE_FILE = "trainer_state.json"

OPTIMIZER_FILE = "optimizer.safetensors"

CHECKPOINT_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, OPTIMIZER_FILE)  # checked against the trainer state's record

LOCK_FILE = ".lock"

# Records that mean a run has trained (a directory holding one is never discarded).
PROGRESS_KINDS = ("step", "train", "failure")


def is_stacked(adapter_cfg: dict) -> bool:
    """Whether the adapter was trained on top of another (``--from``): its run directory then has ``own/``."""
    return bool((adapter_cfg.get("mlxpost") or {}).get("from_adapter"))


class RunLocked(MlxpostError):
    """Another live process holds the run directory."""


class RunDir:
    """One run's directory. ``lock=True``: hold its lock (before anything is cleaned up or written)."""

    def __init__(self, path: str | Path, *, writer: bool = True, lock: bool = False):
        self.path = Path(path)
        self.writer = writer  # only rank 0 writes
        self.ckpt_dir = self.path / "checkpoints"
        self.created = False  # this process made the directory (it may discard it, see discard())
        self.trained = False  # a step, report or failure was logged by this process
        self.tracker = None  # an experiment tracker (--report-to, mlxpost.training.trackers) that log() feeds
        self._lock: IO | None = None
        if writer:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            if lock:
                self._lock = acquire_lock(self.path)
            self._recover()

    # -- one process at a time ----------------------------------------------------
    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the descriptor releases the flock
            self._lock = None

    def discard(self) -> bool:
        """Remove the directory when this process created it and nothing trained in it (a run that failed
        before its first step leaves nothing behind, so the same command can run again). True if removed."""
        if not (self.writer and self.created and self._lock is not None) or self.trained:
            return False
        if any(self.ckpt_dir.glob("step-*")) or (self.path / "failure.json").exists():
            return False
        shutil.rmtree(self.path, ignore_errors=True)
        self.unlock()
        return True

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
        """Append one line to metrics.jsonl (flushed at once: survives a kill), and pass it to the tracker."""
        if not self.writer:
            return
        record = {"time": round(time.time(), 3), **record}
        if record.get("kind") in PROGRESS_KINDS:
            self.trained = True
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json_text(record, indent=None) + "\n")
            f.flush()
        if self.tracker is not None:
            self.tracker.log(record)

    def close_tracker(self) -> None:
        if self.tracker is not None:
            tracker, self.tracker = self.tracker, None
            tracker.close()

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
        """The final adapter in the run directory (each file atomic; a resume rewrites them all if this was cut).

        A run trained on top of others (``--from``) writes its own adapter to
        ``own/``, then the whole stack as one mlx-lm adapter at the top
        (:func:`~mlxpost.hub.export.write_combined_adapter`); when mlx-lm
        cannot hold the stack, why is logged and the top level holds no adapter.
        """
        if not self.writer:
            return
        stacked = is_stacked(adapter_cfg)
        target = self.path / OWN_DIR if stacked else self.path
        target.mkdir(exist_ok=True)
        save_safetensors_atomic(target / ADAPTER_WEIGHTS, adapter_weights(model))
        fault_point("final_save")
        atomic_write_json(target / ADAPTER_CONFIG, adapter_cfg)
        if stacked:
            self._note_mlx_lm(write_combined_adapter(self.path))

    def save_best(self, model, adapter_cfg: dict, info: dict) -> None:
        """``best/``: the adapter of the lowest validation loss, laid out as the final one (:meth:`save_final`)."""
        if not self.writer:
            return
        tmp = self.path / ".best.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        stacked = is_stacked(adapter_cfg)
        save_adapters(model, tmp / OWN_DIR if stacked else tmp, adapter_cfg)
        note = write_combined_adapter(tmp) if stacked else None
        atomic_write_json(tmp / "best.json", info)
        _replace_dir(tmp, self.path / "best")
        self._note_mlx_lm(note)

    def _note_mlx_lm(self, note: str | None) -> None:
        if note and not any(r.get("kind") == "mlx_lm" for r in self.read_metrics()):  # said once
            self.log({"kind": "mlx_lm", "message": f"no adapter for mlx-lm at the top of the run directory: {note}"})

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
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        # Written last: marks the checkpoint complete, and records what a resume verifies.
        files = {name: file_record(tmp / name) for name in CHECKPOINT_FILES}
        atomic_write_json(tmp / STATE_FILE, {**state, "files": files})
        _replace_dir(tmp, final)
        atomic_write_bytes(self.ckpt_dir / "latest", name.encode())
        # Prune old checkpoints (never the one just written).
        if keep > 0:
            done = sorted(p for p in self.ckpt_dir.glob("step-*") if (p / STATE_FILE).exists())
            for old in done[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints (their trainer state written), newest first."""
        return sorted((p for p in self.ckpt_dir.glob("step-*") if (p / STATE_FILE).exists()), reverse=True)

    def set_aside(self, ckpt: Path) -> Path | None:
        """Move a damaged checkpoint to ``checkpoints/damaged/`` (kept for inspection, never resumed from)."""
        if not self.writer:
            return None
        shelf = self.ckpt_dir / "damaged"
        shelf.mkdir(exist_ok=True)
        dest = next(shelf / f"{ckpt.name}{f'-{i}' if i > 1 else ''}" for i in itertools.count(1)
                    if not (shelf / f"{ckpt.name}{f'-{i}' if i > 1 else ''}").exists())
        os.replace(ckpt, dest)
        return dest

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


def read_checkpoint_state(path: Path) -> tuple[dict | None, str | None]:
    """A checkpoint's trainer state, or why it cannot be read."""
    try:
        state = json.loads((path / STATE_FILE).read_bytes())
    except FileNotFoundError:
        return None, f"{STATE_FILE} is missing"
    except (OSError, ValueError, RecursionError):
        return None, f"{STATE_FILE} is not valid JSON"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(state.get("data"), dict):
        return None, f"{STATE_FILE} has no step or data position"
    return state, None


def verify_checkpoint(path: Path) -> tuple[dict | None, str | None]:
    """``(trainer state, None)`` when every file of the checkpoint is as it was written, else ``(None, problem)``.

    Checkpoints record each file's size and sha256 in their trainer state;
    for one written before that, the safetensors headers and sizes are checked.
    """
    state, problem = read_checkpoint_state(path)
    if problem:
        return None, problem
    records = state.get("files")
    for name in CHECKPOINT_FILES:
        if isinstance(records, dict):
            problem = record_problem(path / name, records.get(name) or {})
        elif not (path / name).is_file():
            problem = f"{name} is missing"
        elif name.endswith(".safetensors"):
            problem = safetensors_problem(path / name)
        if problem:
            return None, problem
    return state, None


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore adapter weights and optimizer state; return the trainer state."""
    state, problem = read_checkpoint_state(path)
    if problem:
        raise MlxpostError(f"checkpoint {path}: {problem}")
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


LOCK_TRIES = 5  # a lock found held is tried again this many times, 50 ms apart (see is_locked)


def acquire_lock(directory: Path) -> IO:
    """Hold ``directory``'s lock (an OS file lock, released when the process ends); refuse when another has it.

    A held lock is tried again a few times over 0.2 s before refusing: :func:`is_locked` (``mlxpost runs``)
    holds it for a moment to probe it, which must never refuse a run.
    """
    f = open(Path(directory) / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the run: the lock lives with it
    for attempt in range(LOCK_TRIES):
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            if attempt + 1 < LOCK_TRIES:
                time.sleep(0.05)
    else:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise RunLocked(f"{shown_path(directory)} is in use: process {pid} is training in it (wait for it to end, or stop it "
                        f"with kill {pid}); one process at a time may write a run directory") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def is_locked(directory: str | Path) -> bool:
    """Whether a live process holds ``directory``'s lock (is training in it).

    Probed with a shared lock taken and released at once (flock cannot be
    queried otherwise); :func:`acquire_lock` retries, so a probe at the moment
    a run starts delays it by 50 ms rather than refusing it.
    """
    try:
        f = open(Path(directory) / LOCK_FILE, "rb")  # noqa: SIM115 - closed below
    except OSError:
        return False
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return False


def new_run_dir(root: str | Path, name: str | None, method: str, overwrite: bool) -> Path:
    """A new, empty run directory: ``root/name``, or ``root/<method>-<time>`` (with ``-2``, ``-3``, ... when
    a run started in the same second has that name). ``overwrite`` replaces an old run of that name, unless
    a live process holds it."""
    root = Path(root)
    if name is None:
        root.mkdir(parents=True, exist_ok=True)
        stamp = f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"
        for i in itertools.count(1):
            path = root / (stamp if i == 1 else f"{stamp}-{i}")
            try:
                path.mkdir()  # atomic: of two processes, one gets each name
                return path
            except FileExistsError:
                continue
    path = root / name
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not overwrite:
            raise MlxpostError(f"run directory {shown_path(path)} exists; resume it with --resume {shown_path(path)}, "
                               "pick another --name, or pass --overwrite")
        if not (path / "config.yaml").exists() and not (path / "metrics.jsonl").exists():
            raise MlxpostError(f"{shown_path(path)} exists and is not an mlxpost run directory; --overwrite only "
                               "replaces run directories")
        try:
            held = acquire_lock(path)  # held while deleting: no resume can start in it meanwhile
        except RunLocked as e:
            raise RunLocked(f"--overwrite refused: {e}") from None
        try:
            shutil.rmtree(path)
        finally:
            held.close()
    path.mkdir(parents=True, exist_ok=True)
    return path
