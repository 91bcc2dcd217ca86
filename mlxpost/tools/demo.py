"""``mlxpost demo``: the whole pipeline on the built-in default model, each stage measured on held-out data.

1. **SFT** on the bundled dataset: the model learns to answer in one-line
   JSON ``{"answer": ..., "explanation": ...}``. Measured: the share of
   JSON replies (and of right answers) to 60 held-out questions.
2. **DPO** from that run (with the chosen answers' NLL, ``dpo.rpo_alpha``) on
   the bundled pairs, which prefer the explanation *before* the answer
   (reasoning first). Measured: the share of explanation-first replies to
   the same held-out questions.
3. **GRPO** from the DPO run on one-step arithmetic questions (sums and
   products of numbers up to 12, the ``accuracy`` reward). Measured: greedy
   accuracy on 48 held-out questions no training step showed.
4. **RLVR** from the GRPO run on two-digit sums, the ``arithmetic`` step
   verifier scoring every calculation and the final answer. Measured: final
   accuracy on 48 held-out sums.

Each change is before -> after on the same prompts with its 95% interval
(:func:`mlxpost.stats.paired_change`); the table says whether it is outside
noise. Every stage also measures what it costs (``train.eval_tasks``, the
machinery of ``mlxpost eval``): the perplexity of forty everyday questions'
prose answers (:data:`mlxpost.assets.GENERAL_TEXT`, nothing like the
training data) before and after, as the share of it kept (before / after)
against :data:`RETENTION_MIN`. The default settings are short, so the four stages take a few
minutes on a 2-core CPU; ``--full`` runs the recipes' lengths and also draws
the curves (PNG). Each stage is an ordinary run directory under ``--out``
and can be resumed, exported or compared like any other.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..assets import ARITH_FACTS_DIR, ARITH_SUMS_DIR, DEFAULT_SFT_RECIPE, GENERAL_TEXT, RECIPES_DIR
from ..config import RunConfig, build_config
from ..errors import MlxpostError
from ..eval.retention import retention, verdict
from ..methods import get as get_method
from ..model.adapters import ADAPTER_WEIGHTS, own_adapter_dir
from ..stats import describe
from ..training.pipeline import run
from ..training.resume import resume_config
from .compare import collect_runs, plot_available, plot_curves


@dataclass
class Stage:
    name: str
    method: str
    recipe: str | None  # a recipe shipped in the package, or None: the default SFT recipe
    sets: list  # --set overrides of every demo run
    short: list  # further --set overrides of the shortened demo
    from_stage: str | None = None
    measured: list = field(default_factory=list)  # (summary key, label) of what the table shows


# The RL stages answer in the JSON the earlier stages taught: rollouts of 40
# tokens at most, a temperature of 0.8 (the 135M model's samples at 1.0 are
# mostly noise), two prompts of eight completions a step.
_RL = ["grpo.group_size=8", "grpo.prompts_per_step=2", "grpo.temperature=0.8", "grpo.max_new_tokens=40",
       "grpo.eval_prompts=48", "train.warmup_steps=1", "train.report_every=1"]

# What each stage must keep of the general text's perplexity (before / after): a narrow 20-step skill is
# allowed to cost up to 10% of it; more is the sign of a run that is overwriting the model.
RETENTION_MIN = 0.90
RETENTION_TASK = f"ppl:{GENERAL_TEXT}"
_RETAIN = [f"train.eval_tasks=[{RETENTION_TASK}]", f"train.eval_min_retention={RETENTION_MIN}"]

STAGES = [
    Stage("sft", "sft", None, [*_RETAIN], ["train.steps=20", "train.eval_every=0", "train.eval_batches=2",
                                   "train.save_every=10"],
          measured=[("behaviour.json", "JSON replies"), ("behaviour.correct", "right answers")]),
    Stage("dpo", "dpo", "smollm2-135m-dpo.yaml", [*_RETAIN],
          ["train.steps=24", "train.eval_every=0", "train.eval_batches=3", "train.save_every=12"], "sft",
          measured=[("behaviour.explanation_first", "explanation first"), ("behaviour.json", "JSON replies")]),
    Stage("grpo", "grpo", "smollm2-135m-grpo.yaml",
          [f"data.path={ARITH_FACTS_DIR}", "grpo.rewards=[accuracy]", "train.lr=5e-4", *_RL, *_RETAIN],
          ["train.steps=10", "train.save_every=5"], "dpo",
          measured=[("eval_change.reward", "held-out accuracy")]),
    Stage("rlvr", "rlvr", "smollm2-135m-rlvr.yaml",
          [f"data.path={ARITH_SUMS_DIR}", "grpo.rewards=[]", "train.lr=1e-3", *_RL, *_RETAIN],
          ["train.steps=12", "train.save_every=6"], "grpo",
          measured=[("eval_change.final_acc", "held-out final accuracy")]),
]


def stage_settings(stage: Stage, extra: list[str]) -> list[str]:
    """The ``--set KEY=VALUE`` options that apply to ``stage``: those whose section its method has (grpo.* to
    the RL stages, ...), and ``STAGE:KEY=VALUE`` written for this stage by name.

    >>> [stage_settings(s, ["grpo.beta=0.1", "rlvr:train.lr=1e-4", "train.seed=3"]) for s in STAGES[2:]]
    [['grpo.beta=0.1', 'train.seed=3'], ['grpo.beta=0.1', 'train.lr=1e-4', 'train.seed=3']]
    """
    sections = RunConfig(stage.method).sections()
    out = []
    for x in extra:
        key = x.split("=", 1)[0]
        where, _, setting = x.partition(":") if ":" in key else ("", "", x)
        if where == stage.name if where else key.split(".")[0] in sections:
            out.append(setting)
    return out


def recipe_path(stage: Stage) -> Path:
    if stage.recipe is None:
        return DEFAULT_SFT_RECIPE
    path = RECIPES_DIR / stage.recipe
    if not path.exists():
        raise MlxpostError(f"the demo's recipe {path} is missing from this installation")
    return path


def lookup(summary: dict, key: str):
    v = summary
    for part in key.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return v


def stage_rows(stage: Stage, s: dict) -> list[list]:
    """The table's rows of one stage: one per measurement, ``before -> after (change, 95% CI, verdict)``."""
    health = s.get("health") or {}
    warned = [k for k, v in health.items() if v.get("verdict") in ("warn", "fail")]
    common = [stage.name, s.get("steps"), f"{s.get('wall_seconds', 0):.0f}s"]
    rows = []
    for i, (key, label) in enumerate(stage.measured):
        change = lookup(s, key)
        shown = describe(change) if isinstance(change, dict) and change.get("n") and "change" in change else "-"
        n = change.get("n") if isinstance(change, dict) else None
        rows.append((common if i == 0 else ["", "", ""]) +
                    [f"{label} (n={n})" if n else label, shown,
                     (", ".join(warned) or "ok") if i == 0 else ""])
    kept = retention_row(s)
    if kept:
        rows.append(["", "", "", *kept])
    return rows


def retention_row(s: dict) -> list | None:
    """``[label, before -> after (kept ..), verdict]`` of the general text's perplexity, or None without it.

    >>> retention_row({"eval_tasks": {"before": {"ppl:x": {"ppl": 20.0}}, "after": {"ppl:x": {"ppl": 21.0}},
    ...                               "min_retention": 0.9}})
    ['general text perplexity (cost)', '20.00 -> 21.00 (kept 0.95)', 'kept >= 0.9']
    """
    ev = s.get("eval_tasks") or {}

    def ppl(when: str):  # the retention task's perplexity (the only task of a demo stage)
        tasks = ev.get(when) or {}
        metrics = tasks.get(RETENTION_TASK) or (next(iter(tasks.values())) if len(tasks) == 1 else {})
        v = (metrics or {}).get("ppl")
        return v if isinstance(v, (int, float)) and v > 0 else None

    b, a = ppl("before"), ppl("after")
    if b is None or a is None:
        return None
    least = ev.get("min_retention", RETENTION_MIN)
    kept = retention(b, a, higher_is_better=False)  # before / after: perplexity is lower-is-better
    return ["general text perplexity (cost)", f"{b:.2f} -> {a:.2f} (kept {kept:.2f})",
            f"kept {'>=' if verdict(kept, least) == 'pass' else '<'} {least}"]


def run_demo(out: str | Path = "runs/demo", *, full: bool = False, model: str | None = None, reporter,
             stages: list[str] | None = None, extra_sets: list[str] = ()) -> dict:
    """Run the stages in order (skipping those already finished in ``out``); return their summaries."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rep = reporter
    wanted = stages or [s.name for s in STAGES]
    summaries: dict[str, dict] = {}
    t0 = time.time()
    for stage in STAGES:
        if stage.name not in wanted:
            continue
        run_dir = out / stage.name
        summary_path = run_dir / "summary.json"
        if summary_path.exists():
            rep.info(f"== stage {stage.name}: already done in {run_dir} (delete it to run it again)")
            summaries[stage.name] = json.loads(summary_path.read_text())
            continue
        sets = list(stage.sets) + ([] if full else list(stage.short))
        sets += [f"output.dir={out}", f"output.name={stage.name}"]
        if model:
            sets.append(f"model.path={model}")
        if stage.from_stage:
            src = out / stage.from_stage
            if not (own_adapter_dir(src) / ADAPTER_WEIGHTS).exists():
                raise MlxpostError(f"stage {stage.name} starts from {src}, which has no adapter: run the demo "
                                   f"from the start (or delete {out})")
            key = get_method(stage.method).from_key
            sets.append(f"{key}={src}")
        sets += stage_settings(stage, extra_sets)
        rep.info(f"== stage {stage.name}: mlxpost {stage.method} --config {recipe_path(stage)} "
                 + " ".join(f"--set {x}" for x in sets))
        if any((run_dir / "checkpoints").glob("step-*")):  # a stage killed after a checkpoint
            cfg = resume_config(run_dir, [])
            run(cfg, reporter=rep, resume=run_dir)
        else:
            cfg = build_config(recipe_path(stage), sets, method=stage.method)
            if run_dir.exists():  # a stage killed before its first checkpoint
                cfg.output.overwrite = True
            run(cfg, reporter=rep)
        summaries[stage.name] = json.loads(summary_path.read_text())

    rows = [row for st in STAGES if st.name in summaries for row in stage_rows(st, summaries[st.name])]
    rep.grid("the pipeline, stage by stage (held-out measurements, before -> after)",
             ["stage", "steps", "wall", "measured", "before -> after (change, 95% CI)", "health"], rows)
    show_samples(out, summaries, rep)
    png = None
    if full and plot_available():
        png = out / "curves.png"
        plot_curves(collect_runs([out / st.name for st in STAGES if st.name in summaries]),
                    ["loss", "reward", "rewards/margins", "val_loss"], png)
        rep.info(f"curves: {png}")
    result = {"out": str(out), "seconds": round(time.time() - t0, 1), "full": full,
              "curves": str(png) if png else None,
              "stages": {k: {kk: vv for kk, vv in v.items() if kk != "run_dir"} for k, v in summaries.items()}}
    (out / "demo.json").write_text(json.dumps(result, indent=2, default=str))
    done = [st.name for st in STAGES if st.name in summaries]
    rep.info(f"demo done in {result['seconds']:.0f}s; stage runs in {out}/ (compare them: mlxpost compare "
             + " ".join(f"{out}/{n}" for n in done) + f"; list them: mlxpost runs {out}; talk to the last: "
             f"mlxpost chat --adapter {out}/{done[-1]}). "
             + ("" if full else "Full-length version: mlxpost demo --full"))
    return result


def show_samples(out: Path, summaries: dict, rep, n: int = 2) -> None:
    """A few held-out replies of each stage, before and after."""
    for st in STAGES:
        if st.name not in summaries:
            continue
        samples = out / st.name / "samples.json"
        if samples.exists():
            rows = json.loads(samples.read_text())[:n]
        else:
            ev = out / st.name / "rl_eval_after.json"
            before = out / st.name / "rl_eval_before.json"
            if not ev.exists():
                continue
            b = json.loads(before.read_text()).get("samples", []) if before.exists() else []
            a = json.loads(ev.read_text()).get("samples", [])
            rows = [{"prompt": x["prompt"], **({"before": y["completion"]} if y else {}), "after": x["completion"]}
                    for x, y in zip(a[:n], (b + [None] * n)[:n])]
        if rows:
            rep.info(f"samples of stage {st.name}:")
            rep.samples(rows)
