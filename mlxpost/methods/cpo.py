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

from ..logprobs import HeadSplit
from ..preference import PairLogps, PairLoss, pair_objective, smoothed_sigmoid_loss


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
