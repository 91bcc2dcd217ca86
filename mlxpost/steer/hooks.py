"""Steering hooks: a block's output plus ``λ·v``, installed and removed by swapping the block in its list.

mlx-lm models keep their transformer blocks in a plain Python list
(``model.layers``, the same list object as ``model.model.layers``) and call
them in a loop (``h = layer(h, mask, cache)``). A stand-in object put at
``layers[i]`` calls the original block and adds ``Σ λ_k·v_k`` (shape ``(D,)``,
broadcast over ``(B, T, D)``) to its output; putting the original object back
restores the model exactly (no weight is touched). At λ=0 nothing is
installed, so the model is bit-identical to the unsteered one by
construction. The same swap technique is used by :mod:`mlxpost.core.shared_blocks`.

:func:`steered` is the one entry point: generation (``mlxpost generate``),
the sweep and, later, ``mlxpost eval`` wrap their sampling in it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn

from ..errors import MlxpostError


def model_blocks(model: nn.Module) -> list:
    """The model's list of transformer blocks (mutable in place)."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, list):
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
    if not isinstance(layers, list) or not layers:
        raise MlxpostError(f"{type(model).__name__}: no list of transformer blocks found (model.layers)")
    return layers


@dataclass
class SteerSpec:
    """One steering vector to add: ``scale · vector`` at the output of block ``layer``."""

    layer: int
    vector: mx.array  # (D,)
    scale: float
    name: str = ""
    prompt_only: bool = False  # added in the prompt's pass only (see _Steer), not in the decode steps


class _Stand:
    """Takes a block's place; other attributes (``use_sliding``, ...) read through to the block."""

    def __init__(self, block):
        self.block = block

    def __getattr__(self, name):  # only for names not set on the stand-in
        if name.startswith("__") or name == "block":
            raise AttributeError(name)
        return getattr(self.block, name)


class _Steer(_Stand):
    """``block(h, ...) + add`` where ``add`` (D,) is the sum of every spec's ``λ·v`` for this block.

    ``prompt`` (D,) is added only in passes over more than one position: the
    prompt's prefill, where generation reads a whole prompt at once. The
    decode steps (one position each) run unsteered; the KV cache carries the
    shifted prompt into every later token (Turner et al. 2023's ActAdd adds
    at prompt positions only). A vector added at every position keeps pushing
    each new token the same way, which can repeat a format's first token
    instead of writing the rest of it. A one-token prompt is not steered.
    """

    def __init__(self, block, add: mx.array | None, prompt: mx.array | None = None):
        super().__init__(block)
        self.add, self.prompt = add, prompt

    def __call__(self, h, *args, **kwargs):
        out = self.block(h, *args, **kwargs)
        add = self.add
        if self.prompt is not None and out.shape[1] > 1 and not _after_prompt[0]:
            add = self.prompt if add is None else add + self.prompt
        return out if add is None else out + add.astype(out.dtype)


class _Record(_Stand):
    """Stores the block's output (B, T, D) in ``sink[layer]``, returns it unchanged."""

    def __init__(self, block, sink: dict, layer: int):
        super().__init__(block)
        self.sink, self.layer = sink, layer

    def __call__(self, h, *args, **kwargs):
        out = self.block(h, *args, **kwargs)
        self.sink[self.layer] = out
        return out


_after_prompt = [False]  # inside after_prompt(): passes of several positions are not the prompt's


@contextmanager
def after_prompt() -> Iterator[None]:
    """Inside the block, a pass of several positions continues a prompt already in the KV cache (scoring a
    reply in one pass), so prompt-only vectors are not added to it."""
    before = _after_prompt[0]
    _after_prompt[0] = True
    try:
        yield
    finally:
        _after_prompt[0] = before


@contextmanager
def _swapped(model: nn.Module, stands: dict[int, object]) -> Iterator[None]:
    blocks = model_blocks(model)
    saved = {i: blocks[i] for i in stands}
    try:
        for i, s in stands.items():
            blocks[i] = s
        yield
    finally:
        for i, b in saved.items():
            blocks[i] = b


def _check_layer(model: nn.Module, layer: int, dim: int | None = None, vector=None) -> None:
    n = len(model_blocks(model))
    if not 0 <= layer < n:
        raise MlxpostError(f"steering layer {layer} is outside the model's blocks 0..{n - 1}")


@contextmanager
def steered(model: nn.Module, specs: Sequence[SteerSpec]) -> Iterator[nn.Module]:
    """Inside the block, each spec's ``scale·vector`` is added to its layer's output; vectors on one layer sum.

    Specs with ``scale == 0`` are not installed at all, so ``steered(model,
    [spec at λ=0])`` runs exactly the unsteered model. ``prompt_only`` specs
    are added in the prompt's pass only (see :class:`_Steer`). On exit the original
    blocks are back in place (the same objects), whatever happened inside.
    """
    adds: dict[tuple[int, bool], mx.array] = {}  # (layer, prompt only) -> the sum of λ·v
    for s in specs:
        _check_layer(model, s.layer)
        if s.scale == 0:
            continue
        v = mx.array(s.vector).reshape(-1)
        key = (s.layer, bool(s.prompt_only))
        adds[key] = adds[key] + s.scale * v if key in adds else s.scale * v
    blocks = model_blocks(model)
    layers = sorted({layer for layer, _ in adds})
    with _swapped(model, {i: _Steer(blocks[i], adds.get((i, False)), adds.get((i, True))) for i in layers}):
        yield model


@contextmanager
def recording(model: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, mx.array]]:
    """Inside the block, every forward pass stores each listed block's output ``(B, T, D)`` in the yielded dict."""
    sink: dict[int, mx.array] = {}
    for i in layers:
        _check_layer(model, i)
    blocks = model_blocks(model)
    with _swapped(model, {i: _Record(blocks[i], sink, i) for i in layers}):
        yield sink
