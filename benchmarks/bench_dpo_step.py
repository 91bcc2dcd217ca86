"""What DPO's reference pass costs: one compiled DPO step, three ways.

    python benchmarks/bench_dpo_step.py                      # SmolLM2-135M (the default model), top 12 of 30 blocks
    python benchmarks/bench_dpo_step.py --num-layers -1      # every block adapted: nothing to share
    python benchmarks/bench_dpo_step.py --model path/to/hf_model --batch-size 8

On one batch of the bundled preference pairs (``--data`` for others), with
adapters moved away from zero (so the policy differs from the reference), the
compiled forward + backward of the DPO loss is timed (mean over ``--repeat``
calls after two warm-up calls) with

* the full reference pass: the model with adapters off, from the embedding up;
* the shared shared_blocks (the default): the reference pass starts from the policy
  pass's hidden state at the first adapted block (:mod:`mlxpost.core.shared_blocks`);
* a precomputed reference (``--precompute-ref``): no reference pass at all,
  the lower bound;

and, for scale, one adapters-off forward pass alone. Prints a table and
writes ``benchmarks/results/dpo_step.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default=None, help="preference pairs (default: the bundled ones)")
    ap.add_argument("--num-layers", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--attention-chunk", type=int, default=-1,
                    help="train.attention_chunk: -1 auto (96 on the CPU), 0 off (whole rows)")
    args = ap.parse_args()

    from mlxpost.backend.blas import maybe_reexec

    maybe_reexec()
    import mlx.core as mx
    import mlx.nn as nn

    from mlxpost.config import build_config
    from mlxpost.core.batches import batch_from_arrays
    from mlxpost.core.forward import attention_chunk
    from mlxpost.core.shared_blocks import SharedBlocks
    from mlxpost.methods import dpo
    from mlxpost.methods.preference import reference_token_logprobs
    from mlxpost.training.pipeline import prepare
    from mlxpost.ui import NullReporter

    sets = [f"model.path={args.model}", f"lora.num_layers={args.num_layers}", f"train.batch_size={args.batch_size}",
            "model.dtype=float32", f"train.attention_chunk={args.attention_chunk}"]
    if args.data:
        sets.append(f"data.path={args.data}")
    prep = prepare(build_config(None, sets, method="dpo"), NullReporter())
    model = prep.loaded.model
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape, key=mx.random.key(1)) * 0.01
    batch = next(iter(prep.train))
    ref = reference_token_logprobs(model, batch, prep.split)
    mx.eval(ref)
    pre = batch_from_arrays(batch.arrays())
    pre.extra = {**(batch.extra or {}), "ref_logps": ref}
    shared_blocks = SharedBlocks.find(model)

    def timed(fn, arrays) -> float:
        for _ in range(2):  # compilation, then a warm call
            mx.eval(fn(arrays))
        t = time.perf_counter()
        for _ in range(args.repeat):
            mx.eval(fn(arrays))
        return (time.perf_counter() - t) / args.repeat

    def step(blocks_):
        objective = dpo.objective(prep.split, loss="sigmoid", beta=0.1, label_smoothing=0.0, shared_blocks=blocks_)
        vg = nn.value_and_grad(model, lambda m, a: objective.loss(m, batch_from_arrays(a))[0])
        return mx.compile(lambda a: vg(model, a), inputs=[model.state], outputs=[model.state])

    forward = mx.compile(lambda a: reference_token_logprobs(model, batch_from_arrays(a), prep.split),
                         inputs=[model.state], outputs=[model.state])
    rows = {"full reference pass": timed(step(None), batch.arrays())}
    if shared_blocks is not None:
        rows["shared shared_blocks"] = timed(step(shared_blocks), batch.arrays())
    rows["precomputed reference"] = timed(step(None), pre.arrays())
    rows["one forward pass, adapters off"] = timed(forward, batch.arrays())

    blocks = len(model.layers)
    print(f"\nmodel {args.model}: {blocks} blocks, LoRA on the top {args.num_layers if args.num_layers > 0 else blocks}; "
          f"batch {args.batch_size} pairs, shape {tuple(batch.inputs.shape)} ({prep.batching}), "
          f"{batch.n_targets} answer tokens; shared blocks: {shared_blocks.k if shared_blocks else 0}; "
          f"attention chunk: {attention_chunk(model) or 'off'}")
    base = rows["full reference pass"]
    print(f"{'DPO step':<34}{'seconds':>9}{'vs full':>9}")
    for k, v in rows.items():
        print(f"{k:<34}{v:>9.3f}{base / v:>8.2f}x")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"model": args.model, "blocks": blocks, "num_layers": args.num_layers, "batch_pairs": args.batch_size,
           "attention_chunk": attention_chunk(model),
           "shape": list(batch.inputs.shape), "batching": prep.batching, "shared_blocks": shared_blocks.k if shared_blocks else 0,
           "seconds": rows}
    (RESULTS / "dpo_step.json").write_text(json.dumps(out, indent=2))
    print(f"\nwritten {RESULTS / 'dpo_step.json'}")


if __name__ == "__main__":
    main()
