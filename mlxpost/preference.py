"""Preference pairs on the shared core: scores of chosen and rejected, the reference, common metrics.

A pair batch holds ``P`` pairs as ``2P`` rows of one batch: rows ``0..P-1``
are the chosen sides, rows ``P..2P-1`` the rejected sides of the same pairs
(see :class:`mlxpost.batching.PairSource`). Both go through the model in
**one** forward pass; the prompt tokens carry no weight, so every score below
is over completion tokens only.

The reference model is the same weights with the adapters switched off
(:func:`mlxpost.lora.adapters_off`) under stop-gradient, or reference
log-probs computed once before training and carried by the batch
(``batch.extra["ref_logps"]``, see :mod:`mlxpost.reference`). There is never
a second copy of the model.

A method (``methods/dpo.py``, ``orpo.py``, ``cpo.py``, ``simpo.py``) is a
pure function ``score(PairLogps) -> PairLoss``; :func:`pair_objective` turns
it into the training loop's objective and adds the metrics every
preference method reports, each averaged over pairs:

* ``rewards/chosen``, ``rewards/rejected``: the method's implicit rewards
  (DPO: ``beta * (log pi - log pi_ref)``; reference-free methods:
  ``beta * log pi``), ``rewards/margins`` (chosen - rejected) and
  ``rewards/accuracies`` (the fraction of pairs whose chosen reward is higher:
  a per-pair comparison, not a comparison of batch means);
* ``logps/chosen``, ``logps/rejected``: summed log-probs of each completion,
  and ``logps/chosen_mean``, ``logps/rejected_mean`` per token;
* ``kl`` (when there is a reference): an estimate of KL(policy || reference)
  in nats per answer token, with the k3 estimator ``exp(r) - r - 1``,
  ``r = log pi_ref - log pi``, on the tokens of the **chosen** answers
  (non-negative; unbiased for tokens sampled from the policy, and the chosen
  answers are what the policy is trained towards; rejected tokens, pushed
  down on purpose, would make it explode without saying anything about the
  policy's own outputs);
* ``logratio/chosen``, ``logratio/rejected`` (when there is a reference):
  ``log pi - log pi_ref`` per completion token, 0 at the start;
* ``pref_loss``: ``-log sigmoid(z)`` of the method's preference logit ``z``
  (what the health checks watch for collapse).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from . import kernels
from .batching import Batch
from .logprobs import HeadSplit, logprobs
from .lora import adapters_off
from .train import Objective

# Panel columns shown live for preference methods.
DISPLAY = ("rewards/margins", "rewards/accuracies", "kl")


@dataclass
class PairLogps:
    """Per-pair scores of the policy (and the reference), each of shape (P,)."""

    chosen: mx.array  # summed log p(chosen completion | prompt)
    rejected: mx.array
    chosen_mean: mx.array  # the same per completion token
    rejected_mean: mx.array
    valid: mx.array  # 1.0 for real pairs, 0.0 for the padding pairs of a short batch
    ref_chosen: mx.array | None = None
    ref_rejected: mx.array | None = None
    ref_chosen_mean: mx.array | None = None
    ref_rejected_mean: mx.array | None = None
    kl: mx.array | None = None  # k3 estimate per completion token, over both sides


@dataclass
class PairLoss:
    """What a method's score function returns, each of shape (P,)."""

    losses: mx.array
    chosen_rewards: mx.array
    rejected_rewards: mx.array
    logits: mx.array  # the preference logit z: the pair is "won" when z is large
    metrics: dict = field(default_factory=dict)  # method-specific, per pair


def log_sigmoid(z: mx.array) -> mx.array:
    """``log sigmoid(z) = -log(1 + exp(-z))``, stable for large ``|z|``."""
    return -mx.logaddexp(mx.zeros_like(z), -z)


def smoothed_sigmoid_loss(z: mx.array, label_smoothing: float = 0.0) -> mx.array:
    """``-(1 - e) log sigmoid(z) - e log sigmoid(-z)``: the Bradley-Terry loss with label noise ``e``.

    >>> round(smoothed_sigmoid_loss(mx.array([0.0])).item(), 6)  # log 2
    0.693147
    """
    loss = -log_sigmoid(z)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * log_sigmoid(-z)
    return loss


def _softplus(x: mx.array) -> mx.array:
    """``log(1 + e^x)``, written differently from :func:`log_sigmoid` on purpose.

    ``pref_loss`` often equals the loss itself (sigmoid DPO); when a compiled
    function returns the gradient of one and the other as an output, MLX
    0.32's ``mx.compile`` merges the two identical graphs and then fails
    ("IndexError: _Map_base::at"). A different formula keeps them apart.
    """
    return mx.maximum(x, 0.0) + mx.log1p(mx.exp(-mx.abs(x)))


def _halves(x: mx.array) -> tuple[mx.array, mx.array]:
    P = x.shape[0] // 2
    return x[:P], x[P:]


def sequence_sums(x: mx.array, seq: mx.array | None = None, seq_ids: mx.array | None = None) -> mx.array:
    """Per-sequence sums of per-position values ``x``: (2P,).

    Padded pair batches hold one sequence per row (a row sum); packed ones
    say which sequence each position (or entry, when pairs share their
    prompt) belongs to (``seq``, -1 for padding) and list the sequence ids
    ``seq_ids`` = ``arange(2P)``.
    """
    if seq is None:
        return x.sum(axis=1)
    # A scatter-add: exact (a float32 matmul may run at reduced precision on some GPUs).
    # Padding (-1) lands in slot 0, which is dropped.
    n = seq_ids.shape[0]
    return mx.zeros((n + 1,), x.dtype).at[seq.reshape(-1) + 1].add(x.reshape(-1))[1:]


def pair_logps(tok: mx.array, weights: mx.array, ref_tok: mx.array | None = None,
               seq: mx.array | None = None, seq_ids: mx.array | None = None) -> PairLogps:
    """Per-pair scores from per-token log-probs of a pair batch.

    tok, weights, ref_tok: (2P, L), rows ``i`` and ``P + i`` are pair ``i``;
    or, for packed batches, (R, W) with ``seq``/``seq_ids`` as in
    :func:`sequence_sums`; or per entry, (K,) with ``seq`` (K,) (pairs that
    share their prompt).
    Padding pairs (no trained tokens) get harmless finite stand-in scores
    (-1 per token) so that no loss formula meets ``log 0`` on them; they are
    masked out of every sum by ``valid``.
    """
    def sums(x):
        return sequence_sums(x, seq, seq_ids).reshape(-1)

    n = sums(weights)
    n_c, n_r = _halves(n)
    valid = ((n_c > 0) & (n_r > 0)).astype(mx.float32)

    def scores(t):
        total = sums(t * weights)
        s_c, s_r = _halves(total)
        m_c, m_r = _halves(total / mx.maximum(n, 1.0))
        ok = valid > 0
        return (mx.where(ok, s_c, -1.0), mx.where(ok, s_r, -1.0), mx.where(ok, m_c, -1.0), mx.where(ok, m_r, -1.0))

    c, r, mc, mr = scores(tok)
    out = PairLogps(chosen=c, rejected=r, chosen_mean=mc, rejected_mean=mr, valid=valid)
    if ref_tok is not None:
        out.ref_chosen, out.ref_rejected, out.ref_chosen_mean, out.ref_rejected_mean = scores(ref_tok)
        # KL estimate on the chosen answers only: they stand in for samples of
        # the policy. On rejected tokens, which the policy is taught to avoid,
        # exp(r) explodes (a token pushed down 5 nats adds e^5) and says
        # nothing about how far the policy's own outputs moved.
        if seq is None:
            on_chosen = (mx.arange(weights.shape[0]) < weights.shape[0] // 2)[:, None]
        else:
            on_chosen = (seq >= 0) & (seq < seq_ids.shape[0] // 2)
        wc = weights * on_chosen
        d = (ref_tok - tok) * wc
        k3 = (mx.exp(d) - d - 1.0) * wc
        out.kl = _halves(sums(k3))[0] / mx.maximum(n_c, 1.0)
    return out


def reference_token_logprobs(model: nn.Module, batch: Batch, split: HeadSplit | None = None,
                             trunk=None) -> mx.array:
    """Per-token log-probs under the reference: precomputed, or the model with adapters off.

    With a ``trunk`` (:class:`mlxpost.trunk.SharedTrunk`) the live pass starts
    from the hidden state the policy pass just recorded at the first adapted
    block. Under stop-gradient either way: the reference is a constant of the loss.
    """
    if batch.extra and "ref_logps" in batch.extra:
        return mx.stop_gradient(batch.extra["ref_logps"])
    with adapters_off(model), (trunk.reference() if trunk is not None else nullcontext()), kernels.no_grad_pass():
        ref = logprobs(model, batch, reduction="none", split=split, select=batch.select)
    return mx.stop_gradient(ref)


def pair_objective(score: Callable[[PairLogps], PairLoss], *, split: HeadSplit | None, reference: bool,
                   monitor=None, trunk=None) -> Objective:
    """The training objective of a preference method.

    ``score``: the method's pure loss on :class:`PairLogps`. ``reference``:
    whether it needs reference log-probs (DPO does; ORPO, CPO and SimPO do
    not, and then no reference pass runs at all). ``trunk``: a
    :class:`mlxpost.trunk.SharedTrunk`, with which the live reference pass
    starts from the policy pass's hidden state at the first adapted block.
    The loss is summed over pairs and counted in pairs, so the loop averages
    it over every pair of the optimizer step.
    """

    def loss(model, batch):
        live = trunk if reference and not (batch.extra and "ref_logps" in batch.extra) else None
        with live.policy() if live is not None else nullcontext():
            tok = logprobs(model, batch, reduction="none", split=split, select=batch.select)
        ref_tok = reference_token_logprobs(model, batch, split, trunk=live) if reference else None
        extra = batch.extra or {}
        weights = batch.select[1] if batch.entries else batch.weights  # per entry (K,) or per position
        lp = pair_logps(tok, weights, ref_tok, extra.get("seq"), extra.get("seq_ids"))
        out = score(lp)
        # Metrics carry no gradient.
        c, r = mx.stop_gradient(out.chosen_rewards), mx.stop_gradient(out.rejected_rewards)
        metrics = {
            "rewards/chosen": c, "rewards/rejected": r, "rewards/margins": c - r,
            "rewards/accuracies": (c > r).astype(mx.float32),
            "logps/chosen": lp.chosen, "logps/rejected": lp.rejected,
            "logps/chosen_mean": lp.chosen_mean, "logps/rejected_mean": lp.rejected_mean,
            "pref_loss": _softplus(-mx.stop_gradient(out.logits)),
        }
        if lp.kl is not None:
            metrics["kl"] = lp.kl
            metrics["logratio/chosen"] = lp.chosen_mean - lp.ref_chosen_mean
            metrics["logratio/rejected"] = lp.rejected_mean - lp.ref_rejected_mean
        metrics.update(out.metrics)
        v = lp.valid
        return (out.losses * v).sum(), v.sum(), {k: mx.stop_gradient(m * v).sum() for k, m in metrics.items()}

    return Objective(loss=loss, unit="pair", perplexity=False, display=DISPLAY, monitor=monitor)
