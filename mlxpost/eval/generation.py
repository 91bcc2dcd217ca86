"""Generation for evaluation: many prompts through the batched, KV-cached rollout sampler.

Generate-and-check tasks (arithmetic, HumanEval, user tasks, lm-eval's
``generate_until``) all need completions of many prompts, greedy or with
``n`` samples each. :func:`complete` hands them to
:func:`mlxpost.rl.rollout.sample_groups` (prompts prefilled once, each
prompt's cache repeated for its samples, all rows decoded together) in
batches of prompts of similar length, so little of a batch is padding.
"""

from __future__ import annotations

from typing import Callable, Sequence

import mlx.core as mx

from ..core.sampling import Sampling
from ..rl.rollout import sample_groups


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (without) the first occurrence of any stop string.

    >>> cut_at_stop("    return x\\ndef g():", ["\\ndef", "\\nclass"])
    '    return x'
    >>> cut_at_stop("no stop here", ["\\n\\n"])
    'no stop here'
    """
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def complete(model, tokenizer, prompts: Sequence[list[int]], sampling: Sampling, *, n: int = 1,
             batch_size: int = 8, seed: int = 0, pad_id: int = 0,
             progress: Callable[[int], None] | None = None) -> tuple[list[list[str]], list[list[bool]]]:
    """``n`` completions of each prompt (token ids), stop strings cut off; and whether each hit the token limit.

    Returns ``(texts, truncated)``, each a list per prompt of ``n`` entries,
    in the order of ``prompts``. ``batch_size`` counts rows (prompts x n) per
    decoding batch. ``progress(k)`` after each batch (``k`` prompts done).
    Sampling at a temperature above 0 is seeded by ``seed`` (the same seed,
    the same samples).
    """
    mx.random.seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    per_batch = max(1, batch_size // max(1, n))
    texts: list = [None] * len(prompts)
    truncated: list = [None] * len(prompts)
    for s in range(0, len(order), per_batch):
        idx = order[s:s + per_batch]
        ro = sample_groups(model, tokenizer, [list(prompts[i]) for i in idx], n, sampling, pad_id=pad_id)
        for k, i in enumerate(idx):
            texts[i] = [cut_at_stop(t, sampling.stop) for t in ro.texts[k * n:(k + 1) * n]]
            truncated[i] = [bool(x) for x in ro.truncated[k * n:(k + 1) * n]]
        if progress is not None:
            progress(len(idx))
    return texts, truncated
