"""Supervised fine-tuning: mean negative log-likelihood of the trained tokens.

The loss is summed over every trained token of a micro-batch and returned with
the token count; the training loop divides by the total count of the whole
optimizer step (all micro-batches, all ranks), so each token weighs the same
however the step is split.
"""

from __future__ import annotations

import mlx.core as mx

from ..logprobs import HeadSplit, logprobs
from ..train import Objective


def sft_loss(token_logprobs: mx.array, weights: mx.array) -> tuple[mx.array, mx.array, dict]:
    """Summed NLL and token count.

    token_logprobs: (B, L) log p(target), zero where not trained.
    weights: (B, L) 1.0 at trained positions.

    >>> lp = mx.array([[-1.0, -2.0, 0.0]]); w = mx.array([[1.0, 1.0, 0.0]])
    >>> loss, n, _ = sft_loss(lp, w); (loss.item(), n.item())
    (3.0, 2.0)
    """
    return -(token_logprobs * weights).sum(), weights.sum(), {}


def objective(split: HeadSplit | None = None) -> Objective:
    """The SFT objective; ``split`` computes logits only at trained positions."""

    def loss(model, batch):
        lp = logprobs(model, batch, reduction="none", split=split, select=batch.select)  # (B, L)
        return sft_loss(lp, batch.weights)

    return Objective(loss=loss, unit="token", perplexity=True)
