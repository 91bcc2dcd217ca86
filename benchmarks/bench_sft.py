"""LoRA SFT throughput: mlxpost against mlx-lm's own trainer, same model, same data.

    python benchmarks/bench_sft.py                 # variable-length and fixed-length data
    python benchmarks/bench_sft.py --quick         # fewer examples, for a smoke run

Setup (printed with the results):

* a ~32M-parameter llama (hidden 512, 8 blocks, 8 heads / 4 KV heads, MLP
  1408, a 16k byte-level BPE vocabulary trained on the data), random weights,
  written in Hugging Face layout and loaded with mlx-lm by both trainers;
* single-turn chats (system + user + assistant), loss on the assistant reply
  only (mlx-lm: ``ChatDataset(mask_prompt=True)``), lengths uniform in 50-600
  tokens ("variable") or all 256 tokens ("fixed");
* LoRA rank 8, scale 2, on every linear layer of every block; AdamW
  (bias correction on) at a constant 1e-3, no clipping, batch size 4, one
  epoch over the same examples; float32 on MLX's CPU backend. A packed row
  holds several examples, so with packing the number of rows per batch is
  chosen to give the same number of optimizer steps as mlx-lm's batches of 4.

Each trainer runs in its own process (fresh peak-memory counter, same BLAS).
Reported per trainer: trained (loss) tokens per second over the whole epoch
including compilation, the same after the first 10% of steps (steady state),
peak memory, the mean training loss of the last 10% of steps, and the
validation loss of the trained adapter on 64 held-out chats, computed by the
same code for both. Results: a table on stdout and ``benchmarks/results/sft.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

LR = 1e-3

SYSTEMS = ["You are a helpful assistant.", "Answer carefully.", "You are a concise assistant.",
           "Be friendly and precise."]


def _words(rng: random.Random, n: int) -> list[str]:
    syll = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "shi", "pe", "da", "zu", "bo", "ri", "ga", "fe", "no"]
    return ["".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(n)]


def make_rows(n: int, tokens_lo: int, tokens_hi: int, seed: int) -> list[dict]:
    """Chats whose rendered length is roughly uniform in [tokens_lo, tokens_hi] tokens."""
    rng = random.Random(seed)
    lexicon = _words(random.Random(1234), 4000)
    rows = []
    for _ in range(n):
        target = rng.randint(tokens_lo, tokens_hi)
        # About 1.6 tokens per pseudo-word after BPE; a third prompt, two thirds reply.
        words = max(6, int(target / 1.6))
        q = max(3, words // 3)
        user = " ".join(rng.choice(lexicon) for _ in range(q)) + "?"
        reply = " ".join(rng.choice(lexicon) for _ in range(words - q)) + "."
        rows.append({"messages": [{"role": "system", "content": rng.choice(SYSTEMS)},
                                  {"role": "user", "content": user}, {"role": "assistant", "content": reply}]})
    return rows


def prepare(workdir: Path, n_train: int, kind: str) -> dict:
    from mlxpost.model.tiny import build_tiny_model, count_parameters

    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = workdir / "model"
    if not (model_dir / "config.json").exists():
        corpus = [m["content"] for r in make_rows(3000, 50, 600, seed=99) for m in r["messages"]]
        build_tiny_model(model_dir, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4,
                         intermediate_size=1408, vocab_size=16384, corpus=corpus, seed=0)
    lo, hi = (50, 600) if kind == "variable" else (256, 256)
    data_dir = workdir / f"data-{kind}-{n_train}"
    if not (data_dir / "train.jsonl").exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        rows = make_rows(n_train, lo, hi, seed=1)
        if kind == "fixed":
            rows = fix_length(rows, model_dir, 256)
        (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        valid = make_rows(64, 50, 600, seed=2)
        (data_dir / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in valid))
    return {"model": str(model_dir), "data": str(data_dir), "params": count_parameters(model_dir)}


def fix_length(rows: list[dict], model_dir: Path, length: int) -> list[dict]:
    """Trim or extend each reply until the rendered chat is exactly ``length`` tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    lexicon = _words(random.Random(1234), 4000)
    rng = random.Random(5)
    out = []
    for r in rows:
        msgs = r["messages"]
        words = msgs[2]["content"].rstrip(".").split()
        for _ in range(4 * length):  # converges in far fewer; the bound only guards a loop
            msgs[2]["content"] = " ".join(words) + "."
            n = len(tok.apply_chat_template(msgs, tokenize=True, return_dict=False))
            if n == length:
                break
            if n > length:
                words.pop()
            else:
                words.append(rng.choice(lexicon))
            if not words:
                break
        if n == length:
            out.append({"messages": msgs})
    return out


# ---------------------------------------------------------------------------
# Workers (each runs in its own process)
# ---------------------------------------------------------------------------


def _valid_loss(model, tokenizer, data_dir: str) -> float:
    """Mean NLL of the assistant tokens of valid.jsonl, computed by mlxpost's core for both trainers."""

    from mlxpost.core.batches import BatchSource
    from mlxpost.core.logprobs import logprobs
    from mlxpost.data.load import tokenize_file
    from mlxpost.data.render import Renderer

    exs, _ = tokenize_file(Path(data_dir) / "valid.jsonl", Renderer(tokenizer), max_seq_len=1024)
    src = BatchSource(exs, mode="pad", batch_size=4, max_len=1024, shuffle=False)
    model.eval()
    total = count = 0.0
    for b in src:
        lp = logprobs(model, b)
        total += -lp.sum().item()
        count += b.weights.sum().item()
    return total / count


def worker_mlx_lm(args) -> dict:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, tok = load(args.model)
    model.set_dtype(mx.float32)
    mx.random.seed(0)
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": 8, "scale": 2.0, "dropout": 0.0})
    rows = [json.loads(l) for l in open(Path(args.data) / "train.jsonl")]
    ds = CacheDataset(ChatDataset(rows, tok, mask_prompt=True))
    iters = len(rows) // args.batch_size
    reports = []

    class CB(TrainingCallback):
        def on_train_loss_report(self, info):
            reports.append(dict(info, t=time.perf_counter()))

    opt = optim.AdamW(learning_rate=LR, weight_decay=0.0, bias_correction=True)
    targs = TrainingArgs(batch_size=args.batch_size, iters=iters, steps_per_report=max(1, iters // 20),
                         steps_per_eval=10**9, steps_per_save=10**9, max_seq_length=1024,
                         adapter_file=str(Path(args.tmp) / "mlxlm_adapters.safetensors"))
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    train(model, opt, ds, None, args=targs, training_callback=CB())
    wall = time.perf_counter() - t0
    trained = sum(r["trained_tokens"] for r in reports[-1:])  # cumulative in mlx-lm's reports
    skip = max(1, len(reports) // 10)
    steady_tok = reports[-1]["trained_tokens"] - reports[skip - 1]["trained_tokens"]
    steady_t = reports[-1]["t"] - reports[skip - 1]["t"]
    last = reports[-max(1, len(reports) // 10):]
    return {"trainer": "mlx-lm", "steps": iters, "trained_tokens": trained, "seconds": wall,
            "trained_tokens_per_s": trained / wall, "steady_trained_tokens_per_s": steady_tok / steady_t,
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "final_train_loss": sum(r["train_loss"] for r in last) / len(last),
            "valid_loss": _valid_loss(model, tok, args.data)}


def worker_mlxpost(args) -> dict:
    import mlx.core as mx

    from mlxpost.config import build_config
    from mlxpost.methods import sft
    from mlxpost.training.loop import Trainer
    from mlxpost.training.pipeline import prepare as prepare_run
    from mlxpost.training.pipeline import run_flops, total_steps
    from mlxpost.training.rundir import RunDir
    from mlxpost.ui import NullReporter

    cfg = build_config(None, [
        f"model.path={args.model}", f"data.path={args.data}", "data.valid_fraction=0", "data.max_seq_len=1024",
        f"data.batching={args.batching}", f"train.batch_size={args.batch_size}", "train.epochs=1",
        f"train.lr={LR}", "train.schedule=constant", "train.max_grad_norm=null", "train.eval_every=0",
        "train.save_every=0", "lora.rank=8", "lora.scale=2.0", f"train.report_every={10**9}",
    ])
    rep = NullReporter()
    prep = prepare_run(cfg, rep)
    if prep.batching == "pack":
        # Rows hold several examples: pick rows per batch so that one epoch takes
        # as many optimizer steps as mlx-lm's batches of batch_size examples.
        import math

        target = len(prep.train.examples) // args.batch_size
        rows = prep.train.batches_per_epoch() * prep.train.batch_size
        prep.train.batch_size = max(1, math.ceil(rows / target))
        prep.train._plan = None
    steps = total_steps(cfg, prep.train)
    run = RunDir(Path(args.tmp) / "mlxpost-run")
    trainer = Trainer(prep.loaded.model, sft.objective(prep.split), cfg.train, total_steps=steps, run=run,
                      reporter=rep, adapter_cfg=prep.adapter_cfg)
    # Time every step: wrap the update to record timestamps and token counts.
    marks = []
    orig_advance = rep.advance

    def advance(step):
        marks.append((time.perf_counter(), trainer.trained_tokens, trainer.history))
        orig_advance(step)

    rep.advance = advance
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    result = trainer.fit(prep.train, None)
    wall = time.perf_counter() - t0
    skip = max(1, len(marks) // 10)
    steady = (marks[-1][1] - marks[skip - 1][1]) / (marks[-1][0] - marks[skip - 1][0])
    losses = [h["loss"] for h in result.history if h["kind"] == "train"]
    flops = run_flops(prep, result)  # FLOP/s over the steps' time (mlxpost.core.flops); MFU null without a peak
    return {"model_flops_per_s": flops["model_flops_per_s"], "mfu": flops["mfu"], "peak_gflops": flops["peak_gflops"],
            "trainer": f"mlxpost ({prep.batching})", "steps": steps, "rows_per_batch": prep.train.batch_size, "trained_tokens": result.trained_tokens,
            "seconds": wall, "trained_tokens_per_s": result.trained_tokens / wall,
            "steady_trained_tokens_per_s": steady, "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "final_train_loss": losses[-1] if losses else None,
            "valid_loss": _valid_loss(prep.loaded.model, prep.loaded.tokenizer, args.data)}


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def gflops(r: dict) -> str:
    """Model GFLOP/s of a row ('-' for mlx-lm's, which the FLOP model does not count)."""
    return f"{r['model_flops_per_s'] / 1e9:.1f}" if r.get("model_flops_per_s") else "-"


def pct(x: float | None) -> str:
    return f"{100 * x:.1f}%" if x is not None else "-"


def run_worker(which: str, info: dict, batching: str, batch_size: int, tmp: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", which, "--model", info["model"], "--data", info["data"],
           "--batching", batching, "--batch-size", str(batch_size), "--tmp", str(tmp)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-3000:] + out.stderr[-5000:])
        raise SystemExit(f"worker {which} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["mlx-lm", "mlxpost"])
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--tmp")
    ap.add_argument("--batching", default="auto")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--examples", type=int, default=400)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--kinds", default="variable,fixed")
    ap.add_argument("--mlxpost-batching", default="pack,pad")
    args = ap.parse_args()

    if args.worker:
        res = worker_mlx_lm(args) if args.worker == "mlx-lm" else worker_mlxpost(args)
        print(json.dumps(res))
        return

    from mlxpost.backend.blas import loaded_blas, maybe_reexec

    maybe_reexec()
    n = 48 if args.quick else args.examples
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = RESULTS / "work"
    all_results = {"setup": {}, "runs": {}}
    for kind in args.kinds.split(","):
        info = prepare(work, n, kind)
        all_results["setup"] = {"params": info["params"], "examples": n, "batch_size": args.batch_size,
                                "blas": loaded_blas().get("name")}
        rows = [run_worker("mlx-lm", info, "pad", args.batch_size, work)]
        for b in args.mlxpost_batching.split(","):
            rows.append(run_worker("mlxpost", info, b, args.batch_size, work))
        base = rows[0]
        for r in rows:
            r["speedup_vs_mlx_lm"] = r["trained_tokens_per_s"] / base["trained_tokens_per_s"]
            r["steady_speedup_vs_mlx_lm"] = r["steady_trained_tokens_per_s"] / base["steady_trained_tokens_per_s"]
            r["memory_vs_mlx_lm"] = r["peak_memory_gb"] / base["peak_memory_gb"]
        all_results["runs"][kind] = rows
        print(f"\n{kind}-length data: {n} chats, model {info['params'] / 1e6:.1f}M params, batch {args.batch_size}")
        hdr = (f"{'trainer':<18}{'tok/s':>9}{'x':>7}{'steady':>9}{'x':>7}{'peak GB':>9}{'x':>7}{'train loss':>12}"
               f"{'val loss':>10}{'GFLOP/s':>9}{'MFU':>7}")
        print(hdr)
        print("-" * len(hdr))
        for r in rows:
            print(f"{r['trainer']:<18}{r['trained_tokens_per_s']:>9.0f}{r['speedup_vs_mlx_lm']:>7.2f}"
                  f"{r['steady_trained_tokens_per_s']:>9.0f}{r['steady_speedup_vs_mlx_lm']:>7.2f}"
                  f"{r['peak_memory_gb']:>9.3f}{r['memory_vs_mlx_lm']:>7.2f}"
                  f"{r['final_train_loss']:>12.4f}{r['valid_loss']:>10.4f}{gflops(r):>9}{pct(r.get('mfu')):>7}")
    out = RESULTS / "sft.json"
    out.write_text(json.dumps(all_results, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
