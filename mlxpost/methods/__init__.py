"""One module per training method: its pure loss and the objective the loop runs.

:data:`METHODS` tells the shared pipeline (``runner.py``) what each method
needs: which data it reads (``sft`` rows or preference ``pairs``), whether it
needs reference log-probs, and how to build its objective from the prepared
run. The training loop itself never imports a method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Method:
    name: str
    data: str  # "sft" | "pairs" | "prompts" (online RL: the source samples its own batches)
    reference: bool  # needs reference log-probs (adapters off, or precomputed)
    objective: Callable  # (prepared run) -> train.Objective


def _health(cfg):
    from ..health import PreferenceHealth, Thresholds

    p = cfg.preference
    t = Thresholds(kl_max=p.kl_max, collapse_loss=p.collapse_loss, collapse_fraction=p.collapse_fraction,
                   rejected_drop=p.rejected_drop, chosen_drop=p.chosen_drop, gate_min_margin=p.gate_min_margin,
                   gate_min_accuracy=p.gate_min_accuracy)
    return lambda total_steps: PreferenceHealth(total_steps, t)


def _sft(prep):
    from . import sft

    return sft.objective(prep.split)


def _dpo(prep):
    from . import dpo

    c = prep.cfg.dpo
    return dpo.objective(prep.split, loss=c.loss, beta=c.beta, label_smoothing=c.label_smoothing,
                         monitor=_health(prep.cfg), trunk=prep.trunk)


def _orpo(prep):
    from . import orpo

    return orpo.objective(prep.split, lam=prep.cfg.orpo.lam, monitor=_health(prep.cfg))


def _cpo(prep):
    from . import cpo

    c = prep.cfg.cpo
    return cpo.objective(prep.split, beta=c.beta, alpha=c.alpha, label_smoothing=c.label_smoothing,
                         monitor=_health(prep.cfg))


def _simpo(prep):
    from . import simpo

    c = prep.cfg.simpo
    return simpo.objective(prep.split, beta=c.beta, gamma=c.gamma, alpha=c.alpha, label_smoothing=c.label_smoothing,
                           monitor=_health(prep.cfg))


def _rl(prep):
    from ..rl import RLHealth, RLThresholds
    from . import grpo

    g, cfg = prep.cfg.grpo, prep.cfg
    t = RLThresholds(all_equal_warn=g.all_equal_warn, kl_max=0.5 if g.beta > 0 else None,
                     gate_step_acc=cfg.rlvr.gate_step_acc, gate_final_acc=cfg.rlvr.gate_final_acc)
    return grpo.objective(prep.split, eps_low=g.epsilon_low, eps_high=g.epsilon_high, beta=g.beta,
                          norm=g.loss_norm, max_new_tokens=g.max_new_tokens,
                          monitor=lambda total: RLHealth(total, t, rlvr=cfg.method == "rlvr"))


METHODS = {
    "sft": Method("sft", "sft", False, _sft),
    "dpo": Method("dpo", "pairs", True, _dpo),
    "orpo": Method("orpo", "pairs", False, _orpo),
    "cpo": Method("cpo", "pairs", False, _cpo),
    "simpo": Method("simpo", "pairs", False, _simpo),
    "grpo": Method("grpo", "prompts", False, _rl),
    "rlvr": Method("rlvr", "prompts", False, _rl),
}


def get(name: str) -> Method:
    return METHODS[name]
