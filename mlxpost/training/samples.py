"""Replies to a few prompts, before and after training."""

from __future__ import annotations

import mlx.core as mx

from ..core.generate import generate_text
from ..core.sampling import Sampling
from ..data.render import prompt_ids
from ..rl.rollout import sample_groups
from ..steer.hooks import steered
from ..steer.vectors import steer_specs


def run_samples(model, tokenizer, prompts: list[str], cfg) -> list[str]:
    """Replies to ``prompts`` (chat template applied), all decoded together in one KV-cached batch.

    Greedy by default (``sample.temperature``); one batch instead of one
    prompt after another makes the before/after samples several times faster.
    ``sample.steer`` (``VEC_DIR@λ[:layer]``) steers every reply, as ``mlxpost generate --steer`` does.
    """
    if not prompts:
        return []
    with sample_steering(model, cfg):
        return _replies(model, tokenizer, prompts, cfg)


def sample_steering(model, cfg):
    """The run's ``sample.steer`` installed (a context manager; nothing when the list is empty)."""
    return steered(model, steer_specs(model, list(cfg.sample.steer)))


def _replies(model, tokenizer, prompts: list[str], cfg) -> list[str]:
    mx.random.seed(cfg.train.seed)
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    pad = getattr(tokenizer, "pad_token_id", None)
    try:
        out = sample_groups(model, tokenizer, ids, 1,
                            Sampling(temperature=cfg.sample.temperature, max_new_tokens=cfg.sample.max_tokens),
                            pad_id=pad if pad is not None else 0)
        return [t.strip() for t in out.texts]
    except Exception:  # an architecture the batched sampler cannot drive: mlx-lm's generate, one by one
        return [generate_text(model, tokenizer, p, max_tokens=cfg.sample.max_tokens,
                              temperature=cfg.sample.temperature) for p in prompts]
