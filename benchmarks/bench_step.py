"""One training step under different settings, timed interleaved: attention chunks, fused CPU kernels.

    python benchmarks/bench_step.py                        # DPO on SmolLM2-135M, top 16 of 30 blocks
    python benchmarks/bench_step.py --kernels off,on       # MLX's softmax/log-sum-exp against mlxpost.backend.kernels
    python benchmarks/bench_step.py --method sft --batch-size 4
    python benchmarks/bench_step.py --chunks 0,64,96,128 --num-layers -1
    python benchmarks/bench_step.py --method sft --chunks 0 --head full,fused   # the output layer's two paths

Settings are the product of ``--chunks`` (``train.attention_chunk``; 0 =
whole rows) and ``--kernels`` (``on``/``off``: whether training passes use
:mod:`mlxpost.backend.kernels`; ``auto``: what this process would do).

* **Attention chunks.** A training forward pass on MLX's CPU backend computes
  attention scores for every pair of positions of a row, and the causal mask
  throws half of them away. With attention in query chunks (each chunk's
  queries against the keys up to its end), only the scores on and below the
  diagonal between chunks are computed (:func:`mlxpost.backend.kernels.query_chunks`).
* **Fused kernels.** MLX's softmax and log-sum-exp primitives run a scalar
  ``exp`` on the CPU; written as ops and compiled by MLX's JIT with the flags
  of :mod:`mlxpost.backend.jit`, the same ``exp`` is vectorized.

One process, one prepared run (the method's own objective: for DPO the
reference pass that shares the lower blocks), adapters moved away from zero; for each
setting a compiled value-and-gradient step is traced, then the settings are
timed in turn, ``--rounds`` times over the same ``--batches`` batches, so
machine noise hits them alike. Prints a table and writes
``benchmarks/results/step-<method>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BENCH_PAIRS = RESULTS / "dpo-work" / "pairs-32-default"  # written by bench_dpo.py --model default --pairs 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--method", default="dpo", choices=["dpo", "orpo", "sft"])
    ap.add_argument("--data", default=None,
                    help="data directory (default: bench_dpo.py's SmolLM2 pairs when written, else the bundled data)")
    ap.add_argument("--num-layers", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=2, help="pairs (or SFT rows) per step")
    ap.add_argument("--chunks", default="0,96", help="attention chunk settings to compare; 0 = whole rows")
    ap.add_argument("--kernels", default="auto", help="fused CPU kernels: on, off, auto, or a list (off,on)")
    ap.add_argument("--head", default="fused",
                    help="output layer of the policy pass: fused (chunked log-probs with their gradient), "
                         "full (whole logits, autodiff), or a list (full,fused)")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from mlxpost.backend.blas import maybe_reexec

    maybe_reexec()
    import mlx.core as mx
    import mlx.nn as nn

    from mlxpost.backend import jit, kernels
    from mlxpost.backend.doctor import cached_peak
    from mlxpost.config import build_config
    from mlxpost.core.batches import batch_from_arrays
    from mlxpost.core.flops import causal_pairs, flop_model, training_flops
    from mlxpost.core.forward import set_attention_chunk
    from mlxpost.core.logprobs import set_fused_head
    from mlxpost.methods import get as get_method
    from mlxpost.training.pipeline import prepare
    from mlxpost.ui import NullReporter

    auto = "on" if kernels.enabled() else "off"
    kernel_opts = [auto if k.strip() == "auto" else k.strip() for k in args.kernels.split(",")]
    if any(k not in ("on", "off") for k in kernel_opts):
        ap.error(f"--kernels: on, off or auto, got {args.kernels!r}")
    heads = [h.strip() for h in args.head.split(",")]
    if any(h not in ("fused", "full") for h in heads):
        ap.error(f"--head: fused, full or a list, got {args.head!r}")
    settings = [(int(c), k, h) for c in args.chunks.split(",") for k in kernel_opts for h in heads]
    data = args.data or (str(BENCH_PAIRS) if args.method != "sft" and BENCH_PAIRS.exists() else None)
    sets = [f"model.path={args.model}", f"lora.num_layers={args.num_layers}", f"train.batch_size={args.batch_size}",
            "model.dtype=float32", "train.attention_chunk=0"]
    if data:
        sets.append(f"data.path={data}")
    prep = prepare(build_config(None, sets, method=args.method), NullReporter())
    model = prep.loaded.model
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape, key=mx.random.key(1)) * 0.01
    it = iter(prep.train)
    batches = [next(it) for _ in range(args.batches)]

    steps, losses = {}, {}
    for c, k, h in settings:
        set_attention_chunk(model, c or None)  # all three read when the step is traced
        kernels.set_enabled(k == "on")
        set_fused_head(h == "fused")
        objective = get_method(args.method).objective(prep)
        vg = nn.value_and_grad(model, lambda m, a, o=objective: o.loss(m, batch_from_arrays(a))[0])
        step = mx.compile(lambda a, vg=vg: vg(model, a), inputs=[model.state], outputs=[model.state])
        losses[c, k, h] = [step(b.arrays())[0].item() for b in batches]  # traces every shape once
        steps[c, k, h] = step
    set_attention_chunk(model, None)
    kernels.set_enabled(None)
    set_fused_head(True)

    seconds = {s: 0.0 for s in settings}
    for _ in range(args.rounds):
        for s in settings:
            for b in batches:
                t = time.perf_counter()
                mx.eval(steps[s](b.arrays()))
                seconds[s] += time.perf_counter() - t
    per_step = {s: seconds[s] / (args.rounds * len(batches)) for s in settings}
    # Model FLOPs of a step (the same for every setting: attention chunks change the hardware's work, not the
    # model's), the mean over the batches; MFU against the peak mlxpost doctor cached, else unknown.
    fm, ref = flop_model(model), get_method(args.method).reference_pass(prep)
    step_flops = sum(training_flops(fm, b.n_tokens, b.n_targets if prep.split is not None else b.n_tokens,
                                    causal_pairs(b.n_tokens, max(b.n_examples, b.inputs.shape[0], 1)), ref)["model"]
                     for b in batches) / len(batches)
    peak = cached_peak(mx, "float32")

    shapes = [tuple(b.inputs.shape) for b in batches]
    print(f"\n{args.method} on {args.model}: LoRA on the top {args.num_layers} blocks "
          f"(of {len(model.layers)}), batch shapes {shapes} ({prep.batching}); "
          f"{args.rounds} interleaved rounds; JIT flags: {os.environ.get(jit.ACTIVE_VAR) or 'none'}")
    base = per_step[settings[0]]
    print(f"{'attention chunk':<18}{'kernels':<9}{'head':<7}{'s/step':>9}{'vs first':>10}{'max |loss diff|':>17}"
          f"{'GFLOP/s':>9}{'MFU %':>7}")
    for s in settings:
        diff = max(abs(a - b) for a, b in zip(losses[s], losses[settings[0]]))
        c, k, h = s
        rate = step_flops / per_step[s]
        mfu = f"{100 * rate / (peak['gflops'] * 1e9):>7.1f}" if peak else f"{'-':>7}"
        print(f"{(str(c) if c else 'whole rows'):<18}{k:<9}{h:<7}{per_step[s]:>9.3f}{base / per_step[s]:>9.2f}x"
              f"{diff:>17.2e}{rate / 1e9:>9.1f}{mfu}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"model": args.model, "method": args.method, "num_layers": args.num_layers, "batch_size": args.batch_size,
           "data": data or "bundled", "shapes": shapes, "batching": prep.batching, "rounds": args.rounds,
           "jit_flags": os.environ.get(jit.ACTIVE_VAR),
           "seconds_per_step": {f"chunk={c},kernels={k},head={h}": v for (c, k, h), v in per_step.items()},
           "losses": {f"chunk={c},kernels={k},head={h}": v for (c, k, h), v in losses.items()},
           "model_flops_per_step": step_flops, "peak_gflops": peak["gflops"] if peak else None,
           "model_flops_per_s": {f"chunk={c},kernels={k},head={h}": step_flops / v
                                 for (c, k, h), v in per_step.items()},
           "mfu": {f"chunk={c},kernels={k},head={h}": step_flops / v / (peak["gflops"] * 1e9) if peak else None
                   for (c, k, h), v in per_step.items()}}
    path = RESULTS / f"step-{args.method}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
