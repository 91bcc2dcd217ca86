"""The reference pass reuses the policy's frozen lower layers.

LoRA usually adapts only the top blocks (``lora.num_layers``: 12 of
SmolLM2's 30 in our recipes, 16 by mlx-lm's default). Below the first
adapted block the policy and the reference (the same weights with the
adapters off) compute exactly the same hidden states, so a reference pass
that starts from scratch repeats that work. :class:`SharedBlocks` records the
hidden state that enters the first adapted block during the policy's
forward pass, and replays it in the reference pass: there the blocks below
are skipped (the first one returns the recorded state, under stop-gradient,
the others pass it on), and only the adapted blocks, the final norm and the
head run again. MLX's ``compile`` does not merge the two passes' identical
lower layers by itself (measured: the live reference cost 80% of a full
forward on SmolLM2-135M with 12 of 30 blocks adapted).

The swap is done on the model's own list of blocks, only while a forward
pass is being traced, and undone right after; the model's own code (the
embedding, masks, caches, the final norm) runs unchanged. Whether it is
exact for a model is checked once, on a probe input with the adapters
moved away from zero (:meth:`SharedBlocks.find`); models where the replay does
not reproduce the adapters-off output (blocks that return more than the
hidden state, loops that pass state from block to block besides it) get
``None`` and keep the full reference pass. Other attributes of a swapped
block (``use_sliding`` and the like, which some loops read) read through.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn

from ..model.lora import LoRALinear, adapters_off


def _blocks(model: nn.Module) -> list | None:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None) if inner is not None else None
    return layers if isinstance(layers, list) and layers else None


def first_adapted_block(model: nn.Module) -> int | None:
    """Index of the lowest block holding an adapter, or None when none does."""
    blocks = _blocks(model)
    if blocks is None:
        return None
    for i, block in enumerate(blocks):
        if any(isinstance(m, LoRALinear) for _, m in block.named_modules()):
            return i
    return None


class _StandIn:
    """Takes a block's place in the list; its other attributes (``use_sliding``, ...) read through."""

    def __init__(self, block, shared: "SharedBlocks"):
        self.block, self.shared = block, shared

    def __getattr__(self, name):  # only called for names not set on the stand-in itself
        if name.startswith("__") or name in ("block", "shared"):  # copies, pickling: no recursion
            raise AttributeError(name)
        return getattr(self.block, name)


class _Tap(_StandIn):
    """Stands in for the first adapted block: records its input, then runs it."""

    def __call__(self, h, *args, **kwargs):
        self.shared.hidden.append(h)  # one per call of the block (one per pass)
        return self.block(h, *args, **kwargs)


class _Replay(_StandIn):
    """Stands in for a frozen block below the first adapted one in the reference pass."""

    def __init__(self, block, shared: "SharedBlocks", first: bool):
        super().__init__(block, shared)
        self.first = first

    def __call__(self, h, *args, **kwargs):
        if not self.first:
            return h
        if not self.shared.hidden or self.shared.hidden[0].shape != h.shape:
            raise RuntimeError("the reference pass must follow a policy pass on the same batch")
        return mx.stop_gradient(self.shared.hidden.pop(0))


class SharedBlocks:
    def __init__(self, model: nn.Module, k: int):
        self.model, self.k = model, k
        self.hidden: list[mx.array] = []  # recorded inputs of block k, in call order

    @contextmanager
    def _swapped(self, stand_ins: dict) -> Iterator[None]:
        blocks = _blocks(self.model)
        saved = {i: blocks[i] for i in stand_ins}
        for i, s in stand_ins.items():
            blocks[i] = s
        try:
            yield
        finally:
            for i, b in saved.items():
                blocks[i] = b

    @contextmanager
    def policy(self) -> Iterator[None]:
        """Within the block, a forward pass records the hidden state entering block ``k``."""
        self.hidden = []
        try:
            with self._swapped({self.k: _Tap(_blocks(self.model)[self.k], self)}):
                yield
        except BaseException:
            self.hidden = []  # a failed pass leaves nothing to replay
            raise

    @contextmanager
    def reference(self) -> Iterator[None]:
        """Within the block, a forward pass starts at block ``k`` from the recorded state."""
        blocks = _blocks(self.model)
        try:
            with self._swapped({i: _Replay(blocks[i], self, i == 0) for i in range(self.k)}):
                yield
            if self.hidden:  # the passes went through the blocks a different number of times
                raise RuntimeError(f"the reference pass replayed fewer block inputs than the policy pass "
                                   f"recorded ({len(self.hidden)} left)")
        finally:
            self.hidden = []  # the graph holds them now; keep no traced array alive here

    @staticmethod
    def find(model: nn.Module, atol: float = 1e-6) -> "SharedBlocks | None":
        """Shared blocks for ``model`` if its lowest blocks carry no adapter and the replay is exact."""
        k = first_adapted_block(model)
        if not k:  # no adapter at all, or one in the first block: nothing to share
            return None
        shared = SharedBlocks(model, k)
        adapters = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
        saved = [m.lora_b for m in adapters]
        was_training = model.training
        model.eval()
        try:
            # Adapters away from zero, so that the policy differs from the reference.
            for m in adapters:
                m.lora_b = mx.random.normal(m.lora_b.shape, key=mx.random.key(7)).astype(m.lora_b.dtype) * 0.05
            x = mx.array([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=mx.int32)
            with adapters_off(model):
                want = model(x)
            with shared.policy():
                policy = model(x)
            with adapters_off(model), shared.reference():
                got = model(x)
            if got.shape != want.shape:
                return None
            want32, got32 = want.astype(mx.float32), got.astype(mx.float32)
            err = mx.abs(want32 - got32).max().item()
            moved = mx.abs(policy.astype(mx.float32) - want32).max().item()
            scale = max(1.0, mx.abs(want32).max().item())
        except Exception:
            return None
        finally:
            for m, b in zip(adapters, saved):
                m.lora_b = b
            shared.hidden = []
            if was_training:
                model.train()
        # A valid replay runs the very same operations on the same inputs: the
        # outputs agree to rounding at most (exactly, in practice). The probe
        # must also have told policy and reference apart, or it proved nothing.
        return shared if err <= atol * scale and moved > 0 else None
