"""CPO (Xu et al. 2024): a reference-free DPO with a behaviour-cloning term.

With ``s_c``, ``s_r`` the **summed** log-probs of the chosen and rejected
completions and ``m_c`` the mean per-token log-prob of the chosen one::

    z    = beta (s_c - s_r)
    loss = -(1-e) log sigmoid(z) - e log sigmoid(-z) + alpha * (-m_c)

``alpha`` weighs the NLL of the chosen completion (the behaviour-cloning
regulariser that replaces the reference model); ``e`` is label smoothing.
Implicit rewards: ``beta * s``.
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


def cpo_loss(chosen, rejected, chosen_mean, *, beta: float, alpha: float, label_smoothing: float = 0.0):
    """Per-pair CPO loss and its logit.

    >>> import mlx.core as mx
    >>> loss, z = cpo_loss(mx.array([-10.0]), mx.array([-10.0]), mx.array([-2.0]), beta=0.1, alpha=1.0)
    >>> round(loss.item(), 5), z.item()  # log 2 + 2
    (2.69315, 0.0)
    """
    z = beta * (chosen - rejected)
    return smoothed_sigmoid_loss(z, label_smoothing) + alpha * (-chosen_mean), z


def cpo_score(lp: PairLogps, *, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0) -> PairLoss:
    losses, z = cpo_loss(lp.chosen, lp.rejected, lp.chosen_mean, beta=beta, alpha=alpha,
                         label_smoothing=label_smoothing)
    return PairLoss(losses=losses, chosen_rewards=beta * lp.chosen, rejected_rewards=beta * lp.rejected, logits=z,
                    metrics={"nll": -lp.chosen_mean})


def objective(split: HeadSplit | None, *, beta: float, alpha: float, label_smoothing: float, monitor=None):
    def score(lp):
        return cpo_score(lp, beta=beta, alpha=alpha, label_smoothing=label_smoothing)

    return pair_objective(score, split=split, reference=False, monitor=monitor)


@dataclass
class CPOConfig:
    beta: float = 0.1
    alpha: float = 1.0  # weight of the behaviour-cloning term (NLL of chosen)
    label_smoothing: float = 0.0


class CPO(PreferenceMethod):
    name = "cpo"
    help = """CPO: reference-free DPO on summed log-probs, plus NLL of the chosen answer.

\b
Examples:
  mlxpost cpo --data prefs.jsonl --beta 0.1 --alpha 1.0
  mlxpost cpo --from runs/my-sft --data prefs/
""" + DATA_HELP
    sections = {"cpo": CPOConfig, "preference": PreferenceConfig}
    options = (
        FROM_OPTION,
        click.option("--beta", "cpo__beta", type=float, help="Scale of the preference logit (default 0.1)."),
        click.option("--alpha", "cpo__alpha", type=float,
                     help="Weight of the NLL (behaviour cloning) term (default 1.0)."),
        click.option("--label-smoothing", "cpo__label_smoothing", type=float, help="Label noise."),
    )
    positive = ("cpo.beta",)

    def validate(self, cfg) -> None:
        super().validate(cfg)
        check_non_negative(cfg, "cpo.alpha")
        check_label_smoothing(cfg, "cpo.label_smoothing")

    def objective(self, prep):
        c = prep.cfg.cpo
        return objective(prep.split, beta=c.beta, alpha=c.alpha, label_smoothing=c.label_smoothing,
                         monitor=self.monitor(prep.cfg))
