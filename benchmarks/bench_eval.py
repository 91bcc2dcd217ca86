"""Evaluation throughput: mlxpost's lm-eval model against ``mlx_lm.evaluate`` (mlx-lm's own lm-eval wrapper).

    python benchmarks/bench_eval.py --model default --limit 40 --batch-size 8   # SmolLM2-135M-Instruct
    python benchmarks/bench_eval.py --limit 100                                 # the tiny benchmark llama
    python benchmarks/bench_eval.py --tasks short --rounds 2                    # one task, two rounds

Two local multiple-choice tasks, defined by lm-eval YAML files over local
JSONL files (nothing downloaded), built from mlxpost's bundled data:

* ``short``: arithmetic questions ("Compute 14 + 13 - 19 + 5.") with four
  numeric answers of one to three tokens (the shape of MMLU or ARC:
  a long question, short choices);
* ``long``: the bundled preference prompts with their chosen and rejected
  replies as two choices of 20-80 tokens each (the shape of HellaSwag:
  long continuations).

Both tools run the same task through ``lm_eval.simple_evaluate`` (no chat
template, zero-shot, the first ``--limit`` questions), each in its own
process, on the same model files in float32 on MLX's CPU backend, with the
same BLAS and JIT environment (the driver re-executes itself with the system
OpenBLAS preloaded, :func:`mlxpost.backend.blas.maybe_reexec`, and the
workers inherit it), at the same ``--batch-size``: mlx-lm's ``MLXLM(path,
batch_size=B, use_chat_template=False)`` (its weights cast to float32 as
mlxpost loads them) and mlxpost's :func:`mlxpost.eval.lm_eval_model.make_lm`
with a :class:`mlxpost.eval.loglik.Scorer` of ``batch_size=B``. Each worker
first runs the task on two questions (kernels compiled, caches warm), then
times the measured run. mlx-lm's ``loglikelihood`` scores one question at a
time: a KV-cached pass over the question, then each choice on a copy of the
cache (its batch size does not apply to log-likelihoods).

Reported per task and tool (a table on stdout, ``benchmarks/results/bench_eval.json``):
``acc`` and ``acc_norm`` (lm-eval's); the seconds spent in the model's
``loglikelihood`` (what the two tools do differently) and the requests per
second over them (lm-eval's loglikelihood requests: one per choice); the
seconds of the whole ``simple_evaluate`` call (lm-eval's own work included:
reading the data, building requests, metrics, the same for both); the peak
MLX memory (``mx.get_peak_memory``) and the process's peak resident memory.
The speedup is mlx-lm's model seconds over mlxpost's (end to end beside
it); the accuracy difference is checked against 1e-3.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
WORK = RESULTS / "eval-work"

YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def short_rows() -> list[dict]:
    """Arithmetic questions with four numeric choices (the right one and three near misses)."""
    rng = random.Random(0)
    rows = []
    for t in read_jsonl(ROOT / "mlxpost/assets/arith_tasks/valid.jsonl") + read_jsonl(
            ROOT / "mlxpost/assets/arith_tasks/train.jsonl"):
        right = int(t["answer"])
        wrong = rng.sample([right + d for d in (-10, -3, -2, -1, 1, 2, 3, 10) if right + d >= 0], 3)
        choices = [str(x) for x in [right] + wrong]
        rng.shuffle(choices)
        rows.append({"question": t["prompt"].split("\n")[0], "choices": choices, "answer": choices.index(str(right))})
    return rows


def long_rows() -> list[dict]:
    """The bundled preference prompts, the chosen and the rejected reply as two choices (in random order)."""
    rng = random.Random(1)
    rows = []
    for p in read_jsonl(ROOT / "mlxpost/assets/pref_json_answers/valid.jsonl") + read_jsonl(
            ROOT / "mlxpost/assets/pref_json_answers/train.jsonl"):
        prompt = p["prompt"] if isinstance(p["prompt"], str) else p["prompt"][-1]["content"]
        side = lambda x: x if isinstance(x, str) else x[-1]["content"]  # noqa: E731
        choices = [side(p["chosen"]), side(p["rejected"])]
        order = rng.random() < 0.5
        rows.append({"question": prompt, "choices": choices[::-1] if order else choices, "answer": int(order)})
    return rows


TASKS = {"short": short_rows, "long": long_rows}


def prepare_tasks(names: list[str]) -> dict[str, Path]:
    """Each task's YAML (and JSONL) in benchmarks/results/eval-work/<task>/."""
    out = {}
    for name in names:
        d = WORK / name
        d.mkdir(parents=True, exist_ok=True)
        data = d / "test.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in TASKS[name]()))
        (d / f"bench_{name}.yaml").write_text(YAML.format(name=f"bench_{name}", data=data))
        out[name] = d
    return out


def model_path(spec: str | None) -> str:
    if spec in (None, "tiny"):
        from mlxpost.model.tiny import build_tiny_model

        p = RESULTS / "work" / "model"
        if not (p / "config.json").exists():  # the ~32M llama of bench_sft.py
            build_tiny_model(p, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1408,
                             vocab_size=16384)
        return str(p)
    from mlxpost.model.load import resolve_model_path

    return str(resolve_model_path(spec))


# ---------------------------------------------------------------------------
# Workers (one process per tool and task)
# ---------------------------------------------------------------------------


def make_tool(tool: str, path: str, batch_size: int):
    import mlx.core as mx

    if tool == "mlx-lm":
        from mlx_lm.evaluate import MLXLM

        lm = MLXLM(path, batch_size=batch_size, use_chat_template=False)
        lm._model.set_dtype(mx.float32)  # as mlxpost loads it on the CPU
        mx.eval(lm._model.parameters())
        return lm
    from mlxpost.core.forward import set_attention_chunk
    from mlxpost.core.probes import resolve_attention_chunk
    from mlxpost.eval.lm_eval_model import make_lm
    from mlxpost.eval.loglik import Scorer
    from mlxpost.model.load import load_model

    loaded = load_model(path)
    model = loaded.model
    model.freeze()
    set_attention_chunk(model, resolve_attention_chunk(-1, model))  # as mlxpost eval does
    scorer = Scorer(model, batch_size=batch_size, pad_id=loaded.tokenizer.pad_token_id or 0)
    return make_lm(model, loaded.tokenizer, scorer=scorer, batch_size=batch_size,
                   max_length=int(loaded.config.get("max_position_embeddings") or 2048))


def worker(args) -> dict:
    import logging

    import lm_eval
    import mlx.core as mx
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = make_tool(args.worker, args.model, args.batch_size)
    tm = TaskManager(include_path=args.task_dir)
    name = f"bench_{args.task}"

    def run(limit):
        return lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=tm, limit=limit, log_samples=False,
                                       bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                       fewshot_random_seed=0)

    inner = {"seconds": 0.0}
    score = lm.loglikelihood

    def timed(requests, *a, **k):  # the model's own time, without lm-eval's (task loading, metrics)
        t = time.perf_counter()
        try:
            return score(requests, *a, **k)
        finally:
            inner["seconds"] += time.perf_counter() - t

    lm.loglikelihood = timed
    run(2)  # warm-up: kernels compiled, caches filled
    mx.reset_peak_memory()
    inner["seconds"] = 0.0
    t0 = time.perf_counter()
    out = run(args.limit)
    seconds = time.perf_counter() - t0
    res = out["results"][name]
    rows = read_jsonl(Path(args.task_dir) / "test.jsonl")[: args.limit]
    return {"tool": args.worker, "task": args.task, "acc": res["acc,none"], "acc_norm": res["acc_norm,none"],
            "questions": len(rows), "requests": sum(len(r["choices"]) for r in rows), "seconds": seconds,
            "model_seconds": inner["seconds"],
            "peak_mlx_gb": mx.get_peak_memory() / 1e9,
            "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def run_worker(tool: str, task: str, task_dir: Path, model: str, limit: int, batch_size: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, "--task", task, "--task-dir",
           str(task_dir), "--model", model, "--limit", str(limit), "--batch-size", str(batch_size)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{tool} on {task} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["mlx-lm", "mlxpost"])
    ap.add_argument("--task", help=argparse.SUPPRESS)
    ap.add_argument("--task-dir", help=argparse.SUPPRESS)
    ap.add_argument("--model", help="default: the ~32M tiny benchmark llama; 'default': SmolLM2-135M-Instruct; "
                                    "or a model directory")
    ap.add_argument("--tasks", default="short,long", help="short, long or both (default)")
    ap.add_argument("--limit", type=int, default=40, help="questions per task (default 40)")
    ap.add_argument("--batch-size", type=int, default=8, help="the same for both tools (default 8)")
    ap.add_argument("--rounds", type=int, default=1, help="runs of each tool, back to back with its peer")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    from mlxpost.backend.blas import loaded_blas, maybe_reexec

    maybe_reexec()
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names or set(names) - set(TASKS):
        raise SystemExit(f"--tasks: choose among {', '.join(TASKS)}")
    dirs = prepare_tasks(names)
    path = model_path(args.model)
    from importlib.metadata import version

    setup = {"model": path, "limit": args.limit, "batch_size": args.batch_size, "rounds": args.rounds,
             "blas": loaded_blas().get("name"), "versions": {p: version(p) for p in ("mlx", "mlx-lm", "lm_eval",
                                                                                   "mlxpost")}}
    results = []
    for r in range(args.rounds):
        for task in names:
            for tool in ("mlx-lm", "mlxpost"):
                print(f"{tool} on {task} (round {r + 1}) ...", flush=True)
                results.append({**run_worker(tool, task, dirs[task], path, args.limit, args.batch_size), "round": r})
    print(f"\nmodel {path}, {args.limit} questions per task, batch size {args.batch_size}, BLAS {setup['blas']}")
    print(f"{'task':6} {'tool':8} {'acc':>7} {'acc_norm':>8} {'model req/s':>11} {'model s':>8} {'total s':>8} "
          f"{'peak MLX GB':>11} {'RSS GB':>7}")
    for x in results:
        print(f"{x['task']:6} {x['tool']:8} {x['acc']:7.4f} {x['acc_norm']:8.4f} "
              f"{x['requests'] / x['model_seconds']:11.2f} {x['model_seconds']:8.1f} {x['seconds']:8.1f} "
              f"{x['peak_mlx_gb']:11.2f} {x['max_rss_gb']:7.2f}")
    summary = []
    for r in range(args.rounds):
        for task in names:
            a, b = (next(x for x in results if x["round"] == r and x["task"] == task and x["tool"] == t)
                    for t in ("mlx-lm", "mlxpost"))
            s = {"task": task, "round": r, "speedup": a["model_seconds"] / b["model_seconds"],
                 "speedup_total": a["seconds"] / b["seconds"],
                 "acc_diff": abs(a["acc"] - b["acc"]), "acc_norm_diff": abs(a["acc_norm"] - b["acc_norm"])}
            summary.append(s)
            print(f"{task}: mlxpost {s['speedup']:.2f}x mlx_lm.evaluate's log-likelihood throughput "
                  f"({s['speedup_total']:.2f}x end to end, lm-eval's own work included); |acc diff| "
                  f"{s['acc_diff']:.4f}, |acc_norm diff| {s['acc_norm_diff']:.4f} "
                  f"({'within' if max(s['acc_diff'], s['acc_norm_diff']) <= 1e-3 else 'over'} 1e-3)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_eval.json").write_text(json.dumps({"setup": setup, "runs": results, "summary": summary},
                                                        indent=2))
    print(f"written to {RESULTS / 'bench_eval.json'}")


if __name__ == "__main__":
    main()
