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

from ..logprobs import HeadSplit
from ..preference import PairLogps, PairLoss, pair_objective, smoothed_sigmoid_loss


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
