"""Reference log-probs computed once before training (``--precompute-ref``), cached beside the data.

The reference of DPO is the model with its adapters switched off. Its
log-probs of the training pairs never change, so they can be computed once
(one forward pass per batch instead of one per step) and read back in every
later run on the same model and data. Training then runs the policy only.

The cache file is keyed by a fingerprint of

* the model as it is in memory with adapters off: parameter names, shapes,
  dtypes and a strided sample of every base tensor's values (this covers the
  checkpoint, the dtype, quantization and an SFT adapter merged with
  ``--from``);
* the adapter merged with ``--from`` (its weight file's hash), named separately;
* the data exactly as trained: every pair's tokens and masks (this covers the
  files, the tokenizer, the chat template and truncation).

Stored per pair: the reference log-prob of every completion token of the
chosen and the rejected side, so per-token quantities (the KL estimate,
mean-reduced losses) work as with the live reference. File:
``<data dir>/.mlxpost-cache/ref-<fingerprint>.npz``, written atomically
(``preference.ref_cache_dir`` chooses another directory).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..core.logprobs import HeadSplit, logprobs
from ..core.pairs import PairSource
from ..model.lora import adapters_off

if TYPE_CHECKING:  # annotations only: the pipeline imports the methods
    from ..training.pipeline import Prepared
from ..core.batches import batch_from_arrays
from ..files import cache_root

CACHE_VERSION = 1


def model_fingerprint(model: nn.Module, samples: int = 2048) -> str:
    """A hash of the base weights as they are in memory (adapter tensors excluded)."""
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    h = hashlib.sha256()
    for name, p in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        if name in trainable:
            continue
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        flat = p.reshape(-1)
        step = max(1, flat.size // samples)
        sample = flat[::step][:samples]
        if sample.dtype in (mx.bfloat16, mx.float16):
            sample = sample.astype(mx.float32)
        h.update(np.array(sample).tobytes())
    return h.hexdigest()


def data_fingerprint(pairs: list) -> str:
    h = hashlib.sha256()
    for p in pairs:
        for ex in (p.chosen, p.rejected):
            h.update(ex.tokens.tobytes())
            h.update(np.packbits(ex.mask).tobytes())
            h.update(b"|")
    return h.hexdigest()


def fingerprint(model: nn.Module, pairs: list, adapter_hash: str | None = None) -> str:
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}".encode())
    h.update(model_fingerprint(model).encode())
    h.update((adapter_hash or "-").encode())
    h.update(data_fingerprint(pairs).encode())
    return h.hexdigest()[:24]


def compute(model: nn.Module, source: PairSource, split: HeadSplit | None = None, progress=None) -> list:
    """Reference log-probs of every pair of ``source``: ``[(chosen_values, rejected_values), ...]``.

    Pairs are visited in length order (little padding), with the adapters
    off and the model in evaluation mode. ``progress(done, total)`` is called
    after each batch.
    """
    n = len(source.examples)
    order = sorted(range(n), key=lambda i: len(source.examples[i]))
    out: list = [None] * n
    saved = source.ref
    source.ref = None
    was_training = model.training
    model.eval()

    def ref_tokens(arrays):
        batch = batch_from_arrays(arrays)
        with adapters_off(model):
            return logprobs(model, batch, reduction="none", split=split, select=batch.select)

    # Not compiled: one pass over the data, where compilation (a JIT build on
    # Linux) would cost more than it saves.
    step = ref_tokens
    try:
        P = source.batch_size
        for s in range(0, n, P):
            idx = order[s:s + P]
            batch = source.build_pairs(idx)  # packed like the training batches when they are
            tok = np.array(step(batch.arrays()))
            seq = np.array(batch.extra["seq"]) if batch.extra and "seq" in batch.extra else None
            for k, i in enumerate(idx):
                p = source.examples[i]
                sides = []
                for key, ex in ((k, p.chosen), (P + k, p.rejected)):
                    if batch.entries:  # pairs sharing their prompt: a sequence's trained entries, in order
                        sides.append(tok[seq == key].astype(np.float32))
                        continue
                    # A sequence's positions, in order: its row (padded) or its span of a packed row.
                    values = tok[key] if seq is None else tok[seq == key]
                    sides.append(values[np.flatnonzero(ex.mask[1:])].astype(np.float32))
                out[i] = tuple(sides)
            if progress:
                progress(min(s + P, n), n)
    finally:
        source.ref = saved
        if was_training:
            model.train()
    return out


def cache_path(directory: Path, key: str) -> Path:
    return Path(directory) / f"ref-{key}.npz"


def save(path: Path, ref: list, meta: dict) -> None:
    """Write ``ref`` atomically (ragged arrays as values + offsets)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for side, name in ((0, "chosen"), (1, "rejected")):
        vals = [r[side] for r in ref]
        arrays[f"{name}_offsets"] = np.cumsum([0] + [len(v) for v in vals]).astype(np.int64)
        arrays[f"{name}_values"] = np.concatenate(vals).astype(np.float32) if vals else np.zeros(0, np.float32)
    arrays["meta"] = np.frombuffer(repr(sorted(meta.items())).encode(), dtype=np.uint8)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path, pairs: list) -> list | None:
    """The cached values for ``pairs``, or None when the file does not fit them."""
    try:
        with np.load(path) as z:
            parts = {}
            for name in ("chosen", "rejected"):
                off, vals = z[f"{name}_offsets"], z[f"{name}_values"]
                parts[name] = [vals[off[i]:off[i + 1]] for i in range(len(off) - 1)]
    except (OSError, KeyError, ValueError):
        return None
    if len(parts["chosen"]) != len(pairs):
        return None
    out = []
    for p, c, r in zip(pairs, parts["chosen"], parts["rejected"]):
        if len(c) != p.chosen.n_targets or len(r) != p.rejected.n_targets:
            return None
        out.append((c, r))
    return out


def default_cache_dir(data_path: Path) -> Path:
    base = data_path if data_path.is_dir() else data_path.parent
    return base / ".mlxpost-cache"


def writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


def precompute_reference(prep: Prepared, rep, *, cache_dir: str | None = None) -> None:
    """``--precompute-ref``: reference log-probs of every pair once, from the cache when it fits.

    ``cache_dir``: where to cache them (default: ``.mlxpost-cache`` beside the data).
    """
    data_path = prep.data_path
    directory = Path(cache_dir) if cache_dir else default_cache_dir(data_path)
    if not writable(directory):
        fallback = cache_root() / "ref"
        rep.warn(f"{directory} is not writable; caching reference log-probs in {fallback}")
        directory = fallback
    adapter_hash = prep.adapter_cfg["mlxpost"].get("from_adapter_sha256")
    for name, src in (("train", prep.train), ("valid", prep.valid)):
        if src is None or not src.examples:
            continue
        key = fingerprint(prep.loaded.model, src.examples, adapter_hash)
        path = cache_path(directory, key)
        ref = load(path, src.examples) if path.exists() else None
        if ref is not None:
            rep.info(f"reference log-probs ({name}): from the cache {path}")
        else:
            t0 = time.time()
            with rep.status(f"computing reference log-probs of {len(src.examples)} {name} pairs"):
                ref = compute(prep.loaded.model, src, prep.split)
            save(path, ref, {"model": prep.cfg.model.path, "data": str(data_path), "split": name})
            dt = time.time() - t0
            prep.timings["precompute_ref_seconds"] = round(prep.timings.get("precompute_ref_seconds", 0.0) + dt, 2)
            rep.info(f"reference log-probs ({name}): computed in {dt:.1f}s, cached in {path}")
        src.set_reference(ref)
