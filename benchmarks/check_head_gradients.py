"""The fused output layer against whole logits on a real model: loss and every LoRA gradient, SFT and DPO.

    python benchmarks/check_head_gradients.py            # SmolLM2-135M-Instruct (the default model)
    python benchmarks/check_head_gradients.py --model DIR

One batch of the bundled data per method, adapters moved away from zero; the
same value-and-gradient with ``set_fused_head(False)`` (whole (K, V) logits,
autodiff) and ``set_fused_head(True)`` (:func:`mlxpost.core.logprobs.head_logprobs`).
Prints the loss difference and the worst gradient difference relative to
that tensor's largest entry.
"""
import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    args = ap.parse_args()
    from mlxpost.backend.blas import maybe_reexec

    maybe_reexec()
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlxpost.config import build_config
    from mlxpost.core.batches import batch_from_arrays
    from mlxpost.core.logprobs import set_fused_head
    from mlxpost.methods import get as get_method
    from mlxpost.training.pipeline import prepare
    from mlxpost.ui import NullReporter

    for method in ("sft", "dpo"):
        sets = [f"model.path={args.model}", "train.batch_size=4", "model.dtype=float32", "train.max_memory_gb=0"]
        prep = prepare(build_config(None, sets, method=method), NullReporter())
        model = prep.loaded.model
        for _, m in model.named_modules():
            if hasattr(m, "lora_b"):
                m.lora_b = mx.random.normal(m.lora_b.shape, key=mx.random.key(1)) * 0.01
        arrays = next(iter(prep.train)).arrays()
        out = {}
        for fused in (False, True):
            set_fused_head(fused)
            objective = get_method(method).objective(prep)
            vg = nn.value_and_grad(model, lambda m, a, o=objective: o.loss(m, batch_from_arrays(a))[0])
            v, g = vg(model, arrays)
            mx.eval(v, g)
            out[fused] = (v.item(), dict(tree_flatten(g)))
        set_fused_head(True)
        (v0, g0), (v1, g1) = out[False], out[True]
        worst = max(mx.abs(g0[k] - g1[k]).max().item() / max(1e-12, mx.abs(g0[k]).max().item()) for k in g0)
        print(f"{method}: loss {v0:.6f} (whole logits) vs {v1:.6f} (fused), |diff| {abs(v0 - v1):.2e}; "
              f"{len(g0)} gradient tensors, worst max|diff| / max|g| {worst:.2e}; "
              f"batch {tuple(arrays['inputs'].shape)}")


if __name__ == "__main__":
    main()
