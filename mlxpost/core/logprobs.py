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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from ..backend import kernels
from .batches import Batch, per_entry
from .forward import forward

REDUCTIONS = ("none", "sum", "mean")


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
    lse = kernels.logsumexp(logits) if kernels.enabled() else mx.logsumexp(logits, axis=-1)
    return picked - lse


def token_logprobs(model: nn.Module, batch: Batch, split: HeadSplit | None = None,
                   select: tuple[mx.array, mx.array] | None = None) -> mx.array:
    """Per-token log p(target | prefix), shape (B, L); exactly 0 where weights are 0.

    ``select = (index, valid)``: flat positions (K,) whose log-probs are needed
    and a (K,) 0/1 mask for the padding entries of ``index``. With a head
    split, only those K hidden states go through the output layer.

    ``select = (index, valid, targets)`` (pairs sharing their prompt, see
    :class:`mlxpost.core.pairs.PairSource`): per entry, shape (K,), each entry
    the log-prob of its own target at its position (a position may appear
    twice); 0 for padding entries. Needs the head split.
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
        return target_logprobs(split.head(h), select[2]) * valid  # (K,)
    lp = target_logprobs(split.head(h), batch.targets.reshape(-1)[index]) * valid  # (K,)
    out = mx.zeros((B * L,), mx.float32).at[index].add(lp)
    return out.reshape(B, L) * batch.weights


def logprobs(model: nn.Module, batch: Batch, *, reduction: str = "none", split: HeadSplit | None = None,
             select: tuple[mx.array, mx.array] | None = None, num_segments: int | None = None) -> mx.array:
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
    tok = token_logprobs(model, batch, split, select)
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
