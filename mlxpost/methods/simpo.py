"""SimPO (Meng et al. 2024): length-normalized, reference-free, with a target margin.

With ``m_c``, ``m_r`` the **mean** per-token log-probs of the chosen and
rejected completions::

    z    = beta (m_c - m_r) - gamma
    loss = -(1-e) log sigmoid(z) - e log sigmoid(-z) + alpha * (-m_c)

``gamma`` is the target reward margin (the reward is ``beta * m``), ``e``
label smoothing, and ``alpha`` an optional NLL of the chosen completion
(0 in the paper; CPO-SimPO uses 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import click

from ..core.logprobs import HeadSplit
from .base import check_non_negative
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


def simpo_loss(chosen_mean, rejected_mean, *, beta: float, gamma: float, alpha: float = 0.0,
               label_smoothing: float = 0.0):
    """Per-pair SimPO loss and its logit.

    >>> import mlx.core as mx
    >>> loss, z = simpo_loss(mx.array([-1.0]), mx.array([-1.25]), beta=2.0, gamma=0.5)
    >>> z.item(), round(loss.item(), 6)  # 2 * 0.25 - 0.5 = 0, so log 2
    (0.0, 0.693147)
    """
    z = beta * (chosen_mean - rejected_mean) - gamma
    return smoothed_sigmoid_loss(z, label_smoothing) + alpha * (-chosen_mean), z


def simpo_score(lp: PairLogps, *, beta: float = 2.0, gamma: float = 0.5, alpha: float = 0.0,
                label_smoothing: float = 0.0) -> PairLoss:
    losses, z = simpo_loss(lp.chosen_mean, lp.rejected_mean, beta=beta, gamma=gamma, alpha=alpha,
                           label_smoothing=label_smoothing)
    return PairLoss(losses=losses, chosen_rewards=beta * lp.chosen_mean, rejected_rewards=beta * lp.rejected_mean,
                    logits=z, metrics={"nll": -lp.chosen_mean})


def objective(split: HeadSplit | None, *, beta: float, gamma: float, alpha: float, label_smoothing: float,
              monitor=None):
    def score(lp):
        return simpo_score(lp, beta=beta, gamma=gamma, alpha=alpha, label_smoothing=label_smoothing)

    return pair_objective(score, split=split, reference=False, monitor=monitor)


@dataclass
class SimPOConfig:
    beta: float = 2.0  # scale of the length-normalized reward
    gamma: float = 0.5  # target reward margin
    alpha: float = 0.0  # optional NLL of chosen (0 = pure SimPO)
    label_smoothing: float = 0.0


class SimPO(PreferenceMethod):
    name = "simpo"
    help = """SimPO: length-normalized, reference-free preference loss with a target margin.

\b
Examples:
  mlxpost simpo --data prefs.jsonl --beta 2 --gamma 0.5
  mlxpost simpo --from runs/my-sft --data prefs/ --alpha 0.1
""" + DATA_HELP
    sections = {"simpo": SimPOConfig, "preference": PreferenceConfig}
    options = (
        FROM_OPTION,
        click.option("--beta", "simpo__beta", type=float, help="Scale of the length-normalized reward (default 2.0)."),
        click.option("--gamma", "simpo__gamma", type=float, help="Target reward margin (default 0.5)."),
        click.option("--alpha", "simpo__alpha", type=float, help="Optional NLL of the chosen answer (default 0)."),
        click.option("--label-smoothing", "simpo__label_smoothing", type=float, help="Label noise."),
    )
    positive = ("simpo.beta",)

    def validate(self, cfg) -> None:
        super().validate(cfg)
        check_non_negative(cfg, "simpo.alpha", "simpo.gamma")
        check_label_smoothing(cfg, "simpo.label_smoothing")

    def objective(self, prep):
        c = prep.cfg.simpo
        return objective(prep.split, beta=c.beta, gamma=c.gamma, alpha=c.alpha, label_smoothing=c.label_smoothing,
                         monitor=self.monitor(prep.cfg))
