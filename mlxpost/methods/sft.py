"""Supervised fine-tuning: mean negative log-likelihood of the trained tokens.

The loss is summed over every trained token of a micro-batch and returned with
the token count; the training loop divides by the total count of the whole
optimizer step (all micro-batches, all ranks), so each token weighs the same
however the step is split.
"""

from __future__ import annotations

import mlx.core as mx

from ..assets import DEFAULT_SFT_RECIPE
from ..core.logprobs import HeadSplit, logprobs
from ..training.loop import Objective
from .base import Bundled, Method


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


class SFT(Method):
    name = "sft"
    help = """Fine-tune with LoRA on chat, prompt/completion or text data.

\b
Examples:
  mlxpost sft                                   # built-in default
  mlxpost sft --model Qwen/Qwen2.5-0.5B-Instruct --data data/ --steps 500
  mlxpost sft --config recipes/smollm2-135m-sft.yaml --set train.lr=2e-4
  mlxpost sft --resume runs/sft-20260101-120000  # continue after a kill
"""
    data = "sft"
    bundled = Bundled(f"no --data and no --config: the built-in default run ({DEFAULT_SFT_RECIPE.name})",
                      recipe=DEFAULT_SFT_RECIPE)

    def objective(self, prep) -> Objective:
        return objective(prep.split)
