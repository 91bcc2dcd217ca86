"""GRPO rollout throughput: mlxpost GRPO against mlx-lm-lora's GRPO, same model, same prompts.

    python benchmarks/bench_grpo.py                      # full run (about 20 minutes on 2 idle x86 cores)
    python benchmarks/bench_grpo.py --quick              # 4 steps instead of 8 at 'defaults' (about 14 minutes)
    python benchmarks/bench_grpo.py --only mlxpost       # one side only (mlx-lm-lora or mlxpost)
    python benchmarks/bench_grpo.py --settings best      # one setting only (defaults or best)
    python benchmarks/bench_grpo.py --repeat 2           # every trainer twice, interleaved; best of the two kept

Same model, same prompts, group size 8. Four trainers, each in its own process
(fresh peak-memory counter), in two settings:

* **defaults** -- 2 prompts per optimizer step (mlxpost's default
  ``grpo.prompts_per_step``; mlx-lm-lora ``--batch-size 2``), 16 completions
  per step. mlx-lm-lora runs through its own CLI code path
  (``mlx_lm_lora.train.build_parser`` + ``run``, i.e. ``mlx_lm_lora.train
  --train --train-mode grpo``) with its defaults for everything this benchmark
  does not have to fix: its sampler (``GRPOTrainingArgs`` top_p=0.95,
  top_k=20, min_p=0; the CLI exposes none of them), its reference model
  (``run`` always loads a second full copy of the model for GRPO). Its
  rollout (``generate_grpo``) prefills each prompt once, forks that cache
  for the G samples and decodes them with mlx-lm's ``BatchGenerator`` --
  but with ``completion_batch_size=batch_size``: at most ``batch_size``
  (= prompts per step) completions are decoded at a time, so 2 here, in
  eight waves of 64 tokens. (Its own default ``batch_size`` is 1: one
  completion at a time; 2 is used so that both tools do the same work per step.)
* **best** -- the fastest rollout configuration mlx-lm-lora offers, read
  from its source: ``batch_size`` is its one knob for the decode width
  (there is no separate generation batch size; ``completion_batch_size`` is
  hard-wired to it), so all 16 prompts in one step (``--batch-size 16``:
  128 completions, decoded 16 at a time), and the plain temperature sampler
  (``GRPOTrainingArgs(top_p=1.0, top_k=0)``, set through its Python API since
  the CLI has no flag; the same sampler mlxpost uses, and the cheapest).
  mlxpost gets the same workload (``--prompts-per-step 16``: 128
  completions per step, all decoded together).

Held equal everywhere: the model (bench_sft.py's ~32M-parameter llama,
random weights, float32, ChatML, in ``benchmarks/results/work/model``), the
prompts (the task lines of the first 16 bundled arithmetic tasks,
``mlxpost/assets/arith_tasks/train.jsonl``, "Compute 12 - 9 + 1.", with the
system message "You are a helpful assistant.": ~50 tokens each, rendered to
the very same token ids by both tools -- checked before running), group
size 8, at most 64 new tokens (a random-weight model rarely samples EOS, so
nearly every completion runs to the limit on both sides; the mean completion
length is reported), temperature 1.0, KL
coefficient beta = 0 (mlxpost's default; mlx-lm-lora's default is 0.1,
which only adds a reference forward to the optimizer step, not to the
rollout -- set to 0 so that the step times compare), the same number of
optimizer steps, learning rate 1e-5 constant, AdamW (weight decay 0), LoRA
rank 8, scale 2, dropout 0 on every linear layer of every block, one rollout
per step (no reuse), no validation, no checkpoints in between, the system
OpenBLAS for both (``mlxpost.backend.blas.maybe_reexec``; every worker inherits
the environment). The loss itself differs in details (mlx-lm-lora clips the
ratio at 1e-4, its default epsilon; mlxpost at 0.2; on-policy the ratio is
exactly 1 for both) -- irrelevant to the timings. Rewards: mlxpost's built-in
``accuracy`` (the ``answer`` column), mlx-lm-lora's five default R1 reward
functions; their time is measured and left out of both the rollout and the
optimizer step. (A random model earns no reward, so every advantage is 0 on
both sides; the forward, backward and update run all the same.)

Measured per trainer (a table on stdout and ``benchmarks/results/grpo.json``):

* rollout tokens/s -- completion tokens sampled / wall time of the sampling
  (mlxpost: ``rollout_tok_s`` / ``rollout_s`` of ``metrics.jsonl``, timed
  inside ``sample_groups``; mlx-lm-lora: its ``generate_grpo`` wrapped with
  ``time.perf_counter`` in the worker, tokens = the sizes of the completions
  it returns), over all steps and over the steps after the first
  ("steady": the first rollout pays for warm-up);
* the same per CPU second -- sampled tokens / process CPU time
  (``time.process_time``, all threads) of the rollouts: a second look that
  other jobs disturb differently (a descheduled thread does not count) but
  not a clean one either (threads that spin while waiting do count);
* optimizer-step time -- the mean time of a step minus its rollout and its
  reward scoring (the forward + backward + update; mlxpost: ``step_s -
  rollout_s - score_s``; mlx-lm-lora: ``1 / iterations_per_second`` of its
  per-step report minus the timed ``generate_grpo`` and ``_rollout_rewards``),
  first step excluded where there are at least two;
* peak memory -- ``mx.get_peak_memory()`` of the whole process (model(s),
  adapters, optimizer, rollout caches, activations);
* total wall time of the worker process (loading included).

mlxpost runs as ``mlxpost grpo`` inside a worker process of this script (the
exact command line is recorded in the results), with ``mlxpost.rl.source.sample_groups``
wrapped only to read its CPU time; mlx-lm-lora in a worker inside its own
virtual environment ``benchmarks/results/venv-mlx-lm-lora`` (created by
``bench_dpo.ensure_mlx_lm_lora_venv``: ``pip install mlx-lm-lora mlx[cpu]``).
Its GRPO needs no patch on Linux: unlike its DPO/ORPO trainers it does not
index the Metal-only ``device_info()["max_recommended_working_set_size"]``
(mlx-lm's ``BatchGenerator`` reads it with ``.get`` and skips the wired
limit when it is missing), so the worker changes nothing in it; it only wraps
``generate_grpo``, ``_rollout_rewards`` and ``train_grpo`` with timers and,
for 'best', sets the sampler fields of ``GRPOTrainingArgs``.

Targets (issue 4): rollout throughput >= 4x mlx-lm-lora's at its defaults,
and >= 1.5x at its best setting (same workload on both sides). The machine may
be shared with other jobs: timings are noisy, the results record the load
average before and after each run, and ``--repeat N`` keeps each trainer's
fastest of N interleaved runs (other jobs only ever slow a run down).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = RESULTS / "grpo-work"

if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_dpo import build_model, ensure_mlx_lm_lora_venv, venv_python  # noqa: E402

LR = 1e-5
RANK = 8
SCALE = 2.0
GROUP = 8
MAX_NEW = 64
TEMPERATURE = 1.0
BETA = 0.0
N_PROMPTS = 16
MAX_SEQ_LEN = 1024
# mlx-lm-lora's GRPODataset always renders a system message (its own long R1-style one when a row has
# none), so every row carries this one, and mlxpost gets the same message list: the same prompt tokens.
# (A sentence of the tiny model's training corpus: a few tokens, not ~180 bytes-as-tokens.)
SYSTEM = "You are a helpful assistant."

# name -> (prompts per step, mlx-lm-lora sampler override or None for its defaults)
SETTINGS = {
    "defaults": {"prompts_per_step": 2, "lora_sampler": None},
    "best": {"prompts_per_step": 16, "lora_sampler": {"top_p": 1.0, "top_k": 0, "min_p": 0.0}},
}


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def prepare() -> dict:
    model_dir = RESULTS / "work" / "model"  # shared with bench_sft.py / bench_dpo.py (identical files)
    build_model(model_dir)
    src = Path(__file__).resolve().parent.parent / "mlxpost" / "assets" / "arith_tasks" / "train.jsonl"
    rows = [json.loads(x) for x in src.read_text().splitlines()[:N_PROMPTS]]
    # The task line only ("Compute 12 - 9 + 1."), without the bundled formatting instructions: the
    # tiny model's byte-level vocabulary spends ~100 tokens on them, which only lengthens the
    # optimizer step (both tools prefill a prompt once per group).
    rows = [{**r, "prompt": r["prompt"].split("\n")[0]} for r in rows]
    lora_dir, ours_dir = WORK / "data-mlx-lm-lora", WORK / "data-mlxpost"
    for d in (lora_dir, ours_dir):
        d.mkdir(parents=True, exist_ok=True)
    # mlx-lm-lora's GRPODataset: "prompt", "answer", optional "system" (a string each).
    (lora_dir / "train.jsonl").write_text("".join(
        json.dumps({"prompt": r["prompt"], "answer": r["answer"], "system": SYSTEM}) + "\n" for r in rows))
    # mlxpost: the same conversation as a message list (system + user); "answer" for its accuracy reward.
    (ours_dir / "train.jsonl").write_text("".join(
        json.dumps({"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["prompt"]}],
                    "answer": r["answer"]}) + "\n" for r in rows))
    lens = check_same_prompts(model_dir, rows)
    return {"model": str(model_dir), "lora_data": str(lora_dir), "mlxpost_data": str(ours_dir),
            "prompt_tokens_mean": sum(lens) / len(lens), "prompt_tokens_min": min(lens),
            "prompt_tokens_max": max(lens)}


def check_same_prompts(model_dir: Path, rows: list[dict]) -> list[int]:
    """Token ids of every prompt as mlxpost renders it == as mlx-lm-lora's GRPODataset renders it."""
    from mlx_lm.utils import load_tokenizer

    from mlxpost.data.render import Renderer

    wrapper = load_tokenizer(model_dir)  # what both tools load
    tok = wrapper._tokenizer
    renderer = Renderer(wrapper)
    lens = []
    for r in rows:
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["prompt"]}]
        theirs = list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
        ours, _ = renderer.prompt(msgs)
        if list(ours) != theirs:
            raise SystemExit(f"prompt tokens differ between the tools: {ours[:20]}... vs {theirs[:20]}...")
        lens.append(len(ours))
    return lens


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


# ---------------------------------------------------------------------------
# mlx-lm-lora: a worker inside its own virtual environment
# ---------------------------------------------------------------------------


def worker_mlx_lm_lora(args) -> dict:
    """Runs in the mlx-lm-lora venv: its CLI code path, generation and scoring timed by wrappers."""
    import functools

    import mlx.core as mx

    # No device_info shim here (unlike bench_dpo.py): its GRPO path never indexes the Metal-only
    # "max_recommended_working_set_size" key (mlx-lm's BatchGenerator uses .get() and skips the wired
    # limit when it is missing), and adding the key would change that path (set_wired_limit calls).
    import mlx_lm_lora.train as T
    import mlx_lm_lora.trainer.grpo_trainer as G

    rollouts, scores = [], []
    orig_generate, orig_rewards = G.generate_grpo, G._rollout_rewards

    def timed_generate(*a, **kw):
        t0, c0 = time.perf_counter(), time.process_time()
        completions, texts, indices = orig_generate(*a, **kw)
        mx.eval(completions)  # already concrete (built from Python lists); no-op
        rollouts.append({"s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                         "tokens": int(sum(c.size for c in completions)),
                         "n": len(completions),
                         "hit_limit": sum(int(c.size) >= kw["max_tokens"] for c in completions),
                         "sampler": {k: kw[k] for k in ("temperature", "top_p", "top_k", "min_p")}})
        return completions, texts, indices

    def timed_rewards(*a, **kw):
        t0 = time.perf_counter()
        out = orig_rewards(*a, **kw)
        mx.eval(out)
        scores.append(time.perf_counter() - t0)
        return out

    # train_grpo looks both names up in its module's globals at every step.
    G.generate_grpo, G._rollout_rewards = timed_generate, timed_rewards
    if args.sampler:
        # What a Python-API user sets on the training arguments (the CLI has no flag for these).
        T.GRPOTrainingArgs = functools.partial(G.GRPOTrainingArgs, **json.loads(args.sampler))

    big = 10**9
    cli = ["--model", args.model, "--train", "--train-mode", "grpo", "--train-type", "lora",
           "--data", args.data, "--batch-size", str(args.batch_size), "--iters", str(args.steps),
           "--learning-rate", str(args.lr), "--optimizer", "adamw", "--num-layers", "-1",
           "--max-seq-length", str(MAX_SEQ_LEN), "--steps-per-report", "1", "--steps-per-eval", str(big),
           "--save-every", str(big), "--adapter-path", str(Path(args.tmp) / "adapters"),
           "--group-size", str(GROUP), "--max-completion-length", str(MAX_NEW),
           "--temperature", str(TEMPERATURE), "--beta", str(args.beta), "--seed", "0"]
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
            reports.append(dict(info))

    span = {}
    orig_train = T.train_grpo

    def timed_train(*a, **kw):
        span["t0"] = time.perf_counter()
        out = orig_train(*a, **kw)
        span["t1"] = time.perf_counter()
        return out

    T.train_grpo = timed_train
    t_run = time.perf_counter()
    T.run(ns, training_callback=CB())
    run_s = time.perf_counter() - t_run

    if not (len(reports) == len(rollouts) == len(scores) == args.steps):
        raise RuntimeError(f"expected {args.steps} reports/rollouts, got {len(reports)}/{len(rollouts)}/{len(scores)}")
    steps = []
    for r, ro, sc in zip(reports, rollouts, scores):
        step_s = 1.0 / r["iterations_per_second"]  # steps_per_report=1: this step's wall time
        steps.append({"step_s": step_s, "rollout_s": ro["s"], "rollout_cpu_s": ro["cpu_s"], "score_s": sc,
                      "tokens": ro["tokens"],
                      "completions": ro["n"], "optimizer_s": step_s - ro["s"] - sc,
                      "completion_len": ro["tokens"] / ro["n"], "truncated": ro["hit_limit"] / ro["n"],
                      "loss": r["train_loss"]})
    return {"steps": steps, "peak_memory_gb": mx.get_peak_memory() / 1e9, "train_fn_s": span["t1"] - span["t0"],
            "wall_s": run_s, "sampler": rollouts[0]["sampler"]}


def run_lora(setting: str, info: dict, steps: int, tag: str = "") -> dict:
    cfg = SETTINGS[setting]
    tmp = WORK / f"mlx-lm-lora-{setting}{tag}"
    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [str(venv_python()), __file__, "--worker", "mlx-lm-lora", "--model", info["model"],
           "--data", info["lora_data"], "--batch-size", str(cfg["prompts_per_step"]), "--steps", str(steps),
           "--lr", str(LR), "--beta", str(BETA), "--tmp", str(tmp)]
    if cfg["lora_sampler"]:
        cmd += ["--sampler", json.dumps(cfg["lora_sampler"])]
    env = dict(os.environ, PYTHONPATH="")  # the venv's packages only (not the dev tree's)
    load0, t0 = loadavg(), time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    (tmp / "log.txt").write_text(f"$ {' '.join(cmd)}\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise RuntimeError(f"mlx-lm-lora ({setting}) failed (exit {proc.returncode}); log: {tmp / 'log.txt'}")
    raw = json.loads(proc.stdout.strip().splitlines()[-1])
    return summarize(f"mlx-lm-lora {setting}", setting, raw["steps"], raw["peak_memory_gb"], wall,
                     extra={"train_fn_s": raw["train_fn_s"], "sampler": raw["sampler"],
                            "decode_width": cfg["prompts_per_step"], "load_before": load0,
                            "load_after": loadavg(), "log": str(tmp / "log.txt")})


# ---------------------------------------------------------------------------
# mlxpost: its CLI
# ---------------------------------------------------------------------------


def worker_mlxpost(args) -> list[dict]:
    """Runs `mlxpost grpo` in this process, its ``sample_groups`` wrapped to record the CPU time of each rollout.

    (The rollout's wall time and tokens come from the run's own ``metrics.jsonl``;
    the wrapper adds the process CPU time, which other jobs on a shared machine
    disturb less than the wall time.)
    """
    import mlxpost.rl.source as RL

    orig, recs = RL.sample_groups, []

    def timed(*a, **kw):
        t0, c0 = time.perf_counter(), time.process_time()
        ro = orig(*a, **kw)
        recs.append({"s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "tokens": ro.sampled_tokens})
        return ro

    RL.sample_groups = timed  # RolloutSource.rollout looks the name up in mlxpost.rl.source
    from mlxpost.cli import main

    sys.argv = ["mlxpost", "grpo", *json.loads(args.cli)]
    try:
        main()
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
    return recs


def run_mlxpost(setting: str, info: dict, steps: int, tag: str = "") -> dict:
    P = SETTINGS[setting]["prompts_per_step"]
    out_dir = WORK / "runs"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"grpo-{setting}{tag}"
    cli = ["--model", info["model"], "--data", info["mlxpost_data"], "--out", str(out_dir), "--name", name,
           "--overwrite", "--steps", str(steps), "--lr", str(LR), "--rank", str(RANK),
           "--max-seq-len", str(MAX_SEQ_LEN), "--seed", "0", "--plain",
           "--group-size", str(GROUP), "--prompts-per-step", str(P), "--max-new-tokens", str(MAX_NEW),
           "--temperature", str(TEMPERATURE), "--top-p", "1.0", "--beta", str(BETA), "--reward", "accuracy",
           "--set", f"lora.scale={SCALE}", "--set", "lora.dropout=0", "--set", "lora.targets=all-linear",
           "--set", "lora.num_layers=-1", "--set", "model.dtype=float32",
           "--set", "train.schedule=constant", "--set", "train.warmup_steps=0", "--set", "train.warmup_ratio=0",
           "--set", "train.max_grad_norm=null", "--set", "train.optimizer=adamw", "--set", "train.weight_decay=0",
           "--set", "train.bias_correction=true", "--set", "train.report_every=1",
           "--set", "train.eval_every=0", "--set", "train.eval_at_start=false", "--set", "train.save_every=0",
           "--set", "data.valid_fraction=0", "--set", "grpo.eval_prompts=0"]
    # The equivalent command line: mlxpost grpo <cli> (run in a worker process so that the rollouts'
    # CPU time can be recorded; the driver has already set up the BLAS environment).
    cmd = [sys.executable, __file__, "--worker", "mlxpost", "--cli", json.dumps(cli)]
    load0, t0 = loadavg(), time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out_dir / f"{name}.log").write_text("$ mlxpost grpo " + " ".join(cli) + "\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.stderr.write("$ mlxpost grpo " + " ".join(cli) + "\n" + proc.stdout[-3000:] + proc.stderr[-5000:])
        raise RuntimeError(f"mlxpost grpo ({setting}) failed (exit {proc.returncode})")
    cpu = json.loads(proc.stdout.strip().splitlines()[-1])
    run_dir = out_dir / name
    summary = json.loads((run_dir / "summary.json").read_text())
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r.get("kind") == "train"]
    if [r["step"] for r in train] != list(range(1, steps + 1)) or len(cpu) != steps:
        raise RuntimeError(f"expected one train report and one rollout per step, got steps "
                           f"{[r['step'] for r in train]} and {len(cpu)} rollouts")
    n = GROUP * P
    out = []
    for r, c in zip(train, cpu):
        tokens = round(r["completion_len"] * n)  # sampled tokens: mean length x completions (exact)
        if tokens != c["tokens"]:
            raise RuntimeError(f"step {r['step']}: metrics.jsonl says {tokens} sampled tokens, "
                               f"the wrapper {c['tokens']}")
        out.append({"step_s": r["step_s"], "rollout_s": r["rollout_s"], "rollout_cpu_s": c["cpu_s"],
                    "score_s": r["score_s"], "tokens": tokens, "completions": n,
                    "optimizer_s": r["step_s"] - r["rollout_s"] - r["score_s"],
                    "completion_len": r["completion_len"], "truncated": r["truncated"], "loss": r["loss"]})
    # The training steps' model FLOPs (mlxpost.core.flops) over the steps' time less rollout and scoring:
    # rollout generation FLOPs are not in summary.json's count, so they are not put against its time.
    opt_s = sum(o["optimizer_s"] for o in out)
    train_fps = summary["model_flops"] / opt_s if summary.get("model_flops") and opt_s > 0 else None
    peak = summary.get("peak_gflops")
    # Rollout generation FLOPs, apart (forward only; exact prompt and completion lengths: see
    # RolloutSource._count), over the rollouts' time as this driver measured it.
    roll_flops = summary.get("rollout_model_flops")
    roll_s = sum(o["rollout_s"] for o in out)
    return summarize(f"mlxpost {setting}", setting, out, summary["peak_memory_gb"], wall,
                     extra={"train_seconds": summary.get("train_seconds"), "decode_width": n,
                            "train_model_flops": summary.get("model_flops"), "train_model_flops_per_s": train_fps,
                            "train_mfu": train_fps / (peak * 1e9) if train_fps and peak else None,
                            "peak_gflops": peak, "rollout_model_flops": roll_flops,
                            "rollout_model_flops_per_s": roll_flops / roll_s if roll_flops and roll_s > 0 else None,
                            "load_before": load0, "load_after": loadavg(), "run_dir": str(run_dir),
                            "command": "mlxpost grpo " + " ".join(cli)})


# ---------------------------------------------------------------------------
# Summary and driver
# ---------------------------------------------------------------------------


def summarize(name: str, setting: str, steps: list[dict], peak_gb: float, wall: float, extra: dict) -> dict:
    def rate(xs):
        s = sum(x["rollout_s"] for x in xs)
        return sum(x["tokens"] for x in xs) / s if s > 0 else None

    def cpu_rate(xs):
        s = sum(x["rollout_cpu_s"] for x in xs)
        return sum(x["tokens"] for x in xs) / s if s > 0 else None

    tail = steps[1:] if len(steps) > 1 else steps
    return {"trainer": name, "setting": setting, "steps": len(steps),
            "completions_per_step": steps[0]["completions"],
            "sampled_tokens": sum(x["tokens"] for x in steps),
            "completion_len_mean": sum(x["completion_len"] for x in steps) / len(steps),
            "truncated_mean": sum(x["truncated"] for x in steps) / len(steps),
            "rollout_seconds": sum(x["rollout_s"] for x in steps),
            "rollout_tok_s": rate(steps), "steady_rollout_tok_s": rate(tail),
            "rollout_tok_per_cpu_s": cpu_rate(steps), "rollout_cpu_seconds": sum(x["rollout_cpu_s"] for x in steps),
            "optimizer_step_s": sum(x["optimizer_s"] for x in tail) / len(tail),
            "first_optimizer_step_s": steps[0]["optimizer_s"],
            "score_s_mean": sum(x["score_s"] for x in steps) / len(steps),
            "step_s_mean": sum(x["step_s"] for x in steps) / len(steps),
            "peak_memory_gb": peak_gb, "wall_s": wall, "per_step": steps, **extra}


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else format("-", ">" + spec.split(".")[0].lstrip(">"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["mlx-lm-lora", "mlxpost"])
    ap.add_argument("--cli", help="worker mlxpost: JSON list of `mlxpost grpo` arguments")
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--tmp")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--beta", type=float, default=BETA)
    ap.add_argument("--sampler", help="worker: JSON of GRPOTrainingArgs sampler fields")
    ap.add_argument("--steps", type=int, help="optimizer steps per run (default: 8 at 'defaults', 2 at 'best'; "
                                              "--quick: 4 and 2)")
    ap.add_argument("--quick", action="store_true", help="fewer steps: a smoke run")
    ap.add_argument("--only", choices=["mlx-lm-lora", "mlxpost"], help="run one side only")
    ap.add_argument("--settings", default="defaults,best", help="comma-separated: defaults, best")
    ap.add_argument("--out", default=str(RESULTS / "grpo.json"), help="results file (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every trainer this many times, interleaved, and keep each trainer's run with the "
                         "highest rollout throughput (other jobs on the machine only ever slow a run down)")
    args = ap.parse_args()

    if args.worker == "mlx-lm-lora":
        print(json.dumps(worker_mlx_lm_lora(args)))
        return
    if args.worker == "mlxpost":
        recs = worker_mlxpost(args)
        sys.stdout.flush()
        print("\n" + json.dumps(recs), flush=True)
        return

    from mlxpost.backend.blas import loaded_blas, maybe_reexec

    maybe_reexec()
    WORK.mkdir(parents=True, exist_ok=True)
    info = prepare()
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    for s in settings:
        if s not in SETTINGS:
            raise SystemExit(f"--settings: unknown {s!r} (defaults, best)")

    def steps_for(setting):
        if args.steps:
            return args.steps
        # 'defaults': one pass over the 16 prompts (8 steps of 2); 'best': 2 steps of all 16.
        return (4 if args.quick else 8) if setting == "defaults" else 2

    from importlib.metadata import version

    from mlxpost.model.tiny import count_parameters

    setup = {"model": info["model"], "params": count_parameters(Path(info["model"])), "dtype": "float32",
             "prompts": N_PROMPTS, "prompt_tokens_mean": info["prompt_tokens_mean"],
             "prompt_tokens_range": [info["prompt_tokens_min"], info["prompt_tokens_max"]],
             "group_size": GROUP, "max_new_tokens": MAX_NEW, "temperature": TEMPERATURE, "beta": BETA, "lr": LR,
             "lora": {"rank": RANK, "scale": SCALE, "dropout": 0.0, "targets": "all-linear"},
             "settings": {s: {**SETTINGS[s], "steps": steps_for(s)} for s in settings},
             "blas": loaded_blas().get("name"), "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
             "jit_flags": os.environ.get("MLXPOST_JIT_FLAGS"),
             "cpu_count": os.cpu_count(),
             "versions": {"mlxpost": version("mlxpost"), "mlx": version("mlx"), "mlx-lm": version("mlx-lm")}}

    results, skipped, all_runs = [], {}, []
    if args.only != "mlxpost":
        setup["mlx_lm_lora_env"] = ensure_mlx_lm_lora_venv()
    setup["repeat"] = args.repeat
    jobs = []
    for s in settings:
        if args.only != "mlx-lm-lora":
            jobs.append(("mlxpost", s, run_mlxpost))
        if args.only != "mlxpost":
            jobs.append(("mlx-lm-lora", s, run_lora))
    for rep in range(args.repeat):
        tag = f"-r{rep + 1}" if args.repeat > 1 else ""
        for tool, s, fn in jobs:
            label = f"{tool} {s}"
            if label in skipped:
                continue
            print(f"running {tool} grpo ({s}, {steps_for(s)} steps)" +
                  (f", repetition {rep + 1}/{args.repeat}" if args.repeat > 1 else "") + " ...", flush=True)
            try:
                r = fn(s, info, steps_for(s), tag)
                r["repetition"] = rep + 1
                all_runs.append(r)
            except RuntimeError as e:
                skipped[label] = str(e)
    for tool, s, _ in jobs:
        mine = [r for r in all_runs if r["trainer"] == f"{tool} {s}"]
        if mine:
            best = max(mine, key=lambda r: r["rollout_tok_s"])
            if len(mine) > 1:
                best = dict(best, repetitions_rollout_tok_s=[r["rollout_tok_s"] for r in mine],
                            repetitions_optimizer_step_s=[r["optimizer_step_s"] for r in mine])
            results.append(best)

    by = {r["trainer"]: r for r in results}
    ratios, targets = {}, {}
    need = {"defaults": 4.0, "best": 1.5}
    for s in settings:
        ours, theirs = by.get(f"mlxpost {s}"), by.get(f"mlx-lm-lora {s}")
        if not (ours and theirs):
            continue
        ratios[f"{s}_rollout_speedup"] = ours["rollout_tok_s"] / theirs["rollout_tok_s"]
        ratios[f"{s}_steady_rollout_speedup"] = ours["steady_rollout_tok_s"] / theirs["steady_rollout_tok_s"]
        ratios[f"{s}_rollout_per_cpu_s_speedup"] = ours["rollout_tok_per_cpu_s"] / theirs["rollout_tok_per_cpu_s"]
        ratios[f"{s}_optimizer_step_time_ratio"] = ours["optimizer_step_s"] / theirs["optimizer_step_s"]
        ratios[f"{s}_peak_memory_ratio"] = ours["peak_memory_gb"] / theirs["peak_memory_gb"]
        targets[f"rollout_at_least_{need[s]:g}x_mlx_lm_lora_at_its_{s}"] = {
            "ratio": ratios[f"{s}_rollout_speedup"], "steady_ratio": ratios[f"{s}_steady_rollout_speedup"],
            "per_cpu_s_ratio": ratios[f"{s}_rollout_per_cpu_s_speedup"],
            "met": ratios[f"{s}_rollout_speedup"] >= need[s]}
    # mlxpost at its own defaults against mlx-lm-lora at its best (different workloads: informational).
    if by.get("mlxpost defaults") and by.get("mlx-lm-lora best"):
        ratios["mlxpost_defaults_vs_mlx_lm_lora_best_rollout"] = (by["mlxpost defaults"]["rollout_tok_s"]
                                                                  / by["mlx-lm-lora best"]["rollout_tok_s"])

    print(f"\n{N_PROMPTS} arithmetic prompts (~{info['prompt_tokens_mean']:.0f} tokens incl. system message), "
          f"group size {GROUP}, <= {MAX_NEW} new tokens, temperature {TEMPERATURE}, beta {BETA}, "
          f"model {setup['params'] / 1e6:.1f}M params float32, LoRA r{RANK} all-linear, BLAS {setup['blas']}, "
          f"{os.cpu_count()} CPUs (shared machine: timings are noisy)")
    hdr = (f"{'trainer':<22}{'P x G':>6}{'width':>6}{'steps':>6}{'len':>6}{'sampled':>8}{'roll s':>8}"
           f"{'tok/s':>7}{'steady':>7}{'/cpu-s':>7}{'opt s':>7}{'peak GB':>8}{'wall s':>7}{'load':>6}"
           f"{'GFLOP/s':>8}{'MFU %':>6}{'roll GF/s':>10}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        P = SETTINGS[r["setting"]]["prompts_per_step"]
        print(f"{r['trainer']:<22}{f'{P}x{GROUP}':>6}{r['decode_width']:>6}{r['steps']:>6}"
              f"{r['completion_len_mean']:>6.1f}{r['sampled_tokens']:>8}{r['rollout_seconds']:>8.1f}"
              f"{_fmt(r['rollout_tok_s'], '>7.0f')}{_fmt(r['steady_rollout_tok_s'], '>7.0f')}"
              f"{_fmt(r['rollout_tok_per_cpu_s'], '>7.0f')}"
              f"{r['optimizer_step_s']:>7.2f}{r['peak_memory_gb']:>8.3f}{r['wall_s']:>7.0f}"
              f"{_fmt(r['load_before'], '>6.1f')}"
              f"{_fmt(r['train_model_flops_per_s'] / 1e9 if r.get('train_model_flops_per_s') else None, '>8.1f')}"
              f"{_fmt(100 * r['train_mfu'] if r.get('train_mfu') is not None else None, '>6.1f')}"
              f"{_fmt(r['rollout_model_flops_per_s'] / 1e9 if r.get('rollout_model_flops_per_s') else None, '>10.1f')}")
    print("(width: completions decoded at a time; len: mean completion tokens; roll s: rollout wall time, all "
          "steps; tok/s: sampled tokens / rollout s; steady: the same after the first step; /cpu-s: sampled "
          "tokens / process CPU seconds of the rollouts; opt s: mean step time minus rollout and scoring, first "
          "step excluded; peak GB: mx.get_peak_memory(); wall s: whole process; load: 1-min load average "
          "before the run, on " + str(os.cpu_count()) + " CPUs; GFLOP/s, MFU %: the training steps' model FLOPs "
          "over opt s, all steps; roll GF/s: rollout generation's model FLOPs over roll s)")
    for k, v in skipped.items():
        print(f"{k:<24}  not run: {v}")
    if ratios:
        print()
        for k, v in ratios.items():
            print(f"{k:<52}{v:>8.2f}")
    for k, v in targets.items():
        print(f"target {k}: {'met' if v['met'] else 'NOT met'} ({v['ratio']:.2f}x; steady {v['steady_ratio']:.2f}x; "
              f"per CPU second {v['per_cpu_s_ratio']:.2f}x)")
    out = Path(args.out)
    out.write_text(json.dumps({"setup": setup, "runs": results, "skipped": skipped, "ratios": ratios,
                               "targets": targets, "all_runs": all_runs if args.repeat > 1 else None}, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
