"""Abliteration: remove a refusal direction from every matrix that writes into the residual stream.

The direction ``r`` (D,) is the normalized mean difference of block ``L``'s
output between harmful and harmless prompts (last prompt token), read with
:func:`~mlxpost.steer.vectors.hidden_states`. Every write into the residual
stream is then orthogonalized so that no component along ``r`` can be
written: for a linear layer ``y = W x`` with ``W`` (D, d_in) (each block's
``o_proj`` and ``down_proj``) ``W ← W − r (rᵀ W)``; for the embedding table
``E`` (V, D), whose rows are written, ``E ← E − (E r) rᵀ``. With tied
embeddings the head reads the same table, so its logits lose the ``r``
component too (as in the refusal-direction papers). Weights are edited in
place (one model in memory); adapters must be fused first.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..data.render import Renderer
from ..errors import MlxpostError
from ..model.adapters import fuse_adapters
from ..model.lora import adapter_modules
from .extract import load_for_steering, read_sequences
from .hooks import model_blocks
from .scores import refusal_rate
from .sweep import greedy_replies, reply_perplexity
from .vectors import hidden_states, separation

WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def direction(harmful: np.ndarray, harmless: np.ndarray) -> np.ndarray:
    """Unit vector along ``mean(harmful) − mean(harmless)`` (N, D each) -> (D,).

    >>> direction(np.array([[2.0, 1.0]]), np.array([[0.0, 1.0]])).tolist()
    [1.0, 0.0]
    """
    v = harmful.mean(0) - harmless.mean(0)
    n = float(np.linalg.norm(v))
    if n == 0:
        raise MlxpostError("the harmful and harmless prompts give the same mean state: no direction to remove")
    return (v / n).astype(np.float32)


def writer_weights(model: nn.Module) -> dict[str, nn.Module]:
    """Modules whose output is added to the residual stream: the embedding and each block's writers."""
    inner = getattr(model, "model", model)
    out = {"embed_tokens": inner.embed_tokens}
    for i, block in enumerate(model_blocks(model)):
        mods = dict(block.named_modules())
        for name in WRITERS:
            if name not in mods:
                raise MlxpostError(f"block {i} has no {name}: abliteration knows Llama-style blocks only")
            out[f"layers.{i}.{name}"] = mods[name]
    for name, m in out.items():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) or not hasattr(m, "weight"):
            raise MlxpostError(f"{name} is quantized (or not a plain layer): abliterate a float model")
    return out


def orthogonalize(model: nn.Module, r: np.ndarray) -> dict[str, float]:
    """Remove ``r`` from every residual writer in place; returns the largest ``|rᵀW|`` per matrix afterwards."""
    u = mx.array(r, dtype=mx.float32)
    left = {}
    for name, m in writer_weights(model).items():
        w = m.weight.astype(mx.float32)
        if name == "embed_tokens":  # (V, D): rows are written
            w = w - (w @ u)[:, None] * u[None, :]
            resid = w @ u
        else:  # (D, d_in): columns are written
            w = w - u[:, None] * (u @ w)[None, :]
            resid = u @ w
        m.weight = w.astype(m.weight.dtype)
        left[name] = float(mx.abs(resid).max())
    mx.eval(model.parameters())
    return left


def write_fused(loaded, out) -> Path:
    """Write the (edited, adapter-free) model as a Hugging Face directory: weights, config, tokenizer files."""
    from mlx_lm.utils import save_model  # here: importing mlx-lm loads transformers

    if adapter_modules(loaded.model):
        raise MlxpostError("fuse the adapters before writing an abliterated model")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, loaded.model)
    base = Path(loaded.path)
    shutil.copyfile(base / "config.json", out / "config.json")
    for f in base.iterdir():
        if f.is_file() and (f.name.startswith("tokenizer") or f.name in ("vocab.json", "merges.txt",
                                                                        "special_tokens_map.json",
                                                                        "generation_config.json")):
            shutil.copyfile(f, out / f.name)
    return out


def run_abliterate(*, model, adapter, harmful, harmless, layer: str = "auto", out, max_new_tokens: int = 48,
                   log=lambda s: None) -> dict:
    """Direction from the first half of each prompt file, rates before/after on the second halves, model to ``out``.

    ``layer auto``: among the middle half of the blocks, the one whose harmful/harmless difference has
    the largest gap over spread (:func:`~mlxpost.steer.vectors.separation`).
    """
    loaded = load_for_steering(model, adapter)
    fuse_adapters(loaded.model)
    r = Renderer(loaded.tokenizer)
    bad, good = read_sequences(harmful, r), read_sequences(harmless, r)
    if len(bad) < 4 or len(good) < 4:
        raise MlxpostError("abliteration needs at least 4 harmful and 4 harmless prompts (half are held out)")
    bad_fit, bad_test, good_fit, good_test = bad[0::2], bad[1::2], good[0::2], good[1::2]
    n = len(model_blocks(loaded.model))
    layers = list(range(n // 4, max(n // 4 + 1, 3 * n // 4))) if layer == "auto" else [int(layer)]
    hb = hidden_states(loaded.model, bad_fit, layers, pad_id=r.eos_id or 0)
    hg = hidden_states(loaded.model, good_fit, layers, pad_id=r.eos_id or 0)
    chosen = max(layers, key=lambda l: separation(hb[l], hg[l])["gap_over_spread"])
    rdir = direction(hb[chosen], hg[chosen])
    log(f"refusal direction from block {chosen}; answering {len(bad_test)} + {len(good_test)} held-out prompts before")
    before_bad = greedy_replies(loaded.model, loaded.tokenizer, bad_test, max_new_tokens)
    before_good = greedy_replies(loaded.model, loaded.tokenizer, good_test, max_new_tokens)
    good_ids = [loaded.tokenizer.encode(t, add_special_tokens=False) for t in before_good]
    ppl_before = reply_perplexity(loaded.model, good_test, good_ids)
    left = orthogonalize(loaded.model, rdir)
    log("answering again after the edit")
    after_bad = greedy_replies(loaded.model, loaded.tokenizer, bad_test, max_new_tokens)
    after_good = greedy_replies(loaded.model, loaded.tokenizer, good_test, max_new_tokens)
    ppl_after = reply_perplexity(loaded.model, good_test, good_ids)
    write_fused(loaded, out)
    res = {"layer": chosen, "max_residual": max(left.values()),
           "refusal_before": refusal_rate(before_bad), "refusal_after": refusal_rate(after_bad),
           "harmless_refusal_before": refusal_rate(before_good), "harmless_refusal_after": refusal_rate(after_good),
           "harmless_ppl_before": ppl_before, "harmless_ppl_after": ppl_after,
           "retention": ppl_before / ppl_after, "n_heldout": [len(bad_test), len(good_test)],
           "examples_after": after_bad[:3]}
    res["verdicts"] = {"refusals_under_5pct": res["refusal_after"] < 0.05, "retention_over_90pct": res["retention"] > 0.9}
    return res
