"""Padded and packed batches of examples, and the resumable stream that yields them.

Every batch is a :class:`Batch` of fixed-width rows. Each example of ``T``
tokens contributes ``T - 1`` positions: ``inputs = tokens[:-1]``,
``targets = tokens[1:]``, ``weights = mask[1:]``.

* **pad**: one example per row, rows of similar length grouped together
  (length buckets), right padding to a multiple of ``pad_multiple``.
* **pack**: several examples per row (best-fit), rows of exactly
  ``row_len`` positions. ``segments`` numbers the examples within a row
  (``-1`` for padding); attention is causal *and* restricted to the same
  segment (:mod:`mlxpost.core.forward`), so no example sees another.
* **pairs**: :mod:`mlxpost.core.pairs`.

Batch plans are pure functions of ``(seed, epoch)``, so a resumed run sees the
same batches in the same order (see :meth:`BatchSource.state`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterator, Sequence

import mlx.core as mx
import numpy as np

from ..data.load import Example
from ..errors import MlxpostError


@dataclass
class Batch:
    inputs: mx.array  # (B, L) int32
    targets: mx.array  # (B, L) int32
    weights: mx.array  # (B, L) float32, 1.0 where the target is trained
    segments: mx.array | None  # (B, L) int32 for packed rows, else None
    n_tokens: int = 0  # real (non-padding) input positions
    n_targets: int = 0  # trained positions
    n_examples: int = 0
    # (index (K,), valid (K,)): see selection(); shared-prompt pair batches add
    # targets (K,): each entry is a (position, target) and a position may serve two.
    select: tuple | None = None
    sources: list[str] | None = None  # "file:line" of each example, for error messages
    extra: dict | None = None  # further arrays a method needs (e.g. precomputed reference log-probs)
    branches: mx.array | None = None  # (B, L) int32, shared-prompt pairs: 0 prompt, 1 chosen, 2 rejected
    positions: mx.array | None = None  # (B, L) int32 RoPE positions, when they are not the row's own

    @property
    def entries(self) -> bool:
        """Whether log-probs of this batch come per selected entry (K,) rather than per position (B, L)."""
        return per_entry(self.select)

    def arrays(self) -> dict:
        """The arrays a compiled step receives (one structure per batch layout: a new one is traced once)."""
        out = {"inputs": self.inputs, "targets": self.targets, "weights": self.weights}
        if self.segments is not None:
            out["segments"] = self.segments
        if self.select is not None:
            out["select"] = self.select
        if self.extra:
            out["extra"] = self.extra
        if self.branches is not None:
            out["branches"] = self.branches
        if self.positions is not None:
            out["positions"] = self.positions
        return out


def per_entry(select: tuple | None) -> bool:
    """Whether a selection carries its own targets, ``(index, valid, targets)`` (see :class:`Batch`)."""
    return select is not None and len(select) == 3


def batch_from_arrays(arrays: dict) -> Batch:
    """Rebuild a :class:`Batch` view (arrays only) inside a compiled function."""
    return Batch(arrays["inputs"], arrays["targets"], arrays["weights"], arrays.get("segments"),
                 select=arrays.get("select"), extra=arrays.get("extra"), branches=arrays.get("branches"),
                 positions=arrays.get("positions"))


def rows_apart(batch: Batch, cotangent: mx.array, bucket: int = 64) -> list[tuple[Batch, mx.array]]:
    """The batch's rows as one-row batches, each with its share of ``cotangent``.

    ``cotangent``: the gradient of a loss with respect to the batch's
    per-token log-probs (:func:`mlxpost.core.logprobs.token_logprobs`: (B, L),
    or (K,) per selected entry). For each row that trains a position, a
    :class:`Batch` of that row alone (its inputs, targets, weights, segments,
    branches, positions, and a selection of its own entries, padded to a
    multiple of ``bucket``) and the cotangent of its log-probs, so that
    ``sum over rows of (cotangent_r * log-probs of row r)`` has the batch's
    gradient (see ``train.split_rows`` in :mod:`mlxpost.training.loop`).
    Rows training nothing are left out.
    """
    B, L = batch.inputs.shape
    weights = np.array(batch.weights)
    entries = batch.entries
    if entries:
        index, valid = np.array(batch.select[0]), np.array(batch.select[1]) > 0
        row_of = np.where(valid, index // L, -1)
        targets, g_host = np.array(batch.select[2]), np.array(cotangent)
    out = []

    def take(a, r):
        return None if a is None else a[r:r + 1]

    for r in range(B):
        if not weights[r].any() and not (entries and (row_of == r).any()):
            continue
        if entries:  # each entry its own (position, target): the row's entries, re-indexed, and their cotangents
            keep = np.flatnonzero(row_of == r)
            k = bucketed(len(keep), bucket)
            idx, tgt = np.zeros(k, np.int32), np.zeros(k, np.int32)
            ok, gr = np.zeros(k, np.float32), np.zeros(k, np.float32)
            idx[: len(keep)] = index[keep] - r * L
            ok[: len(keep)] = 1.0
            tgt[: len(keep)] = targets[keep]
            gr[: len(keep)] = g_host[keep]
            select, g = (mx.array(idx), mx.array(ok), mx.array(tgt)), mx.array(gr)
        else:  # per position: the row's trained positions (its log-probs are weighted by them anyway)
            select = selection(weights[r:r + 1], bucket) if batch.select is not None else None
            g = take(cotangent, r)
        row = Batch(take(batch.inputs, r), take(batch.targets, r), take(batch.weights, r), take(batch.segments, r),
                    n_tokens=int((weights[r] > 0).sum()), select=select, branches=take(batch.branches, r),
                    positions=take(batch.positions, r))
        out.append((row, g))
    return out


def bucketed(n: int, bucket: int) -> int:
    """``n`` rounded up to a multiple of ``bucket`` (at least one bucket)."""
    return max(bucket, -(-n // bucket) * bucket)


def selection(weights: np.ndarray, bucket: int) -> tuple[mx.array, mx.array]:
    """Flat indices of the trained positions of (B, L) ``weights``, padded to a multiple of ``bucket``.

    Padding to buckets keeps the number of distinct shapes (and so compiled
    graphs) small. Returns ``(index (K,), valid (K,))``.
    """
    w = weights.reshape(-1)
    idx = np.flatnonzero(w > 0).astype(np.int32)
    k = min(bucketed(len(idx), bucket), w.size)
    index = np.zeros(k, np.int32)
    valid = np.zeros(k, np.float32)
    index[: len(idx)] = idx
    valid[: len(idx)] = 1.0
    return mx.array(index), mx.array(valid)


def _stack(rows: list[list[Example]], width: int, pad_id: int, packed: bool,
           select_bucket: int | None = None) -> Batch:
    B = len(rows)
    inputs = np.full((B, width), pad_id, np.int32)
    targets = np.zeros((B, width), np.int32)
    weights = np.zeros((B, width), np.float32)
    segments = np.full((B, width), -1, np.int32)
    n_tokens = n_examples = 0
    sources = []
    for r, row in enumerate(rows):
        pos = 0
        for s, ex in enumerate(row):
            n = len(ex) - 1
            inputs[r, pos:pos + n] = ex.tokens[:-1]
            targets[r, pos:pos + n] = ex.tokens[1:]
            weights[r, pos:pos + n] = ex.mask[1:]
            segments[r, pos:pos + n] = s
            pos += n
            n_examples += 1
            sources.append(ex.source)
        n_tokens += pos
    return Batch(
        inputs=mx.array(inputs), targets=mx.array(targets), weights=mx.array(weights),
        segments=mx.array(segments) if packed else None, n_tokens=n_tokens,
        n_targets=int(weights.sum()), n_examples=n_examples, sources=sources,
        select=selection(weights, select_bucket) if select_bucket else None,
    )


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: assign items (positions each) to rows of ``capacity``.

    Returns rows as lists of item indices. Items are visited longest first;
    each goes to the fullest row it still fits in.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, row index)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise MlxpostError(f"an example of {n + 1} tokens does not fit a packed row of {capacity} positions")
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            space, r = free.pop(j)
            rows[r].append(i)
            bisect.insort(free, (space - n, r))
        else:
            rows.append([i])
            bisect.insort(free, (capacity - n, len(rows) - 1))
    return rows


class BatchSource:
    """An endless, resumable stream of batches over ``examples``.

    ``mode``: ``"pack"`` or ``"pad"``. ``batch_size`` counts rows. With
    ``shuffle=False`` (evaluation) the order is fixed and one pass is made.
    In data-parallel training each rank gets a source over its own share of
    the examples.
    """

    def __init__(self, examples: list[Example], *, mode: str, batch_size: int, max_len: int, pad_id: int = 0,
                 seed: int = 0, shuffle: bool = True, pad_multiple: int = 32, select_bucket: int | None = None):
        """``max_len``: tokens per packed row (pack) or the longest allowed example (pad)."""
        if mode not in ("pack", "pad"):
            raise MlxpostError(f"data.batching must be 'pack' or 'pad', got {mode!r}")
        if not examples and shuffle:
            raise MlxpostError("no examples to train on")
        self.examples = examples
        self.mode = mode
        self.batch_size = batch_size
        self.row_len = max_len - 1  # positions per packed row
        self.pad_id = pad_id
        self.seed = seed
        self.shuffle = shuffle
        self.pad_multiple = pad_multiple
        self.select_bucket = select_bucket
        self.epoch = 0
        self.index = 0  # next batch within the epoch
        self.epoch_limit: int | None = None
        self._plan: list[list[list[int]]] | None = None

    # A plan is a list of batches; a batch is a list of rows; a row is a
    # list of example indices.
    def _make_plan(self, epoch: int) -> list[list[list[int]]]:
        n = len(self.examples)
        if n == 0:  # a rank whose share of the validation rows is empty
            return []
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        B = self.batch_size
        if self.mode == "pack":
            lengths = [len(self.examples[i]) - 1 for i in order]
            rows = [[int(order[k]) for k in row] for row in pack_rows(lengths, self.row_len)]
            if self.shuffle:
                rows = [rows[k] for k in rng.permutation(len(rows))]
        else:
            if self.shuffle:
                # Sort within chunks of 16 batches: similar lengths share a batch,
                # yet the data order stays random.
                chunk = B * 16
                rows = []
                for s in range(0, n, chunk):
                    part = sorted(order[s:s + chunk].tolist(), key=lambda i: len(self.examples[i]))
                    rows += [[i] for i in part]
            else:
                rows = [[i] for i in sorted(range(n), key=lambda i: len(self.examples[i]))]
        batches = [rows[s:s + B] for s in range(0, len(rows), B)]
        if self.shuffle and self.mode == "pad":
            batches = [batches[k] for k in rng.permutation(len(batches))]
        return batches

    def _plan_for_epoch(self) -> list[list[list[int]]]:
        if self._plan is None:
            self._plan = self._make_plan(self.epoch)[: self.epoch_limit]
        return self._plan

    def limit_epoch(self, n: int) -> None:
        """Use at most ``n`` batches per epoch (ranks with unequal shares agree on epoch length)."""
        self.epoch_limit = n
        self._plan = None

    def batches_per_epoch(self) -> int:
        return len(self._plan_for_epoch())

    def _build(self, plan_rows: list[list[int]]) -> Batch:
        rows = [[self.examples[i] for i in r] for r in plan_rows]
        rows += [[] for _ in range(self.batch_size - len(rows))]  # a short last batch keeps its shape
        if self.mode == "pack":
            width = self.row_len
        else:
            longest = max((len(r[0]) - 1 for r in rows if r), default=1)
            m = self.pad_multiple
            width = min(self.row_len, -(-longest // m) * m)
        return _stack(rows, width, self.pad_id, packed=self.mode == "pack", select_bucket=self.select_bucket)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            plan = self._plan_for_epoch()
            while self.index < len(plan):
                batch = self._build(plan[self.index])
                self.index += 1
                yield batch
            if not self.shuffle:
                return
            self.epoch += 1
            self.index = 0
            self._plan = None

    # -- resume --------------------------------------------------------------
    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self._plan = None

    @property
    def epoch_progress(self) -> float:
        return self.epoch + self.index / max(1, self.batches_per_epoch())
