"""``mlxpost demo``: the whole pipeline on the built-in default model.

1. **SFT** on the bundled dataset (one-line JSON answers), the default recipe;
2. **DPO** from that SFT run on the bundled preference pairs (concise correct
   JSON against wrong, rambling or wrapped answers);
3. **RLVR** from the DPO run on generated multi-step arithmetic tasks, with
   the step verifier;
4. a comparison of the three stages: what each measured before and after,
   time, memory and the health checks' verdicts, and before/after samples.

The default settings are shortened so that the three stages finish in about
five minutes on a 2-core CPU (fewer steps, validation on a few batches, fewer
RL validation prompts); ``--full`` uses the recipes' full lengths. Each
stage is an ordinary run directory under ``--out`` and can be resumed,
exported or compared like any other.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..assets import DEFAULT_SFT_RECIPE, RECIPES_DIR
from ..config import build_config
from ..errors import MlxpostError
from ..methods import get as get_method
from ..training.pipeline import run
from ..training.resume import resume_config


@dataclass
class Stage:
    name: str
    method: str
    recipe: str | None  # a recipe shipped in recipes/ or the package's default SFT recipe
    short: list  # --set overrides of the shortened demo
    from_stage: str | None = None


STAGES = [
    Stage("sft", "sft", None, ["train.steps=20", "train.eval_every=0", "train.eval_batches=2",
                               "train.save_every=10"]),
    Stage("dpo", "dpo", "smollm2-135m-dpo.yaml",
          ["train.steps=12", "train.eval_every=0", "train.eval_batches=3", "train.save_every=6",
           "data.max_examples=48"], "sft"),
    Stage("rlvr", "rlvr", "smollm2-135m-rlvr.yaml",
          ["train.steps=6", "grpo.group_size=4", "grpo.max_new_tokens=64", "grpo.eval_prompts=12",
           "train.save_every=3"], "dpo"),
]


def _recipe_path(stage: Stage) -> Path:
    if stage.recipe is None:
        return DEFAULT_SFT_RECIPE

    path = RECIPES_DIR / stage.recipe
    if not path.exists():
        raise MlxpostError(f"the demo's recipe {path} is missing from this installation")
    return path


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _stage_row(stage: Stage, s: dict) -> list:
    """One row of the comparison: what the stage measured before -> after."""
    if stage.method == "sft":
        # The SFT behaviour score is the share of one-line JSON answers (a number).
        b, a = s.get("behaviour_before"), s.get("behaviour_after")
        b, a = (x.get("json_rate") if isinstance(x, dict) else x for x in (b, a))
        what = f"JSON answers {_fmt(b)} -> {_fmt(a)}"
        second = f"val loss {_fmt(s.get('best_val_loss') or s.get('val_loss'))}"
    elif stage.method == "dpo":
        b, a = (s.get("behaviour_before") or {}), (s.get("behaviour_after") or {})
        val = s.get("val_metrics") or {}
        what = (f"correct {_fmt(b.get('correct_rate'))} -> {_fmt(a.get('correct_rate'))}, explanation words "
                f"{_fmt(b.get('mean_explanation_words'))} -> {_fmt(a.get('mean_explanation_words'))}")
        second = (f"val margin {_fmt(val.get('val_rewards/margins'))}, accuracy "
                  f"{_fmt(val.get('val_rewards/accuracies'))}")
    else:
        b, a = (s.get("eval_before") or {}), (s.get("eval_after") or {})
        what = (f"final acc {_fmt(b.get('final_acc'))} -> {_fmt(a.get('final_acc'))}, step acc "
                f"{_fmt(b.get('step_acc'))} -> {_fmt(a.get('step_acc'))}")
        fm = s.get("final_metrics") or {}
        second = f"reward {_fmt(fm.get('reward'))}, flat groups {_fmt(fm.get('all_equal_groups'))}"
    health = s.get("health") or {}
    verdicts = ", ".join(f"{k} {v.get('verdict')}" for k, v in health.items()) or "-"
    return [stage.name, s.get("steps"), f"{s.get('wall_seconds', 0):.0f}s", f"{s.get('peak_memory_gb', 0):.2f} GB",
            what, second, verdicts]


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
        sets = [] if full else list(stage.short)
        sets += [f"output.dir={out}", f"output.name={stage.name}"]
        if model:
            sets.append(f"model.path={model}")
        if stage.from_stage:
            src = out / stage.from_stage
            if not (src / "adapters.safetensors").exists():
                raise MlxpostError(f"stage {stage.name} starts from {src}, which has no adapter: run the demo "
                                   f"from the start (or delete {out})")
            key = get_method(stage.method).from_key
            sets.append(f"{key}={src}")
        sets += list(extra_sets)
        rep.info(f"== stage {stage.name}: mlxpost {stage.method} --config {_recipe_path(stage)} "
                 + " ".join(f"--set {x}" for x in sets))
        if any((run_dir / "checkpoints").glob("step-*")):  # a stage killed after a checkpoint
            cfg = resume_config(run_dir, [])
            run(cfg, reporter=rep, resume=run_dir)
        else:
            cfg = build_config(_recipe_path(stage), sets, method=stage.method)
            if run_dir.exists():  # a stage killed before its first checkpoint
                cfg.output.overwrite = True
            run(cfg, reporter=rep)
        summaries[stage.name] = json.loads(summary_path.read_text())

    rows = [_stage_row(st, summaries[st.name]) for st in STAGES if st.name in summaries]
    rep.grid("the pipeline, stage by stage", ["stage", "steps", "wall", "peak mem", "before -> after",
                                              "validation", "health"], rows)
    for st in STAGES:
        samples = out / st.name / "samples.json"
        if st.name in summaries and samples.exists():
            rows = json.loads(samples.read_text())[:2]
            if rows:
                rep.info(f"samples of stage {st.name}:")
                rep.samples(rows)
        ev = out / st.name / "rl_eval_after.json"
        if st.name in summaries and ev.exists():
            before = out / st.name / "rl_eval_before.json"
            b = json.loads(before.read_text()).get("samples", []) if before.exists() else []
            a = json.loads(ev.read_text()).get("samples", [])
            rep.info(f"samples of stage {st.name}:")
            rep.samples([{"prompt": x["prompt"], **({"before": y["completion"]} if y else {}),
                          "after": x["completion"]} for x, y in zip(a[:2], (b + [None, None])[:2])])
    result = {"out": str(out), "seconds": round(time.time() - t0, 1), "full": full,
              "stages": {k: {kk: vv for kk, vv in v.items() if kk != "run_dir"} for k, v in summaries.items()}}
    (out / "demo.json").write_text(json.dumps(result, indent=2, default=str))
    rep.info(f"demo done in {result['seconds']:.0f}s; stage runs in {out}/ "
             f"(compare them: mlxpost compare {out}/sft {out}/dpo {out}/rlvr). "
             + ("" if full else "Full-length version: mlxpost demo --full"))
    return result
