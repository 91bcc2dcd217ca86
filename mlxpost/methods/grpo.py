"""GRPO: group-relative advantages and the clipped policy objective, as pure functions.

For a prompt, G completions ``o_1..o_G`` are sampled and scored ``r_1..r_G``.
The advantage of completion i is its reward relative to its group:

    A_i = (r_i - mean(r_group)) / (s + 1e-4)

with ``s`` chosen by ``scale``: ``"group"`` (the std of the group, as in the
original GRPO), ``"batch"`` (the std over all completions of the step) or
``"none"`` (s = 1, as in Dr. GRPO). Step-verified RLVR replaces the one
advantage per completion by one per token (:mod:`mlxpost.rl`).

Per completion token t, with the importance ratio ``rho_t = pi(o_t) / pi_old(o_t)``
(``pi_old``: the policy that sampled; exactly 1 on the first pass over a
rollout), the clipped objective is

    loss_t = -min(rho_t * A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) * A_t)
             + beta * KL_t,    KL_t = exp(q_t) - q_t - 1,  q_t = log pi_ref(o_t) - log pi(o_t)

(KL_t: the k3 estimator against the reference, i.e. the same weights with the
adapters off; beta defaults to 0). Token losses are reduced to one number by
one of three normalizations:

* ``"grpo"``: mean over each completion's tokens, then mean over completions
  (the original GRPO; long completions weigh less per token);
* ``"dapo"``: sum over all tokens / number of tokens (token-level, DAPO);
* ``"dr_grpo"``: sum over all tokens / (completions * max_new_tokens), a
  constant (Dr. GRPO; no length bias).

Each normalization returns ``(sum, count)`` so that gradient accumulation and
several processes divide once, by the total count.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .. import kernels
from ..logprobs import HeadSplit, token_logprobs

SCALES = ("group", "batch", "none")
NORMS = ("grpo", "dapo", "dr_grpo")


def group_advantages(rewards: np.ndarray, group_size: int, scale: str = "group", eps: float = 1e-4) -> np.ndarray:
    """(P*G,) rewards, rows grouped by prompt -> (P*G,) advantages.

    The std is the population std of the group (numpy's default, ddof=0:
    divide by G), not the sample std (ddof=1: divide by G - 1). The
    advantage standardizes the group's own rewards: the G completions are
    the whole set being ranked against each other, not a sample from which a
    wider variance is estimated, and with ddof=0 the advantages of every
    group that is not all equal have mean 0 and std exactly 1 (up to ``eps``),
    whatever G is. With ddof=1 they would be smaller by ``sqrt((G - 1) / G)``:
    for G = 2 rewards (1, 0) give +-1 here and +-0.707 with ddof=1; for G = 8
    the factor is 0.935.

    TRL's GRPOTrainer (huggingface/trl, ``trl/trainer/grpo_trainer.py``)
    computes ``rewards.view(-1, num_generations).std(dim=1)``, torch's
    default Bessel-corrected std (ddof=1), and then
    ``(r - mean) / (std + 1e-4)``, so its advantages are ours times
    ``sqrt((G - 1) / G)`` (apart from ``eps``): the same direction, scaled by
    a factor that depends only on G. ``"batch"`` is the population std of
    all P*G rewards.

    >>> group_advantages(np.array([1.0, 0.0]), 2).round(3).tolist()
    [1.0, -1.0]
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    r = np.asarray(rewards, np.float64).reshape(-1, group_size)
    centred = r - r.mean(axis=1, keepdims=True)
    if scale == "group":
        s = r.std(axis=1, keepdims=True)
    elif scale == "batch":
        s = np.full_like(r[:, :1], r.std())
    else:
        s = np.ones_like(r[:, :1])
        eps = 0.0
    return (centred / (s + eps)).reshape(-1).astype(np.float32)


def clipped_token_loss(logp: mx.array, old_logp: mx.array, adv: mx.array, eps_low: float, eps_high: float):
    """Per-token clipped surrogate loss and its diagnostics. All (B, L).

    Returns ``(loss, ratio, clipped_low, clipped_high)``; ``clipped_low`` marks
    tokens where the ratio fell below ``1 - eps_low`` with a negative
    advantage (the clip holds the gradient at zero), ``clipped_high`` those
    above ``1 + eps_high`` with a positive advantage.
    """
    ratio = mx.exp(logp - old_logp)
    clipped = mx.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = -mx.minimum(ratio * adv, clipped * adv)
    low = ((ratio < 1.0 - eps_low) & (adv < 0)).astype(mx.float32)
    high = ((ratio > 1.0 + eps_high) & (adv > 0)).astype(mx.float32)
    return loss, ratio, low, high


def k3(logp: mx.array, ref_logp: mx.array) -> mx.array:
    """The k3 estimate of KL(pi || pi_ref) per token: exp(q) - q - 1, q = ref - logp (>= 0)."""
    q = ref_logp - logp
    return mx.exp(q) - q - 1.0


def normalize(token_loss: mx.array, weights: mx.array, norm: str, max_new_tokens: int) -> tuple[mx.array, mx.array]:
    """(sum, count) of a (B, L) token loss over trained tokens (``weights``); see the module docstring."""
    per_row = (token_loss * weights).sum(axis=1)
    n_tok = weights.sum(axis=1)
    rows = (n_tok > 0).astype(mx.float32)
    if norm == "grpo":
        return (per_row / mx.maximum(n_tok, 1.0)).sum(), rows.sum()
    if norm == "dapo":
        return per_row.sum(), n_tok.sum()
    if norm == "dr_grpo":
        return per_row.sum() / max_new_tokens, rows.sum()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def objective(split: HeadSplit | None, *, eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.0,
              norm: str = "grpo", max_new_tokens: int = 128, monitor=None):
    """The training objective over rollout batches built by :class:`mlxpost.rl.RolloutSource`.

    The batch carries ``extra["adv"]`` (B, L) token advantages aligned with
    ``targets``, and ``extra["old_logps"]`` when a rollout is reused for
    several optimizer steps (else the ratio is taken against the current
    log-probs under stop-gradient: exactly 1, with the gradient of the policy
    term intact).
    """
    from ..lora import adapters_off
    from ..train import Objective

    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")

    def loss(model, batch):
        w = batch.weights
        logp = token_logprobs(model, batch, split, batch.select)
        extra = batch.extra or {}
        old = extra.get("old_logps")
        old = mx.stop_gradient(logp) if old is None else old
        adv = extra["adv"]
        tok_loss, ratio, low, high = clipped_token_loss(logp, old, adv, eps_low, eps_high)
        n = mx.maximum(w.sum(), 1.0)
        metrics = {}
        if beta > 0:
            with adapters_off(model), kernels.no_grad_pass():
                ref = mx.stop_gradient(token_logprobs(model, batch, split, batch.select))
            kl = k3(logp, ref) * w
            tok_loss = tok_loss + beta * kl
        else:
            kl = k3(logp, mx.stop_gradient(logp)) * w  # zero: no reference pass when beta is 0
        total, count = normalize(tok_loss, w, norm, max_new_tokens)
        sg = mx.stop_gradient
        # Token means, scaled by ``count`` so that the loop's division by the
        # summed count gives count-weighted means over micro-batches.
        for name, v in (("kl", kl), ("clip_low", low * w), ("clip_high", high * w), ("ratio", ratio * w)):
            metrics[name] = sg(v.sum() / n * count)
        return total, count, metrics

    return Objective(loss=loss, unit="completion" if norm != "dapo" else "token", perplexity=False,
                     display=("reward", "reward_std", "kl", "clip_high"), monitor=monitor)
