"""Preference pairs on the shared core: scores of chosen and rejected, the reference, common metrics.

A pair batch holds ``P`` pairs as ``2P`` rows of one batch: rows ``0..P-1``
are the chosen sides, rows ``P..2P-1`` the rejected sides of the same pairs
(see :class:`mlxpost.core.pairs.PairSource`). Both go through the model in
**one** forward pass; the prompt tokens carry no weight, so every score below
is over completion tokens only.

The reference model is the same weights with the adapters switched off
(:func:`mlxpost.model.lora.adapters_off`) under stop-gradient, or reference
log-probs computed once before training and carried by the batch
(``batch.extra["ref_logps"]``, see :mod:`mlxpost.methods.reference`). There is never
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

import click
import mlx.core as mx
import mlx.nn as nn

from ..backend import kernels
from ..core.batches import Batch
from ..core.logprobs import HeadSplit, k3, logprobs
from ..core.shared_blocks import SharedBlocks
from ..errors import ConfigError
from ..model.lora import adapters_off
from ..training.loop import Objective
from .base import Bundled, Method, check_choice, check_fraction, check_non_negative, check_positive, value
from .preference_health import PreferenceHealth, Thresholds
from .reference import precompute_reference

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
        out.kl = _halves(sums(k3(tok, ref_tok, weights * on_chosen)))[0] / mx.maximum(n_c, 1.0)
    return out


def reference_token_logprobs(model: nn.Module, batch: Batch, split: HeadSplit | None = None,
                             shared_blocks=None) -> mx.array:
    """Per-token log-probs under the reference: precomputed, or the model with adapters off.

    With a ``shared_blocks`` (:class:`mlxpost.core.shared_blocks.SharedBlocks`) the live pass starts
    from the hidden state the policy pass just recorded at the first adapted
    block. Under stop-gradient either way: the reference is a constant of the loss.
    """
    if batch.extra and "ref_logps" in batch.extra:
        return mx.stop_gradient(batch.extra["ref_logps"])
    with adapters_off(model), (shared_blocks.reference() if shared_blocks is not None else nullcontext()), kernels.no_grad_pass():
        ref = logprobs(model, batch, reduction="none", split=split, select=batch.select)
    return mx.stop_gradient(ref)


def pair_objective(score: Callable[[PairLogps], PairLoss], *, split: HeadSplit | None, reference: bool,
                   monitor=None, shared_blocks=None) -> Objective:
    """The training objective of a preference method.

    ``score``: the method's pure loss on :class:`PairLogps`. ``reference``:
    whether it needs reference log-probs (DPO does; ORPO, CPO and SimPO do
    not, and then no reference pass runs at all). ``shared_blocks``: a
    :class:`mlxpost.core.shared_blocks.SharedBlocks`, with which the live reference pass
    starts from the policy pass's hidden state at the first adapted block.
    The loss is summed over pairs and counted in pairs, so the loop averages
    it over every pair of the optimizer step.
    """

    def live_for(batch):
        return shared_blocks if reference and not (batch.extra and "ref_logps" in batch.extra) else None

    def tokens(model, batch, grad=True, for_loss=False):
        # ``for_loss``: the loss on this batch follows (train.split_rows' weighing pass): the policy pass records
        # the hidden states the live reference starts from, as in ``loss``.
        live = live_for(batch) if for_loss else None
        with live.policy() if live is not None else nullcontext():
            return logprobs(model, batch, reduction="none", split=split, select=batch.select, grad=grad)

    def loss(model, batch, tok=None):
        # ``tok``: the policy's log-probs from ``tokens(..., for_loss=True)`` just before (train.split_rows).
        live = live_for(batch)
        if tok is None:
            tok = tokens(model, batch, for_loss=True)
        ref_tok = reference_token_logprobs(model, batch, split, shared_blocks=live) if reference else None
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

    return Objective(loss=loss, unit="pair", perplexity=False, display=DISPLAY, monitor=monitor, tokens=tokens)


# ---------------------------------------------------------------------------
# The family: what every preference method declares and does alike
# ---------------------------------------------------------------------------


@dataclass
class PreferenceConfig:
    from_run: str | None = None  # SFT run (or adapter dir) merged into the base: the start and the reference
    precompute_ref: bool = False  # reference log-probs once before training, cached beside the data
    ref_cache_dir: str | None = None  # where to cache them (default: .mlxpost-cache beside the data)
    # The prompt once per pair, both replies after it, in the packed batches where that costs less:
    # auto = when the model passes the check, on = the check must pass (else an error), off = never.
    share_prompt: str = "auto"  # auto | on | off
    # Health checks (live and in the summary).
    kl_max: float = 0.1  # drift: KL estimate to the reference (nats per token)
    collapse_loss: float = 0.05  # collapse: preference loss below this with accuracy 1.0 early on
    collapse_fraction: float = 0.05  # "early on": this fraction of the steps
    rejected_drop: float = 2.0  # rejected log-prob per token fallen this far below its start, still falling
    chosen_drop: float = 0.1  # chosen log-prob per token fallen this far below its start, with rejected
    # Quality gate on the validation pairs at the end.
    gate_min_margin: float = 0.0  # mean reward margin must exceed this
    gate_min_accuracy: float = 0.6  # fraction of pairs ranked right must reach this


DATA_HELP = """

\b
Data: JSONL rows {"prompt", "chosen", "rejected"} as strings or message lists
(a system message may lead the prompt; without "prompt", chosen and rejected
are whole conversations sharing their first turns). With no --data and no
--config: the bundled example pairs.
"""

FROM_OPTION = click.option(
    "--from", "preference__from_run", type=click.Path(file_okay=False, exists=True),
    help="An SFT run (or adapter) directory: merged into the base, it is the start and the reference.")

# Metrics of the last report that the summary keeps as the run's final metrics.
FINAL_METRICS = ("kl", "nll", "log_odds")


class PreferenceMethod(Method):
    """A method trained on preference pairs: subclasses set ``reference`` and write :meth:`objective`.

    What the family does alike: the ``preference`` section and ``--from``,
    a gentler learning rate, prompt sharing, the reference (precomputed or
    live with shared lower blocks), the health monitor and the final metrics.
    """

    data = "pairs"
    defaults = {"train.lr": 5e-5}  # LoRA preference tuning moves far less than SFT: a gentler default
    from_key = "preference.from_run"
    path_keys = ("preference.ref_cache_dir",)
    bundled = Bundled("no --data and no --config: the bundled example preference pairs")
    reference: bool = False  # needs reference log-probs (adapters off, or precomputed)
    rows_apart = True  # pair_objective's loss is a function of per-row log-probs
    positive: tuple = ()  # the method's keys that must be positive

    def reference_pass(self, prep) -> str | None:
        if not self.reference or prep.cfg.preference.precompute_ref:
            return None
        return "shared" if prep.state.get("shared_blocks") is not None else "full"

    def monitor(self, cfg):
        """A factory of the run's health monitor (:class:`mlxpost.methods.preference_health.PreferenceHealth`)."""
        p = cfg.preference
        t = Thresholds(kl_max=p.kl_max, collapse_loss=p.collapse_loss, collapse_fraction=p.collapse_fraction,
                       rejected_drop=p.rejected_drop, chosen_drop=p.chosen_drop, gate_min_margin=p.gate_min_margin,
                       gate_min_accuracy=p.gate_min_accuracy)
        return lambda total_steps: PreferenceHealth(total_steps, t)

    def validate(self, cfg) -> None:
        check_choice(cfg, "preference.share_prompt", ("auto", "on", "off"))
        check_positive(cfg, *self.positive, "preference.kl_max")
        check_non_negative(cfg, "preference.rejected_drop", "preference.chosen_drop")
        check_fraction(cfg, "preference.collapse_fraction", "preference.gate_min_accuracy")
        if cfg.preference.share_prompt == "on" and cfg.train.grad_checkpoint:
            raise ConfigError("preference.share_prompt=on cannot be combined with train.grad_checkpoint (a "
                              "recomputed block would rotate the rejected reply at the wrong positions); set one "
                              "of them off")
        if cfg.preference.share_prompt == "on" and cfg.data.batching == "pad":
            raise ConfigError("preference.share_prompt=on needs packed pair batches: set data.batching to pack or "
                              "auto")

    def share_prompt(self, cfg) -> str:
        return cfg.preference.share_prompt

    def prepare(self, prep, rep) -> None:
        """The reference: precomputed once (``--precompute-ref``), or live with the lower blocks shared."""
        if not self.reference:
            return
        if prep.cfg.preference.precompute_ref:
            precompute_reference(prep, rep, cache_dir=prep.cfg.preference.ref_cache_dir)
        else:
            prep.state["shared_blocks"] = SharedBlocks.find(prep.loaded.model)

    def setup_rows(self, prep) -> list:
        ref = "none (reference-free)"
        shared = prep.state.get("shared_blocks")
        if self.reference:
            ref = "precomputed (cached)" if prep.cfg.preference.precompute_ref else "same weights, adapters off"
            if shared is not None:
                ref += f" (blocks 0-{shared.k - 1} shared with the policy pass)"
        return [("reference", ref)]

    def setup_record(self, prep) -> dict:
        shared = prep.state.get("shared_blocks")
        return {"reference_shares_blocks": shared.k} if shared is not None else {}

    def summarize(self, prep, result, summary: dict, *, monitor=None, evals=None) -> None:
        last = next((h for h in reversed(result.history) if h.get("kind") == "train"), None)
        if last:
            summary["final_metrics"] = {k: v for k, v in last.items() if "/" in k or k in FINAL_METRICS}


def check_label_smoothing(cfg, key: str) -> None:
    """Label smoothing (an assumed rate of flipped labels) must stay below one half."""
    if not 0 <= value(cfg, key) < 0.5:
        raise ConfigError(f"{key}: must be in [0, 0.5), got {value(cfg, key)}")
