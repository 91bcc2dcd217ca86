"""Where a rollout's decode step goes: the step against the matrix products it cannot avoid.

    python benchmarks/profile_decode.py                          # bench_grpo.py's 32M model and SmolLM2-135M
    python benchmarks/profile_decode.py --model default --rows 16,128

A GRPO step decodes all its completions together, one token per row per
step (``mlxpost.rl.rollout``). At a width of 128 rows every linear layer of
every block is a (128 x D_in) @ (D_in x D_out) product, and the output layer
one of (128 x D) @ (D x V). This script times, on the same model and in the
same process (interleaved, so a shared machine's load falls on both alike):

* **step**: one decode step as the rollout runs it: the model on one new
  token per row against a KV cache of ``--context`` positions, then
  :func:`mlxpost.rl.rollout.sample_next` at temperature 1 (adapters merged:
  plain weights);
* **products**: every linear layer's product at that width, alone, one
  after another (each distinct shape timed, multiplied by how often it
  occurs), with the output layer's product;
* parts of the step in CPU milliseconds: the output layer, the sampler, and
  the attention over the KV cache with the cache's upkeep (the step less
  the same model call without a cache, less the sampler);

and prints the share of the step the products take. When the products are
most of the step, the step runs at the speed of the machine's matrix
products and no change to the decoding loop can make it much faster; only
fewer FLOPs (fewer rows, fewer tokens) can. The table goes to stdout and
``benchmarks/results/profile_decode.json``.
"""

from __future__ import annotations

from mlxpost.backend.blas import maybe_reexec

maybe_reexec()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
RESULTS = Path(__file__).resolve().parent / "results"

from bench_grpo import loadavg  # noqa: E402  (the 1-minute load average, as bench_grpo reports it)

from mlxpost.backend import kernels  # noqa: E402
from mlxpost.model.load import load_model  # noqa: E402
from mlxpost.rl.rollout import _batch_cache, sample_next  # noqa: E402


def linear_shapes(model: nn.Module) -> Counter:
    """``{(D_in, D_out): count}`` of every linear layer in the blocks, and the output layer's (D, V)."""
    shapes = Counter()
    for _, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out_dim, in_dim = m.weight.shape
            shapes[(in_dim, out_dim)] += 1
    if not any(name.endswith("lm_head") for name, _ in model.named_modules()):  # tied: the embedding is the head
        vocab, dim = model.model.embed_tokens.weight.shape
        shapes[(dim, vocab)] += 1
    return shapes


def clock():
    """(wall, CPU) seconds: on a shared machine the CPU seconds of this process (all its threads) are the
    steadier measure of the work done; both are reported."""
    return time.perf_counter(), time.process_time()


def time_products(shapes: Counter, rows: int, reps: int) -> tuple[float, float]:
    """(wall, CPU) seconds of all the products at ``rows`` rows: each distinct shape timed (median of ``reps``)
    x how often it occurs."""
    total = [0.0, 0.0]
    for (d_in, d_out), count in shapes.items():
        x = mx.random.normal((rows, d_in))
        w = mx.random.normal((d_out, d_in)) * 0.02
        mx.eval(x, w, x @ w.T)  # warm-up
        times = []
        for _ in range(reps):
            t0 = clock()
            mx.eval(x @ w.T)
            t1 = clock()
            times.append((t1[0] - t0[0], t1[1] - t0[1]))
        for i in (0, 1):
            total[i] += statistics.median(t[i] for t in times) * count
    return total[0], total[1]


def time_steps(model: nn.Module, rows: int, context: int, steps: int) -> tuple[float, float]:
    """(wall, CPU) seconds per decode step (medians over ``steps``) after a prefill of ``context`` positions
    per row."""
    vocab = model.model.embed_tokens.weight.shape[0]
    cache = _batch_cache(model, [0] * rows)
    prompt = mx.random.randint(0, vocab, (rows, context)).astype(mx.int32)
    logits = model(prompt, cache=cache)[:, -1, :]
    y = sample_next(logits, 1.0)
    mx.eval(y)
    times = []
    for _ in range(steps + 2):
        t0 = clock()
        with kernels.cpu_attention():  # as sample_groups runs its steps
            logits = model(y[:, None], cache=cache)[:, -1, :]
        y = sample_next(logits, 1.0)
        mx.eval(y)
        t1 = clock()
        times.append((t1[0] - t0[0], t1[1] - t0[1]))
    times = times[2:]  # the first steps grow the cache's buffers
    return statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)


def time_parts(model: nn.Module, rows: int, reps: int) -> dict:
    """CPU seconds (medians) of parts of a step: the model on one token per row without a cache (so the
    difference to a step is the attention over the cache and the cache's upkeep), the output layer alone,
    and the sampler alone on (rows, V) logits."""
    emb = model.model.embed_tokens
    y = mx.zeros((rows, 1), mx.int32)
    h = emb(y)
    head = getattr(model, "lm_head", None) or emb.as_linear
    logits = mx.random.normal((rows, emb.weight.shape[0]))
    mx.eval(h, logits)
    def no_cache():
        with kernels.cpu_attention():
            mx.eval(model(y))

    parts = {"no_cache": no_cache, "head": lambda: mx.eval(head(h)),
             "sampler": lambda: mx.eval(sample_next(logits, 1.0))}
    out = {}
    for name, f in parts.items():
        f()
        times = []
        for _ in range(reps):
            t0 = clock()
            f()
            times.append(clock()[1] - t0[1])
        out[name] = statistics.median(times)
    return out


def profile(spec: str, rows: int, context: int, rounds: int) -> dict:
    loaded = load_model(spec)
    model = loaded.model
    model.eval()
    shapes = linear_shapes(model)
    flops = 2 * rows * sum(a * b * n for (a, b), n in shapes.items())
    steps, prods, parts = [], [], []
    for _ in range(rounds):  # interleaved: load on the machine falls on all alike
        steps.append(time_steps(model, rows, context, 6))
        prods.append(time_products(shapes, rows, 5))
        parts.append(time_parts(model, rows, 5))
    step, prod = (statistics.median(t[0] for t in x) for x in (steps, prods))
    step_cpu, prod_cpu = (statistics.median(t[1] for t in x) for x in (steps, prods))
    part = {k: 1e3 * statistics.median(p[k] for p in parts) for k in parts[0]}
    return {"model": spec, "rows": rows, "context": context, "step_ms": 1e3 * step, "products_ms": 1e3 * prod,
            "products_share": prod / step, "step_cpu_ms": 1e3 * step_cpu, "products_cpu_ms": 1e3 * prod_cpu,
            "products_share_cpu": prod_cpu / step_cpu, "step_gflops": flops / step / 1e9,
            "products_gflops": flops / prod / 1e9, "rollout_tok_s": rows / step,
            "head_cpu_ms": part["head"], "sampler_cpu_ms": part["sampler"],
            "cache_attention_cpu_ms": 1e3 * step_cpu - part["no_cache"] - part["sampler"], "load": loadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", default=None,
                    help="model directory or 'default' (repeatable; default: bench_grpo's model and SmolLM2)")
    ap.add_argument("--rows", default="16,128", help="decode widths, comma-separated")
    ap.add_argument("--context", type=int, default=64, help="positions already in the KV cache")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of step and product timings")
    args = ap.parse_args()
    models = args.model
    if not models:
        work = RESULTS / "work" / "model"
        if not work.exists():
            from bench_dpo import build_model  # bench_grpo.py's model, built on first use
            build_model(work)
        models = [str(work), "default"]
    out = []
    print(f"{'model':<24} {'rows':>5} {'step ms':>8} {'products ms':>12} {'share':>6} {'CPU-ms step':>12} "
          f"{'CPU-ms products':>16} {'CPU share':>10} {'head':>6} {'sampler':>8} {'cache attn':>11} "
          f"{'step GFLOP/s':>13} {'tok/s':>7} {'load':>5}")
    for spec in models:
        for rows in [int(r) for r in args.rows.split(",")]:
            r = profile(spec, rows, args.context, args.rounds)
            out.append(r)
            name = Path(spec).name if spec != "default" else "SmolLM2-135M (default)"
            print(f"{name[-24:]:<24} {rows:>5} {r['step_ms']:>8.1f} {r['products_ms']:>12.1f} "
                  f"{r['products_share']:>6.2f} {r['step_cpu_ms']:>12.1f} {r['products_cpu_ms']:>16.1f} "
                  f"{r['products_share_cpu']:>10.2f} {r['head_cpu_ms']:>6.1f} {r['sampler_cpu_ms']:>8.1f} "
                  f"{r['cache_attention_cpu_ms']:>11.1f} {r['step_gflops']:>13.1f} {r['rollout_tok_s']:>7.0f} "
                  f"{r['load'] or 0:>5.1f}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "profile_decode.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
