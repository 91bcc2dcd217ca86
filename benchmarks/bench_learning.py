"""Learning benchmarks: does each method move a held-out measurement of a real model, and how fast?

    python benchmarks/bench_learning.py                          # sft -> dpo -> grpo -> rlvr, chained
    python benchmarks/bench_learning.py --method grpo            # one method (from the run before it in --out,
                                                                 # else from the base model)
    python benchmarks/bench_learning.py --method grpo --steps 100 --measure-every 10
    python benchmarks/bench_learning.py --model DIR --out benchmarks/results/learning-mine
    python benchmarks/bench_learning.py --method grpo --set grpo.eval_prompts=96 --set grpo:data.path=DIR

The stages are the demo's (:data:`mlxpost.tools.demo.STAGES`: the same
data, recipes and settings), run longer and measured while they train
(``train.measure_every``; ``train.eval_every`` for the validation loss and the
validation preference accuracy):

========  ==========================================  ====================================================
method    data                                        held-out measurements
========  ==========================================  ====================================================
sft       bundled chats (one-line JSON answers)       validation loss; JSON replies and right answers to
                                                      60 held-out questions
dpo       bundled pairs (explanation first), from     validation preference accuracy and margin;
          the SFT run, ``rpo_alpha`` 1                explanation-first replies to the 60 questions
grpo      one-step arithmetic facts (``accuracy``),   greedy accuracy on 96 held-out facts (the demo
          from the DPO run                            holds out 48: :func:`facts_with_more_held_out`)
rlvr      two-digit sums (``arithmetic`` verifier),   final-answer (and step) accuracy on 48 held-out sums
          from the GRPO run
========  ==========================================  ====================================================

Every stage also measures what it cost, as the demo does: the perplexity of
the bundled everyday prose (:data:`mlxpost.assets.GENERAL_TEXT`) before and
after, as the share kept. Every run is an ordinary run directory under ``--out`` (resumable: a killed
benchmark continues where it stopped; a finished stage is read back, not
rerun; delete it to rerun). Printed: a table of before -> after with the 95%
interval of the paired change (:func:`mlxpost.stats.paired_change`), the
best mid-run value and the wall time; written: ``learning.json`` (the table
and every curve) and ``learning.png`` (the held-out curves, with matplotlib).
"""

from __future__ import annotations

from mlxpost.backend.blas import maybe_reexec

maybe_reexec()  # the system OpenBLAS before MLX loads (else reference BLAS: ~20x slower on the CPU)

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from mlxpost.config import build_config  # noqa: E402
from mlxpost.methods import get as get_method  # noqa: E402
from mlxpost.rl.tasks import fact_questions, write_split  # noqa: E402
from mlxpost.stats import describe  # noqa: E402
from mlxpost.tools.demo import STAGES, lookup, recipe_path, retention_row, stage_settings  # noqa: E402
from mlxpost.training.pipeline import run  # noqa: E402
from mlxpost.training.resume import resume_config  # noqa: E402
from mlxpost.ui import make_reporter  # noqa: E402

# Per method: optimizer steps, steps between held-out measurements, steps between validation-loss evaluations,
# and what the table and the curves show: (summary key of the paired change, mid-run record key, label).
LENGTHS = {
    "sft": dict(steps=100, measure_every=20, eval_every=20,
                shown=[("behaviour.json", "json", "JSON replies"),
                       ("behaviour.correct", "correct", "right answers")]),
    "dpo": dict(steps=60, measure_every=10, eval_every=10,
                shown=[("behaviour.explanation_first", "explanation_first", "explanation first"),
                       ("behaviour.json", "json", "JSON replies")]),
    "grpo": dict(steps=200, measure_every=20, eval_every=0, held_out_facts=96,
                 shown=[("eval_change.reward", "reward", "held-out accuracy")]),
    "rlvr": dict(steps=100, measure_every=20, eval_every=0,
                 shown=[("eval_change.final_acc", "final_acc", "final accuracy"),
                        (None, "step_acc", "step accuracy")]),
}
# Validation metrics (eval records) drawn next to the held-out ones.
VALIDATION = {"sft": ["val_loss"], "dpo": ["val_rewards/accuracies", "val_rewards/margins"]}


def facts_with_more_held_out(out: Path, n_valid: int) -> Path:
    """The demo's one-step facts (operands up to 12, + and x) split with ``n_valid`` held out instead of 48.

    The demo's 48 held-out facts leave a 95% interval of about +-15 points on
    a change; twice as many narrow it by sqrt(2) (the training facts go from
    217 to 169). The same rows as ``python examples/make_arithmetic_tasks.py
    --facts --ops '+*' --max-operand 12 --valid 96``.
    """
    d = out / f"facts-{n_valid}"
    if not (d / "valid.jsonl").exists():
        write_split(d, *fact_questions(ops="+*", max_operand=12, n_valid=n_valid, seed=0))
    return d


def stage_sets(stage, length: dict, steps: int, measure_every: int, out: Path, model: str | None,
               start: Path | None, extra: list[str] = ()) -> list[str]:
    sets = list(stage.sets) + [
        f"train.steps={steps}", f"train.measure_every={measure_every}", f"train.eval_every={length['eval_every']}",
        f"train.save_every={max(measure_every, 10)}", f"output.dir={out}", f"output.name={stage.name}"]
    if stage.method in ("grpo", "rlvr"):
        sets.append("train.report_every=5")
    if length.get("held_out_facts"):
        n = length["held_out_facts"]
        sets += [f"data.path={facts_with_more_held_out(out, n)}", f"grpo.eval_prompts={n}"]
    if model:
        sets.append(f"model.path={model}")
    if start is not None:
        sets.append(f"{get_method(stage.method).from_key}={start}")
    return sets + stage_settings(stage, extra)  # --set, after the rest, as the demo applies it


def run_stage(stage, sets: list[str], out: Path, rep) -> dict:
    run_dir = out / stage.name
    summary = run_dir / "summary.json"
    if summary.exists():
        rep.info(f"== {stage.name}: already done in {run_dir} (delete it to run it again)")
    elif any((run_dir / "checkpoints").glob("step-*")):
        rep.info(f"== {stage.name}: resuming {run_dir}")
        run(resume_config(run_dir, []), reporter=rep, resume=run_dir)
    else:
        rep.info(f"== {stage.name}: mlxpost {stage.method} --config {recipe_path(stage)} "
                 + " ".join(f"--set {x}" for x in sets))
        cfg = build_config(recipe_path(stage), sets, method=stage.method)
        cfg.output.overwrite = run_dir.exists()  # killed before its first checkpoint
        run(cfg, reporter=rep)
    return json.loads(summary.read_text())


def curves(run_dir: Path, method: str, summary: dict) -> dict[str, list]:
    """[step, value] pairs of every held-out and validation figure: before training, while, after."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    out: dict[str, list] = {}
    for key, rec, _ in LENGTHS[method]["shown"]:
        change = lookup(summary, key) if key else None
        before = change["before"] if change else None
        after = change["after"] if change else None
        if key is None and method in ("grpo", "rlvr"):  # step accuracy: from the evaluations, unpaired
            before = (summary.get("eval_before") or {}).get(rec)
            after = (summary.get("eval_after") or {}).get(rec)
        mid = [[r["step"], r[rec]] for r in records if r["kind"] == "heldout" and r.get(rec) is not None]
        out[rec] = ([[0, before]] if before is not None else []) + mid + (
            [[summary["steps"], after]] if after is not None else [])
    for name in VALIDATION.get(method, []):
        out[name] = [[r["step"], r[name]] for r in records if r["kind"] == "eval" and name in r]
    return out


def table_rows(method: str, summary: dict, curve: dict) -> list[list]:
    rows = []
    for i, (key, rec, label) in enumerate(LENGTHS[method]["shown"]):
        change = lookup(summary, key) if key else None
        if change and change.get("n"):
            shown = describe(change)
        else:
            pts = [v for _, v in curve.get(rec, []) if isinstance(v, (int, float)) and v == v]
            shown = f"{pts[0]:.3f} -> {pts[-1]:.3f} (unpaired)" if len(pts) >= 2 else "-"
        vals = [v for _, v in curve.get(rec, [])[1:-1] if isinstance(v, (int, float)) and v == v]
        best = f"{max(vals):.3f}" if vals else "-"
        head = [method, summary.get("steps"), f"{summary.get('wall_seconds', 0) / 60:.1f} min"] if i == 0 else [
            "", "", ""]
        rows.append(head + [label, shown, best])
    for name in VALIDATION.get(method, []):
        pts = curve.get(name) or []
        if len(pts) >= 2:
            rows.append(["", "", "", name, f"{pts[0][1]:.3f} -> {pts[-1][1]:.3f}", ""])
    kept = retention_row(summary)  # what the stage cost: general text's perplexity (the demo's train.eval_tasks)
    if kept:
        rows.append(["", "", "", kept[0], f"{kept[1]}: {kept[2]}", ""])
    return rows


def plot(result: dict, path: Path) -> bool:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    panels = [(m, name) for m, r in result["methods"].items() for name in r["curves"] if r["curves"][name]]
    cols = min(len(panels), 3) or 1
    rows = (len(panels) + cols - 1) // cols
    fig = Figure(figsize=(5.2 * cols, 3.6 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for i, (m, name) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        pts = result["methods"][m]["curves"][name]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, linewidth=1.4)
        ax.set_title(f"{m}: {name}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"held-out and validation figures while training ({result['model']})")
    fig.savefig(path)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a model directory or 'default' (SmolLM2-135M-Instruct)")
    ap.add_argument("--method", action="append", choices=[s.name for s in STAGES],
                    help="run only these (repeatable; default: all four, chained)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps of every chosen method")
    ap.add_argument("--measure-every", type=int, default=None, help="steps between held-out measurements")
    ap.add_argument("--from", dest="start", default=None,
                    help="the run the (first) chosen method starts from (default: the stage before it in --out)")
    ap.add_argument("--out", default="benchmarks/results/learning")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting of the stages that have it, after the demo's (repeatable), e.g. "
                         "--set grpo.eval_prompts=96 --set grpo:data.path=DIR (STAGE:KEY=VALUE: that stage only)")
    ap.add_argument("--plain", action="store_true", help="plain line logs")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rep = make_reporter(0, plain=True if args.plain else None)
    wanted = args.method or [s.name for s in STAGES]
    result_path = out / "learning.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {"methods": {}}
    result["model"] = args.model or "default (SmolLM2-135M-Instruct)"
    t0 = time.time()
    for stage in STAGES:
        if stage.name not in wanted:
            continue
        length = LENGTHS[stage.name]
        steps = args.steps or length["steps"]
        every = args.measure_every or length["measure_every"]
        start = None
        if args.start and stage.name == next(s for s in wanted):
            start = Path(args.start)
        elif stage.from_stage and (out / stage.from_stage / "adapters.safetensors").exists():
            start = out / stage.from_stage
        elif stage.from_stage:
            rep.warn(f"{stage.name}: no {stage.from_stage} run in {out}: starting from the base model")
        summary = run_stage(stage, stage_sets(stage, length, steps, every, out, args.model, start, args.sets), out, rep)
        curve = curves(out / stage.name, stage.name, summary)
        result["methods"][stage.name] = {
            "run_dir": str(out / stage.name), "from": str(start) if start else None, "steps": summary["steps"],
            "wall_seconds": summary.get("wall_seconds"),
            "changes": {rec: lookup(summary, key) for key, rec, _ in length["shown"] if key},
            "curves": curve, "health": {k: v.get("verdict") for k, v in (summary.get("health") or {}).items()}}
        result_path.write_text(json.dumps(result, indent=2))

    rows = [row for s in STAGES if s.name in result["methods"]
            for row in table_rows(s.name, json.loads((Path(result["methods"][s.name]["run_dir"]) /
                                                      "summary.json").read_text()),
                                  result["methods"][s.name]["curves"])]
    rep.grid(f"learning on held-out data ({result['model']}; this call {time.time() - t0:.0f}s)",
             ["method", "steps", "wall", "measured", "before -> after (change, 95% CI)", "best mid-run"], rows)
    result["table"] = rows
    result_path.write_text(json.dumps(result, indent=2))
    png = out / "learning.png"
    if plot(result, png):
        rep.info(f"curves: {png}")
    rep.info(f"results: {result_path}")


if __name__ == "__main__":
    main()
