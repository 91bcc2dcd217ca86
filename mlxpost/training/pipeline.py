"""From a resolved configuration to a finished run: the pipeline every method shares.

::

    run directory -> load the model (merge --from) -> attach adapters -> probes
      -> data (by kind: rows, pairs, prompts) -> the method's preparation
      -> measure before (and train.eval_tasks) -> the training loop -> measure after (and eval) -> summary

Every stage of the end (the final adapter, measuring after training, the
summary, written last) is one that ``--resume`` completes when a kill cut
it short, and a run that fails before its first step leaves no directory
behind (:meth:`~mlxpost.training.rundir.RunDir.discard`). The pipeline holds
no method names: what differs between methods it asks
the method (:class:`mlxpost.methods.base.Method`: its objective, its
preparation, its setup rows and summary lines) and the kind of data it trains
on (:mod:`mlxpost.training.sources`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import yaml

from ..backend.doctor import cached_peak
from ..config import RunConfig, dump_yaml, method_of, with_absolute_paths
from ..core.batches import BatchSource
from ..core.flops import flop_model, step_flops, throughput, training_flops
from ..core.forward import attention_chunk, set_attention_chunk
from ..core.logprobs import HeadSplit, set_head_chunk_bytes
from ..core.probes import resolve_attention_chunk
from ..errors import MlxpostError
from ..eval.stage import StageEval
from ..files import file_sha256, shown_path
from ..methods.base import Method, from_run
from ..model.adapters import (
    ADAPTER_WEIGHTS,
    adapter_config,
    attach_adapters,
    fuse_adapters,
    load_adapter_stack,
    own_adapter_dir,
    read_adapter_config,
    resolve_targets,
    trainable_count,
)
from ..model.load import LoadedModel, compute_dtype, is_quantized, load_model, quantize_blocks
from ..model.lora import set_merge_for_sampling
from ..model.peft import load_init_adapter
from . import memory
from .distributed import agree, world_group
from .faults import fault_point
from .loop import NonFiniteError, Objective, Trainer, TrainResult, steps_for_epochs
from .resume import config_changes, resume_point
from .rundir import RunDir, new_run_dir
from .sources import DataKind, data_kind
from .trackers import open_tracker, require_tracker


@dataclass
class Prepared:
    """A run ready to train: the model with its adapters, the batch sources, and what was decided on the way."""

    cfg: RunConfig
    method: Method
    loaded: LoadedModel
    split: HeadSplit | None  # the model's body and head, when logits can be limited to trained positions
    adapter_cfg: dict
    trainable: int
    chunk: int | None = None  # attention's query chunk in training passes (None: whole rows)
    memory: Any = None  # the memory plan (mlxpost.training.memory.Plan), when a budget applies
    train: Any = None  # the batch source of training (BatchSource, PairSource or RolloutSource)
    valid: BatchSource | None = None
    stats: dict = field(default_factory=dict)  # what data_stats.json records
    batching: str = "pad"
    data_path: Path | None = None  # the data read (a file or directory): caches go beside it
    rows: list = field(default_factory=list)  # setup-table rows of the data kind (they replace the common ones)
    record: dict = field(default_factory=dict)  # fields the data kind adds to the setup record
    state: dict = field(default_factory=dict)  # what the data kind and the method keep for later (see their hooks)
    timings: dict = field(default_factory=dict)  # one-off work before training (seconds)

    @property
    def pad_id(self) -> int:
        pad = self.loaded.tokenizer.pad_token_id
        return pad if pad is not None else 0


# ---------------------------------------------------------------------------
# Training on top of an earlier run (--from)
# ---------------------------------------------------------------------------


def resolve_from_run(cfg: RunConfig, method: Method) -> None:
    """``--from``: train on top of an earlier run.

    The run's adapter is merged into the base when the model is loaded
    (:func:`prepare`); here the base model, dtype and quantization default
    to the ones that run used, and a different base is refused.
    """
    src = from_run(cfg, method)
    if not src:
        return
    d = Path(src).expanduser()
    if not d.is_dir():
        raise MlxpostError(f"--from {src}: not a directory (give an SFT run directory or an adapter directory)")
    meta = read_adapter_config(own_adapter_dir(d)).get("mlxpost", {})
    base = meta.get("base_model")
    if cfg.model.path == "default" and base:
        cfg.model.path = base
        if cfg.model.quantize is None:
            cfg.model.quantize = meta.get("quantize")
            cfg.model.quantize_group_size = meta.get("quantize_group_size") or cfg.model.quantize_group_size
        if cfg.model.dtype == "auto" and meta.get("dtype"):
            cfg.model.dtype = meta["dtype"]
    elif base and cfg.model.path != base and Path(cfg.model.path).expanduser().resolve() != Path(base):
        raise MlxpostError(f"--from {src}: that adapter was trained on {base}, not on {cfg.model.path} "
                           "(leave --model out to use the run's base model)")
    section, key = method.from_key.split(".")
    setattr(getattr(cfg, section), key, str(d.resolve()))


def merge_from_run(model, cfg: RunConfig, directory: str, rep) -> dict:
    """Merge the ``--from`` run's adapter (and whatever it was trained on top of) into the base in memory."""
    d = Path(directory)
    load_adapter_stack(model, d)
    fuse_adapters(model)  # quantized layers come back dequantized ...
    if cfg.model.quantize:  # ... and are quantized again, so memory stays that of a quantized base
        quantize_blocks(model, cfg.model.quantize, cfg.model.quantize_group_size)
    mx.eval(model.parameters())
    rep.info(f"merged the adapter of {d} into the base: it is the starting policy and the reference")
    return {"from_adapter": str(d), "from_adapter_sha256": file_sha256(own_adapter_dir(d) / ADAPTER_WEIGHTS)}


# ---------------------------------------------------------------------------
# Preparation
# ---------------------------------------------------------------------------


def load_base(cfg: RunConfig, method: Method, rep, cache=None) -> tuple[LoadedModel, dict]:
    """The base model (with the ``--from`` run merged into it), and what the adapter records of that run."""
    m = cfg.model

    def load() -> LoadedModel:
        return load_model(m.path, dtype=m.dtype, quantize=m.quantize, group_size=m.quantize_group_size,
                          revision=m.revision, trust_remote_code=m.trust_remote_code, log=rep.info)

    with rep.status(f"loading model {m.path}"):
        loaded = cache.model(m, load) if cache is not None else load()
    # Building the model draws random initial weights (then overwritten); a model from a cache draws
    # none. Seeding again makes the adapters' initial values depend on the seed alone.
    mx.random.seed(cfg.train.seed)
    src = from_run(cfg, method)
    if not src:
        return loaded, {}
    with rep.status(f"merging the adapter of {src}"):
        return loaded, merge_from_run(loaded.model, cfg, src, rep)


def add_adapters(cfg: RunConfig, loaded: LoadedModel, from_info: dict, rep) -> tuple[dict, int]:
    """Attach the run's LoRA / DoRA adapters (new, or ``lora.init``); their adapter_config.json and size."""
    model, lcfg, m = loaded.model, cfg.lora, cfg.model
    if lcfg.init:
        init_cfg = load_init_adapter(model, lcfg.init, dropout=lcfg.dropout)
        lp = init_cfg["lora_parameters"]
        keys, rank, scale = lp["keys"], lp["rank"], lp["scale"]
        num_layers, dora = init_cfg["num_layers"], init_cfg.get("fine_tune_type") == "dora"
        rep.info(f"starting from adapter {lcfg.init}")
    else:
        keys = resolve_targets(model, lcfg.targets)
        num_layers = len(model.layers) if lcfg.num_layers in (-1, 0) else lcfg.num_layers
        rank, scale, dora = lcfg.rank, lcfg.resolved_scale(), lcfg.type == "dora"
        attach_adapters(model, rank=rank, scale=scale, dropout=lcfg.dropout, keys=keys, num_layers=num_layers,
                        dora=dora)
    local = Path(m.path).expanduser()
    extra = {"base_model": str(local.resolve()) if local.exists() else m.path,  # absolute: works from anywhere
             "model_dir": str(Path(loaded.path).resolve()), "method": cfg.method, "alpha": scale * rank,
             "quantize": m.quantize, "quantize_group_size": m.quantize_group_size if m.quantize else None,
             "base_quantized": is_quantized(model), "dtype": m.dtype, **from_info}
    acfg = adapter_config(rank=rank, scale=scale, dropout=lcfg.dropout, keys=keys, num_layers=num_layers,
                          dora=dora, extra=extra)
    return acfg, trainable_count(model)


def prepare(cfg: RunConfig, rep, rank: int = 0, world_size: int = 1, cache=None,
            method: Method | None = None) -> Prepared:
    """Load, adapt, probe and read: everything before the first step.

    ``cache``: reuse across runs in one process (see :class:`mlxpost.tools.run_cache.RunCache`): an object
    with ``model(model_cfg, load) -> LoadedModel`` (a clean base model) and
    ``data(cfg, loaded, kind, files, rank, world_size, read)`` (the data kind's tokenized examples).
    """
    method = method or method_of(cfg)
    mx.random.seed(cfg.train.seed)
    loaded, from_info = load_base(cfg, method, rep, cache)
    adapter_cfg, trainable = add_adapters(cfg, loaded, from_info, rep)
    model = loaded.model
    model.eval()  # the probes below must not see dropout; the loop switches to train mode
    prep = Prepared(cfg, method, loaded, HeadSplit.find(model), adapter_cfg, trainable)
    set_attention_chunk(model, None)  # the probes run whole rows
    prep.chunk = resolve_attention_chunk(cfg.train.attention_chunk, model, warn=rep.warn)
    kind = data_kind(method.data)
    # Online RL: the rollouts' passes are sized by the longest prompt read, not grpo.max_prompt_len.
    prep.memory = fit_memory(cfg, method, model, prep.chunk, rep, prompt_len=kind.longest(prep, rep))
    kind.read(prep, rep, rank=rank, world=world_size, cache=cache)
    set_attention_chunk(model, prep.chunk)  # after the data kind's probes (packing runs whole rows)
    method.prepare(prep, rep)
    return prep


def fit_memory(cfg: RunConfig, method: Method, model, chunk: int | None, rep, prompt_len: int | None = None):
    """Apply ``train.max_memory_gb`` (see :mod:`mlxpost.training.memory`): may turn on gradient checkpointing
    and split the micro-batch in ``cfg.train`` (online RL: ``grpo.micro_batch``, completions per pass), and
    says whether sampling may merge the adapters; warns when the budget cannot be met. The plan, or None.
    ``prompt_len``: online RL's longest prompt (at most ``grpo.max_prompt_len``: longer ones are dropped when
    read; default: that bound)."""
    t = cfg.train
    set_merge_for_sampling(model, True)  # a model reused across runs (sweeps) starts from the defaults
    set_head_chunk_bytes(None)
    if t.max_memory_gb == 0:
        return None
    budget = memory.default_budget() if t.max_memory_gb == -1 else t.max_memory_gb * memory.GB
    shape = memory.ModelShape.of(model)
    if method.data == "prompts":  # rollouts: prompts of up to max_prompt_len tokens, then the completions
        ro = method.rollout(cfg)
        rows = ro.settings.micro_batch  # completions per forward pass
        # A smaller micro-batch of completions (a divisor of the step's) accumulates into the same step.
        p = memory.plan(shape, budget, batch_size=rows, grad_accum=1,
                        length=(prompt_len or ro.max_prompt_len) + ro.settings.sampling.max_new_tokens,
                        checkpoint=t.grad_checkpoint, query_chunk=chunk)
        t.grad_checkpoint = p.checkpoint
        if p.batch_size != rows:
            cfg.grpo.micro_batch = p.batch_size  # what the online RL methods' settings read
    else:
        length = cfg.data.pack_len or cfg.data.max_seq_len
        p = memory.plan(shape, budget, batch_size=t.batch_size, grad_accum=t.grad_accum, length=length,
                        rows_per_item=2 if method.data == "pairs" else 1, checkpoint=t.grad_checkpoint,
                        query_chunk=chunk, can_split_rows=method.rows_apart and not cfg.lora.dropout)
        t.grad_checkpoint, t.batch_size, t.grad_accum = p.checkpoint, p.batch_size, p.grad_accum
        t.split_rows = t.split_rows or p.split_rows
    set_merge_for_sampling(model, p.merge)
    set_head_chunk_bytes(p.head_chunk_bytes)
    if not p.fits:
        rep.warn(f"train.max_memory_gb: the estimated peak memory is {p.peak / memory.GB:.1f} GB "
                 f"(weights {p.estimate.weights / memory.GB:.1f} GB) even with gradient checkpointing and a "
                 f"micro-batch of {p.batch_size}{' (one backward pass per row)' if p.split_rows else ''}, "
                 f"over the budget of {budget / memory.GB:.1f} GB: shorten "
                 f"data.max_seq_len, quantize the base (--quantize 4) or raise --max-memory")
    return p


def total_steps(cfg: RunConfig, source: BatchSource) -> int:
    if cfg.train.steps:
        return cfg.train.steps
    return steps_for_epochs(source, cfg.train.epochs, cfg.train.grad_accum)


# ---------------------------------------------------------------------------
# A whole run
# ---------------------------------------------------------------------------


def setup_rows(prep: Prepared, kind: DataKind, steps: int, size: int) -> list[tuple[str, Any]]:
    """The setup table: the common rows (the data kind's replace its examples and batching), then the method's."""
    cfg, a = prep.cfg, prep.adapter_cfg
    rows = {"model": shown_path(cfg.model.path), "model dir": shown_path(prep.loaded.path),
            "trainable params": f"{prep.trainable:,}",
            "adapter": f"{a['fine_tune_type']} r={a['lora_parameters']['rank']}",
            f"train {kind.examples}": prep.stats["train_examples"] * size,
            f"valid {kind.examples}": prep.stats["valid_examples"] * size,
            "batching": prep.batching, "steps": steps, "processes": size,
            "logits": "trained positions only" if prep.split else "all positions"}
    for key, v in prep.rows:
        rows[key] = v
    if prep.memory is not None:
        rows["memory"] = prep.memory.describe()
    chunk = attention_chunk(prep.loaded.model)
    rows["attention"] = f"in query chunks of ~{chunk} positions (at most 8 a row)" if chunk else "whole rows"
    out = [(k, v) for k, v in rows.items() if v is not None]
    out += prep.method.setup_rows(prep)
    src = from_run(cfg, prep.method)
    if src:
        out.append(("from", shown_path(src)))
    return out


def start_run(cfg: RunConfig, world, rank: int, resume: Path | None, rep) -> RunDir:
    """The run directory (a new one, or the one resumed), locked, with the resolved configuration in it
    (its paths absolute).

    A resumed run records in metrics.jsonl (and says) which settings changed.
    """
    if world is not None and resume is None and cfg.output.name is None:
        raise MlxpostError("distributed runs need an explicit run name (--name) so every rank writes the same place")

    def open_run_dir() -> RunDir:
        if resume is not None:
            return RunDir(resume, writer=rank == 0, lock=True)
        if rank != 0:
            return RunDir(Path(cfg.output.dir) / cfg.output.name, writer=False)
        rundir = RunDir(new_run_dir(cfg.output.dir, cfg.output.name, cfg.method, cfg.output.overwrite), lock=True)
        rundir.created = True
        return rundir

    rundir = agree(world, open_run_dir, "opening the run directory")
    stored = with_absolute_paths(cfg)  # config.yaml must name the same files when resumed from anywhere
    if resume is not None and rank == 0:
        try:
            old = yaml.safe_load((rundir.path / "config.yaml").read_text())
        except (OSError, ValueError, yaml.YAMLError):
            old = {}
        changes = config_changes(old if isinstance(old, dict) else {}, stored.to_dict())
        if changes:
            rundir.log({"kind": "config_change", "changes": changes})
            rep.info("resuming with changed settings: "
                     + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items()))
    rundir.write_text("config.yaml", dump_yaml(stored))
    if rundir.writer:
        rundir.tracker = open_tracker(cfg.train.report_to, rundir.path, stored.to_dict())
    return rundir


def agree_on_data(prep: Prepared, world) -> None:
    """Every rank drops batches beyond the smallest share's epoch, so that data positions agree and rank
    0's checkpoint describes every rank."""
    if world is None:
        return
    n = prep.train.batches_per_epoch()
    n_min = int(mx.distributed.all_gather(mx.array([n]), group=world, stream=mx.cpu).min().item())
    prep.train.limit_epoch(n_min)


def checkpoint_to_resume(rundir: RunDir, steps: int, world, rep) -> Path | None:
    """The checkpoint a resumed run continues from (the same on every rank), or None to start afresh."""
    found = agree(world, lambda: resume_point(rundir, steps, rep), "reading the checkpoint")
    if found is None:
        rep.warn(f"{rundir.path}: no checkpoint yet; starting this run from the beginning")
    if world is not None:
        mine = found[1]["step"] if found else -1
        steps_seen = mx.distributed.all_gather(mx.array([mine]), group=world, stream=mx.cpu).tolist()
        if len(set(steps_seen)) > 1:
            raise MlxpostError(
                f"the processes see different checkpoints in {rundir.path} (steps {steps_seen}, -1 = none): "
                "resuming a run on several machines needs its run directory on every machine "
                "(a shared filesystem, or copy it to each)")
    return found[0] if found else None


def run(cfg: RunConfig, objective_for: Callable[[Prepared], Objective] | None = None, *, reporter,
        resume: Path | None = None, cache=None) -> tuple[Path, TrainResult]:
    """Run one training job end to end; returns the run directory and the result.

    ``objective_for``: builds the objective from the prepared run (default:
    the method's own). ``cache``: see :func:`prepare`. The run directory is
    locked while this runs; a new one is removed again when the run fails
    before its first step.
    """
    method = method_of(cfg)
    kind = data_kind(method.data)
    if resume is None:
        resolve_from_run(cfg, method)
    world = world_group()
    rank = world.rank() if world else 0
    if world is not None and not kind.distributed:
        raise MlxpostError(f"{cfg.method} runs in one process for now (distributed rollouts are not supported)")
    require_tracker(cfg.train.report_to)  # a missing package stops the run before its directory exists
    # train.eval_tasks, checked before loading; a --from run's evaluation after training is this run's baseline
    stage_eval = StageEval.from_config(cfg, from_run(cfg, method)) if rank == 0 else None
    rundir = start_run(cfg, world, rank, resume, reporter)
    reporter.info(f"run directory: {shown_path(rundir.path)}")
    try:
        result = train_run(cfg, method, kind, rundir, world, reporter, objective_for, resume, cache, stage_eval)
    except BaseException:
        if rundir.discard():
            reporter.info(f"removed {shown_path(rundir.path)} again: the run failed before its first step")
        raise
    finally:
        rundir.close_tracker()
        rundir.unlock()
    return rundir.path, result


def train_run(cfg: RunConfig, method: Method, kind: DataKind, rundir: RunDir, world, rep, objective_for,
              resume: Path | None, cache, stage_eval: StageEval | None = None) -> TrainResult:
    """Prepare, measure before (and ``train.eval_tasks``), train (or continue), then :func:`finish_run`."""
    rank, size = (world.rank(), world.size()) if world else (0, 1)
    t_start = time.time()
    prep = agree(world, lambda: prepare(cfg, rep, rank, size, cache=cache, method=method),
                 "loading the model or the data")
    agree_on_data(prep, world)
    steps = total_steps(cfg, prep.train)
    ckpt = checkpoint_to_resume(rundir, steps, world, rep) if resume is not None else None

    rep.table("setup", setup_rows(prep, kind, steps, size))
    rundir.write_json("data_stats.json", prep.stats)
    rundir.log({"kind": "setup", "steps": steps, "trainable_params": prep.trainable, "batching": prep.batching,
                "world_size": size, "data": prep.stats, "attention_chunk": attention_chunk(prep.loaded.model),
                **method.setup_record(prep), **prep.record})

    before = None
    if rank == 0:  # a resumed run measured before training the first time
        before = kind.measure(prep, rep, rundir, "before") if ckpt is None else kind.measured(rundir, "before")
        if stage_eval is not None:
            stage_eval.run(prep.loaded, rundir.path, "before", rep, resumed=ckpt is not None)

    trainer = Trainer(prep.loaded.model, (objective_for or method.objective)(prep), cfg.train, total_steps=steps,
                      run=rundir, reporter=rep, adapter_cfg=prep.adapter_cfg, world=world,
                      measure=(lambda step: kind.scores(prep, rep)) if rank == 0 else None)
    try:
        result = trainer.fit(prep.train, prep.valid, resume_from=ckpt)
    except NonFiniteError:
        rundir.write_json("summary.json", {"run_dir": str(rundir.path), "method": cfg.method, "stopped": "non_finite",
                                           "steps": trainer.step, "wall_seconds": round(time.time() - t_start, 1)})
        raise
    finally:
        rep.end()
    finish_run(prep, kind, rundir, result, trainer.monitor, before, t_start, rep, rank, stage_eval)
    return result


def finish_run(prep: Prepared, kind: DataKind, rundir: RunDir, result: TrainResult, monitor, before,
               t_start: float, rep, rank: int, stage_eval: StageEval | None = None) -> None:
    """Measure after training (unless a run cut short after doing so already did), then the summary, last.

    Each stage is marked done in metrics.jsonl (``{"kind": "end", "stage": ..., "step": ...}``), so a
    resume after a kill here redoes only the stages without their mark; summary.json, written last,
    says that the whole run is complete.
    """
    fault_point("after_training")
    after = None
    if rank == 0:
        done = any(r.get("kind") == "end" and r.get("stage") == "after" and r.get("step") == result.steps
                   for r in rundir.read_metrics())
        after = kind.measured(rundir, "after") if done else None
        if after is None:
            after = kind.measure(prep, rep, rundir, "after")
            rundir.log({"kind": "end", "stage": "after", "step": result.steps})
    summary = summarize(prep, kind, result, t_start, monitor, before, after, rundir.path)
    if stage_eval is not None:
        summary["eval_tasks"] = stage_eval.run(prep.loaded, rundir.path, "after", rep)
    fault_point("summary")
    rundir.write_json("summary.json", summary)
    report_summary(summary, rundir.path, rep)


def summarize(prep: Prepared, kind: DataKind, result: TrainResult, t_start: float, monitor, before, after,
              run_path: Path) -> dict:
    """summary.json: the common figures, the method's lines, validation metrics, what the kind measured, health."""
    summary = {
        "run_dir": str(run_path), "method": prep.cfg.method, "stopped": result.stopped, "steps": result.steps,
        "final_train_loss": result.final_loss, "val_loss": result.val_loss, "best_val_loss": result.best_val_loss,
        "best_step": result.best_step, "tokens": result.tokens, "trained_tokens": result.trained_tokens,
        "train_seconds": round(result.train_seconds, 2),
        "tokens_per_s": result.tokens / max(result.train_seconds, 1e-9),
        "trained_tokens_per_s": result.trained_tokens / max(result.train_seconds, 1e-9),
        "peak_memory_gb": result.peak_memory_gb, "wall_seconds": round(time.time() - t_start, 1),
        **run_flops(prep, result),
        **prep.timings,
    }
    prep.method.summarize(prep, result, summary, monitor=monitor, evals={"before": before, "after": after})
    if result.val_metrics:
        summary["val_metrics"] = {k: v for k, v in result.val_metrics.items() if k != "eval_seconds"}
    kind.summarize(prep, summary, before, after)
    if result.health is not None:
        summary["health"] = result.health
    return summary


def run_flops(prep: Prepared, result: TrainResult) -> dict:
    """Model FLOPs of the run's training steps, FLOP/s and MFU (see :mod:`mlxpost.core.flops`).

    The policy's forward and backward over every input position (the output
    layer only on trained positions when the head is split), plus the live
    reference forward a preference or KL-penalised RL step runs. MFU is
    against the matmul peak ``mlxpost doctor`` cached for this machine and the
    model's dtype; without one it is None. For online RL the steps' time
    includes rollout generation, whose FLOPs are not counted here
    (``flops_scope`` says so).
    """
    model = prep.loaded.model
    fm = flop_model(model, checkpointed=prep.cfg.train.grad_checkpoint)
    head = result.trained_tokens if prep.split is not None else result.tokens
    flops = training_flops(fm, result.tokens, head, result.attention_pairs, prep.method.reference_pass(prep))
    if prep.cfg.train.split_rows:  # the forward pass that weighs the rows: hardware FLOPs, not model FLOPs
        flops["hardware"] += step_flops(fm, result.tokens, head, result.attention_pairs, backward=False)["forward"]
    dtype = str(compute_dtype(model)).removeprefix("mlx.core.")
    # Online RL: the steps' time less this process's rollout generation (counted apart by the method).
    generated = getattr(prep.train, "generated", None) or {}
    seconds = result.train_seconds - generated.get("seconds", 0.0)
    out = throughput(flops, seconds, cached_peak(mx, dtype))
    out["peak_dtype"] = dtype if out["peak"] else None  # the peak is of this dtype's matmuls
    out["flops_scope"] = ("training steps, over train_seconds less rollout_seconds (generation: rollout_model_flops)"
                          if generated else "training steps")
    return out


FLOP_KEYS = ("model_flops", "hardware_flops", "model_flops_per_s", "hardware_flops_per_s", "mfu", "peak_gflops",
             "peak", "peak_dtype", "flops_scope", "rollout_model_flops", "rollout_model_flops_per_s")


def flops_line(summary: dict) -> str:
    """One line for the printed summary.

    >>> flops_line({"model_flops_per_s": 2.5e10, "mfu": 0.25, "peak_gflops": 100.0})
    '25.0 GFLOP/s, MFU 25.0% of a 100.0 GFLOP/s matmul peak'
    >>> flops_line({"model_flops_per_s": 2.5e10, "mfu": None})
    '25.0 GFLOP/s, MFU unknown (no matmul peak measured: run mlxpost doctor)'
    """
    rate = f"{summary['model_flops_per_s'] / 1e9:.1f} GFLOP/s"
    if summary.get("mfu") is None:
        return rate + ", MFU unknown (no matmul peak measured: run mlxpost doctor)"
    return rate + f", MFU {100 * summary['mfu']:.1f}% of a {summary['peak_gflops']:.1f} GFLOP/s matmul peak"


def report_summary(summary: dict, run_path: Path, rep) -> None:
    skip = ("run_dir", "final_metrics", "val_metrics", "health", "eval_before", "eval_after", "eval_tasks",
            *FLOP_KEYS)
    rows = [(k, v) for k, v in summary.items() if k not in skip]
    if summary.get("model_flops_per_s") is not None:
        rows.append(("model FLOP/s", flops_line(summary)))
    if summary.get("rollout_model_flops_per_s") is not None:
        rows.append(("rollout FLOP/s", f"{summary['rollout_model_flops_per_s'] / 1e9:.1f} GFLOP/s (generation)"))
    rows += [(f"val {k[4:]}", v) for k, v in (summary.get("val_metrics") or {}).items()
             if k[4:] in ("rewards/margins", "rewards/accuracies", "kl", "nll")]
    rep.table(f"summary: {shown_path(run_path)}", rows)
    if summary.get("eval_tasks"):
        ev = summary["eval_tasks"]
        rep.info(f"eval tasks: every metric kept {ev['min_retention']} of its value before training: "
                 f"{'yes' if ev['passed'] else 'no'} ({ev['file']})")
    if summary.get("health") is not None:
        report_health(summary["health"], rep)


def report_health(health: dict, rep) -> None:
    """The health checks' verdicts, one row each, with the first finding's reason."""
    rows = []
    for check, h in health.items():
        verdict = h["verdict"]
        if check == "quality_gate" and verdict in ("pass", "fail") and "detail" in h:
            verdict += f" ({h['detail']})"
        elif check == "quality_gate" and verdict in ("pass", "fail") and "step_acc" in h:
            verdict += (f" (val step accuracy {h['step_acc']:.3f} vs > {h['min_step_acc']}, final accuracy "
                        f"{h['final_acc']:.3f} vs > {h['min_final_acc']})")
        elif check == "quality_gate" and verdict in ("pass", "fail"):
            verdict += (f" (val margin {h['margin']:.3f} vs > {h['min_margin']}, accuracy {h['accuracy']:.3f} "
                        f"vs >= {h['min_accuracy']})")
        elif check == "quality_gate":
            verdict += f" ({h.get('reason', '')})"
        elif h.get("findings"):
            f = h["findings"][0]
            verdict += f" (step {f['step']}: {f['message'][:90]}...)"
        rows.append((check, verdict))
    rep.table("health checks", rows)
