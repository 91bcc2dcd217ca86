"""ORPO (Hong et al. 2024): SFT on the chosen completion plus an odds-ratio preference term.

No reference model. With ``m_c``, ``m_r`` the **mean** per-token log-probs of
the chosen and rejected completions and ``odds(p) = p / (1 - p)``::

    log_odds = log odds(e^m_c) - log odds(e^m_r)
             = (m_c - m_r) - (log(1 - e^m_c) - log(1 - e^m_r))
    loss     = -m_c - lam * log sigmoid(log_odds)

``-m_c`` is the per-token NLL of the chosen completion (averaged per pair).
``log(1 - e^m)`` is computed as ``log(-expm1(m))``, exact for ``m`` near 0, with ``m``
clamped to at most -1e-6 so that a chosen completion of mean log-prob 0 gives a
finite loss and gradient (:func:`log1m_exp`).
Implicit rewards (as TRL reports them): ``lam * m``.
"""

from __future__ import annotations

from dataclasses import dataclass

import click
import mlx.core as mx

from ..core.logprobs import HeadSplit
from .preference import (
    DATA_HELP,
    FROM_OPTION,
    PairLogps,
    PairLoss,
    PreferenceConfig,
    PreferenceMethod,
    log_sigmoid,
    pair_objective,
)

# The largest m that log1m_exp takes (see there): about 8 float32 ulps of 1.
LOG1M_EXP_MAX = -1e-6


def log1m_exp(m: mx.array) -> mx.array:
    """``log(1 - exp(m))`` for ``m < 0``, with ``m`` clamped to at most :data:`LOG1M_EXP_MAX` (-1e-6).

    ``m`` is a mean log-prob. When the model is sure of every token it rounds
    to 0 in float32 (or a hair above 0: a log-softmax is not exactly <= 0 in
    floating point), where ``log(-expm1(m))`` is ``-inf`` (NaN above 0) and
    its gradient ``exp(m) / expm1(m)`` infinite: one such pair turns the whole
    step's gradient into NaN. Clamping at -1e-6 keeps the value at least
    ``log(1e-6) = -13.8`` and the gradient at most 1e6 in magnitude (it is 0
    above the clamp, where ``m`` is within float32 rounding, ~1e-7, of 0
    anyway); below -1e-6 nothing changes.

    >>> round(log1m_exp(mx.array([-0.6931472])).item(), 5)  # log(1 - 1/2)
    -0.69315
    >>> round(log1m_exp(mx.array([0.0])).item(), 3)  # log(1 - e^-1e-6), not -inf
    -13.816
    """
    return mx.log(-mx.expm1(mx.minimum(m, LOG1M_EXP_MAX)))


def orpo_loss(chosen_mean: mx.array, rejected_mean: mx.array, lam: float) -> tuple[mx.array, mx.array, mx.array]:
    """Per-pair ORPO loss, NLL term and log odds ratio.

    >>> import math
    >>> loss, nll, lo = orpo_loss(mx.array([math.log(0.5)]), mx.array([math.log(0.2)]), 0.1)
    >>> round(lo.item(), 5), round(nll.item(), 5)  # log((0.5/0.5) / (0.2/0.8)) = log 4
    (1.38629, 0.69315)
    >>> round(loss.item(), 5)  # 0.69315 + 0.1 * log(1 + 1/4)
    0.71546
    """
    log_odds = (chosen_mean - rejected_mean) - (log1m_exp(chosen_mean) - log1m_exp(rejected_mean))
    nll = -chosen_mean
    return nll - lam * log_sigmoid(log_odds), nll, log_odds


def orpo_score(lp: PairLogps, *, lam: float = 0.1) -> PairLoss:
    losses, nll, log_odds = orpo_loss(lp.chosen_mean, lp.rejected_mean, lam)
    return PairLoss(losses=losses, chosen_rewards=lam * lp.chosen_mean, rejected_rewards=lam * lp.rejected_mean,
                    logits=log_odds, metrics={"nll": nll, "log_odds": log_odds, "or_loss": -log_sigmoid(log_odds)})


def objective(split: HeadSplit | None, *, lam: float, monitor=None):
    return pair_objective(lambda lp: orpo_score(lp, lam=lam), split=split, reference=False, monitor=monitor)


@dataclass
class ORPOConfig:
    lam: float = 0.1  # lambda: weight of the odds-ratio term next to the NLL of chosen (TRL calls it beta)


class ORPO(PreferenceMethod):
    name = "orpo"
    help = """ORPO: NLL of the chosen answer plus an odds-ratio preference term; no reference model.

\b
Examples:
  mlxpost orpo --model Qwen/Qwen2.5-0.5B-Instruct --data prefs.jsonl --lam 0.1
""" + DATA_HELP
    sections = {"orpo": ORPOConfig, "preference": PreferenceConfig}
    options = (FROM_OPTION,
               click.option("--lam", "orpo__lam", type=float, help="Weight of the odds-ratio term (default 0.1)."))
    positive = ("orpo.lam",)

    def objective(self, prep):
        return objective(prep.split, lam=prep.cfg.orpo.lam, monitor=self.monitor(prep.cfg))
