"""Online RL (GRPO and step-verified RLVR): group-relative advantages and the clipped policy objective.

For a prompt, G completions ``o_1..o_G`` are sampled and scored ``r_1..r_G``.
The advantage of completion i is its reward relative to its group:

    A_i = (r_i - mean(r_group)) / (s + 1e-4)

with ``s`` chosen by ``scale``: ``"group"`` (the std of the group, as in the
original GRPO), ``"batch"`` (the std over all completions of the step) or
``"none"`` (s = 1, as in Dr. GRPO). Step-verified RLVR replaces the one
advantage per completion by one per token (:mod:`mlxpost.rl.source`).

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

import math
from dataclasses import dataclass, field

import click
import mlx.core as mx
import numpy as np

from ..backend import kernels
from ..core.flops import flop_model, generation_flops
from ..core.logprobs import HeadSplit, k3, token_logprobs
from ..core.sampling import Sampling
from ..errors import ConfigError
from ..model.lora import adapters_off
from ..training.health import Finding, HealthMonitor
from ..training.loop import Objective
from .base import Bundled, Method, check_choice, check_fraction, check_non_negative, check_positive

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
    """The training objective over rollout batches built by :class:`mlxpost.rl.source.RolloutSource`.

    The batch carries ``extra["adv"]`` (B, L) token advantages aligned with
    ``targets``, and ``extra["old_logps"]`` when a rollout is reused for
    several optimizer steps (else the ratio is taken against the current
    log-probs under stop-gradient: exactly 1, with the gradient of the policy
    term intact).
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")

    def loss(model, batch):
        w = batch.weights
        logp = token_logprobs(model, batch, split, batch.select, grad=True)
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
            kl = k3(logp, ref, w)
            tok_loss = tok_loss + beta * kl
        else:
            kl = k3(logp, mx.stop_gradient(logp), w)  # zero: no reference pass when beta is 0
        total, count = normalize(tok_loss, w, norm, max_new_tokens)
        sg = mx.stop_gradient
        # Token means, scaled by ``count`` so that the loop's division by the
        # summed count gives count-weighted means over micro-batches.
        for name, v in (("kl", kl), ("clip_low", low * w), ("clip_high", high * w), ("ratio", ratio * w)):
            metrics[name] = sg(v.sum() / n * count)
        return total, count, metrics

    return Objective(loss=loss, unit="completion" if norm != "dapo" else "token", perplexity=False,
                     display=("reward", "reward_std", "kl", "clip_high"), monitor=monitor)


@dataclass
class RLSettings:
    group_size: int = 8
    prompts_per_step: int = 2
    micro_batch: int = 16  # completions per forward pass
    num_iterations: int = 1
    scale: str = "group"
    mask_truncated: bool = False
    step_weight: float = 1.0
    final_weight: float = 1.0
    sampling: Sampling = field(default_factory=Sampling)


@dataclass
class RLThresholds:
    all_equal_warn: float = 0.8  # warn when this fraction of groups has equal rewards...
    all_equal_patience: int = 5  # ... for this many steps in a row
    kl_max: float | None = None
    gate_step_acc: float = 0.8
    gate_final_acc: float = 0.9


class RLHealth(HealthMonitor):
    """Live checks of an online RL run, and the end-of-run gate of step-verified RL."""

    checks = {"flat_rewards": "flat-rewards"}

    def __init__(self, total_steps: int, t: RLThresholds):
        super().__init__(total_steps)
        # The clipped surrogate is ~0 at every step (advantages have mean 0 and the ratio starts at 1):
        # a flat loss says nothing here; only a gradient norm that collapses does.
        self.stuck.by_loss = False
        self.t = t
        self.streak = 0

    def check(self, step: int, m: dict) -> list[Finding]:
        out = []
        frac = m.get("all_equal_groups")
        if frac is not None:
            self.streak = self.streak + 1 if frac >= self.t.all_equal_warn else 0
            if self.streak >= self.t.all_equal_patience:
                out += self.found(
                    "flat-rewards", "flat-rewards", step,
                    f"{frac:.0%} of the groups had equal rewards for {self.streak} steps in a row: "
                    "those groups give zero advantage and teach nothing",
                    "use a larger group (grpo.group_size), a higher temperature, easier or more varied prompts, "
                    "or a reward with partial credit")
        kl = m.get("kl")
        if self.t.kl_max is not None and kl is not None and kl > self.t.kl_max:
            out += self.found("drift-kl", "drift-kl", step, f"KL to the reference {kl:.3f} > {self.t.kl_max}",
                              "lower the learning rate or raise grpo.beta")
        return out

    def gate(self, ev: dict | None) -> dict:
        """Step and final accuracy of the greedy answers to the validation prompts against their gates."""
        if not ev or "final_acc" not in ev or math.isnan(ev.get("final_acc", float("nan"))):
            return {"verdict": "n/a", "reason": "no validation prompts to evaluate"}
        ok = ev["step_acc"] > self.t.gate_step_acc and ev["final_acc"] > self.t.gate_final_acc
        return {"verdict": "pass" if ok else "fail", "step_acc": ev["step_acc"], "final_acc": ev["final_acc"],
                "min_step_acc": self.t.gate_step_acc, "min_final_acc": self.t.gate_final_acc}


# ---------------------------------------------------------------------------
# The family: what GRPO and step-verified RLVR declare and do alike
# ---------------------------------------------------------------------------


@dataclass
class GRPOConfig:
    group_size: int = 8  # completions sampled per prompt
    prompts_per_step: int = 2  # prompts per optimizer step
    micro_batch: int | None = None  # completions per forward pass (None: all of the step's, at most 16)
    num_iterations: int = 1  # optimizer steps per rollout (> 1: the ratio to the sampling policy is clipped)
    epsilon_low: float = 0.2  # clip range below 1
    epsilon_high: float = 0.2  # clip range above 1 (DAPO: 0.28)
    beta: float = 0.0  # KL penalty (k3) against the reference (adapters off); 0 = no reference pass
    loss_norm: str = "grpo"  # grpo (per sequence) | dapo (per token) | dr_grpo (constant)
    scale_rewards: str = "group"  # group | batch | none
    mask_truncated: bool = False  # no loss on completions that hit max_new_tokens
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    max_new_tokens: int = 128
    max_prompt_len: int = 512  # longer prompts are dropped (counted)
    stop: list = field(default_factory=list)  # stop strings
    rewards: list = field(default_factory=list)  # "name[@weight]": built-in, file.py:function or module:function
    all_equal_warn: float = 0.8  # warn when this fraction of groups has equal rewards for 5 steps running
    eval_prompts: int = 64  # validation prompts answered (greedy) before and after training
    from_run: str | None = None  # an earlier run (SFT, DPO, ...) merged into the base: the start and the reference


@dataclass
class RolloutPlan:
    """What the rollout source of a run needs, as plain values (the pipeline builds rewards and verifier)."""

    settings: RLSettings
    rewards: list[str]  # "name[@weight]" specs
    verifier: str | None  # a step verifier's spec, or None
    max_prompt_len: int
    eval_prompts: int  # validation prompts answered before and after training


OPTIONS = (
    click.option("--group-size", "grpo__group_size", type=int, help="Completions sampled per prompt (default 8)."),
    click.option("--prompts-per-step", "grpo__prompts_per_step", type=int,
                 help="Prompts per optimizer step (default 2)."),
    click.option("--num-iterations", "grpo__num_iterations", type=int,
                 help="Optimizer steps per rollout (default 1; more: the ratio is clipped)."),
    click.option("--max-new-tokens", "grpo__max_new_tokens", type=int, help="Longest completion (default 128)."),
    click.option("--temperature", "grpo__temperature", type=float, help="Sampling temperature (default 1.0)."),
    click.option("--top-p", "grpo__top_p", type=float, help="Nucleus sampling (default 1.0)."),
    click.option("--top-k", "grpo__top_k", type=int, help="Sample among the k most likely tokens (default 0: all)."),
    click.option("--min-p", "grpo__min_p", type=float,
                 help="Drop tokens less likely than min_p times the most likely one (default 0: off)."),
    click.option("--stop", "grpo__stop", multiple=True, help="A stop string (repeatable)."),
    click.option("--beta", "grpo__beta", type=float, help="KL penalty to the reference, adapters off (default 0)."),
    click.option("--loss-norm", "grpo__loss_norm", type=click.Choice(list(NORMS)),
                 help="Per sequence (grpo), per token (dapo) or a constant (dr_grpo)."),
    click.option("--scale-rewards", "grpo__scale_rewards", type=click.Choice(list(SCALES)),
                 help="Divide advantages by the group's std, the batch's, or nothing."),
    click.option("--mask-truncated", "grpo__mask_truncated", is_flag=True, default=None,
                 help="No loss on completions that hit --max-new-tokens."),
    click.option("--from", "grpo__from_run", type=click.Path(file_okay=False, exists=True),
                 help="An earlier run (SFT, DPO, ...): merged into the base, it is the start and the reference."),
    click.option("--reward", "grpo__rewards", multiple=True, metavar="NAME[@WEIGHT]",
                 help="accuracy, format, path/to/file.py:function or package.module:function (repeatable)."),
)

REWARDS_HELP = """

\b
A reward is a Python function (completions, **columns) -> list[float | None];
the columns are the data rows' fields (answer, ...), aligned with completions.
"""

# Metrics of the last report that the summary keeps as the run's final metrics.
FINAL_METRICS = ("reward", "reward_std", "all_equal_groups", "kl", "clip_low", "clip_high", "adv_std",
                 "completion_len", "completion_len_max", "truncated", "step_acc", "final_acc", "rollout_tok_s")


def default_micro_batch(n: int, cap: int = 16) -> int:
    """Completions per forward pass when grpo.micro_batch is not set: all of them, at most ``cap``.

    The largest divisor of ``n`` not above ``cap``, so that big rollouts do
    not hold every completion's activations at once.

    >>> default_micro_batch(16), default_micro_batch(24), default_micro_batch(7)
    (16, 12, 7)
    """
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


class OnlineRLMethod(Method):
    """A method that samples its own completions of prompts and reinforces the better ones."""

    data = "prompts"
    # Online RL moves a policy by its own samples: a small learning rate; no validation loss to
    # measure at the start, and the validation prompts are answered instead (grpo.eval_prompts).
    defaults = {"train.lr": 2e-5, "train.eval_at_start": False, "data.valid_fraction": 0.0}
    options = OPTIONS
    from_key = "grpo.from_run"
    plugin_keys = ("grpo.rewards",)
    bundled = Bundled("no --data and no --config: the bundled multi-step arithmetic tasks")

    def validate(self, cfg) -> None:
        g = cfg.grpo
        check_choice(cfg, "grpo.loss_norm", NORMS)
        check_choice(cfg, "grpo.scale_rewards", SCALES)
        check_positive(cfg, "grpo.group_size", "grpo.prompts_per_step", "grpo.num_iterations",
                       "grpo.max_new_tokens", "grpo.max_prompt_len", "grpo.top_p")
        if g.group_size < 2:
            raise ConfigError(f"grpo.group_size: group-relative advantages need at least 2 completions per "
                              f"prompt, got {g.group_size}")
        check_non_negative(cfg, "grpo.epsilon_low", "grpo.epsilon_high", "grpo.beta", "grpo.temperature",
                           "grpo.top_k", "grpo.min_p")
        if g.epsilon_low >= 1:
            raise ConfigError(f"grpo.epsilon_low: must be below 1, got {g.epsilon_low}")
        if g.top_p > 1:
            raise ConfigError(f"grpo.top_p: must be at most 1, got {g.top_p}")
        if g.min_p >= 1:
            raise ConfigError(f"grpo.min_p: must be below 1 (a fraction of the top token's probability), got {g.min_p}")
        check_fraction(cfg, "grpo.all_equal_warn")
        n = g.group_size * g.prompts_per_step
        if g.micro_batch is not None and (g.micro_batch <= 0 or n % g.micro_batch):
            raise ConfigError(f"grpo.micro_batch: must divide prompts_per_step x group_size = {n}, "
                              f"got {g.micro_batch}")
        if cfg.train.grad_accum != 1:
            raise ConfigError(f"train.grad_accum: for {self.name} it follows from grpo.micro_batch (completions "
                              "per forward pass); leave it at 1")
        if not isinstance(g.stop, list) or not all(isinstance(x, str) for x in g.stop):
            raise ConfigError(f"grpo.stop: expected a list of strings, got {g.stop!r}")
        if not isinstance(g.rewards, list) or not all(isinstance(x, str) for x in g.rewards):
            raise ConfigError(f"grpo.rewards: expected a list of 'name[@weight]' strings, got {g.rewards!r}")
        if cfg.data.batching == "pack":
            raise ConfigError("data.batching=pack: rollouts are batched with padding; use pad or auto")

    def settings(self, cfg) -> RLSettings:
        g = cfg.grpo
        return RLSettings(group_size=g.group_size, prompts_per_step=g.prompts_per_step,
                          micro_batch=g.micro_batch or default_micro_batch(g.group_size * g.prompts_per_step),
                          num_iterations=g.num_iterations, scale=g.scale_rewards, mask_truncated=g.mask_truncated,
                          sampling=Sampling(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, min_p=g.min_p,
                                            max_new_tokens=g.max_new_tokens, stop=tuple(g.stop)))

    def verifier(self, cfg) -> str | None:
        """The step verifier's spec (step-verified methods), else None."""
        return None

    def rollout(self, cfg) -> RolloutPlan:
        g = cfg.grpo
        return RolloutPlan(self.settings(cfg), list(g.rewards), self.verifier(cfg), g.max_prompt_len,
                           g.eval_prompts)

    def thresholds(self, cfg) -> RLThresholds:
        g = cfg.grpo
        return RLThresholds(all_equal_warn=g.all_equal_warn, kl_max=0.5 if g.beta > 0 else None)

    def reference_pass(self, prep) -> str | None:
        return "full" if prep.cfg.grpo.beta > 0 else None  # the k3 penalty's adapters-off pass

    def objective(self, prep) -> Objective:
        g, t = prep.cfg.grpo, self.thresholds(prep.cfg)
        return objective(prep.split, eps_low=g.epsilon_low, eps_high=g.epsilon_high, beta=g.beta,
                         norm=g.loss_norm, max_new_tokens=g.max_new_tokens,
                         monitor=lambda total: RLHealth(total, t))

    def setup_rows(self, prep) -> list:
        g = prep.cfg.grpo
        rows = [("rewards", ", ".join(g.rewards) or "none")]
        verifier = self.verifier(prep.cfg)
        if verifier:
            rows.append(("verifier", verifier))
        rows.append(("objective", f"clip [{1 - g.epsilon_low:.2f}, {1 + g.epsilon_high:.2f}], norm {g.loss_norm}, "
                                  f"scale {g.scale_rewards}, beta {g.beta}, {g.num_iterations} step(s)/rollout"))
        return rows

    def summarize(self, prep, result, summary: dict, *, monitor=None, evals=None) -> None:
        gen = getattr(prep.train, "generated", None)
        if gen and gen["seconds"] > 0:  # rollout generation's own FLOPs, apart from the training steps'
            f = generation_flops(flop_model(prep.loaded.model), gen["prompt_tokens"], gen["prompts"],
                                 gen["new_tokens"], gen["pairs"])
            summary.update(rollout_model_flops=f, rollout_seconds=round(gen["seconds"], 2),
                           rollout_model_flops_per_s=f / gen["seconds"])
        last = next((h for h in reversed(result.history) if h.get("kind") == "train"), None) or {}
        summary["final_metrics"] = {k: v for k, v in last.items() if k in FINAL_METRICS or k.startswith("reward/")}
