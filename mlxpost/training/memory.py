"""Training memory to a budget: ``train.max_memory_gb`` (``--max-memory``).

Before the data are read, the run estimates the peak memory of one
micro-batch's forward and backward pass and, when it would not fit the
budget, picks (in this order, cheapest in time first) gradient
checkpointing of whole blocks, then smaller micro-batches with more
accumulation (same rows per optimizer step, same loss: the loop sums losses
and counts over micro-batches before it divides), then smaller chunks of the
output layer, then, for a preference pair (one item, two rows), one backward
pass per row (``train.split_rows``: the same gradients, one more forward
pass; on Qwen2.5-0.5B's shapes a pair of 2 x 1024 peaked at 2.59 GB instead
of 3.10, at 83 s a step against the defaults' 57). The choice is a row of the
setup table; a budget that even one row with checkpointing cannot meet is a
warning before training starts, not an error.

The estimate, in float elements of the training dtype, for ``T = rows x
length`` positions through ``n`` blocks of width ``D``, MLP width ``I``,
``H`` query heads:

* weights: the model's own bytes (quantized bases count as quantized);
* trainable weights: 4 copies (value, gradient, Adam's two moments) in float32;
* saved activations without checkpointing: ``T * n * (ACT_D * D + ACT_I * I
  + 2 * H * S)``, where ``S`` is the keys a query sees on average (half a
  row under causal query chunks, a whole row without), the 2 for the
  attention scores and probabilities kept for the backward pass;
* with checkpointing: each block's input (``T * n * D``), plus one block's
  saved activations and their gradients while that block is recomputed
  (twice the per-block term above);
* the output layer: the fused log-prob pass (:mod:`mlxpost.core.logprobs`)
  keeps (T, D) gradient vectors and works on chunks of ``HEAD_CHUNK_BYTES``
  of logits; ``HEAD_ALIVE`` chunks' worth are alive at the peak (fitted:
  at Qwen2.5-0.5B's shapes, checkpointed, one row of 1024, the peak fell
  from 3.02 to 2.59 GB when the chunks went from 64 to 16 MB, i.e. about
  nine chunks). Under a budget that checkpointing and the smallest
  micro-batch cannot meet, the plan lowers the chunk to 32 then 16 MB (more,
  smaller products in the output layer).

Sampling (the rollouts of online RL, the replies before and after every
run) has its own peak: the weights, the optimizer state, and the merged
copies of the adapted layers (:func:`mlxpost.model.lora.adapters_merged`:
as many bytes as those layers' weights; the KV cache and one step's logits
are small next to them). The run's peak is the larger of the two. When the
merged copies would break the budget, sampling leaves the adapters
unmerged (slower per token, no extra bytes): the plan decides this first,
since it costs the least time.

``ACT_D`` and ``ACT_I`` were fitted on Qwen2.5-0.5B's shapes (hidden 896,
MLP 4864, 24 blocks, 2 x 1024 positions, float32 on the CPU, LoRA on every
linear): MLX's measured peak was 10.4 GB without checkpointing and 3.1 GB
with it (estimates: 11.3 and 3.6: on the safe side; one row of 1024,
checkpointed: 3.02 measured, 3.10 estimated; with 16 MB chunks 2.59 and
2.65); see
benchmarks/bench_memory.py. The same constants are used on every backend:
what the backward pass keeps is the graph's, not the device's.

Not chosen automatically: checkpointing only parts of a block, and
off-loading; the auto budget (:func:`default_budget`) leaves a third of the
machine's memory (Metal: of the recommended working set) to the system.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..core.logprobs import HEAD_CHUNK_BYTES
from ..model.adapters import trainable_count
from ..model.load import compute_dtype
from ..model.lora import merged_bytes

ACT_D = 10  # per position and block, in units of the hidden width: norms, q/k/v/o inputs, residuals, LoRA
ACT_I = 4  # ... of the MLP width: gate, up, activation, product
HEAD_ALIVE = 9  # chunks of output-layer logits alive at the peak (see the module doc)
HEAD_CHUNKS_TRIED = (HEAD_CHUNK_BYTES, 32 << 20, 16 << 20)  # chunk sizes the plan may choose, largest first
GB = 1e9


@dataclass
class ModelShape:
    blocks: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    weight_bytes: int
    trainable: int
    itemsize: int = 4  # bytes per activation element (the model's compute dtype)
    merged: int = 0  # bytes of the merged copies made for sampling (mlxpost.model.lora.merged_bytes)

    @staticmethod
    def of(model: nn.Module) -> "ModelShape":
        """Read the shapes from an mlx-lm model (its ``args``) and its parameters."""
        args = getattr(model, "args", None)

        def arg(*names, default=0):
            for n in names:
                v = getattr(args, n, None)
                if v:
                    return int(v)
            return default

        params = tree_flatten(model.parameters())
        weight_bytes = sum(v.nbytes for _, v in params)
        hidden = arg("hidden_size", "d_model", "n_embd")
        return ModelShape(blocks=len(getattr(model, "layers", [])) or arg("num_hidden_layers"), hidden=hidden,
                          intermediate=arg("intermediate_size", "ffn_dim", default=4 * hidden),
                          heads=arg("num_attention_heads", "n_head", default=max(1, hidden // 64)),
                          vocab=arg("vocab_size"), weight_bytes=weight_bytes, trainable=trainable_count(model),
                          itemsize=compute_dtype(model).size, merged=merged_bytes(model))


@dataclass
class Estimate:
    weights: float
    optimizer: float
    activations: float
    head: float

    @property
    def total(self) -> float:
        return self.weights + self.optimizer + self.activations + self.head


def estimate(shape: ModelShape, rows: int, length: int, *, checkpoint: bool, query_chunk: int | None,
             head_chunk_bytes: int = HEAD_CHUNK_BYTES) -> Estimate:
    """Peak bytes of one micro-batch of ``rows x length`` positions (see the module doc).

    >>> s = ModelShape(blocks=24, hidden=896, intermediate=4864, heads=14, vocab=151_936,
    ...                weight_bytes=1_976_000_000, trainable=4_399_104)
    >>> round(estimate(s, 2, 1024, checkpoint=False, query_chunk=96).total / 1e9, 1)  # measured: 10.42
    11.3
    >>> round(estimate(s, 2, 1024, checkpoint=True, query_chunk=96).total / 1e9, 1)  # measured: 3.11
    3.6
    >>> round(estimate(s, 1, 1024, checkpoint=True, query_chunk=96).total / 1e9, 2)  # measured: 3.02
    3.1
    >>> round(estimate(s, 1, 1024, checkpoint=True, query_chunk=96, head_chunk_bytes=16 << 20).total / 1e9, 2)
    2.65
    """
    T = rows * length
    seen = (length + (query_chunk or 0)) / 2 if query_chunk else length  # keys per query, on average
    per_block = T * (ACT_D * shape.hidden + ACT_I * shape.intermediate + 2 * shape.heads * seen) * shape.itemsize
    if checkpoint:
        activations = T * shape.blocks * shape.hidden * shape.itemsize + 2 * per_block
    else:
        activations = shape.blocks * per_block
    head_chunk = min(T * shape.vocab * 4, head_chunk_bytes)
    head = T * shape.hidden * 4 + HEAD_ALIVE * head_chunk
    return Estimate(weights=float(shape.weight_bytes), optimizer=16.0 * shape.trainable, activations=float(activations),
                    head=float(head))


def sampling_peak(shape: ModelShape, merge: bool) -> float:
    """Peak bytes while sampling: weights, optimizer state, and the merged copies when ``merge``.

    >>> s = ModelShape(blocks=24, hidden=896, intermediate=4864, heads=14, vocab=151_936,
    ...                weight_bytes=1_976_000_000, trainable=4_399_104, merged=1_431_000_000)
    >>> round(sampling_peak(s, True) / 1e9, 2), round(sampling_peak(s, False) / 1e9, 2)  # measured: 3.43 merged
    (3.48, 2.05)
    """
    return float(shape.weight_bytes) + 16.0 * shape.trainable + (shape.merged if merge else 0)


@dataclass
class Plan:
    budget: float
    checkpoint: bool
    batch_size: int
    grad_accum: int
    estimate: Estimate
    fits: bool
    changed: bool
    merge: bool = True  # adapters merged into the weights while sampling
    sampling: float = 0.0  # estimated peak while sampling (with the chosen merge)
    head_chunk_bytes: int = HEAD_CHUNK_BYTES  # logits per chunk of the output layer
    split_rows: bool = False  # one backward pass per row (train.split_rows)

    @property
    def peak(self) -> float:
        return max(self.estimate.total, self.sampling)

    def describe(self) -> str:
        """The setup table's row."""
        parts = [f"budget {self.budget / GB:.1f} GB, estimated peak {self.peak / GB:.1f} GB"]
        if self.changed:
            parts.append(("gradient checkpointing, " if self.checkpoint else "")
                         + f"micro-batch {self.batch_size} x {self.grad_accum} accumulated (chosen to fit)")
        elif self.checkpoint:
            parts.append("gradient checkpointing")
        if self.split_rows:
            parts.append("one backward pass per row, a pair's two sides apart (chosen to fit)")
        if self.head_chunk_bytes != HEAD_CHUNK_BYTES:
            parts.append(f"output layer in chunks of {self.head_chunk_bytes >> 20} MB of logits (chosen to fit)")
        if not self.merge:
            parts.append("adapters not merged while sampling (chosen to fit)")
        return ": ".join(parts)


def plan(shape: ModelShape, budget: float, *, batch_size: int, grad_accum: int, length: int, rows_per_item: int = 1,
         checkpoint: bool = False, query_chunk: int | None = None, can_split: bool = True,
         can_split_rows: bool = False) -> Plan:
    """The fastest settings whose estimate fits ``budget`` bytes (the given ones when they fit).

    ``rows_per_item``: rows a batch item puts through the model (2 for a
    preference pair). ``can_split``: whether the micro-batch may shrink.
    ``can_split_rows``: whether the loss allows one backward pass per row
    (``train.split_rows``: a pair's two sides apart, one more forward pass).
    Order tried: as given; checkpointing; then smaller micro-batches (each a
    divisor of the given one) with more accumulation, down to one item; then
    smaller chunks of the output layer's logits; then (items of several
    rows) one backward pass per row, with each chunk size again. Sampling
    merges the adapters when their copies fit, whatever the training step
    chose.

    >>> s = ModelShape(blocks=24, hidden=896, intermediate=4864, heads=14, vocab=151_936,
    ...                weight_bytes=1_976_000_000, trainable=4_399_104)
    >>> p = plan(s, 4e9, batch_size=2, grad_accum=1, length=1024, query_chunk=96)
    >>> p.checkpoint, p.batch_size, p.grad_accum, p.fits
    (True, 2, 1, True)
    >>> p = plan(s, 3.0e9, batch_size=4, grad_accum=1, length=1024, query_chunk=96)
    >>> p.checkpoint, p.batch_size, p.grad_accum, p.fits
    (True, 1, 4, True)
    >>> plan(s, 1e9, batch_size=4, grad_accum=1, length=1024, query_chunk=96).fits
    False

    Sampling merges the adapters while the copies fit (see :func:`sampling_peak`):

    >>> s.merged = 1_431_000_000
    >>> plan(s, 4e9, batch_size=2, grad_accum=1, length=1024, query_chunk=96).merge
    True
    >>> p = plan(s, 3.0e9, batch_size=2, grad_accum=1, length=1024, query_chunk=96)
    >>> p.merge, p.checkpoint, p.batch_size, p.fits
    (False, True, 1, True)

    A preference pair (two rows of 1024) under 2.8 GB: only with its two sides' backward passes apart.

    >>> p = plan(s, 2.8e9, batch_size=1, grad_accum=1, length=1024, rows_per_item=2, query_chunk=96)
    >>> p.split_rows, p.fits
    (False, False)
    >>> p = plan(s, 2.8e9, batch_size=1, grad_accum=1, length=1024, rows_per_item=2, query_chunk=96,
    ...          can_split_rows=True)
    >>> p.split_rows, p.checkpoint, p.head_chunk_bytes >> 20, round(p.estimate.total / 1e9, 2), p.fits
    (True, True, 16, 2.65, True)
    """
    merge = sampling_peak(shape, True) <= budget

    def est(ckpt, bs, head=HEAD_CHUNK_BYTES, rows_apart=False):
        # Rows apart: each backward pass holds one row; the pass that weighs them keeps no activations.
        return estimate(shape, 1 if rows_apart else bs * rows_per_item, length, checkpoint=ckpt,
                        query_chunk=query_chunk, head_chunk_bytes=head)

    given = (checkpoint, batch_size, grad_accum)
    options = [given]
    if not checkpoint:
        options.append((True, batch_size, grad_accum))
    if can_split:  # smaller micro-batches that divide the given one: the same rows per optimizer step
        options += [(True, d, grad_accum * (batch_size // d)) for d in range(batch_size - 1, 0, -1)
                    if batch_size % d == 0]
    options = [(*o, HEAD_CHUNK_BYTES, False) for o in options]
    options += [(*options[-1][:3], head, False) for head in HEAD_CHUNKS_TRIED[1:]]  # smaller output-layer chunks
    if can_split_rows and rows_per_item * options[-1][1] > 1:
        options += [(*options[-1][:3], head, True) for head in HEAD_CHUNKS_TRIED]
    sampling = sampling_peak(shape, merge)
    for ckpt, b, a, head, apart in options:
        e = est(ckpt, b, head, apart)
        if e.total <= budget:
            return Plan(budget, ckpt, b, a, e, sampling <= budget, (ckpt, b, a) != given, merge, sampling, head,
                        apart)
    ckpt, b, a, head, apart = options[-1]
    return Plan(budget, ckpt, b, a, est(ckpt, b, head, apart), False, (ckpt, b, a) != given, merge, sampling, head,
                apart)


def machine_memory() -> int:
    """Bytes of physical memory (0 when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


def default_budget() -> float:
    """Two thirds of the machine's memory; on Metal, at most the recommended working set (None-safe)."""
    total = machine_memory()
    try:
        working = mx.device_info().get("max_recommended_working_set_size") or 0
    except (AttributeError, RuntimeError, ValueError):
        working = 0
    options = [x for x in (2 * total / 3, working) if x]
    return float(min(options)) if options else float("inf")
