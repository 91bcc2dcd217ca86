"""``mlxpost eval``: capability numbers of a model or a run, and their retention against a baseline."""

from __future__ import annotations

import sys

import click

from ..eval.run import evaluate
from ..ui import make_reporter
from .train import show_blas_advice


def _num(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if abs(v) < 100 else f"{v:,.1f}"


def result_rows(doc: dict) -> list[list[str]]:
    """One row per task and metric: value ± stderr (and a rate's 95% interval), samples, seconds."""
    rows = []
    for task, r in doc["tasks"].items():
        for i, (m, v) in enumerate(r["metrics"].items()):
            se = f" ± {_num(v['stderr'])}" if v.get("stderr") is not None else ""
            if v.get("ci95"):  # a rate: its Wilson 95% interval, which the stderr misstates at 0, n or small n
                se += f" [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]"
            rows.append([task if i == 0 else "", m, _num(v["value"]) + se, str(r["n"]) if i == 0 else "",
                         f"{r['seconds']:.1f}" if i == 0 else ""])
    return rows


def baseline_rows(base: dict) -> list[list[str]]:
    rows = []
    for r in base["rows"]:
        ret = f"{r['retention']:.3f}" if r["retention"] is not None else "-"
        delta = _num(r["delta"]) if r["delta"] is None else f"{r['delta']:+.4f}"
        se = f" ± {_num(r['delta_stderr'])}" if r.get("delta_stderr") is not None else ""
        rows.append([r["task"], r["metric"], _num(r["before"]), _num(r["after"]), delta + se, ret, r["verdict"]])
    return rows


@click.command("eval")
@click.argument("target")
@click.option("--tasks", "-t", "tasks", multiple=True, required=True, metavar="T1,T2,...",
              help="Tasks, comma-separated or repeated: humaneval, arith[:FILE], ppl:FILE, pairs:FILE, "
                   "task:FILE.jsonl, any lm-eval task name, or a local lm-eval YAML.")
@click.option("--limit", type=int, help="Evaluate the first N samples of each task.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Write DIR/eval.json (default: RUN/eval/<tasks>.json, or evals/<model>/<tasks>.json).")
@click.option("--baseline", metavar="EVAL_OR_RUN",
              help="Compare with an eval.json, a run directory or a model (evaluated on the same tasks if needed).")
@click.option("--min-retention", type=float, default=0.95, show_default=True,
              help="With --baseline: the least share of each metric to keep (after / before; perplexity: "
                   "before / after); exit code 1 below it.")
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="Rows scored or prompts decoded together.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Keep the tasks already in the output file; run the others.")
@click.option("--allow-code-exec", is_flag=True,
              help="Let humaneval run the code the model writes (sandboxed: time and memory limits, no network).")
@click.option("--samples", "num_samples", type=int, default=1, show_default=True,
              help="humaneval: completions per problem (pass@k for k <= samples; more than 1 samples at T=0.8).")
@click.option("--temperature", type=float, help="humaneval: sampling temperature (default 0 for one sample, else 0.8).")
@click.option("--max-new-tokens", type=int, help="Generation limit (default: humaneval 512, others 256).")
@click.option("--reward", "rewards", multiple=True, metavar="SPEC[@W]",
              help="task:FILE generate-and-check rows: reward functions as for grpo (default: accuracy).")
@click.option("--num-fewshot", type=int, help="lm-eval tasks: few-shot examples (default: the task's own).")
@click.option("--chat-template", is_flag=True, help="lm-eval tasks: render prompts with the chat template.")
@click.option("--model", "base_model", help="For a run directory: the base model, instead of the one it recorded.")
@click.option("--steer", "steer", multiple=True, metavar="VEC_DIR@λ[:LAYER]",
              help="Evaluate the model steered (repeatable: vectors sum); a --baseline runs unsteered.")
@click.option("--plain", is_flag=True, default=False, help="Plain line logs instead of the live display.")
def eval_command(target, tasks, limit, out, baseline, min_retention, batch_size, seed, resume, allow_code_exec,
                 num_samples, temperature, max_new_tokens, rewards, num_fewshot, chat_template, base_model, steer,
                 plain):
    """Evaluate a model or a run directory: capability baselines, before/after deltas, retention gates.

    \b
    TARGET is a model (repo id, directory, .gguf, default) or a run directory,
    whose whole adapter stack (--from chains included) is applied in memory.
    \b
    Examples:
      mlxpost eval default --tasks arith,humaneval --allow-code-exec --limit 20
      mlxpost eval runs/demo/dpo --baseline runs/demo/sft --tasks arith,pairs:prefs/valid.jsonl
      mlxpost eval runs/my-sft --tasks ppl:data/valid.jsonl,mmlu --limit 100
      mlxpost eval default --tasks my_tasks/quiz.yaml          # an lm-eval task from a local YAML
      mlxpost eval default --tasks ppl:chat.jsonl --steer vecs/sft@2:18 --baseline default  # steering's cost
    \b
    Exit code: 0, or 1 when a metric kept less than --min-retention of the baseline.
    """
    rep = make_reporter(0, plain=True if plain else None)
    show_blas_advice(rep)
    settings = dict(limit=limit, batch_size=batch_size, seed=seed, allow_code_exec=allow_code_exec,
                    num_samples=num_samples, temperature=temperature, max_new_tokens=max_new_tokens,
                    rewards=list(rewards) or ["accuracy"], num_fewshot=num_fewshot, chat_template=chat_template)
    try:
        doc = evaluate(target, list(tasks), out=out, resume=resume, baseline=baseline, min_retention=min_retention,
                       reporter=rep, base_model=base_model, steer=steer, **settings)
    except KeyboardInterrupt:
        click.secho("\ninterrupted: the finished tasks are kept; run the same command with --resume for the rest.",
                    fg="yellow", err=True)
        sys.exit(130)
    rep.grid(f"eval: {target}", ["task", "metric", "value", "n", "seconds"], result_rows(doc))
    if doc.get("path"):
        rep.info(f"written to {doc['path']}")
    base = doc.get("baseline")
    if base is None:
        return
    rep.grid(f"against the baseline {base['target'].get('spec', baseline)} (min retention {min_retention})",
             ["task", "metric", "before", "after", "delta", "retention", "verdict"], baseline_rows(base))
    for t in base.get("mismatched", []):
        rep.warn(f"{t}: the baseline ran it with other settings (data, limit); its verdicts are n/a")
    if not base["passed"]:
        failed = [f"{r['task']}/{r['metric']}" for r in base["rows"] if r["verdict"] == "fail"]
        rep.error(f"retention gate failed: {', '.join(failed)} kept less than {min_retention} of the baseline")
        sys.exit(1)
    rep.info("retention gate passed")
