"""Softmax, log-sum-exp and attention written as fused element-wise graphs, for MLX's CPU backend.

MLX's ``Softmax`` and ``LogSumExp`` primitives run a scalar ``exp`` on the
CPU (about 10 ns an element). Written as ops (a max, ``exp(x - max)``, a
sum) and compiled, the ``exp`` lands in a kernel of MLX's JIT, which
vectorizes once :mod:`mlxpost.backend.jit` gives it the host CPU's instruction set:
the softmax of (36, 416, 416) attention scores takes 13 ms instead of 64-75.
The exp is MLX's own polynomial, so the results match the primitives to
float rounding (tests allow 1e-6; on SmolLM2 the logits matched bit for
bit).

:func:`cpu_attention` routes ``mx.fast.scaled_dot_product_attention`` (what
mlx-lm's attention blocks call; on the CPU MLX composes it from a matmul, a
masked softmax and a matmul anyway) through :func:`attention` in every
pass of :func:`mlxpost.core.forward.forward` (training, evaluation, the
``--precompute-ref`` pass). :func:`enabled` says when: the JIT flags are
active in this process and the default device is the CPU. Without the
flags a composed softmax is slower than the primitive (its ``exp`` stays
scalar and it makes more passes), so nothing changes there. The output
layer's log-sum-exp (:mod:`mlxpost.core.logprobs`) uses :func:`logsumexp` in the
policy pass and MLX's own in the reference pass (:func:`no_grad_pass`).

Measured on (1024, 49152) logits: forward 200 ms against MLX's 600; value
and gradient 430 ms against 784 inside ``mx.compile`` (training steps are
compiled by default), but 1.3 s against 0.9 s when the step is not
compiled (``train.compile=false``; measured, cause not pinned down: the
custom gradient's pieces are compiled, but nothing fuses across them).
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager

import mlx.core as mx

from . import jit

__all__ = ["attention", "cpu_attention", "enabled", "logsumexp", "no_grad_pass", "query_chunks", "replayed", "routed",
           "routing", "set_enabled", "setting", "softmax"]

_override: bool | None = None

_no_grad: contextvars.ContextVar[bool] = contextvars.ContextVar("mlxpost_no_grad_pass", default=False)


@contextmanager
def no_grad_pass():
    """Within the block, :func:`logsumexp` is MLX's own: for a pass put under stop-gradient in a training step.

    The reference pass of DPO runs while the policy's activations are alive;
    there the composed log-sum-exp's temporary (``exp(x - max)``, the size of
    the logits) raised the step's peak memory by ~190 MB on SmolLM2-135M for
    no measurable gain. Attention keeps :func:`attention`.
    """
    token = _no_grad.set(True)
    try:
        yield
    finally:
        _no_grad.reset(token)


def set_enabled(value: bool | None) -> None:
    """Force the fused kernels on or off (benchmarks, tests); None: automatic."""
    global _override
    _override = value


def enabled() -> bool:
    """Whether training passes use :func:`attention` and :func:`logsumexp` (see the module doc)."""
    if _override is not None:
        return _override
    return jit.active() and mx.default_device() == mx.cpu


def _softmax_forward(x: mx.array) -> mx.array:
    m = mx.stop_gradient(x.max(axis=-1, keepdims=True))
    e = mx.exp(x - m)
    return e * (1.0 / e.sum(axis=-1, keepdims=True))


def _softmax_backward(y: mx.array, g: mx.array) -> mx.array:
    # d softmax: y * (g - <g, y>), the primitive's own rule, without a second exp.
    return y * (g - (g * y).sum(axis=-1, keepdims=True))


_softmax_forward_c = mx.compile(_softmax_forward, shapeless=True)

_softmax_backward_c = mx.compile(_softmax_backward, shapeless=True)


@mx.custom_function
def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis (``mx.softmax(x, axis=-1)``, float rounding aside).

    An axis of length 1 (one key: a one-token prompt's prefill) runs uncompiled: MLX's shapeless
    compiled function, once traced at another length, corrupts the heap on it (mlx 0.32.4, CPU).
    """
    return (_softmax_forward_c if x.shape[-1] > 1 else _softmax_forward)(x)


@softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    return ((_softmax_backward_c if output.shape[-1] > 1 else _softmax_backward)(output, cotangent),)


def _logsumexp_forward(x: mx.array) -> mx.array:
    m = mx.stop_gradient(x.max(axis=-1, keepdims=True))
    return mx.log(mx.exp(x - m).sum(axis=-1)) + m[..., 0]


def _logsumexp_backward(x: mx.array, out: mx.array, g: mx.array) -> mx.array:
    # d lse / dx = softmax(x) = exp(x - lse): recomputed (cheap here) rather than kept.
    return g[..., None] * mx.exp(x - out[..., None])


_logsumexp_forward_c = mx.compile(_logsumexp_forward, shapeless=True)

_logsumexp_backward_c = mx.compile(_logsumexp_backward, shapeless=True)


@mx.custom_function
def _logsumexp(x: mx.array) -> mx.array:
    return _logsumexp_forward_c(x)


def logsumexp(x: mx.array) -> mx.array:
    """Log-sum-exp over the last axis (``mx.logsumexp(x, axis=-1)`` for finite ``x``).

    Materializes ``exp(x - max)`` before the sum (MLX fuses element-wise
    work, not a reduction with it); inside :func:`no_grad_pass`, MLX's own.
    """
    return mx.logsumexp(x, axis=-1) if _no_grad.get() else _logsumexp(x)


@_logsumexp.vjp
def _logsumexp_vjp(primals, cotangent, output):
    x = primals[0] if isinstance(primals, (list, tuple)) else primals  # one input: the array itself
    return (_logsumexp_backward_c(x, output, cotangent),)


def attention(queries: mx.array, keys: mx.array, values: mx.array, *, scale: float,
              mask=None, sinks=None, **kwargs) -> mx.array:
    """``mx.fast.scaled_dot_product_attention`` with the softmax from :func:`softmax`.

    ``queries`` (B, H, L, D), ``keys``/``values`` (B, Hkv, S, D) with H a
    multiple of Hkv (grouped queries share a key head without copying it).
    ``mask``: None, ``"causal"`` (the last L of S positions as queries), a
    boolean array (True = attend) or an additive one of the queries' dtype,
    broadcastable to (B, H, L, S). A masked score is the lowest finite float, so a row with
    nothing to attend averages the values instead of producing NaN.
    Attention sinks and any option this does not know go to MLX's own.
    """
    B, H, L, D = queries.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    unusual = (sinks is not None or kwargs or H % Hkv or (isinstance(mask, str) and mask != "causal")
               or (isinstance(mask, mx.array) and mask.dtype not in (mx.bool_, queries.dtype)))
    if unusual:  # sinks, a stream, odd head counts, a mask of another dtype: MLX's own rules apply
        return _MLX_SDPA(queries, keys, values, scale=scale, mask=mask, sinks=sinks, **kwargs)
    rep = H // Hkv
    q = (queries * mx.array(scale, queries.dtype)).reshape(B, Hkv, rep, L, D)
    scores = q @ keys[:, :, None].swapaxes(-1, -2)  # (B, Hkv, rep, L, S)
    if mask is not None:
        if isinstance(mask, str):
            mask = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
        scores = scores.reshape(B, H, L, S)
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
        else:
            scores = scores + mask
        scores = scores.reshape(B, Hkv, rep, L, S)
    probs = softmax(scores.astype(mx.float32)).astype(values.dtype)
    return (probs @ values[:, :, None]).reshape(B, H, L, -1)


_MLX_SDPA = mx.fast.scaled_dot_product_attention

_routing: contextvars.ContextVar[bool] = contextvars.ContextVar("mlxpost_cpu_attention", default=False)

_chunks: contextvars.ContextVar[tuple[int, ...] | None] = contextvars.ContextVar("mlxpost_query_chunks", default=None)


def _dispatch(*args, **kwargs):
    """What ``mx.fast.scaled_dot_product_attention`` is once :func:`cpu_attention` or :func:`query_chunks` ran."""
    inner = attention if _routing.get() else _MLX_SDPA
    if len(args) < 3:  # some of q, k, v given by MLX's own keyword names
        args += tuple(kwargs.pop(n) for n in ("q", "k", "v")[len(args):] if n in kwargs)
    bounds = _chunks.get()
    if bounds and len(args) == 3 and _cuttable(args[0], args[1], kwargs.get("mask"), bounds):
        return _chunked(inner, *args, bounds=bounds, **kwargs)
    return inner(*args, **kwargs)


def _cuttable(queries, keys, mask, bounds) -> bool:
    """Whether a call is a whole row's self-attention under a mask with a row per query (causal-shaped)."""
    L = bounds[-1]
    if queries.shape[2] != L or keys.shape[2] != L:
        return False
    if isinstance(mask, str):
        return mask == "causal"
    # No mask, or one not given per query and key (keys only, say), may let a position see later keys: run whole.
    return isinstance(mask, mx.array) and mask.ndim >= 2 and mask.shape[-2:] == (L, L)


def _chunked(inner, queries, keys, values, *, bounds, mask, **kwargs):
    """:func:`query_chunks`' attention: each chunk's queries against the keys up to its end, concatenated."""
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        # "causal" is aligned to the last query and key, as both MLX's function and attention() read it.
        m = mask if isinstance(mask, str) else mask[..., a:b, :b]
        outs.append(inner(queries[:, :, a:b], keys[:, :, :b], values[:, :, :b], mask=m, **kwargs))
    return mx.concatenate(outs, axis=2)


@contextmanager
def query_chunks(bounds):
    """Within the block, attention over a whole row runs one query chunk at a time.

    ``bounds``: the cut points of the row (``[0, ..., L]``,
    :func:`mlxpost.core.forward.chunk_bounds`); None or a single span: whole rows,
    also inside an outer block that cuts (unlike ``cpu_attention(False)``).
    A call of ``mx.fast.scaled_dot_product_attention`` whose queries and keys
    both span the row, with a mask, computes each chunk's queries against
    the keys up to the chunk's end, with the matching rows and columns of the
    mask: the scores above the diagonal between chunks are never computed.
    Exact for masks that never let a position see a later one (causal,
    packed, tree and sliding-window masks); :func:`mlxpost.core.probes.chunking_problem`
    checks a model before training uses this. Calls without a mask
    (bidirectional attention) and with queries that are not the whole row
    (generation) run unchanged. The chunks go through whatever the call
    would have used (:func:`attention` where routed, else MLX's own).
    """
    bounds = tuple(bounds) if bounds is not None and len(bounds) > 2 else None
    with _scoped(_chunks, bounds):
        yield


def setting() -> tuple:
    """This context's attention setting (routing, query chunks), for :func:`replayed`."""
    return _routing.get(), _chunks.get()


@contextmanager
def replayed(value: tuple):
    """Within the block, the attention setting is ``value`` (from :func:`setting`) exactly.

    For a gradient-checkpointed block recomputed in the backward pass,
    outside the forward pass's context.
    """
    routing_on, bounds = value
    with routed(routing_on), query_chunks(bounds):
        yield


def routing() -> bool:
    """Whether attention in this context goes through :func:`attention` (inside :func:`cpu_attention`)."""
    return _routing.get()


@contextmanager
def routed(value: bool):
    """Within the block, attention routing is ``value`` exactly (on or off), whatever it was outside."""
    with _scoped(_routing, value):
        yield


@contextmanager
def _scoped(var: contextvars.ContextVar, value):
    """Within the block, ``var`` (read by :func:`_dispatch`) is ``value``; a true value installs the dispatcher."""
    if value and mx.fast.scaled_dot_product_attention is not _dispatch:
        mx.fast.scaled_dot_product_attention = _dispatch
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


@contextmanager
def cpu_attention(active: bool | None = None):
    """Within the block, ``mx.fast.scaled_dot_product_attention`` calls :func:`attention`.

    ``active`` defaults to :func:`enabled`; when false the block runs
    unchanged. The first use installs a dispatcher in ``mx.fast`` that sends
    calls to :func:`attention` only inside such a block, for this thread or
    task (a context variable): other threads, and everything outside, get
    MLX's own function. Compiled functions keep what they traced, so
    wrapping the traced call (as :func:`mlxpost.core.forward.forward` does) is
    enough; a block recomputed later (gradient checkpointing) replays the
    setting it had at its first call (:func:`setting`, :func:`replayed`). A false
    ``active`` inside an active block leaves the outer setting.
    """
    if not (enabled() if active is None else active):
        yield
        return
    with routed(True):
        yield
