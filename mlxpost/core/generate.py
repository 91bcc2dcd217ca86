"""Text generation with the chat template applied (for samples and `mlxpost generate`)."""

from __future__ import annotations

from typing import Iterable

import mlx.core as mx

from ..data.render import prompt_ids


def generate_text(model, tokenizer, prompt: str | list[dict], *, max_tokens: int = 128, temperature: float = 0.0,
                  top_p: float = 1.0, system: str | None = None, seed: int | None = 0) -> str:
    from mlx_lm.generate import generate  # here: importing mlx-lm loads transformers (over a second)
    from mlx_lm.sample_utils import make_sampler

    if seed is not None:
        mx.random.seed(seed)
    ids = prompt_ids(tokenizer, prompt, system)
    was_training = model.training
    model.eval()
    try:
        out = generate(model, tokenizer, prompt=ids, max_tokens=max_tokens,
                       sampler=make_sampler(temp=temperature, top_p=top_p), verbose=False)
    finally:
        if was_training:
            model.train()
    return out.strip()


def stream_text(model, tokenizer, prompt: str | list[dict], *, max_tokens: int = 256, temperature: float = 0.0,
                top_p: float = 1.0, system: str | None = None) -> Iterable[str]:
    from mlx_lm.generate import stream_generate  # here: importing mlx-lm loads transformers
    from mlx_lm.sample_utils import make_sampler

    ids = prompt_ids(tokenizer, prompt, system)
    model.eval()
    for resp in stream_generate(model, tokenizer, prompt=ids, max_tokens=max_tokens,
                                sampler=make_sampler(temp=temperature, top_p=top_p)):
        yield resp.text
