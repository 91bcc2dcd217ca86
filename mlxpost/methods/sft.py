"""Supervised fine-tuning: mean negative log-likelihood of the trained tokens.

The loss is summed over every trained token of a micro-batch and returned with
the token count; the training loop divides by the total count of the whole
optimizer step (all micro-batches, all ranks), so each token weighs the same
however the step is split.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..assets import DEFAULT_SFT_RECIPE
from ..core.logprobs import HeadSplit, logprobs
from ..training.loop import Objective
from .base import Bundled, Method, check_fraction, check_positive
from .sft_health import SFTHealth, SFTThresholds


@dataclass
class SFTConfig:
    gate_max_val_ppl: float = 20.0  # quality gate: validation perplexity below this
    flat_window: int = 10  # steps averaged to call the loss flat after warmup
    flat_min_drop: float = 0.01  # relative fall of the loss below which it is flat
    rising_evals: int = 3  # validation losses rising in a row before a warning
    oscillation_window: int = 20  # steps watched for a zig-zag loss
    oscillation_flips: float = 0.8  # share of changes of direction that makes a zig-zag
    oscillation_amplitude: float = 0.1  # ... with steps of at least this share of the mean loss


def sft_loss(token_logprobs: mx.array, weights: mx.array) -> tuple[mx.array, mx.array, dict]:
    """Summed NLL and token count.

    token_logprobs: (B, L) log p(target), zero where not trained.
    weights: (B, L) 1.0 at trained positions.

    >>> lp = mx.array([[-1.0, -2.0, 0.0]]); w = mx.array([[1.0, 1.0, 0.0]])
    >>> loss, n, _ = sft_loss(lp, w); (loss.item(), n.item())
    (3.0, 2.0)
    """
    return -(token_logprobs * weights).sum(), weights.sum(), {}


def objective(split: HeadSplit | None = None, monitor=None) -> Objective:
    """The SFT objective; ``split`` computes logits only at trained positions; ``monitor``: a health monitor factory."""

    def loss(model, batch):
        lp = logprobs(model, batch, reduction="none", split=split, select=batch.select)  # (B, L)
        return sft_loss(lp, batch.weights)

    return Objective(loss=loss, unit="token", perplexity=True, monitor=monitor)


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
    sections = {"sft": SFTConfig}
    bundled = Bundled(f"no --data and no --config: the built-in default run ({DEFAULT_SFT_RECIPE.name})",
                      recipe=DEFAULT_SFT_RECIPE)

    def validate(self, cfg) -> None:
        check_positive(cfg, "sft.gate_max_val_ppl", "sft.flat_window", "sft.rising_evals", "sft.oscillation_window")
        check_fraction(cfg, "sft.flat_min_drop", "sft.oscillation_flips")

    def monitor(self, cfg):
        """A factory of the run's health monitor (:class:`mlxpost.methods.sft_health.SFTHealth`)."""
        s, tr = cfg.sft, cfg.train
        t = SFTThresholds(warmup=tr.warmup_steps, flat_window=s.flat_window, flat_min_drop=s.flat_min_drop,
                          rising_evals=s.rising_evals, oscillation_window=s.oscillation_window,
                          oscillation_flips=s.oscillation_flips, oscillation_amplitude=s.oscillation_amplitude,
                          gate_max_val_ppl=s.gate_max_val_ppl)

        def make(total_steps: int) -> SFTHealth:
            t.warmup = tr.warmup_steps or int(round(tr.warmup_ratio * total_steps))
            return SFTHealth(total_steps, t)

        return make

    def objective(self, prep) -> Objective:
        return objective(prep.split, monitor=self.monitor(prep.cfg))
