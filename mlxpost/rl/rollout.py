"""Batched sampling for online RL: every completion of a step in one batch, with a KV cache.

``sample_groups`` takes P prompts and draws G completions of each:

1. The P prompts are left-padded into one (P, Lmax) batch and prefilled once
   (mlx-lm's ``BatchKVCache`` keeps track of each row's padding, for the
   attention mask and the rotary positions). Leading tokens that every
   prompt shares (a chat template's system message) go through the model
   once, as one row, and the batch pass starts after them
   (:func:`_prefix_cache`): 60 chat prompts of ~50 tokens on SmolLM2, 37 of
   them shared, prefilled in 1.9-2.3 s instead of 4.6.
2. The cache is then repeated G times along the batch axis (row ``p * G + g``
   is sample ``g`` of prompt ``p``): the prompt is computed once per prompt,
   not once per sample.
3. All P * G rows decode together, one token per step. The next step's graph
   is built and handed to MLX before the current tokens are read
   (``mx.async_eval``), so the host's bookkeeping overlaps the compute.
   Rows that have finished (end-of-sequence token or a stop string) are
   dropped from the batch once they are at least a quarter of it
   (``BatchKVCache.filter``), so long stragglers do not pay for finished rows.

Models whose cache is not a plain KV cache in every layer (sliding windows,
state-space layers) are sampled one prompt at a time, still with the
G samples of that prompt in one batch over one prefill.

Sampling: temperature (0 = greedy), nucleus top-p, a token limit and stop
strings. A completion that reaches the limit without an end-of-sequence token
or a stop string is *truncated* (:attr:`Rollouts.truncated`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..backend import kernels
from ..core.sampling import Sampling
from ..errors import MlxpostError
from ..model.lora import adapters_merged


def kv_caches():
    """mlx-lm's KV cache module, imported on first use.

    Importing mlx-lm loads transformers (more than a second), which ``mlxpost --help``
    and every command that never samples should not pay.
    """
    import mlx_lm.models.cache

    return mlx_lm.models.cache


@dataclass
class Rollouts:
    group_size: int
    completions: list  # P*G lists of token ids (end-of-sequence token included when sampled)
    texts: list  # P*G decoded completions (cut after a stop string)
    truncated: np.ndarray  # (P*G,) bool: hit max_new_tokens without stopping
    seconds: float = 0.0  # wall time of the sampling
    prefill_tokens: int = 0  # prompt tokens (those of a shared prefix counted in every prompt)
    shared_prefix: int = 0  # leading tokens common to the prompts, prefilled once for all (_shared_prefix)
    decode_steps: int = 0
    row_steps: list = field(default_factory=list)  # batch size of every decode step

    @property
    def sampled_tokens(self) -> int:
        return sum(len(c) for c in self.completions)


def sample_next(logits: mx.array, temperature: float, top_p: float = 1.0, top_k: int = 0,
                min_p: float = 0.0) -> mx.array:
    """One token per row of (N, V) ``logits``: greedy at temperature 0, else a draw from the tempered softmax.

    The filters act on the tempered distribution ``softmax(logits / temperature)``
    (as in TRL's and vLLM's rollouts), in this order: ``min_p`` keeps the
    tokens at least ``min_p`` times as likely as the most likely one; ``top_k``
    (0: off) the ``top_k`` most likely; ``top_p`` (1: off) the smallest set of
    most likely tokens whose mass reaches ``top_p``. What remains is renormalized.
    With no filter, one uniform number per row is inverted through the CDF.

    Why not ``mlx_lm.sample_utils.make_sampler``: it offers the same filters,
    but draws with ``mx.random.categorical``; inverting one uniform number
    through a two-level CDF (:func:`_sample_softmax`) was measured 3.8x faster
    at 16 rows and 2.0x at 128 rows of SmolLM2's 49k vocabulary (temperature
    0.8 for both; ``benchmarks/README.md``), and rollouts sample every token of every
    completion, so the sampler stays ours (its signature is what the rollout
    benchmarks call).
    """
    if temperature <= 0:
        return mx.argmax(logits, axis=-1)
    if top_p >= 1.0 and top_k <= 0 and min_p <= 0:
        return _sample_softmax(logits, mx.array(temperature, mx.float32))
    logits = logits.astype(mx.float32) / temperature
    if min_p > 0:  # p >= min_p * p_max  <=>  z >= z_max + log(min_p)
        floor = mx.max(logits, axis=-1, keepdims=True) + math.log(min_p)
        logits = mx.where(logits >= floor, logits, -mx.inf)
    if 0 < top_k < logits.shape[-1]:
        kth = mx.take_along_axis(logits, mx.argpartition(-logits, top_k - 1, axis=-1)[:, top_k - 1:top_k], axis=-1)
        logits = mx.where(logits >= kth, logits, -mx.inf)  # ties at the k-th value are all kept
    if top_p >= 1.0:
        return _sample_softmax(logits, mx.array(1.0, mx.float32))
    order = mx.argsort(-logits, axis=-1)
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always the top token).
    before = mx.cumsum(probs, axis=-1) - probs
    sorted_logits = mx.where(before < top_p, sorted_logits, -mx.inf)
    choice = mx.random.categorical(sorted_logits, axis=-1)
    return mx.take_along_axis(order, choice[:, None], axis=-1)[:, 0]


SAMPLE_BLOCK = 256  # vocabulary entries per block of the two-level draw (see _sample_softmax)


@partial(mx.compile, inputs=mx.random.state, outputs=mx.random.state)
def _sample_softmax(logits: mx.array, temperature: mx.array) -> mx.array:
    """A draw from ``softmax(logits / temperature)`` per row of (N, V) ``logits``, by inverting its CDF in two levels.

    One uniform number ``u`` per row instead of ``mx.random.categorical``'s
    one per vocabulary entry. The unnormalized probabilities are cut into
    blocks of :data:`SAMPLE_BLOCK` entries (the last padded with zeros): the
    CDF of the (N, V/256) block sums picks the block holding ``u``, then the
    CDF of that block's 256 entries picks the token. A full-length cumulative
    sum, compare and argmax over (N, V) would each read and write the whole
    matrix (25 MB at N=128 and SmolLM2's 49k entries); here only ``exp`` and
    the block sums touch it. Measured on the CPU backend against one
    full-length inverse CDF: 1.6x at N=128 x 49k, 1.2-2.0x elsewhere. Compiled, so ``exp`` and the
    block sums are fused kernels. Tokens of probability 0 (filtered out by
    top-k / min-p, or padding) are never drawn: the search asks for the first
    CDF entry strictly above ``u``, with ``u`` kept below each level's total.
    """
    N, V = logits.shape
    nb = -(-V // SAMPLE_BLOCK)
    z = logits.astype(mx.float32) / temperature
    p = mx.exp(z - mx.max(z, axis=-1, keepdims=True))  # (N, V), the largest entry 1
    if nb * SAMPLE_BLOCK != V:
        p = mx.concatenate([p, mx.zeros((N, nb * SAMPLE_BLOCK - V), p.dtype)], axis=-1)
    blocks = p.reshape(N, nb, SAMPLE_BLOCK)
    mass = blocks.sum(axis=-1)  # (N, nb)
    cdf = mx.cumsum(mass, axis=-1)
    total = cdf[:, -1:]
    u = mx.minimum(mx.random.uniform(shape=total.shape) * total, total * (1.0 - 1e-6))  # u < total
    b = mx.argmax(cdf > u, axis=-1)[:, None]  # (N, 1): the block holding u
    below = mx.take_along_axis(cdf, b, axis=-1) - mx.take_along_axis(mass, b, axis=-1)  # mass before the block
    inside = mx.cumsum(mx.take_along_axis(blocks, b[:, :, None], axis=1)[:, 0, :], axis=-1)  # (N, SAMPLE_BLOCK)
    rest = mx.minimum(mx.maximum(u - below, 0.0), inside[:, -1:] * (1.0 - 1e-6))  # rounding kept inside the block
    return b[:, 0] * SAMPLE_BLOCK + mx.argmax(inside > rest, axis=-1)


def _batch_cache(model: nn.Module, left_padding: list[int]):
    return [kv_caches().BatchKVCache(left_padding) for _ in model.layers]


MIN_SHARED_PREFIX = 16  # tokens all prompts of a batch must share before the prefix is prefilled once


def _shared_prefix(prompts: list[list[int]]) -> int:
    """How many leading tokens of every prompt are prefilled once for all (0: none).

    The longest common prefix (a chat template's system message and turn
    header, say), at most the shortest prompt's length less two, and only
    from :data:`MIN_SHARED_PREFIX` tokens and two prompts up. The batch pass
    keeps at least two positions: each row's last one for its logits, and a
    pass of one position would be a decode step to prompt-only steering
    (:mod:`mlxpost.steer.hooks`), which must see the whole prompt as prompt.
    """
    if len(prompts) < 2:
        return 0
    first, n = prompts[0], min(len(p) for p in prompts) - 2
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return n if n >= MIN_SHARED_PREFIX else 0


def _prefix_cache(model: nn.Module, prefix: list[int], left: list[int]) -> list:
    """Batch caches holding the keys and values of the first ``len(prefix)`` columns of every left-padded row.

    The prefix goes through the model once, as one row. Row ``i`` of the
    batch is ``left[i]`` padding columns, then the prompt (which starts with
    the prefix); its first ``p = len(prefix)`` columns are padding, then the
    prefix's first ``p - left[i]`` positions. Their keys and values are the
    one row's (rotary positions count from a row's first token, so the
    prefix's keys are the same in every row): gathered, with zeros under
    the padding (masked anyway). The batch pass then takes the columns from
    ``p`` on; a row padded by more than ``p`` has only padding in the cache.
    """
    p = len(prefix)
    one = kv_caches().make_prompt_cache(model)
    model(mx.array([prefix], mx.int32), cache=one)
    col = mx.arange(p)[None, :] - mx.array(left)[:, None]  # (B, p): position in the prefix, < 0 under padding
    take, real = mx.maximum(col, 0), (col >= 0)[:, None, :, None]
    caches = _batch_cache(model, left)
    for c, bc in zip(one, caches):
        keys, values = (a[0, :, :p, :] for a in (c.keys, c.values))  # (H, p, D)
        bc.state = (mx.where(real, keys[:, take].transpose(1, 0, 2, 3), 0),
                    mx.where(real, values[:, take].transpose(1, 0, 2, 3), 0),
                    mx.array([p - n for n in left]), mx.array(left), p)
    return caches


def _repeat_cache(cache: list, G: int) -> None:
    """Repeat every row of a prefilled cache G times in place (row p -> rows p*G .. p*G+G-1)."""
    if G == 1:
        return
    for c in cache:
        if isinstance(c, kv_caches().BatchKVCache):
            c.keys = mx.repeat(c.keys, G, axis=0)
            c.values = mx.repeat(c.values, G, axis=0)
            c.offset = mx.repeat(c.offset, G, axis=0)
            c.left_padding = mx.repeat(c.left_padding, G, axis=0)
        elif hasattr(c, "keys") and hasattr(c, "values"):  # KVCache, RotatingKVCache
            c.keys = mx.repeat(c.keys, G, axis=0)
            c.values = mx.repeat(c.values, G, axis=0)
        elif hasattr(c, "cache"):  # ArraysCache (state-space layers)
            c.cache = [None if a is None else mx.repeat(a, G, axis=0) for a in c.cache]
        else:
            raise MlxpostError(f"group sampling does not support this model's {type(c).__name__} layers "
                               "(their cache cannot be repeated per completion)")


def _filter_cache(cache: list, keep: mx.array) -> None:
    for c in cache:
        if hasattr(c, "filter"):  # BatchKVCache, ArraysCache
            c.filter(keep)
        else:
            c.keys = c.keys[keep]
            c.values = c.values[keep]


def _stop_cut(tokenizer, tokens: list[int], stop: tuple) -> int | None:
    """If a stop string occurs in the decoded ``tokens``: how many tokens it takes to include it."""
    text = tokenizer.decode(tokens)
    hits = [text.find(s) + len(s) for s in stop if s and s in text]
    if not hits:
        return None
    end = min(hits)
    for k in range(1, len(tokens) + 1):
        if len(tokenizer.decode(tokens[:k])) >= end:
            return k
    return len(tokens)


class _Book:
    """Host-side bookkeeping: the tokens of each row and why it stopped."""

    tail = 24  # tokens decoded to look for a stop string (longer stop strings are not supported)

    def __init__(self, tokenizer, n: int, eos: set[int], sampling: Sampling):
        self.tok = tokenizer
        self.eos = eos
        self.s = sampling
        self.out: list[list[int]] = [[] for _ in range(n)]
        self.truncated = np.zeros(n, bool)

    def take(self, row: int, t: int) -> bool:
        """Record token ``t`` of ``row``; True when the row is finished."""
        seq = self.out[row]
        seq.append(t)
        if t in self.eos:
            return True
        if self.s.stop:
            tail = seq[-self.tail:]
            k = _stop_cut(self.tok, tail, self.s.stop)
            if k is not None:
                del seq[len(seq) - len(tail) + k:]
                return True
        if len(seq) >= self.s.max_new_tokens:
            self.truncated[row] = True
            return True
        return False


def _decode(model, cache, first_logits: mx.array, rows: list[int], book: _Book, stats: dict) -> None:
    """Decode the batch positions of ``cache`` (global row ``rows[p]`` at position p) until all stop."""
    s = book.s
    rows = list(rows)
    dead = np.zeros(len(rows), bool)
    y = sample_next(first_logits, s.temperature, s.top_p, s.top_k, s.min_p)
    mx.async_eval(y)
    while True:
        # The next step is built and started before this one's tokens are read.
        logits = model(y[:, None], cache=cache)[:, -1, :]
        nxt = sample_next(logits, s.temperature, s.top_p, s.top_k, s.min_p)
        mx.async_eval(nxt)
        stats["decode_steps"] += 1
        stats["row_steps"].append(len(rows))
        for p, t in enumerate(y.tolist()):
            if not dead[p] and book.take(rows[p], t):
                dead[p] = True
        if dead.all():
            return
        if dead.sum() * 4 >= len(rows):  # drop finished rows from the batch
            keep = np.flatnonzero(~dead)
            idx = mx.array(keep.astype(np.int32))
            _filter_cache(cache, idx)
            nxt = nxt[idx]
            rows = [rows[i] for i in keep]
            dead = dead[keep]
        y = nxt


def _sample(model, prompts: list[list[int]], G: int, book: _Book, stats: dict, pad_id: int) -> None:
    """Prefill the prompts, repeat each cache G times, decode (see the module docstring)."""
    if not all(type(c) is kv_caches().KVCache for c in kv_caches().make_prompt_cache(model)):
        # Caches with their own layout: one prompt at a time (its G samples together).
        for i, p in enumerate(prompts):
            cache = kv_caches().make_prompt_cache(model)
            logits = model(mx.array([p], mx.int32), cache=cache)[:, -1, :]
            _repeat_cache(cache, G)
            _decode(model, cache, mx.repeat(logits, G, axis=0), list(range(i * G, i * G + G)), book, stats)
        return
    lens = [len(p) for p in prompts]
    width = max(lens)
    left = [width - n for n in lens]
    x = np.full((len(prompts), width), pad_id, np.int32)
    for i, p in enumerate(prompts):
        x[i, left[i]:] = p
    shared = _shared_prefix(prompts)
    if shared:
        cache = _prefix_cache(model, prompts[0][:shared], left)
        logits = model(mx.array(x[:, shared:]), cache=cache)[:, -1, :]
    else:
        cache = _batch_cache(model, left)
        logits = model(mx.array(x), cache=cache)[:, -1, :]
    stats["shared_prefix"] = shared
    _repeat_cache(cache, G)
    _decode(model, cache, mx.repeat(logits, G, axis=0), list(range(len(prompts) * G)), book, stats)


def sample_groups(model: nn.Module, tokenizer, prompts: list[list[int]], group_size: int, sampling: Sampling,
                  *, eos_ids: set[int] | None = None, pad_id: int = 0) -> Rollouts:
    """Draw ``group_size`` completions of each prompt (token lists); see the module docstring."""
    if not prompts:
        raise ValueError("no prompts to sample from")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("an empty prompt cannot be sampled from")
    G = group_size
    eos = set(eos_ids if eos_ids is not None else getattr(tokenizer, "eos_token_ids", None) or
              {tokenizer.eos_token_id})
    book = _Book(tokenizer, len(prompts) * G, eos, sampling)
    stats = {"decode_steps": 0, "row_steps": [], "shared_prefix": 0}
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        # Adapters merged: one product per layer while sampling, exactly restored after. Attention through
        # kernels.attention where it is faster (the CPU backend with the JIT flags: MLX's own composes a
        # softmax with a scalar exp there): 1.06x rollout tokens/s on bench_grpo's model, 1.12-1.19x on SmolLM2.
        with adapters_merged(model), kernels.cpu_attention():
            _sample(model, prompts, G, book, stats, pad_id)
    finally:
        if was_training:
            model.train()
    texts = []
    for seq in book.out:
        body = [t for t in seq if t not in eos]
        text = tokenizer.decode(body)
        for stop in sampling.stop:
            if stop and stop in text:
                text = text[: text.find(stop) + len(stop)]
        texts.append(text)
    return Rollouts(group_size=G, completions=book.out, texts=texts, truncated=book.truncated,
                    seconds=time.perf_counter() - t0, prefill_tokens=sum(len(p) for p in prompts),
                    shared_prefix=stats["shared_prefix"],
                    decode_steps=stats["decode_steps"], row_steps=stats["row_steps"])
