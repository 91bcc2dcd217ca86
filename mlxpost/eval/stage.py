"""``train.eval_tasks``: a training run measures its tasks before and after training.

The pipeline (:mod:`mlxpost.training.pipeline`) calls :meth:`StageEval.run`
twice, next to where the data kind measures its before and after:

* before the first step, on the starting model (the base with any
  ``--from`` stack merged; the fresh adapter changes nothing yet), written
  as ``RUN/baseline_metrics.json`` (a resumed run reads it back). A run
  trained ``--from`` another that measured the same tasks (same data and
  settings: equal ``config_hash``) after its training, on the adapter it
  still has (same sha256), starts from that very model: its evaluation is
  copied as the baseline instead of measured again (a chain of stages, as
  in ``mlxpost demo``, measures each model once; the copy says where it
  came from);
* after the last step, on the trained model, written as
  ``RUN/eval/<tasks>.json`` with the comparison against the baseline
  (deltas, retention, verdicts against ``train.eval_min_retention``).

The summary gets ``eval_tasks``: each metric before and after, and whether
every metric kept the minimum retention. Tasks are checked when the run
starts, before the model loads (:meth:`StageEval.from_config`).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MlxpostError
from ..files import atomic_write_json, read_json
from ..model.load import LoadedModel
from .run import (
    adapter_identity,
    check_code_exec,
    compare_baseline,
    context_for,
    eval_chunk,
    run_beta,
    run_tasks,
    tasks_slug,
)
from .tasks import parse_tasks

BASELINE_FILE = "baseline_metrics.json"


class StageEval:
    """The tasks of ``train.eval_tasks`` and their settings (``train.eval_limit``, ``train.eval_allow_code_exec``)."""

    def __init__(self, train_cfg, run_cfg: dict, from_run: str | None = None):
        self.tasks = parse_tasks(list(train_cfg.eval_tasks))
        self.settings = {"limit": train_cfg.eval_limit, "allow_code_exec": train_cfg.eval_allow_code_exec,
                         "seed": train_cfg.seed}
        check_code_exec(self.tasks, train_cfg.eval_allow_code_exec)
        self.run_cfg = run_cfg
        self.min_retention = train_cfg.eval_min_retention
        self.from_run = Path(from_run) if from_run else None

    @staticmethod
    def from_config(cfg, from_run: str | None = None) -> "StageEval | None":
        """None when the run has no ``train.eval_tasks``; checks the tasks (files, names) otherwise.
        ``from_run``: the run this one trains on top of (``--from``), whose evaluation after training can
        serve as the baseline."""
        return StageEval(cfg.train, cfg.to_dict(), from_run) if cfg.train.eval_tasks else None

    def after_path(self, run_dir: Path) -> Path:
        """Where a run writes these tasks' evaluation after training."""
        return Path(run_dir) / "eval" / f"{tasks_slug(self.tasks)}.json"

    def start_evaluation(self, ctx, model_dir: str) -> dict | None:
        """The ``--from`` run's evaluation after training when it is of this run's starting model and tasks.

        It must hold the same tasks with the same ``config_hash`` (data,
        limit, settings), be of the same base model directory, and its
        adapter identity must equal the stack that run directory holds now
        (a later ``--resume`` of that run changes the sha256, and the
        evaluation is measured again)."""
        if self.from_run is None:
            return None
        path = self.after_path(self.from_run)
        try:  # anything amiss (missing, unreadable, another adapter now): measure instead
            doc = read_json(path) if path.exists() else None
            if not isinstance(doc, dict) or not isinstance(doc.get("target"), dict) or \
                    doc["target"].get("when") != "after" or doc["target"].get("model_dir") != model_dir or \
                    doc["target"].get("adapters") != adapter_identity(self.from_run):
                return None
        except (OSError, MlxpostError):
            return None
        done = doc.get("tasks", {})
        if any((done.get(t.key) or {}).get("config_hash") != t.config_hash(ctx) for t in self.tasks):
            return None
        target = {**doc["target"], "when": "before", "copied_from": str(self.from_run / "eval")}
        return {**{k: v for k, v in doc.items() if k != "baseline"}, "target": target,
                "tasks": {t.key: done[t.key] for t in self.tasks}}

    def run(self, loaded: LoadedModel, run_dir: Path, when: str, rep, resumed: bool = False) -> dict | None:
        """Evaluate ``before`` or ``after`` training; the summary's ``eval_tasks`` after it (None before)."""
        run_dir = Path(run_dir)
        if when == "before" and resumed and (run_dir / BASELINE_FILE).exists():
            return None  # measured when the run first started
        ctx = context_for(loaded, None, progress=rep.progress, **self.settings)
        ctx.beta = run_beta(self.run_cfg)
        ident = {"spec": str(run_dir), "kind": "run", "model": loaded.name, "model_dir": str(loaded.path),
                 "when": when}
        if when == "after":  # the final adapter is written by now: the results are this run's (--baseline RUN)
            ident["adapters"] = adapter_identity(run_dir)
        out = run_dir / BASELINE_FILE if when == "before" else self.after_path(run_dir)
        copied = self.start_evaluation(ctx, str(loaded.path)) if when == "before" else None
        if copied is not None:
            atomic_write_json(out, copied)
            rep.info(f"eval tasks before training: {shown(copied)} (the evaluation of {self.from_run} after its "
                     f"training: the model this run starts from)")
            return None
        with eval_chunk(loaded.model):
            doc = run_tasks(loaded.model, loaded.tokenizer, self.tasks, ctx, ident=ident, out=out, reporter=rep)
        if when == "before":
            rep.info(f"eval tasks before training: {shown(doc)}")
            return None
        base = read_json(run_dir / BASELINE_FILE)
        compare_baseline(doc, base, self.min_retention)
        atomic_write_json(out, doc)
        rep.info(f"eval tasks after training: {shown(doc)}")
        return {"before": values(base), "after": values(doc), "passed": doc["baseline"]["passed"],
                "min_retention": self.min_retention, "file": str(out)}


def values(doc: dict) -> dict:
    """``{task: {metric: value}}`` of an eval.json."""
    return {t: {m: v.get("value") for m, v in r.get("metrics", {}).items()} for t, r in doc.get("tasks", {}).items()}


def shown(doc: dict) -> str:
    return "; ".join(f"{t} " + ", ".join(f"{m} {v:.4g}" for m, v in ms.items() if v is not None)
                     for t, ms in values(doc).items())
