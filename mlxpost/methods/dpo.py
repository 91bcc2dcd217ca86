"""Direct Preference Optimization and its variants, with the reference = adapters off.

With policy log-probs ``pi_c``, ``pi_r`` of the chosen and rejected
completions and reference log-probs ``ref_c``, ``ref_r``, every variant works
on the difference of log-ratios ::

    h = (pi_c - ref_c) - (pi_r - ref_r)

* ``sigmoid`` (DPO, Rafailov et al. 2023): ``-log sigmoid(beta h)``; with label
  smoothing ``e`` (conservative DPO): ``-(1-e) log sigmoid(beta h) - e log sigmoid(-beta h)``.
* ``ipo`` (Azar et al. 2023): ``(h - 1 / (2 beta))^2`` on **mean** per-token
  log-probs (as in TRL), so the target margin does not grow with length.
* ``hinge`` (SLiC): ``max(0, 1 - beta h)``.
* ``robust`` (Chowdhury et al. 2024), unbiased under a label-flip rate ``e``:
  ``((1-e)(-log sigmoid(beta h)) + e log sigmoid(-beta h)) / (1 - 2e)``.

Any variant can add the chosen answers' NLL per token, ``rpo_alpha * (-m_c)``
(RPO), which keeps the text the model writes intact while it learns the preference.

Scores are **summed** log-probs of the completion except for IPO, which uses
the per-token mean. Implicit rewards: ``beta (pi - ref)`` on the same scores.
At the first step (fresh adapter) ``pi == ref``, so ``h = 0`` and the sigmoid
loss is exactly ``log 2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import click
import mlx.core as mx

from ..core.logprobs import HeadSplit
from ..errors import ConfigError
from .base import check_choice, check_non_negative
from .preference import (
    DATA_HELP,
    FROM_OPTION,
    PairLogps,
    PairLoss,
    PreferenceConfig,
    PreferenceMethod,
    check_label_smoothing,
    pair_objective,
    smoothed_sigmoid_loss,
)

# loss name -> the per-sequence reduction its scores use
REDUCTION = {"sigmoid": "sum", "ipo": "mean", "hinge": "sum", "robust": "sum"}


def sigmoid_loss(h: mx.array, beta: float, label_smoothing: float = 0.0) -> mx.array:
    """DPO's loss per pair.

    >>> round(sigmoid_loss(mx.array([0.0]), 0.1).item(), 6)  # log 2
    0.693147
    >>> round(sigmoid_loss(mx.array([10.0]), 0.1).item(), 6)  # log(1 + e^-1)
    0.313262
    """
    return smoothed_sigmoid_loss(beta * h, label_smoothing)


def ipo_loss(h: mx.array, beta: float) -> mx.array:
    """IPO's squared loss per pair; ``h`` from mean log-probs.

    >>> ipo_loss(mx.array([1.0]), 0.25).item()  # (1 - 2)^2
    1.0
    """
    return (h - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(h: mx.array, beta: float) -> mx.array:
    """SLiC's hinge loss per pair.

    >>> [round(x, 6) for x in hinge_loss(mx.array([2.0, 20.0]), 0.1).tolist()]
    [0.8, 0.0]
    """
    return mx.maximum(1.0 - beta * h, 0.0)


def robust_loss(h: mx.array, beta: float, label_smoothing: float) -> mx.array:
    """Robust DPO per pair (label smoothing = assumed flip rate, below 0.5).

    >>> round(robust_loss(mx.array([0.0]), 0.1, 0.2).item(), 6)  # (0.8 - 0.2) log 2 / 0.6
    0.693147
    """
    z = beta * h
    e = label_smoothing
    return (-(1.0 - e) * -mx.logaddexp(0.0, -z) + e * -mx.logaddexp(0.0, z)) / (1.0 - 2.0 * e)


# loss name -> per-pair loss of h (the difference of log-ratios), beta and label smoothing
LOSSES = {
    "sigmoid": lambda h, beta, e: sigmoid_loss(h, beta, e),
    "ipo": lambda h, beta, e: ipo_loss(h, beta),
    "hinge": lambda h, beta, e: hinge_loss(h, beta),
    "robust": lambda h, beta, e: robust_loss(h, beta, e),
}


def dpo_score(lp: PairLogps, *, loss: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
              rpo_alpha: float = 0.0) -> PairLoss:
    """The chosen DPO variant on a batch of pairs.

    ``rpo_alpha`` adds ``rpo_alpha * (-m_c)``, the NLL per token of the chosen
    answer (RPO, Pang et al. 2024; TRL's ``rpo_alpha``): DPO alone can widen
    the margin by pushing the rejected answers down in ways that also break
    the text the model writes (it stops writing a token the rejected side
    starts with, everywhere); the NLL keeps the chosen answers likely.

    >>> import mlx.core as mx
    >>> from mlxpost.methods.preference import PairLogps
    >>> z = mx.array([-4.0])
    >>> lp = PairLogps(z, z, mx.array([-2.0]), z, mx.array([1.0]), z, z, z, z)
    >>> round(dpo_score(lp, rpo_alpha=0.5).losses.item(), 6)  # log 2 + 0.5 * 2
    1.693147
    """
    if lp.ref_chosen is None:
        raise ValueError("DPO needs reference log-probs")
    if loss not in LOSSES:
        raise ValueError(f"unknown DPO loss {loss!r} (expected one of {', '.join(LOSSES)})")
    if REDUCTION[loss] == "mean":
        pc, pr, rc, rr = lp.chosen_mean, lp.rejected_mean, lp.ref_chosen_mean, lp.ref_rejected_mean
    else:
        pc, pr, rc, rr = lp.chosen, lp.rejected, lp.ref_chosen, lp.ref_rejected
    h = (pc - rc) - (pr - rr)
    losses = LOSSES[loss](h, beta, label_smoothing)
    metrics = {}
    if rpo_alpha:
        losses = losses + rpo_alpha * (-lp.chosen_mean)
        metrics["nll"] = -lp.chosen_mean
    return PairLoss(losses=losses, chosen_rewards=beta * (pc - rc), rejected_rewards=beta * (pr - rr),
                    logits=beta * h, metrics=metrics)


def objective(split: HeadSplit | None, *, loss: str, beta: float, label_smoothing: float, rpo_alpha: float = 0.0,
              monitor=None, shared_blocks=None):
    if loss not in LOSSES:
        raise ValueError(f"unknown DPO loss {loss!r}")

    def score(lp):
        return dpo_score(lp, loss=loss, beta=beta, label_smoothing=label_smoothing, rpo_alpha=rpo_alpha)

    return pair_objective(score, split=split, reference=True, monitor=monitor, shared_blocks=shared_blocks)


@dataclass
class DPOConfig:
    loss: str = "sigmoid"  # sigmoid | ipo | hinge | robust
    beta: float = 0.1  # strength of the tie to the reference (IPO: its tau)
    label_smoothing: float = 0.0  # sigmoid: conservative DPO; robust: assumed rate of flipped labels (< 0.5)
    rpo_alpha: float = 0.0  # weight of the chosen answers' NLL added to the loss (RPO; TRL's rpo_alpha); 0 = off


class DPO(PreferenceMethod):
    name = "dpo"
    help = """Direct Preference Optimization (reference = the same weights with adapters off).

\b
Examples:
  mlxpost dpo --model Qwen/Qwen2.5-0.5B-Instruct --data prefs.jsonl
  mlxpost dpo --from runs/my-sft --data prefs/ --loss ipo --beta 0.5
  mlxpost dpo --config recipes/smollm2-135m-dpo.yaml --precompute-ref
""" + DATA_HELP
    sections = {"dpo": DPOConfig, "preference": PreferenceConfig}
    options = (
        FROM_OPTION,
        click.option("--loss", "dpo__loss", type=click.Choice(list(REDUCTION)), help="DPO variant (default: sigmoid)."),
        click.option("--beta", "dpo__beta", type=float, help="Strength of the tie to the reference (default 0.1)."),
        click.option("--label-smoothing", "dpo__label_smoothing", type=float, help="Label noise (sigmoid, robust)."),
        click.option("--rpo-alpha", "dpo__rpo_alpha", type=float,
                     help="Add this weight times the chosen answers' NLL (RPO; default 0)."),
        click.option("--precompute-ref", "preference__precompute_ref", is_flag=True, default=None,
                     help="Reference log-probs once before training (cached beside the data)."),
    )
    reference = True
    positive = ("dpo.beta",)

    def validate(self, cfg) -> None:
        check_choice(cfg, "dpo.loss", tuple(LOSSES))
        super().validate(cfg)
        check_label_smoothing(cfg, "dpo.label_smoothing")
        check_non_negative(cfg, "dpo.rpo_alpha")
        if cfg.dpo.loss in ("ipo", "hinge") and cfg.dpo.label_smoothing:
            raise ConfigError(f"dpo.label_smoothing applies to the sigmoid and robust losses, not {cfg.dpo.loss}")

    def objective(self, prep):
        c = prep.cfg.dpo
        return objective(prep.split, loss=c.loss, beta=c.beta, label_smoothing=c.label_smoothing,
                         rpo_alpha=c.rpo_alpha, monitor=self.monitor(prep.cfg), shared_blocks=prep.state.get("shared_blocks"))
