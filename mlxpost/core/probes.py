"""Checks run once on a loaded model: which fast paths give exactly its own results.

Packing (:func:`packing_is_exact`), attention in query chunks
(:func:`chunking_problem`) and pairs sharing their prompt
(:func:`prompt_sharing_problem`) each rely on how a model builds its
attention mask and applies RoPE. Rather than trust an architecture list,
each is tried on random tokens and compared with the plain computation;
a model that fails keeps the plain path, and the setting says why.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..backend import kernels
from ..data.load import Example, PairExample
from ..errors import MlxpostError
from .batches import _stack
from .forward import DEFAULT_ATTENTION_CHUNK, attention_chunk, forward, rope_owners, set_attention_chunk
from .logprobs import logprobs
from .pairs import PairSource


def _probe_tokens(model, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` random token ids (int32) within the model's vocabulary (at most the first 1000), for probes."""
    vocab = model.model.embed_tokens.weight.shape[0] if hasattr(model, "model") and hasattr(
        model.model, "embed_tokens") else 100
    return rng.integers(1, min(vocab, 1000), n).astype(np.int32)


def packing_is_exact(model, atol: float = 1e-4) -> bool:
    """Do packed rows give the same log-probs as one-by-one rows for this model?

    Two random sequences are run packed (block-diagonal mask through
    :class:`mlxpost.core.forward.MaskCache`) and separately. Architectures that do not build their
    mask from the cache, or whose layers mix positions in other ways, fail
    this check and are trained with padding instead.
    """
    rng = np.random.default_rng(0)
    a = Example(_probe_tokens(model, rng, 9), np.ones(9, bool))
    b = Example(_probe_tokens(model, rng, 7), np.ones(7, bool))
    try:
        packed = logprobs(model, _stack([[a, b]], 16, 0, packed=True))
        one = logprobs(model, _stack([[a]], 8, 0, packed=False))
        two = logprobs(model, _stack([[b]], 6, 0, packed=False))
        ref = mx.concatenate([one[0], two[0]])
        err = mx.abs(packed[0, :14] - ref).max().item()
    except Exception:
        return False
    return err < atol


def chunking_is_exact(model, chunk: int = 8) -> bool:
    """Does attention in query chunks (:func:`mlxpost.core.forward.forward`) cut something and give the same logits?"""
    return chunking_problem(model, chunk) is None


def chunking_problem(model, chunk: int = 8) -> str | None:
    """Why this model cannot run attention in query chunks, or None when it can.

    A random row of ``3 * chunk`` positions goes through the model whole and
    with attention in chunks (:func:`mlxpost.backend.kernels.query_chunks`),
    unpacked and as two packed sequences. A model whose attention lets a
    position see later ones while still passing a mask (a bidirectional span
    of the prompt, say) fails and is run whole; so would anything else that
    changes its logits; so does one whose attention never reaches
    ``mx.fast.scaled_dot_product_attention`` with a causal-shaped mask
    (nothing would be cut, and batch layouts would count a saving that does
    not happen).
    """
    L = 3 * chunk
    x = mx.array(_probe_tokens(model, np.random.default_rng(1), L)[None])
    segments = mx.array((np.arange(L) >= L // 2 + 1).astype(np.int32)[None])
    cut = []
    real = kernels._chunked
    kernels._chunked = lambda *a, **k: cut.append(1) or real(*a, **k)  # counts the attention calls cut
    try:
        err, exact_dtype = 0.0, True
        for seg in (None, segments):
            try:
                whole = forward(model, x, seg, chunk=0)
            except Exception:
                if seg is None:
                    raise
                break  # packed rows fail whole too: packing is this model's problem (padded rows are used)
            try:
                parts = forward(model, x, seg, chunk=chunk)
            except Exception as e:  # an attention call this cannot cut: run it whole
                return f"its attention cannot run in query chunks ({type(e).__name__}: {e})"
            exact_dtype = exact_dtype and whole.dtype == mx.float32
            whole, parts = whole.astype(mx.float32), parts.astype(mx.float32)
            err = max(err, (mx.linalg.norm(whole - parts) / mx.linalg.norm(whole)).item())
    finally:
        kernels._chunked = real
    if not cut:
        return "its attention does not go through mx.fast.scaled_dot_product_attention with a causal mask"
    # The same operations on differently shaped pieces differ by rounding only;
    # a lost key changes the logits at order 1.
    if err > (1e-5 if exact_dtype else 1e-2):
        return f"its logits with attention in query chunks differ from whole rows (relative error {err:.1e})"
    return None


def resolve_attention_chunk(setting: int, model, warn=None) -> int | None:
    """``train.attention_chunk``: -1 (auto) chunks on MLX's CPU backend only, where it is measured faster.

    ``warn``: called when an explicit length cannot be used.
    """
    if setting == 0:
        return None
    chunk = setting if setting > 0 else (DEFAULT_ATTENTION_CHUNK if mx.default_device() == mx.cpu else None)
    if chunk is None:
        return None
    problem = chunking_problem(model)
    if problem is not None:
        if setting > 0 and warn is not None:
            warn(f"train.attention_chunk={setting}: this model cannot run in query chunks: {problem}; "
                 "running whole rows")
        return None
    return chunk


def _probe_pairs(model) -> list[PairExample]:
    """Two random pairs: a common prompt, replies of different lengths."""
    rng = np.random.default_rng(2)
    pairs = []
    for n_prompt, n_c, n_r in ((9, 5, 8), (6, 7, 3)):
        prompt = _probe_tokens(model, rng, n_prompt)
        sides = []
        for n in (n_c, n_r):
            tokens = np.concatenate([prompt, _probe_tokens(model, rng, n)])
            sides.append(Example(tokens, np.arange(len(tokens)) >= n_prompt))
        pairs.append(PairExample(*sides))
    return pairs


def prompt_sharing_problem(model, split) -> str | None:
    """Why pairs cannot share their prompt on this model, or None when they can.

    Two random pairs (a common prompt, replies of different lengths) go
    through the model in a shared-prompt batch, whole and in query chunks,
    and as ordinary packed sequences; the hidden states that score each
    trained token must agree (hidden states, not log-probs: a random model's
    log-probs hardly depend on the context, so they would hide a misplaced
    position). Models whose blocks do not rotate keys and queries with a
    ``rope`` module the way mlx-lm's do (taking one offset per batch
    element), or that mix positions in other ways, fail and keep the
    ordinary layout.
    """
    if split is None:
        return "the model's output layer could not be split off (entries need the head split)"

    pairs = _probe_pairs(model)
    was_training = model.training
    model.eval()  # no dropout: both layouts must see the same weights
    try:
        if not rope_owners(model):
            return "no RoPE module found in its blocks"
        states, grads = [], []
        saved = attention_chunk(model)
        for share, chunk in ((False, None), (True, None), (True, 4)):
            src = PairSource(pairs, mode="pack", batch_size=2, max_len=32, select_bucket=16, share_prompt=share,
                             shuffle=False)
            b = src.build_pairs([0, 1], shared=share)
            set_attention_chunk(model, chunk)
            try:
                # The states, and the gradient of their sum (the same sum in both layouts) with respect to
                # the trainable weights: the backward pass through per-position RoPE must agree too.
                def summed(m):
                    h = scored_states(m, split, b)
                    return h.astype(mx.float32).sum(), h

                (_, h), g = nn.value_and_grad(model, summed)(model)  # one pass gives the states and the gradient
                states.append(h)
                grads.append(mx.concatenate([x.reshape(-1).astype(mx.float32) for _, x in tree_flatten(g)]))
            finally:
                set_attention_chunk(model, saved)
        exact_dtype = all(s.dtype == mx.float32 for s in states)

        def rel(xs):
            want = xs[0].astype(mx.float32)
            return max((mx.linalg.norm(x.astype(mx.float32) - want) / mx.linalg.norm(want)).item() for x in xs[1:])

        err = rel(states)
        grad_err = rel(grads) if grads[0].size else 0.0
    except Exception as e:
        return f"the probe failed to run its blocks with per-position RoPE ({type(e).__name__}: {e})"
    finally:
        if was_training:
            model.train()
    # The same operations on differently laid out rows differ by rounding only;
    # a misplaced position changes the states at order 1.
    if err > (1e-5 if exact_dtype else 1e-2):
        return f"its hidden states with a shared prompt differ from separate sequences (relative error {err:.1e})"
    if grad_err > (1e-4 if exact_dtype else 5e-2):
        return f"its gradients with a shared prompt differ from separate sequences (relative error {grad_err:.1e})"
    return None


def scored_states(model, split, b) -> mx.array:
    """Hidden states (before the head) of a pair batch's trained entries, by sequence and position.

    The same rows, in the same order, whether or not the pairs share their
    prompt (the prompt's last position once per side); padding entries left out.
    """
    h = forward(model, b.inputs, b.segments, body=split.body, branches=b.branches, positions=b.positions)
    index, valid = np.array(b.select[0]), np.array(b.select[1]) > 0
    seq = np.array(b.extra["seq"]) if b.entries else np.array(b.extra["seq"]).reshape(-1)[index]
    order = np.argsort(np.where(valid, seq, 1 << 20), kind="stable")[: int(valid.sum())]
    return h.reshape(-1, h.shape[-1])[mx.array(index[order])]


def resolve_share_prompt(setting: str, model, batching: str, split, grad_checkpoint: bool) -> tuple[bool, str]:
    """``preference.share_prompt``: whether pair batches put each prompt through the model once, and why not.

    ``auto`` shares when the batches are packed, gradient checkpointing is
    off and the model passes :func:`prompt_sharing_problem`; ``on`` requires it.
    """
    if setting == "off":
        return False, "off (preference.share_prompt=off)"
    reason = None
    if batching != "pack":
        reason = "pair batches are padded, not packed"
    elif grad_checkpoint:
        reason = "gradient checkpointing is on"
    else:
        reason = prompt_sharing_problem(model, split)
    if reason is None:
        return True, "once per pair (both replies after it) in the batches where that costs less"
    if setting == "on":
        raise MlxpostError(f"preference.share_prompt=on: {reason}")
    return False, f"repeated on each side ({reason})"


def choose_batching(mode: str, model, pairs: bool = False) -> str:
    """Resolve ``data.batching``.

    ``auto`` packs on a GPU (Metal, CUDA) and pads (length-sorted batches) on
    MLX's CPU backend. On the CPU the softmax of attention is costly (MLX's
    CPU ``exp`` is scalar) and a packed row pays attention over its whole
    length, while length-sorted padding wastes little; measured with
    ``benchmarks/bench_sft.py``, padding was the faster of the two there.

    Preference ``pairs`` pack on every backend: their rows are at most twice
    the longest sequence (:func:`mlxpost.core.pairs.pair_layout`), and padding
    a pair's two replies, which differ in length, to the longer wastes about
    a quarter of the positions (measured with ``benchmarks/bench_dpo.py``).

    Packing also needs the model to isolate packed examples: that is checked
    on the model itself (:func:`packing_is_exact`).
    """
    if mode == "pad" or (mode == "auto" and not pairs and mx.default_device() == mx.cpu):
        return "pad"
    ok = packing_is_exact(model)
    if mode == "pack" and not ok:
        raise MlxpostError("data.batching=pack: this model architecture does not isolate packed examples "
                           "(its attention mask is not built from the cache); use data.batching=pad")
    return "pack" if ok else "pad"
