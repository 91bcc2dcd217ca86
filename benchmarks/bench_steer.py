"""Steering on SmolLM2-135M-Instruct: extraction time (one forward pass records every block vs one pass per
block), sweep time per λ, peak memory.

    python benchmarks/bench_steer.py                       # 32 prompts, every block, batch 8
    python benchmarks/bench_steer.py --prompts 64 --sweep-prompts 16 --max-new-tokens 32

Extraction (:func:`mlxpost.steer.vectors.hidden_states`) installs a recorder
on every requested block and reads all of them from ONE forward pass per
batch. The naive alternative that a one-off script writes is a loop over
blocks, each with its own pass over the data (``hidden_states(..., [l])``
per block). Both are timed on the same prompts (held-out demo questions,
``--position mean``), after one warm-up batch, and their vectors compared
(they must agree to float32 rounding). The sweep is timed per λ on the
prompts answered greedily (KV-cached batches; ``--max-new-tokens``), with
the neutral prompts' replies and their perplexity side effect.
``mx.get_peak_memory()`` is read after each part. A table on stdout and
``benchmarks/results/steer.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlxpost.assets.behaviour import heldout_questions  # noqa: E402
from mlxpost.backend.blas import loaded_blas, maybe_reexec  # noqa: E402
from mlxpost.data.render import Renderer  # noqa: E402
from mlxpost.model.load import load_model  # noqa: E402
from mlxpost.steer.extract import read_sequences  # noqa: E402
from mlxpost.steer.hooks import SteerSpec, model_blocks  # noqa: E402
from mlxpost.steer.sweep import run_sweep  # noqa: E402
from mlxpost.steer.vectors import hidden_states  # noqa: E402

NEUTRAL = HERE.parent / "mlxpost" / "assets" / "neutral_prompts.jsonl"


def timed(fn):
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, mx.get_peak_memory() / 1e9


def main():
    maybe_reexec()  # OpenBLAS preloaded, as the CLI runs
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--sweep-prompts", type=int, default=16)
    ap.add_argument("--lambdas", default="0,0.5,1")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(HERE / "results" / "steer.json"))
    args = ap.parse_args()
    loaded = load_model(args.model)
    model, r = loaded.model, Renderer(loaded.tokenizer)
    qs = [q["prompt"] for q in heldout_questions()]
    seqs = [r.prompt(q)[0] for q in qs[: args.prompts]]
    layers = list(range(len(model_blocks(model))))
    kw = dict(position="mean", batch_size=args.batch_size, pad_id=r.eos_id or 0)
    hidden_states(model, seqs[: args.batch_size], layers, **kw)  # warm-up
    one, t_one, mem_one = timed(lambda: hidden_states(model, seqs, layers, **kw))
    naive, t_naive, mem_naive = timed(lambda: {l: hidden_states(model, seqs, [l], **kw)[l] for l in layers})
    max_diff = max(float(np.abs(one[l] - naive[l]).max()) for l in layers)
    mid, half = len(layers) // 2, len(seqs) // 2
    v = one[mid][:half].mean(0) - one[mid][half:].mean(0)  # a direction of the data (its length: --relative)
    neutral = read_sequences(NEUTRAL, r)
    grid = [float(x) for x in args.lambdas.split(",")]
    spec = SteerSpec(mid, mx.array(v), 1.0)
    res, t_sweep, mem_sweep = timed(lambda: run_sweep(
        model, loaded.tokenizer, spec, grid, [r.prompt(q)[0] for q in qs[-args.sweep_prompts:]], neutral,
        score="length", max_new_tokens=args.max_new_tokens, relative=True))
    out = {"model": str(loaded.path), "blas": loaded_blas().get("name"), "machine": platform.machine(),
           "prompts": len(seqs), "tokens": sum(map(len, seqs)), "blocks": len(layers), "batch_size": args.batch_size,
           "extract_one_pass_s": t_one, "extract_per_block_s": t_naive, "speedup": t_naive / t_one,
           "max_abs_diff": max_diff, "extract_peak_gb": mem_one, "naive_peak_gb": mem_naive,
           "sweep_prompts": args.sweep_prompts, "neutral_prompts": len(neutral), "max_new_tokens": args.max_new_tokens,
           "sweep_seconds_per_lambda": {str(x["lambda"]): x["seconds"] for x in res["rows"]},
           "sweep_total_s": t_sweep, "sweep_peak_gb": mem_sweep}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"| part | seconds | peak GB |\n|---|---:|---:|\n"
          f"| extract, {len(seqs)} prompts x {len(layers)} blocks, one pass per batch | {t_one:.2f} | {mem_one:.2f} |\n"
          f"| extract, one pass per block (naive) | {t_naive:.2f} | {mem_naive:.2f} |\n"
          f"| sweep, {len(grid)} λ ({args.sweep_prompts} + {len(neutral)} prompts, {args.max_new_tokens} tokens) | "
          f"{t_sweep:.1f} | {mem_sweep:.2f} |")
    print(f"speedup {t_naive / t_one:.1f}x; max |difference| {max_diff:.2e}; per λ: " +
          ", ".join(f"{k}: {s:.1f}s" for k, s in out["sweep_seconds_per_lambda"].items()))


if __name__ == "__main__":
    main()
