"""The model's forward pass on a batch: packing masks, per-position RoPE, query chunks.

:func:`forward` runs an mlx-lm model (or its body) on a batch's inputs:

* packed rows get a block-diagonal causal mask through a stand-in cache
  (:class:`MaskCache`): mlx-lm models build their mask from the first
  block's cache, so no model code changes. RoPE is relative, so positions
  need not restart per example: packed and one-by-one log-probs agree;
* pairs that share their prompt get a tree mask (:func:`tree_mask`) and
  RoPE at each token's own position (:func:`positioned`);
* attention over long rows runs in query chunks (:func:`chunk_bounds`,
  :func:`mlxpost.backend.kernels.query_chunks`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn

from ..backend import kernels


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
        inner = getattr(model, "model", model)
        owners = []
        for block in getattr(inner, "layers", None) or getattr(model, "layers", None) or []:
            block = getattr(block, "block", block)  # a shared lower blocks's stand-in
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
    positions (:func:`mlxpost.backend.kernels.query_chunks`): each chunk's queries
    against the keys up to its end. A full pass computes attention scores for
    every pair of positions and masks out half of them (causality); in ``n``
    chunks the scores computed drop to ``(n + 1) / (2n)`` of that. On MLX's
    CPU backend, where the softmax's ``exp`` is the costliest part of
    attention, this is what makes long rows cheaper
    (``benchmarks/bench_step.py``). Everything else (projections, MLP, RoPE)
    runs on the whole row at once. For a model that passes
    :func:`mlxpost.core.probes.chunking_is_exact` (training runs check it once)
    the result is the same up to float rounding. Memory: the attention scores
    shrink like the work.

    On MLX's CPU backend with the JIT's vectorizing flags, attention runs
    through :func:`mlxpost.backend.kernels.attention` (the same result, its softmax
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
