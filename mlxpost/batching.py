"""Padded and packed batches, with an exact block-diagonal mask for packing.

Every batch is a :class:`Batch` of fixed-width rows. Each example of ``T``
tokens contributes ``T - 1`` positions: ``inputs = tokens[:-1]``,
``targets = tokens[1:]``, ``weights = mask[1:]``.

* **pad**: one example per row, rows of similar length grouped together
  (length buckets), right padding to a multiple of ``pad_multiple``.
* **pack**: several examples per row (best-fit), rows of exactly
  ``row_len`` positions. ``segments`` numbers the examples within a row
  (``-1`` for padding); attention is causal *and* restricted to the same
  segment, so no example sees another. RoPE is relative, so positions need
  not restart per example: packed and one-by-one log-probs agree.
* **pairs** (:class:`PairSource`): the chosen and rejected sides of a pair
  batch in one batch, padded or packed; packed pairs may share their prompt
  (one segment ``[prompt | chosen | rejected]``, :func:`tree_mask`, RoPE at
  each token's own position through :func:`positioned`).

Batch plans are pure functions of ``(seed, epoch)``, so a resumed run sees the
same batches in the same order (see :meth:`BatchSource.state`).
"""

from __future__ import annotations

import bisect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import mlx.core as mx
import numpy as np

from . import kernels
from .data import Example
from .errors import MlxpostError


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


# ---------------------------------------------------------------------------
# Attention masks
# ---------------------------------------------------------------------------


def causal_mask(length: int) -> mx.array:
    """(1, 1, L, L) bool: position i sees positions j <= i."""
    idx = mx.arange(length)
    return (idx[:, None] >= idx[None, :])[None, None]


def segment_mask(segments: mx.array) -> mx.array:
    """(B, L) segment ids -> (B, 1, L, L) bool: causal within a segment."""
    same = segments[:, None, :, None] == segments[:, None, None, :]  # (B, 1, L, L)
    return same & causal_mask(segments.shape[1])


def tree_mask(segments: mx.array, branches: mx.array) -> mx.array:
    """(B, L) segment and branch ids -> (B, 1, L, L) bool, for pairs that share their prompt.

    A segment holds a prompt (branch 0) followed by two replies (branches 1
    and 2): causal within the segment, and a reply does not see the other.
    """
    bq, bk = branches[:, None, :, None], branches[:, None, None, :]
    return segment_mask(segments) & ((bk == 0) | (bk == bq))


class _PositionedRope:
    """Stands in for a block's RoPE: rotates each position by its own entry of ``positions``.

    MLX's ``fast.rope`` takes one offset per batch element; folding every
    (row, head, position) into the batch axis, (B, H, L, D) -> (B*H*L, 1, 1, D),
    gives each its own. The offsets are built once and shared by every block
    (``shared``); ``offset`` (the cache's, 0 for a whole row) picks the
    columns of ``positions`` that a call rotates.
    """

    def __init__(self, rope, positions: mx.array, shared: dict):
        self.rope, self.positions, self.shared = rope, positions, shared

    def __call__(self, x, offset=0, **kwargs):
        B, H, L, D = x.shape
        key = (offset, L, H)
        if key not in self.shared:
            pos = self.positions[:, offset:offset + L]
            self.shared[key] = mx.broadcast_to(pos[:, None, :], (B, H, L)).reshape(-1)
        y = self.rope(x.reshape(B * H * L, 1, 1, D), offset=self.shared[key], **kwargs)
        return y.reshape(B, H, L, D)


def rope_owners(model) -> list:
    """(module, key) of every RoPE of the model's blocks (found once, on the real blocks)."""
    owners = getattr(model, "_mlxpostrope_owners", None)
    if owners is None:
        import mlx.nn as nn

        inner = getattr(model, "model", model)
        owners = []
        for block in getattr(inner, "layers", None) or getattr(model, "layers", None) or []:
            block = getattr(block, "block", block)  # a shared trunk's stand-in
            if isinstance(block, nn.Module):
                owners += [(m, "rope") for _, m in block.named_modules() if "rope" in m and callable(m["rope"])]
        object.__setattr__(model, "_mlxpostrope_owners", owners)
    return owners


@contextmanager
def positioned(model, positions: mx.array | None) -> Iterator[None]:
    """Within the block, the model's RoPE rotates position ``(b, i)`` by ``positions[b, i]``."""
    if positions is None:
        yield
        return
    owners = rope_owners(model)
    saved = [m[k] for m, k in owners]
    shared: dict = {}
    for m, k in owners:
        m[k] = _PositionedRope(m[k], positions, shared)
    try:
        yield
    finally:
        for (m, k), r in zip(owners, saved):
            m[k] = r


DEFAULT_ATTENTION_CHUNK = 96  # positions per query chunk on the CPU (train.attention_chunk=-1)


class MaskCache:
    """One block's "cache" that hands an mlx-lm model a given attention mask for a whole row.

    mlx-lm models build their mask from the first block's cache
    (``cache.make_mask``) and feed keys/values through ``update_and_fetch``.
    Given the row's full mask (block-diagonal for packed examples, so one
    forward pass treats each separately; a tree for pairs that share their
    prompt), this object returns it, narrowed to a sliding window where a
    block asks for one. ``offset`` is always 0: the row starts at its first
    position (query chunks are cut inside attention, :func:`forward`).
    """

    def __init__(self, mask: mx.array, positions: mx.array | None = None):
        self.mask = mask
        self.positions = positions  # (B, L) token positions when they are not the row's slots
        self.offset = 0
        self.keys = self.values = None

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None, **_):
        # Always an array (``return_array`` asks for one where a string such as "causal" would do).
        mask = self.mask[..., :N, :N]
        if window_size is not None and self.positions is not None:
            # A sliding window counts positions in the sequence, not slots of the row.
            pos = self.positions[:, None, :N]
            mask = mask & ((pos[..., :, None] - pos[..., None, :]) < window_size)
        elif window_size is not None and window_size < N:
            idx = mx.arange(N)
            mask = mask & ((idx[:, None] - idx[None, :]) < window_size)
        return mask

    def update_and_fetch(self, keys, values):
        self.keys, self.values = keys, values  # some models read them back from the cache
        return keys, values

    @property
    def state(self):
        return ()

    def is_trimmable(self):
        return False


def chunk_bounds(length: int, chunk: int | None) -> list[int]:
    """Where a row of ``length`` positions is cut into query chunks of about ``chunk`` (at most 8 chunks)."""
    if not chunk or length < 2 * chunk:
        return [0, length]
    n = min(8, length // chunk)
    step = -(-length // n)
    return list(range(0, length, step)) + [length]


def set_attention_chunk(model, chunk: int | None) -> None:
    """Run this model's training forward passes (:func:`forward`) in query chunks of about ``chunk`` positions."""
    object.__setattr__(model, "_mlxpost_attention_chunk", chunk)


def attention_chunk(model) -> int | None:
    return getattr(model, "_mlxpost_attention_chunk", None)


def forward(model, inputs: mx.array, segments: mx.array | None = None, body=None,
            chunk: int | None = None, branches: mx.array | None = None,
            positions: mx.array | None = None) -> mx.array:
    """Run ``model`` (or its ``body``) on ``inputs`` with packing isolation when segmented.

    ``chunk`` (default: the model's :func:`set_attention_chunk`): attention
    over a row at least two chunks long runs in query chunks of about that many
    positions (:func:`mlxpost.kernels.query_chunks`): each chunk's queries
    against the keys up to its end. A full pass computes attention scores for
    every pair of positions and masks out half of them (causality); in ``n``
    chunks the scores computed drop to ``(n + 1) / (2n)`` of that. On MLX's
    CPU backend, where the softmax's ``exp`` is the costliest part of
    attention, this is what makes long rows cheaper
    (``benchmarks/bench_step.py``). Everything else (projections, MLP, RoPE)
    runs on the whole row at once. For a model that passes
    :func:`mlxpost.runner.chunking_is_exact` (training runs check it once)
    the result is the same up to float rounding. Memory: the attention scores
    shrink like the work.

    On MLX's CPU backend with the JIT's vectorizing flags, attention runs
    through :func:`mlxpost.kernels.attention` (the same result, its softmax
    vectorized).

    ``branches`` and ``positions`` (pairs that share their prompt, see
    :class:`PairSource`): the mask is :func:`tree_mask`, and RoPE rotates
    each position by its entry of ``positions`` (:func:`positioned`).
    """
    fn = body or model
    bounds = chunk_bounds(inputs.shape[1], attention_chunk(model) if chunk is None else chunk)
    with kernels.cpu_attention(), kernels.query_chunks(bounds), positioned(model, positions):
        if segments is None:
            return fn(inputs)  # the model's own causal mask
        mask = segment_mask(segments) if branches is None else tree_mask(segments, branches)
        return fn(inputs, cache=[MaskCache(mask, positions) for _ in model.layers])


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


# ---------------------------------------------------------------------------
# Building batches
# ---------------------------------------------------------------------------


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


def pair_layout(lengths: Sequence[int], multiple: int, cap: int,
                span: float | None = None, chunk: int | None = None) -> tuple[int, list[list[int]]]:
    """Rows for the sequences of one pair batch: ``(width, rows)``, rows as lists of indices.

    Chosen and rejected replies differ in length, so padding every sequence
    to the longest wastes a quarter of the compute on typical preference
    data. Here the sequences are packed (best fit) into rows of a width
    between the longest (rounded up to ``multiple``) and twice that, never
    wider than ``cap``, choosing the width of least estimated cost (ties:
    the narrower).

    The cost of a row of ``width`` positions is ``width * (1 + width / span)``:
    each position pays its share of the linear layers, and its attention
    over the whole row (the block-diagonal mask hides other sequences but
    their scores are still computed). ``span`` (:func:`attention_span`) is
    the width at which the two are equal; ``None`` counts positions only.
    ``chunk``: the query chunk of training passes (:func:`forward`), which
    computes only the scores on and below the diagonal between chunks.
    """
    longest = max(lengths)
    w0 = min(cap, -(-longest // multiple) * multiple)
    best = None
    for width in range(w0, min(cap, 2 * w0) + 1, multiple):
        rows = pack_rows(lengths, width)
        cost = layout_cost(width, len(rows), span, chunk)
        if best is None or cost < best[0]:
            best = (cost, width, rows)
        if len(rows) == 1:
            break
    return best[1], best[2]


def layout_cost(width: int, rows: int, span: float | None, chunk: int | None = None) -> float:
    """Estimated cost of ``rows`` rows of ``width`` positions (see :func:`pair_layout`).

    In ``n`` query chunks a row computes ``(n + 1) / (2n)`` of its attention
    scores (:func:`forward`).
    """
    if not span:
        return rows * width
    n = len(chunk_bounds(width, chunk)) - 1
    return rows * width * (1 + width / span * (n + 1) / (2 * n))


def attention_span(model, cpu: bool | None = None) -> float | None:
    """The row width at which attention costs as much as the rest of a block, per position.

    Per position and block, the linear layers cost ``2 * P`` FLOPs (``P``:
    the block's linear weights), and attention over a row of ``W`` positions
    costs about ``W * (4 * H * d + c * H)``: two matmuls over the ``H``
    heads of size ``d``, and the softmax, whose ``exp`` is worth ``c`` FLOPs
    of matmul. On MLX's CPU backend ``exp`` is scalar (about 10 ns, while
    matmuls run at 130-180 GFLOP/s), so ``c`` is about 1500 and attention
    dominates from a few hundred positions on (measured on SmolLM2-135M:
    equal at about 425 positions, estimated here 448); on a GPU ``c`` is
    small (16 here: an estimate, not measured). The first block stands for
    all (a mixture-of-experts block's experts are not counted); ``None``
    when its linear layers or heads cannot be read (fused QKV projections,
    for one), and layouts then count positions only.
    """
    import mlx.nn as nn

    inner = getattr(model, "model", model)
    layers = getattr(model, "layers", None) or getattr(inner, "layers", None)
    if not layers:
        return None
    weights, q_out = 0, None
    for name, m in layers[0].named_modules():
        if isinstance(m, nn.QuantizedLinear):
            out, packed = m.weight.shape
            n = out * packed * 32 // m.bits
        elif isinstance(m, nn.Linear):
            out, n = m.weight.shape[0], m.weight.size
        else:
            continue
        weights += n
        if {"q_proj", "wq", "query"} & set(name.split(".")):  # also inside a LoRA wrapper
            q_out = out
    args = getattr(model, "args", None)
    heads = getattr(args, "num_attention_heads", None) or getattr(args, "n_heads", None)
    if not weights or not q_out or not heads:
        return None
    if cpu is None:
        cpu = mx.default_device() == mx.cpu
    c = 1500.0 if cpu else 16.0
    return 2.0 * weights / (4.0 * q_out + c * heads)


class PairSource(BatchSource):
    """Batches of preference pairs: the chosen and rejected sides of ``batch_size`` pairs in one batch.

    ``mode="pad"``: ``2 * batch_size`` padded rows; rows ``0..P-1`` hold the
    chosen sides and rows ``P..2P-1`` the rejected sides of the same pairs,
    so one forward pass scores both and pair ``i`` is rows ``i`` and ``P + i``.

    ``mode="pack"``: the ``2P`` sequences are packed into fewer rows
    (:func:`pair_layout`), each isolated by the block-diagonal mask as in SFT
    packing; ``extra["seq"]`` (rows, width) says which sequence each position
    belongs to (chosen of pair ``i``: ``i``; rejected: ``P + i``; padding:
    ``-1``) and ``extra["seq_ids"]`` is ``arange(2P)``, so the losses sum
    per sequence exactly as over padded rows. ``span``: the model's
    :func:`attention_span`, which weighs a wide row's attention against the
    positions it saves; ``chunk``: the query chunk of the training passes
    (fewer scores computed per row, see :func:`layout_cost`).

    A short last batch is filled with empty pairs (no trained tokens), which
    the losses mask out.

    ``share_prompt`` (packed only; needs ``select_bucket``, i.e. a head
    split): each pair is one segment, its prompt once and both replies after
    it (:func:`shared_segment`), instead of two sequences that each repeat
    the prompt. The mask (:func:`tree_mask`, from ``branches``) keeps the
    replies apart and ``positions`` gives the rejected reply the RoPE
    positions it has after the prompt, so every log-prob is the one of the
    unshared layout (float rounding aside); the prompt's positions go through
    the model once. Log-probs then come per trained entry:
    ``select = (index, valid, targets)`` (K,), where the prompt's last
    position appears twice (it predicts the first token of both replies), and
    ``extra["seq"]`` (K,) names each entry's sequence. A batch is laid out
    this way when :func:`layout_cost` rates it no dearer than the ordinary
    packing of the same pairs: a segment holds both replies, so its row may be
    wider (up to twice ``max_len``), and the scores between the two replies
    are computed, then masked (long replies after a short prompt: ordinary
    packing). A sliding window counts ``positions`` (:class:`MaskCache`).

    ``ref``: optional precomputed reference log-probs, one
    ``(chosen_values, rejected_values)`` per pair, each holding the values at
    that side's trained positions in order; batches then carry them as
    ``extra["ref_logps"]``, aligned with ``targets`` (with entries: with them).
    """

    def __init__(self, pairs: list, *, mode: str = "pad", ref: list | None = None, span: float | None = None,
                 share_prompt: bool = False, chunk: int | None = None, **kw):
        if mode not in ("pad", "pack"):
            raise MlxpostError(f"preference pairs are batched with data.batching=pad or pack, got {mode!r}")
        super().__init__(pairs, mode="pad", **kw)  # the plan: pairs in length-sorted batches
        self.pack = mode == "pack"
        self.span = span
        self.chunk = chunk  # the training passes' query chunk, which the layout costs count
        if share_prompt and not (self.pack and self.select_bucket):
            raise MlxpostError("pairs share their prompt only in packed batches with a head split")
        self.share_prompt = share_prompt
        if ref is not None and len(ref) != len(pairs):
            raise MlxpostError(f"reference log-probs for {len(ref)} pairs, but there are {len(pairs)} pairs")
        self.ref = ref

    def set_reference(self, ref: list | None) -> None:
        if ref is not None and len(ref) != len(self.examples):
            raise MlxpostError(f"reference log-probs for {len(ref)} pairs, but there are {len(self.examples)} pairs")
        self.ref = ref

    def _build(self, plan_rows: list[list[int]]) -> Batch:
        return self.build_pairs([r[0] for r in plan_rows])

    def build_pairs(self, idx: list[int], packed: bool | None = None, shared: bool | None = None) -> Batch:
        """The batch of the pairs at positions ``idx`` (at most ``batch_size``).

        ``packed``: override the mode. ``shared`` (with ``share_prompt``): True
        lays the pairs out with their prompt shared, False never, None when that
        is the cheaper layout.
        """
        P = self.batch_size
        pairs = [self.examples[i] for i in idx]
        seqs = self._sequences(pairs)
        m = self.pad_multiple
        pack = self.pack if packed is None else packed
        if pack:
            real, width, layout, segmented = self._packed_layout(pairs, seqs, shared)
            if segmented is not None:
                return self._build_shared(idx, pairs, *segmented)
            rows = [[real[j] for j in row] for row in layout]
        else:
            longest = max(len(p) - 1 for p in pairs)
            width = min(self.row_len, -(-longest // m) * m)
            rows = [[k] if seqs[k] is not None else [] for k in range(2 * P)]
        batch = _stack([[seqs[k] for k in row] for row in rows], width, self.pad_id, packed=pack,
                       select_bucket=self.select_bucket)
        batch.n_examples = len(pairs)
        batch.sources = [p.chosen.source for p in pairs] + [p.rejected.source for p in pairs]
        # Where each sequence starts: (row, offset).
        start = {}
        for r, row in enumerate(rows):
            pos = 0
            for k in row:
                start[k] = (r, pos)
                pos += len(seqs[k]) - 1
        extra = {}
        if batch.segments is not None:
            seq = np.full((len(rows), width), -1, np.int32)
            for k, (r, pos) in start.items():
                seq[r, pos:pos + len(seqs[k]) - 1] = k
            extra["seq"] = mx.array(seq)
            extra["seq_ids"] = mx.arange(2 * P, dtype=mx.int32)
        if self.ref is not None:
            ref = np.zeros((len(rows), width), np.float32)
            for k, i in enumerate(idx):
                for side, key in ((0, k), (1, P + k)):
                    r, pos = start[key]
                    ref[r, pos + np.flatnonzero(seqs[key].mask[1:])] = self.ref[i][side]
            extra["ref_logps"] = mx.array(ref)
        batch.extra = extra or None
        return batch

    def _sequences(self, pairs: list) -> list:
        """The 2P sequence slots of a batch: chosen sides, then rejected sides (None for missing pairs)."""
        P = self.batch_size
        seqs = [p.chosen for p in pairs] + [None] * (P - len(pairs)) + [p.rejected for p in pairs]
        return seqs + [None] * (2 * P - len(seqs))

    def _packed_layout(self, pairs: list, seqs: list, shared: bool | None) -> tuple:
        """``(real, width, layout, segmented)``: the packed rows of the sequences, and the shared-prompt
        ``(segments, width, rows)`` when the batch takes that layout (else None).

        Shared when asked (``shared=True``) or, with ``shared=None``, when it
        costs no more: a segment holds both replies, so its row may be wider
        (up to twice a sequence's row), and attention over a wide row can cost
        more than the prompt positions saved.
        """
        real = [k for k, ex in enumerate(seqs) if ex is not None]
        width, layout = pair_layout([len(seqs[k]) - 1 for k in real], self.pad_multiple, self.row_len, self.span,
                                    self.chunk)
        if not self.share_prompt or shared is False:
            return real, width, layout, None
        segs = [shared_segment(p.chosen, p.rejected) for p in pairs]
        s_width, s_rows = pair_layout([len(s.inputs) for s in segs], self.pad_multiple, 2 * self.row_len, self.span,
                                      self.chunk)
        if shared or (layout_cost(s_width, len(s_rows), self.span, self.chunk)
                      <= layout_cost(width, len(layout), self.span, self.chunk)):
            return real, width, layout, (segs, s_width, s_rows)
        return real, width, layout, None

    def shared_batches(self) -> tuple[int, int]:
        """How many batches of this epoch's plan share their prompt, of how many (no arrays are built)."""
        plan = self._plan_for_epoch()
        if not (self.share_prompt and self.pack):
            return 0, len(plan)
        n = 0
        for batch in plan:
            pairs = [self.examples[r[0]] for r in batch]
            n += self._packed_layout(pairs, self._sequences(pairs), None)[3] is not None
        return n, len(plan)

    def _build_shared(self, idx: list[int], pairs: list, segs: list, width: int, rows: list) -> Batch:
        """A packed batch of shared-prompt segments, one per pair, in ``rows`` of ``width`` (see the class doc)."""
        P = self.batch_size
        R = len(rows)
        inputs = np.full((R, width), self.pad_id, np.int32)
        segments = np.full((R, width), -1, np.int32)
        branches = np.zeros((R, width), np.int32)
        positions = np.zeros((R, width), np.int32)
        targets = np.zeros((R, width), np.int32)
        weights = np.zeros((R, width), np.float32)
        flat, tgt, seq, ref = [], [], [], []
        n_tokens = 0
        for r, row in enumerate(rows):
            pos = 0
            for s_, k in enumerate(row):
                sg = segs[k]
                n = len(sg.inputs)
                sl = slice(pos, pos + n)
                inputs[r, sl], branches[r, sl], positions[r, sl] = sg.inputs, sg.branches, sg.positions
                segments[r, sl] = s_
                for side, key in ((0, k), (1, P + k)):
                    at = r * width + pos + sg.at[side]
                    flat.append(at)
                    tgt.append(sg.targets[side])
                    seq.append(np.full(len(at), key, np.int32))
                    if self.ref is not None:
                        ref.append(np.asarray(self.ref[idx[k]][side], np.float32))
                    targets.reshape(-1)[at] = sg.targets[side]
                    weights.reshape(-1)[at] = 1.0
                pos += n
            n_tokens += pos
        flat, tgt, seq = np.concatenate(flat), np.concatenate(tgt), np.concatenate(seq)
        K = len(flat)
        size = bucketed(K, self.select_bucket)
        index, valid = np.zeros(size, np.int32), np.zeros(size, np.float32)
        etargets, eseq = np.zeros(size, np.int32), np.full(size, -1, np.int32)
        index[:K], valid[:K], etargets[:K], eseq[:K] = flat, 1.0, tgt, seq
        extra = {"seq": mx.array(eseq), "seq_ids": mx.arange(2 * P, dtype=mx.int32)}
        if self.ref is not None:
            values = np.zeros(size, np.float32)
            values[:K] = np.concatenate(ref)
            extra["ref_logps"] = mx.array(values)
        return Batch(
            inputs=mx.array(inputs), targets=mx.array(targets), weights=mx.array(weights),
            segments=mx.array(segments), n_tokens=n_tokens, n_targets=K, n_examples=len(pairs),
            select=(mx.array(index), mx.array(valid), mx.array(etargets)),
            sources=[p.chosen.source for p in pairs] + [p.rejected.source for p in pairs], extra=extra,
            branches=mx.array(branches), positions=mx.array(positions))


@dataclass
class SharedSegment:
    """One pair as a prompt followed by both replies (see :func:`shared_segment`)."""

    inputs: np.ndarray  # (n,) int32: prompt, chosen reply, rejected reply
    branches: np.ndarray  # (n,) int32: 0, 1, 2
    positions: np.ndarray  # (n,) int32: each token's position in its own sequence
    at: tuple  # per side: offsets in the segment of that side's trained positions, in order
    targets: tuple  # per side: the tokens they predict


def shared_prefix(chosen: Example, rejected: Example) -> int:
    """How many leading input positions the two sides of a pair can share.

    The common prefix of their tokens, but no further than the first trained
    position of either side: below it no position is trained on either side,
    and the last shared position may be trained (it predicts each side's own
    next token, so it appears once per side among the entries).
    """
    a, b = chosen.tokens, rejected.tokens
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    lcp = int(diff[0]) if len(diff) else n
    first = [int(np.flatnonzero(ex.mask[1:])[0]) if ex.mask[1:].any() else len(ex) - 2 for ex in (chosen, rejected)]
    return max(0, min(lcp, first[0] + 1, first[1] + 1))


def shared_segment(chosen: Example, rejected: Example) -> SharedSegment:
    """Lay out a pair as ``[prompt | chosen reply | rejected reply]`` input positions.

    Sequence ``x`` of ``T`` tokens has input positions ``0..T-2`` (position
    ``j`` predicts token ``j + 1``). The first ``p`` (:func:`shared_prefix`)
    are common; then come the chosen side's positions ``p..Tc-2`` and the
    rejected side's ``p..Tr-2``, each at its own RoPE position ``j``.
    """
    p = shared_prefix(chosen, rejected)
    nc, nr = len(chosen) - 1 - p, len(rejected) - 1 - p
    inputs = np.concatenate([chosen.tokens[:p], chosen.tokens[p:-1], rejected.tokens[p:-1]]).astype(np.int32)
    branches = np.concatenate([np.zeros(p), np.ones(nc), np.full(nr, 2)]).astype(np.int32)
    positions = np.concatenate([np.arange(p + nc), np.arange(p, p + nr)]).astype(np.int32)
    at, targets = [], []
    for ex, start in ((chosen, p), (rejected, p + nc)):
        j = np.flatnonzero(ex.mask[1:])  # trained input positions of this side
        at.append(np.where(j < p, j, start + (j - p)).astype(np.int64))
        targets.append(ex.tokens[1:][j].astype(np.int32))
    return SharedSegment(inputs, branches, positions, tuple(at), tuple(targets))
