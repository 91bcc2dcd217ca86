"""Peak memory and step time of LoRA training on a large-vocabulary model: mlxpost against mlx-lm's trainer.

    python benchmarks/bench_memory.py                              # Qwen2.5-0.5B-shaped model, SFT
    python benchmarks/bench_memory.py --settings default,grad_checkpoint --trainers mlxpost
    python benchmarks/bench_memory.py --model DIR --steps 4
    python benchmarks/bench_memory.py --mlxpost-src /path/to/other/checkout   # another version of mlxpost

The model (unless ``--model``): Qwen2.5-0.5B-Instruct's shapes (hidden 896,
24 blocks, 14 query / 2 KV heads, MLP 4864, vocabulary 151,936, tied
embeddings, q/k/v biases: 494M parameters, 1.98 GB in float32) with random
weights, written in Hugging Face layout by :mod:`mlxpost.model.tiny`
(nothing comes from the Hub). Memory and time do not depend on the weights'
values; the tokenizer is a small BPE, so the data use the low token ids, which
changes nothing either.

Shapes, as in the issue that asked for this (LoRA rank 8 on every linear of
every block, float32, batch 2 x 1024 trained tokens): plain-text rows longer
than 1024 tokens, cut to 1024 by both trainers (``data.max_seq_len`` /
``--max-seq-length``), every token trained. AdamW at 1e-5. ``--steps`` steps
(the first compiles; step time is the mean of the others).

Each (trainer, setting) runs in its own process, one after the other (never
two at once: the numbers are each process's own). Reported: MLX's peak
memory (``mx.get_peak_memory``: what MLX allocated; for mlxpost from
summary.json, for mlx-lm from its "Peak mem" line), the process's maximum
resident set size (weights, Python, libraries, everything), seconds per step
after the first, and peak memory over the weights' bytes. A table on stdout
and ``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = RESULTS / "memory-work"

QWEN05 = dict(model_type="qwen2", hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
              intermediate_size=4864, vocab_size=151_936, tie_word_embeddings=True, rope_theta=1_000_000.0,
              max_position_embeddings=4096)

# mlxpost settings: name -> --set overrides
SETTINGS = {
    "default": [],
    "grad_checkpoint": ["train.grad_checkpoint=true"],
    "budget_2.8": ["train.max_memory_gb=2.8"],  # the plan picks checkpointing and the micro-batch
}


def build_model(path: Path) -> Path:
    if (path / "model.safetensors").exists():
        return path
    from mlxpost.model.tiny import build_tiny_model

    print(f"writing a random-weight model with Qwen2.5-0.5B's shapes to {path} ...", flush=True)
    return build_tiny_model(path, **QWEN05)


def _text(rng: random.Random, words: int) -> str:
    syll = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "shi", "pe", "da", "zu", "bo", "ri", "ga", "fe", "no"]
    return " ".join("".join(rng.choice(syll) for _ in range(rng.randint(2, 5))) for _ in range(words))


def write_data(path: Path, method: str, n: int, seed: int = 0) -> Path:
    """Rows of pseudo-words: SFT text rows well over 1024 tokens with any BPE; DPO pairs whose prompt +
    reply is over 1024 tokens on both sides; GRPO prompts of a few words."""
    path = path / method
    path.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for name, count in (("train", n), ("valid", 4)):
        with open(path / f"{name}.jsonl", "w") as f:
            for _ in range(count):
                if method == "sft":
                    row = {"text": _text(rng, 900)}
                elif method == "dpo":
                    row = {"prompt": _text(rng, 20), "chosen": _text(rng, 900), "rejected": _text(rng, 900)}
                else:
                    row = {"prompt": _text(rng, 12), "answer": "1"}
                f.write(json.dumps(row) + "\n")
    return path


# GRPO's reward on a random-weight model: any spread of scores (memory and time do not depend on it).
REWARD = '''def spread(completions, **columns):
    return [(sum(map(ord, c)) % 7) / 7 for c in completions]
'''

# Per method: the command's own options, giving 2 x 1024 trained positions (SFT, DPO) or 16 x 128 (GRPO).
METHOD_ARGS = {
    "sft": ["--batch-size", "2", "--max-seq-len", "1024", "--batching", "pad"],
    "dpo": ["--batch-size", "1", "--max-seq-len", "1024", "--batching", "pad"],
    # Prompts of 88 tokens: grpo.max_prompt_len 96 lets the memory plan size its passes by them (it
    # assumes prompts as long as grpo.max_prompt_len, 512 by default).
    "grpo": ["--group-size", "16", "--prompts-per-step", "1", "--max-new-tokens", "128",
             "--set", "grpo.max_prompt_len=96"],
}


def run(cmd: list[str], env: dict, log: Path, cwd: str | None = None) -> tuple[int, float, str]:
    """Run ``cmd`` in ``cwd``; return (exit code, max RSS in GB, output)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
    text = log.read_text()
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1e6, text  # ru_maxrss: KB on Linux


def mlxpost_run(args, model: Path, method: str, setting: str, env: dict) -> dict:
    out = WORK / "runs"
    name = f"{method}-{setting}{args.tag}"
    data = write_data(WORK / "data", method, n=2 * args.steps + 2)
    cmd = [sys.executable, "-m", "mlxpost", method, "--model", str(model), "--data", str(data), "--out", str(out),
           "--name", name, "--overwrite", "--plain", "--steps", str(args.steps), *METHOD_ARGS[method], "--lr", "1e-5",
           "--set", "train.eval_at_start=false", "--set", "train.eval_every=0", "--set", "train.eval_batches=1",
           "--set", "model.dtype=float32", "--set", "train.save_every=0", "--set", "train.report_every=1"]
    if method == "grpo":
        (WORK / "reward.py").write_text(REWARD)
        cmd += ["--reward", f"{WORK / 'reward.py'}:spread"]
    for s in SETTINGS[setting]:
        cmd += ["--set", s]
    # ``python -m`` imports from the working directory first: run in the checkout measured.
    code, rss, text = run(cmd, env, WORK / f"mlxpost-{name}.log", cwd=args.mlxpost_src or str(HERE.parent))
    if code != 0:
        return {"trainer": "mlxpost", "method": method, "setting": setting, "error": text[-2000:]}
    run_dir = out / name
    summary = json.loads((run_dir / "summary.json").read_text())
    times = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    stamps = [r["time"] for r in times if r.get("kind") == "step"]
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
    return {"trainer": "mlxpost", "method": method, "setting": setting, "peak_gb": summary["peak_memory_gb"],
            "max_rss_gb": rss, "s_per_step": per_step}


def mlx_lm_run(args, model: Path, env: dict) -> dict:
    data = write_data(WORK / "data", "sft", n=2 * args.steps + 2)
    cfg = WORK / "mlx-lm-lora.yaml"
    keys = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    cfg.write_text(json.dumps({"lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": keys}}))
    lora_args = ["--model", str(model), "--train", "--data", str(data), "--iters", str(args.steps),
                 "--batch-size", "2", "--max-seq-length", "1024", "--num-layers", "-1", "--learning-rate", "1e-5",
                 "--steps-per-report", "1", "--steps-per-eval", "100000", "--val-batches", "1",
                 "--adapter-path", str(WORK / "mlx-lm-adapter"), "-c", str(cfg)]
    # mlx-lm's own entry point, then MLX's peak memory of that process (its report does not print it).
    driver = ("import sys, time, mlx.core as mx; from mlx_lm import lora; sys.argv = ['mlx_lm.lora'] + sys.argv[1:]; "
              "lora.main(); print('BENCH_PEAK_BYTES', mx.get_peak_memory())")
    code, rss, text = run([sys.executable, "-c", driver, *lora_args], env, WORK / "mlx-lm.log")
    if code != 0:
        return {"trainer": "mlx-lm", "method": "sft", "setting": "default", "error": text[-2000:]}
    peak = re.search(r"BENCH_PEAK_BYTES (\d+)", text)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    # Report rows: "iter  train_loss [arrow]  tok/s  tokens"; the first step compiles.
    row = re.compile(r"^\s*\d+\s+[0-9.]+\s*[^\d\s]?\s+([0-9,.]+)\s+\S+k?\s*$", re.M)
    rates = [float(m.group(1).replace(",", "")) for m in row.finditer(plain)]
    tokens = 2 * 1024  # per step: 2 rows cut to 1024
    return {"trainer": "mlx-lm", "method": "sft", "setting": "default",
            "peak_gb": int(peak.group(1)) / 1e9 if peak else None, "max_rss_gb": rss,
            "s_per_step": tokens / (sum(rates[1:]) / len(rates[1:])) if len(rates) > 1 else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: a Qwen2.5-0.5B-shaped random model)")
    ap.add_argument("--trainers", default="mlxpost,mlx-lm")
    ap.add_argument("--settings", default="default,grad_checkpoint", help=f"mlxpost settings: {', '.join(SETTINGS)}")
    ap.add_argument("--methods", default="sft", help=f"mlxpost methods: {', '.join(METHOD_ARGS)} (mlx-lm: sft only)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--mlxpost-src", default=None, help="run mlxpost from this checkout (PYTHONPATH)")
    ap.add_argument("--tag", default="", help="suffix of the results file (memory<tag>.json)")
    args = ap.parse_args()

    from mlxpost.backend.blas import maybe_reexec

    maybe_reexec()
    from mlxpost.model.tiny import count_parameters

    WORK.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else build_model(WORK / "qwen05-shape")
    params = count_parameters(model)
    weights_gb = params * 4 / 1e9
    env = dict(os.environ)
    if args.mlxpost_src:
        env["PYTHONPATH"] = args.mlxpost_src + os.pathsep + env.get("PYTHONPATH", "")
    rows = []
    for trainer in args.trainers.split(","):
        if trainer == "mlxpost":
            for method in args.methods.split(","):
                for setting in args.settings.split(","):
                    t = time.time()
                    rows.append(mlxpost_run(args, model, method, setting, env) | {"wall_s": round(time.time() - t, 1)})
                    print(json.dumps(rows[-1])[:300], flush=True)
        elif trainer == "mlx-lm":
            t = time.time()
            rows.append(mlx_lm_run(args, model, env) | {"wall_s": round(time.time() - t, 1)})
            print(json.dumps(rows[-1])[:300], flush=True)
        else:
            ap.error(f"unknown trainer {trainer!r}")

    print(f"\nLoRA, SFT/DPO 2 x 1024 trained tokens, GRPO 16 x 128, float32, {args.steps} steps; model {model.name}: "
          f"{params / 1e6:.0f}M parameters = {weights_gb:.2f} GB of weights"
          + (f"; mlxpost from {args.mlxpost_src}" if args.mlxpost_src else ""))
    print(f"{'trainer':<10}{'method':<7}{'setting':<18}{'MLX peak GB':>12}{'x weights':>10}{'max RSS GB':>12}"
          f"{'s/step':>9}")
    for r in rows:
        if "error" in r:
            last = r["error"].splitlines()[-1][:80]
            print(f"{r['trainer']:<10}{r['method']:<7}{r['setting']:<18}  failed: {last}")
            continue
        peak = r["peak_gb"] if r["peak_gb"] is not None else float("nan")
        print(f"{r['trainer']:<10}{r['method']:<7}{r['setting']:<18}{peak:>12.2f}{peak / weights_gb:>10.2f}"
              f"{r['max_rss_gb']:>12.2f}{(r['s_per_step'] or float('nan')):>9.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"memory{args.tag}.json"
    path.write_text(json.dumps({"model": str(model), "parameters": params, "weights_gb": weights_gb,
                                "steps": args.steps, "mlxpost_src": args.mlxpost_src, "rows": rows}, indent=2))
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
