"""LoRA and DoRA layers with an adapters-off switch.

The parameter names (``linear``, ``lora_a`` (in, r), ``lora_b`` (r, out) and
DoRA's ``m`` (out,)) and the forward math match mlx-lm's own tuner layers, so
an adapter written by mlxpost loads with ``mlx_lm.generate --adapter-path``.

What mlx-lm lacks and methods with a reference model need: every adapter
layer can be switched off (``adapters_off(model)``), which turns the policy
back into the base model without a second copy of the weights. The switch is
a Python attribute read while a function is traced, so switching inside a
compiled function works (the trace records both paths); flipping it between
calls of an already compiled function does not, and is never done.

Why not subclasses of mlx-lm's ``LoRALinear`` / ``DoRALinear`` (inheriting
their ``fuse``): importing ``mlx_lm.tuner.lora`` runs ``mlx_lm/__init__``,
which imports transformers: 4-6 s on the 2-core Linux machine (measured with
``python -X importtime -c "import mlx_lm.tuner.lora"``; this module imports
in 0.05 s), and subclassing needs that import at module level, on every
command. ``fused`` here is a few lines of the same math; tests/test_hub_export.py
checks that mlx-lm's own layers, loading an exported adapter, give our
logits, and that the fused export gives them in transformers.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn


def _dims(linear: nn.Module) -> tuple[int, int]:
    out_dims, in_dims = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        in_dims = in_dims * 32 // linear.bits
    return in_dims, out_dims


def dequantized_weight(linear: nn.Module) -> mx.array:
    if isinstance(linear, nn.QuantizedLinear):
        return mx.dequantize(linear.weight, linear.scales, linear.biases,
                             group_size=linear.group_size, bits=linear.bits, mode=linear.mode)
    return linear.weight


def linear_layer(weight: mx.array, bias: mx.array | None = None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` (out, in) and ``bias``, without drawing initial values first
    (``nn.Linear(...)`` would draw random ones from the global random stream, then be overwritten)."""
    out = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(out)
    out.weight = weight
    if bias is not None:
        out.bias = bias
    return out


class LoRALinear(nn.Module):
    """``y = W x + b + scale * B(A(dropout(x)))`` with ``B`` initialised to zero."""

    def __init__(self, linear: nn.Module, rank: int = 8, scale: float = 2.0, dropout: float = 0.0):
        super().__init__()
        in_dims, out_dims = _dims(linear)
        self.linear = linear
        self.scale = float(scale)
        self.dropout = nn.Dropout(p=dropout)
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))
        self.adapter_enabled = True

    @property
    def rank(self) -> int:
        return self.lora_a.shape[1]

    def delta(self) -> mx.array:
        """The low-rank update in the base weight's layout (out, in)."""
        return (self.scale * self.lora_b.T) @ self.lora_a.T

    def __call__(self, x):
        y = self.linear(x)
        if not self.adapter_enabled:
            return y
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        return y + (self.scale * z).astype(x.dtype)

    def fused(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the update merged (dequantized if needed)."""
        w = dequantized_weight(self.linear)
        return linear_layer(w + self.delta().astype(w.dtype), self.linear.get("bias"))


class DoRALinear(LoRALinear):
    """Weight-decomposed LoRA: ``y = m / ||W + dW||_row * (W + dW) x + b``.

    The row norm is treated as a constant in the backward pass (as in the
    DoRA paper's efficient variant and in mlx-lm).
    """

    def __init__(self, linear: nn.Module, rank: int = 8, scale: float = 2.0, dropout: float = 0.0):
        super().__init__(linear, rank, scale, dropout)
        self.m = mx.linalg.norm(dequantized_weight(linear).astype(mx.float32), axis=1)

    def __call__(self, x):
        if not self.adapter_enabled:
            return self.linear(x)
        w = dequantized_weight(self.linear)
        y = x @ w.T
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        y = y + (self.scale * z).astype(x.dtype)
        denom = mx.stop_gradient(mx.linalg.norm(w + self.delta().astype(w.dtype), axis=1))
        y = (self.m / denom).astype(x.dtype) * y
        if "bias" in self.linear:
            y = y + self.linear.bias
        return y

    def fused(self) -> nn.Linear:
        w = dequantized_weight(self.linear)
        has_bias = "bias" in self.linear
        merged = w + self.delta().astype(w.dtype)
        merged = (self.m / mx.linalg.norm(merged, axis=1))[:, None].astype(w.dtype) * merged
        return linear_layer(merged, self.linear.bias if has_bias else None)


ADAPTER_LEAVES = ("lora_a", "lora_b", "m")


def adapter_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes exactly the base model."""
    mods = [m for _, m in adapter_modules(model)]
    before = [m.adapter_enabled for m in mods]
    for m in mods:
        m.adapter_enabled = False
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.adapter_enabled = b


def set_merge_for_sampling(model: nn.Module, merge: bool) -> None:
    """Whether :func:`adapters_merged` merges this model's adapters (True unless a memory budget says no)."""
    object.__setattr__(model, "_mlxpost_merge_for_sampling", bool(merge))


def merges_for_sampling(model: nn.Module) -> bool:
    return getattr(model, "_mlxpost_merge_for_sampling", True)


def merged_bytes(model: nn.Module) -> int:
    """Bytes the merged copies of :func:`adapters_merged` take: the weights of the adapted float layers."""
    return sum(m.linear.weight.nbytes for _, m in adapter_modules(model)
               if m.adapter_enabled and not isinstance(m.linear, nn.QuantizedLinear))


@contextmanager
def adapters_merged(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every adapter on a float base layer is merged into its weight (for generation).

    Sampling runs one token at a time, where each adapter's two extra
    matrix products per layer cost about as much as the layer itself. Merged,
    a layer is one product. The base layer is replaced by its fused copy
    (:meth:`LoRALinear.fused`) and put back on exit, so the model is exactly
    what it was (the original arrays are kept, not recomputed). Adapters on
    quantized layers stay unmerged (merging would dequantize them), and so
    do adapters that are switched off. Not for use inside a compiled
    training step: it changes the model's structure.

    The merged copies take as many bytes as the adapted layers' weights
    while they exist (1.4 GB more for LoRA on every linear layer of a
    0.5B-parameter model in float32). A run under a memory budget that
    cannot hold them turns merging off (:func:`set_merge_for_sampling`,
    chosen by :mod:`mlxpost.training.memory`); the block then leaves the
    adapters as they are.
    """
    mods = [m for _, m in adapter_modules(model)
            if m.adapter_enabled and not isinstance(m.linear, nn.QuantizedLinear)] if merges_for_sampling(model) else []
    saved = [m.linear for m in mods]
    try:
        for m in mods:
            m.linear = m.fused()
            m.adapter_enabled = False
        yield model
    finally:
        for m, linear in zip(mods, saved):
            m.linear = linear
            m.adapter_enabled = True
