"""The shared core: per-token log-probs of a batch under a model.

``logprobs(model, batch, reduction=...)`` is the one log-prob function every
method builds on (SFT's loss, DPO's sequence scores, GRPO's ratios).

Speed: the output layer (hidden -> vocabulary) is often the largest matmul of
a small model (SmolLM2-135M: 28M of its 135M parameters, applied at every
position). When a batch says which positions are trained (``select``), only
those rows of the hidden states go through the head. :class:`HeadSplit`
finds the model's body and head and checks on a probe input that
``head(body(x)) == model(x)``; models where that does not hold (logit
soft-capping, scaled heads) fall back to full logits automatically.

Memory: the K selected positions never hold their full-vocabulary logits at
once (:func:`head_logprobs`). Without a gradient, the head runs on chunks of
positions whose float32 logits fit :data:`HEAD_CHUNK_BYTES`; with one, a
custom function computes, chunk after chunk, each position's log-prob *and*
its gradient with respect to the hidden state,
``d lp / d h = head^T (onehot(target) - softmax(logits))`` (a (D,) vector:
the log-prob of a position depends on its own hidden state only), and its
backward pass only scales those vectors by the incoming per-token
cotangents. That is the fused linear cross-entropy of Liger and of "Cut
Your Losses in Large-Vocabulary Language Models" (Wijmans et al. 2024),
for per-token log-probs with any per-token weighting (SFT, DPO's sequence
sums, GRPO's ratios): the same two matmuls per chunk that autodiff runs
(logits, then the gradient), nothing recomputed, and (K, D) kept between
the passes instead of (K, V). Chunk size is a trade: at 151,936 entries
chunks of 32 rows ran 2.4x slower than chunks of 128 (BLAS at small M).
Heads with trainable weights (a LoRA on ``lm_head``, a full fine-tune) need
the weights' gradient too, which these vectors do not carry: they keep
autodiff on full logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..backend import kernels
from .batches import Batch, per_entry
from .forward import forward

REDUCTIONS = ("none", "sum", "mean")

# Float32 logits one chunk of positions may hold in the output layer (see the module doc). A run under a
# tight memory budget lowers it (set_head_chunk_bytes; mlxpost.training.memory): smaller chunks, more of them.
HEAD_CHUNK_BYTES = 64 << 20
_head_chunk_bytes = HEAD_CHUNK_BYTES


def set_head_chunk_bytes(nbytes: int | None) -> None:
    """Bytes of float32 logits per chunk of the output layer for this process (None: the default)."""
    global _head_chunk_bytes
    _head_chunk_bytes = int(nbytes) if nbytes else HEAD_CHUNK_BYTES


@dataclass
class HeadSplit:
    body: Callable  # (inputs, cache=None) -> hidden states (B, L, D), final norm applied
    head: Callable  # hidden (..., D) -> logits (..., V)

    @staticmethod
    def find(model: nn.Module, atol: float = 1e-4) -> "HeadSplit | None":
        """Split ``model`` into body and head if that reproduces its logits."""
        inner = getattr(model, "model", None)
        if inner is None or not callable(inner):
            return None
        if "lm_head" in model:
            head = model.lm_head
        elif getattr(inner, "embed_tokens", None) is not None and hasattr(inner.embed_tokens, "as_linear"):
            head = inner.embed_tokens.as_linear
        else:
            return None
        split = HeadSplit(body=inner, head=head)
        try:
            x = mx.array([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=mx.int32)
            full = model(x)
            mine = head(inner(x))
            if full.shape != mine.shape:
                return None
            err = mx.abs(full.astype(mx.float32) - mine.astype(mx.float32)).max().item()
            scale = max(1.0, mx.abs(full.astype(mx.float32)).max().item())
        except Exception:
            return None
        tol = atol if full.dtype == mx.float32 else 1e-2
        return split if err <= tol * scale else None


def target_logprobs(logits: mx.array, targets: mx.array) -> mx.array:
    """log softmax(logits)[target], computed in float32. (..., V), (...) -> (...)"""
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - _logsumexp(logits)


def _logsumexp(logits: mx.array) -> mx.array:
    return kernels.logsumexp(logits) if kernels.enabled() else mx.logsumexp(logits, axis=-1)


_fused_head = True


def set_fused_head(value: bool) -> None:
    """Turn the fused output layer of differentiated passes off (whole logits, autodiff) or on: benchmarks."""
    global _fused_head
    _fused_head = bool(value)


def head_chunk(vocab: int, rows: int, budget: int | None = None) -> int:
    """Rows per chunk of the output layer: float32 logits of a chunk fit ``budget`` bytes (>= 16 rows).

    >>> head_chunk(151_936, 2048), head_chunk(49_152, 2048), head_chunk(49_152, 100)
    (110, 341, 100)
    """
    per_row = 4 * vocab
    return max(1, min(rows, max(16, (budget or _head_chunk_bytes) // per_row)))


def head_logprobs(head: Callable, h: mx.array, targets: mx.array, *, grad: bool = False,
                  chunk: int | None = None) -> mx.array:
    """``target_logprobs(head(h), targets)`` without holding (K, V) logits: (K, D), (K,) -> (K,).

    ``grad=True`` for a pass that is differentiated (a policy's loss): the
    fused chunked function of the module doc. ``grad=False`` (reference
    passes, evaluation, rollouts' old log-probs) runs plain chunks; it is
    still differentiable, by autodiff that keeps every chunk's logits.
    ``chunk``: rows per chunk (default :func:`head_chunk`).
    """
    K = h.shape[0]
    if K == 0:
        return mx.zeros((0,), mx.float32)
    probe = head(h[:1])
    chunk = chunk or head_chunk(probe.shape[-1], K)
    if grad and _fused_head and not _trainable(head):
        return _fused(head, chunk)(h, targets)[0]
    if K <= chunk or (grad and not _fused_head):
        return target_logprobs(head(h), targets)
    parts = []
    for i in range(0, K, chunk):
        part = h[i:i + chunk]
        if parts:  # as in _fused: MLX would otherwise run every chunk's head matmul before any reduction
            part = mx.depends(part, parts[-1])
        parts.append(target_logprobs(head(part), targets[i:i + chunk]))
    return mx.concatenate(parts)


def _trainable(head: Callable) -> bool:
    """Whether the head (a module, or a module's bound method like ``Embedding.as_linear``) has trainable weights."""
    module = head if isinstance(head, nn.Module) else getattr(head, "__self__", None)
    if not isinstance(module, nn.Module):
        return True  # unknown: keep autodiff, which is always right
    return len(tree_flatten(module.trainable_parameters())) > 0


@partial(mx.compile, shapeless=True)
def _neg_softmax(logits: mx.array, lse: mx.array) -> mx.array:
    return -mx.exp(logits - lse[:, None])


def _chunk_parts(head: Callable, h: mx.array, targets: mx.array) -> tuple[mx.array, mx.array]:
    """Per row of a chunk: log p(target) (C,) and its gradient with respect to the row of ``h`` (C, D)."""
    logits = head(h)
    z = logits.astype(mx.float32)
    lse = _logsumexp(z)
    lp = mx.take_along_axis(z, targets[:, None], axis=-1)[:, 0] - lse
    # d lp / d logits = onehot(target) - softmax: -p everywhere, 1 - p at the target.
    g = mx.put_along_axis(_neg_softmax(z, lse), targets[:, None], (1.0 - mx.exp(lp))[:, None], axis=-1)
    _, (dh,) = mx.vjp(head, (h,), (g.astype(logits.dtype),))
    return lp, dh


def _fused(head: Callable, chunk: int):
    """The custom function of the module doc for this head: (h (K, D), targets (K,)) -> (lp (K,), d lp/d h (K, D))."""

    @mx.custom_function
    def fused(h, targets):
        lps, dhs = [], []
        for i in range(0, h.shape[0], chunk):
            part = h[i:i + chunk]
            if dhs:  # chunk i starts once chunk i-1 is done: MLX schedules every chunk's matmul first otherwise
                part = mx.depends(part, dhs[-1])
            lp, dh = _chunk_parts(head, part, targets[i:i + chunk])
            lps.append(lp)
            dhs.append(dh)
        return mx.concatenate(lps), mx.concatenate(dhs)

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        h, targets = primals
        return (cotangents[0][:, None] * outputs[1]).astype(h.dtype), mx.zeros_like(targets)

    return fused


def token_logprobs(model: nn.Module, batch: Batch, split: HeadSplit | None = None,
                   select: tuple[mx.array, mx.array] | None = None, *, grad: bool = False) -> mx.array:
    """Per-token log p(target | prefix), shape (B, L); exactly 0 where weights are 0.

    ``select = (index, valid)``: flat positions (K,) whose log-probs are needed
    and a (K,) 0/1 mask for the padding entries of ``index``. With a head
    split, only those K hidden states go through the output layer.

    ``select = (index, valid, targets)`` (pairs sharing their prompt, see
    :class:`mlxpost.core.pairs.PairSource`): per entry, shape (K,), each entry
    the log-prob of its own target at its position (a position may appear
    twice); 0 for padding entries. Needs the head split.

    ``grad=True`` in a pass that is differentiated: the head's memory-saving
    fused gradient (:func:`head_logprobs`).
    """
    B, L = batch.inputs.shape
    entries = per_entry(select)
    if entries and split is None:
        raise ValueError("per-entry log-probs (a shared-prompt pair batch) need a head split")
    if split is None or select is None:
        logits = forward(model, batch.inputs, batch.segments)  # (B, L, V)
        return target_logprobs(logits, batch.targets) * batch.weights
    index, valid = select[0], select[1]
    h = forward(model, batch.inputs, batch.segments, body=split.body, branches=batch.branches,
                positions=batch.positions)  # (B, L, D)
    h = h.reshape(B * L, -1)[index]  # (K, D): only trained positions
    if entries:
        return head_logprobs(split.head, h, select[2], grad=grad) * valid  # (K,)
    lp = head_logprobs(split.head, h, batch.targets.reshape(-1)[index], grad=grad) * valid  # (K,)
    out = mx.zeros((B * L,), mx.float32).at[index].add(lp)
    return out.reshape(B, L) * batch.weights


def logprobs(model: nn.Module, batch: Batch, *, reduction: str = "none", split: HeadSplit | None = None,
             select: tuple[mx.array, mx.array] | None = None, num_segments: int | None = None,
             grad: bool = False) -> mx.array:
    """Log-probs of the batch's targets, reduced as named.

    * ``"none"``: per token, (B, L), zero at untrained positions (per entry,
      (K,), for a ``select`` with targets: see :func:`token_logprobs`).
    * ``"sum"`` / ``"mean"``: per sequence over its trained tokens. For unpacked
      rows the result is (B,); for packed rows pass ``num_segments`` and get
      (B, num_segments) (segments that do not exist give 0).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if reduction != "none" and per_entry(select):
        raise ValueError("per-entry log-probs are reduced per sequence by their caller (preference.sequence_sums)")
    tok = token_logprobs(model, batch, split, select, grad=grad)
    if reduction == "none":
        return tok
    return reduce_tokens(tok, batch.weights, reduction, segments=batch.segments, num_segments=num_segments)


def reduce_tokens(tok: mx.array, weights: mx.array, reduction: str, *, segments: mx.array | None = None,
                  num_segments: int | None = None) -> mx.array:
    """Per-sequence ``"sum"`` or ``"mean"`` of per-token log-probs (B, L) over trained tokens.

    Used by :func:`logprobs`, and by methods that already hold per-token
    log-probs (a policy's and its reference's) and need several reductions
    of them without a second forward pass.

    >>> tok = mx.array([[-1.0, -3.0, 0.0]]); w = mx.array([[1.0, 1.0, 0.0]])
    >>> reduce_tokens(tok, w, "sum").item(), reduce_tokens(tok, w, "mean").item()
    (-4.0, -2.0)
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if segments is None:
        total, count = tok.sum(axis=1), weights.sum(axis=1)
    else:
        if num_segments is None:
            raise ValueError("per-sequence reductions of packed rows need num_segments")
        onehot = (segments[..., None] == mx.arange(num_segments)).astype(mx.float32)  # (B, L, S)
        total = (tok[..., None] * onehot).sum(axis=1)
        count = (weights[..., None] * onehot).sum(axis=1)
    if reduction == "sum":
        return total
    return total / mx.maximum(count, 1.0)


def k3(logp: mx.array, ref_logp: mx.array, mask: mx.array | None = None) -> mx.array:
    """The k3 estimate of KL(pi || pi_ref) per token: ``exp(q) - q - 1``, ``q = log pi_ref - log pi`` (>= 0).

    Unbiased for tokens sampled from the policy (Schulman's k3). ``mask``
    zeroes positions before the ``exp``, so positions left out (padding, or
    the rejected replies of preference pairs, pushed far down on purpose)
    cannot overflow it.

    >>> [round(x, 6) for x in k3(mx.array([-1.0, -2.0]), mx.array([-1.0, -1.0])).tolist()]  # e - 1 - 1
    [0.0, 0.718282]
    """
    q = ref_logp - logp
    if mask is not None:
        q = q * mask
    out = mx.exp(q) - q - 1.0
    return out * mask if mask is not None else out
