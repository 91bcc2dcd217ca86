"""The training loop: one loop for every method.

The loop is given an :class:`Objective` (the method's loss on a batch) and
batch sources; it never imports a method. Contract of a loss function::

    loss_fn(model, batch) -> (loss_sum, count, metric_sums)

``loss_sum`` is a scalar summed over the batch's units (tokens for SFT, pairs
for DPO), ``count`` the number of units, ``metric_sums`` a dict of scalars
summed the same way. The loop differentiates ``loss_sum``, adds gradients
over micro-batches (and ranks), and divides by the total ``count`` once per
optimizer step: the gradient is exactly that of the mean over every unit in
the step, however the work is split.

Per optimizer step: ``grad_accum`` compiled micro-steps (forward + backward),
one compiled update (all-reduce across ranks, normalise, clip, AdamW), an
``mx.eval`` after each micro-step (peak memory: one micro-batch's graph) and
after the update. Scalars stay arrays until a report is printed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from ..backend import kernels
from ..core.batches import Batch, BatchSource, batch_from_arrays, rows_apart
from ..core.flops import causal_pairs
from ..errors import ConfigError, MlxpostError
from .health import HealthMonitor
from .rundir import RunDir, load_checkpoint

if TYPE_CHECKING:  # annotations only: the configuration imports the methods, which import this loop
    from ..config import TrainConfig

LossFn = Callable[[nn.Module, Batch], tuple[mx.array, mx.array, dict]]


@dataclass
class Objective:
    loss: LossFn
    unit: str = "token"  # what ``count`` counts, for display
    perplexity: bool = True  # report exp(val_loss)
    display: tuple = ()  # metric names shown live next to the loss
    # A factory ``monitor(total_steps) -> HealthMonitor`` (see mlxpost.training.health); its findings are
    # shown live and logged. None: the base monitor (the checks every run has).
    monitor: Callable | None = None
    # ``tokens(model, batch, grad=True, for_loss=False) -> per-token log-probs`` when the loss depends on the
    # model only through them and each row's depend on that row alone; ``loss`` then also takes them,
    # ``loss(model, batch, tok=...)``, right after a ``tokens(..., for_loss=True)`` pass on the same batch
    # (which may record what the loss's own passes reuse). With it, ``train.split_rows`` can run one
    # backward pass per row.
    tokens: Callable | None = None


@dataclass
class TrainResult:
    steps: int
    stopped: str  # "completed" | "early_stopping" (a non-finite loss raises NonFiniteError)
    final_loss: float | None
    best_val_loss: float | None
    best_step: int | None
    val_loss: float | None
    tokens: int
    trained_tokens: int
    train_seconds: float
    peak_memory_gb: float
    history: list = field(default_factory=list)
    attention_pairs: float = 0.0  # causal (query, key) pairs of the training passes, for the FLOP count
    val_metrics: dict | None = None  # the last evaluation
    health: dict | None = None  # the health monitor's summary


class NonFiniteError(MlxpostError):
    pass


def build_schedule(cfg: TrainConfig, total_steps: int):
    """Learning rate as a function of the optimizer step (0 for the first update).

    Warmup: ``lr * (s + 1) / W`` for the first W updates (no update is wasted
    at lr 0). Then cosine or linear decay from ``lr`` to ``lr * min_lr_ratio``,
    reached at the last update, or a constant.
    """
    lr, end = cfg.lr, cfg.lr * cfg.min_lr_ratio
    W = warmup_steps(cfg, total_steps)
    span = max(total_steps - 1 - W, 1)
    kind = cfg.schedule

    def schedule(step):
        s = mx.array(step).astype(mx.float32)
        t = mx.clip((s - W) / span, 0.0, 1.0)
        if kind == "cosine":
            main = end + (lr - end) * 0.5 * (1.0 + mx.cos(math.pi * t))
        elif kind == "linear":
            main = lr + (end - lr) * t
        else:
            main = mx.full(s.shape, lr, mx.float32)
        if W == 0:
            return main
        return mx.where(s < W, lr * (s + 1.0) / W, main)

    return schedule


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """Updates of the warmup: ``train.warmup_steps``, else ``warmup_ratio`` of the run (never all of it)."""
    W = cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps))
    return min(W, max(total_steps - 1, 0))


def build_optimizer(cfg: TrainConfig, total_steps: int) -> optim.Optimizer:
    lr = build_schedule(cfg, total_steps)
    if cfg.optimizer == "adamw":
        return optim.AdamW(lr, betas=[cfg.beta1, cfg.beta2], eps=cfg.eps, weight_decay=cfg.weight_decay,
                           bias_correction=cfg.bias_correction)
    if cfg.optimizer == "adam":
        return optim.Adam(lr, betas=[cfg.beta1, cfg.beta2], eps=cfg.eps, bias_correction=cfg.bias_correction)
    return optim.SGD(lr, weight_decay=cfg.weight_decay)


def enable_grad_checkpoint(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass.

    Only this model's block instances change (their class is swapped for a
    subclass), not every model of that class in the process.
    """
    for layer in model.layers:
        base = type(layer)
        if getattr(base, "_mlxpost_checkpointed", False):
            continue
        call = base.__call__

        def checkpointed(self, *args, _call=call, **kwargs):
            setting = kernels.setting()  # the recomputation runs later, outside forward()'s block

            def inner(params, *a, **k):
                self.update(params)
                with kernels.replayed(setting):
                    return _call(self, *a, **k)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        layer.__class__ = type(base.__name__, (base,), {"__call__": checkpointed, "_mlxpost_checkpointed": True})


def _wire_memory() -> None:
    """On Metal, keep up to the recommended working set wired (as mlx-lm does).

    The CPU backend's ``device_info`` has no such key: then nothing happens.
    """
    try:
        size = mx.device_info().get("max_recommended_working_set_size")
        if size:
            mx.set_wired_limit(size)
    except (AttributeError, RuntimeError, ValueError):
        pass


def _sum_trees(a, b):
    return b if a is None else tree_map(lambda x, y: x + y, a, b)


@dataclass
class _Window:
    """The steps since the last report: their summed loss (an array until reported), tokens and time."""

    loss: mx.array | None = None
    steps: int = 0
    tokens: int = 0
    trained: int = 0
    seconds: float = 0.0

    def add(self, out: dict, seconds: float) -> None:
        self.loss = out["loss"] if self.loss is None else self.loss + out["loss"]
        self.steps += 1
        self.tokens += out["n_tokens"]
        self.trained += out["n_trained"]
        self.seconds += seconds

    def metrics(self, out: dict, host: dict, source, trainer: "Trainer") -> dict:
        """The report: the window's mean loss and speed, the last step's metrics (over all ranks), the source's."""
        t = max(self.seconds, 1e-9)
        m = {
            "loss": self.loss.item() / self.steps,
            "grad_norm": out["grad_norm"].item(),
            "lr": float(trainer.optimizer.learning_rate.item()),
            "tokens_per_s": self.tokens / t,
            "trained_tokens_per_s": self.trained / t,
            "step_s": self.seconds / max(self.steps, 1),
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "epoch": round(source.epoch_progress, 3),
            "tokens": trainer.tokens,
        }
        if trainer.objective.perplexity:
            m["ppl"] = math.exp(min(m["loss"], 50.0))
        m.update({k: v.item() for k, v in out["metrics"].items()})
        m.update(host)
        return m


class Trainer:
    """Holds the compiled functions and the state of one training run."""

    def __init__(self, model: nn.Module, objective: Objective, cfg: TrainConfig, *, total_steps: int,
                 run: RunDir, reporter, adapter_cfg: dict, world=None, measure=None):
        """``measure(step) -> dict | None``: held-out measurements taken every ``train.measure_every``
        steps (logged as ``heldout`` records), e.g. greedy accuracy on validation prompts."""
        self.measure = measure
        self.model = model
        self.objective = objective
        self.cfg = cfg
        self.total_steps = total_steps
        self.run = run
        self.reporter = reporter
        self.adapter_cfg = adapter_cfg
        self.world = world
        self.world_size = world.size() if world is not None else 1
        self.optimizer = build_optimizer(cfg, total_steps)
        self.optimizer.init(model.trainable_parameters())
        if cfg.split_rows and objective.tokens is None:
            raise ConfigError("train.split_rows: this method's loss is not a function of per-row log-probs; "
                              "lower train.batch_size (a micro-batch of one row) instead")
        if cfg.grad_checkpoint:
            enable_grad_checkpoint(model)
        self.step = 0
        self.best_val: float | None = None
        self.best_step: int | None = None
        self.patience_ref: float | None = None
        self.bad_evals = 0
        self.tokens = 0
        self.trained_tokens = 0
        self.attention_pairs = 0.0  # see mlxpost.core.flops.causal_pairs
        self.train_seconds = 0.0
        self.history: list[dict] = []
        self.stopped: str | None = None  # set when the run ends
        self.last_loss: float | None = None  # the last reported training loss
        self.val: dict | None = None  # the last evaluation
        self.earlier_peak_gb = 0.0  # peak memory of the process that wrote the checkpoint resumed from
        self.monitor = (objective.monitor or HealthMonitor)(total_steps)
        self.monitor.stuck.window, self.monitor.stuck.after = cfg.stuck_steps, warmup_steps(cfg, total_steps)
        self._build_functions()

    # -- compiled pieces ------------------------------------------------------
    def _build_functions(self):
        model, opt, cfg = self.model, self.optimizer, self.cfg
        loss_fn = self.objective.loss

        def loss_on_arrays(model, arrays):
            loss_sum, count, metrics = loss_fn(model, batch_from_arrays(arrays))
            return loss_sum, (count, metrics)

        value_and_grad = nn.value_and_grad(model, loss_on_arrays)

        def micro(arrays, acc):
            (loss_sum, (count, metrics)), grads = value_and_grad(model, arrays)
            if acc is not None:
                grads = _sum_trees(acc["grads"], grads)
                loss_sum = loss_sum + acc["loss"]
                count = count + acc["count"]
                metrics = _sum_trees(acc["metrics"], metrics)
            return {"grads": grads, "loss": loss_sum, "count": count, "metrics": metrics}

        world = self.world if self.world_size > 1 else None

        def update(acc, tokens):
            # tokens: (2,) this rank's [input positions, trained positions] in the step.
            grads, count, loss, metrics = acc["grads"], acc["count"], acc["loss"], acc["metrics"]
            if world is not None:
                # Sum gradients, unit counts and metrics over ranks, then normalise once.
                grads = tree_map(lambda g: mx.distributed.all_sum(g, group=world), grads)
                count = mx.distributed.all_sum(count, group=world)
                loss = mx.distributed.all_sum(loss, group=world)
                metrics = tree_map(lambda m: mx.distributed.all_sum(m, group=world), metrics)
                tokens = mx.distributed.all_sum(tokens, group=world)
            denom = mx.maximum(count, 1.0)
            grads = tree_map(lambda g: g / denom, grads)
            if cfg.max_grad_norm:
                grads, gnorm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
            else:
                gnorm = mx.sqrt(sum(mx.sum(g * g) for _, g in tree_flatten(grads)))
            opt.update(model, grads)
            mean_loss = loss / denom
            ok = mx.isfinite(mean_loss) & mx.isfinite(gnorm)
            return {"loss": mean_loss, "grad_norm": gnorm, "ok": ok, "tokens": tokens,
                    "metrics": tree_map(lambda m: m / denom, metrics)}

        def evaluate(arrays):
            loss_sum, count, metrics = loss_fn(model, batch_from_arrays(arrays))
            return loss_sum, count, metrics

        tokens = self.objective.tokens

        def row_stats(arrays):
            # The loss at the model's log-probs (no gradient through the model), and its gradient with
            # respect to them: the cotangent each row's backward pass starts from.
            batch = batch_from_arrays(arrays)
            with kernels.no_grad_pass():
                tok = mx.stop_gradient(tokens(model, batch, grad=False, for_loss=True))

            def at(t):
                loss_sum, count, metrics = loss_fn(model, batch, tok=t)
                return loss_sum, (count, metrics)

            (loss_sum, (count, metrics)), g = mx.value_and_grad(at)(tok)
            return {"loss": loss_sum, "count": count, "metrics": metrics, "cotangent": g}

        row_value_and_grad = nn.value_and_grad(
            model, lambda model, arrays, g: (tokens(model, batch_from_arrays(arrays), grad=True) * g).sum())

        def row_grads(arrays, g, acc):
            _, grads = row_value_and_grad(model, arrays, g)
            return _sum_trees(acc, grads)

        state = [model.state, opt.state, mx.random.state]
        if cfg.compile:
            self._micro = mx.compile(micro, inputs=state, outputs=state)
            self._update = mx.compile(update, inputs=state, outputs=state)
            self._eval = mx.compile(evaluate, inputs=state, outputs=state)
            self._row_stats = mx.compile(row_stats, inputs=state, outputs=state)
            self._row_grads = mx.compile(row_grads, inputs=state, outputs=state)
        else:
            self._micro, self._update, self._eval = micro, update, evaluate
            self._row_stats, self._row_grads = row_stats, row_grads
        self._state = state

    def _micro_rows(self, batch: Batch, acc: dict | None) -> dict:
        """A micro-batch with one backward pass per row (``train.split_rows``): the peak memory of one row.

        The loss is a function of the rows' per-token log-probs, ``L(t_1, ..., t_B)``, so its gradient is
        ``sum_r (dL/dt_r) . dt_r/dtheta``: one forward pass without gradient gives every ``t_r`` and the
        cotangents ``dL/dt_r``; then each row's forward and backward pass alone, its log-probs weighted
        by its cotangent, adds its share. Exact (to float rounding) for a loss that couples the rows
        (a preference pair's two sides), at the cost of one more forward pass; LoRA dropout would draw
        different masks in the two passes, so the configuration forbids the two together.
        """
        stats = self._row_stats(batch.arrays())
        mx.eval(stats)
        grads = acc["grads"] if acc is not None else None
        for row, g in rows_apart(batch, stats["cotangent"]):
            grads = self._row_grads(row.arrays(), g, grads)
            mx.eval(grads)  # one row's graph at a time
        out = {"grads": grads, "loss": stats["loss"], "count": stats["count"], "metrics": stats["metrics"]}
        if acc is not None:
            out.update(loss=acc["loss"] + out["loss"], count=acc["count"] + out["count"],
                       metrics=_sum_trees(acc["metrics"], out["metrics"]))
        return out

    # -- evaluation -----------------------------------------------------------
    def evaluate(self, source: BatchSource | None, max_batches: int = -1) -> dict | None:
        """Validation loss (and metric means) over ``source``, summed over ranks.

        Every rank takes part in the reductions, also one whose share of the
        validation rows is empty.
        """
        if source is None:
            return None
        self.model.eval()
        total, count = mx.array(0.0), mx.array(0.0)
        sums = None
        n = 0
        source.load_state({"epoch": 0, "index": 0})
        for batch in source:
            loss_sum, c, metrics = self._eval(batch.arrays())
            total, count = total + loss_sum, count + c
            sums = _sum_trees(sums, metrics)
            mx.eval(total, count, sums)
            n += 1
            if 0 < max_batches <= n:
                break
        self.model.train()
        sums = sums or {}
        if self.world_size > 1:
            g = self.world
            total = mx.distributed.all_sum(total, group=g, stream=mx.cpu)
            count = mx.distributed.all_sum(count, group=g, stream=mx.cpu)
            everyone = mx.distributed.all_sum(mx.array(1 if n else 0), group=g, stream=mx.cpu).item()
            # Metric names are known only where batches ran: reduce them when all ranks had some.
            sums = ({k: mx.distributed.all_sum(v, group=g, stream=mx.cpu) for k, v in sorted(sums.items())}
                    if everyone == self.world_size else {})
        c = count.item()
        if c == 0:
            return None
        out = {"val_loss": total.item() / c}
        if self.objective.perplexity:
            out["val_ppl"] = math.exp(min(out["val_loss"], 50.0))
        for k, v in sums.items():
            out[f"val_{k}"] = v.item() / c
        return out

    # -- checkpoints ----------------------------------------------------------
    def trainer_state(self, source: BatchSource) -> dict:
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "data": source.state(),
            "seed": self.cfg.seed,
            "best_val": self.best_val,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "patience_ref": self.patience_ref,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "attention_pairs": self.attention_pairs,
            "train_seconds": self.train_seconds,
            "world_size": self.world_size,
            "stopped": self.stopped,
            "last_loss": self.last_loss,  # what a finished run's summary needs, should its end be cut short
            "val": self.val,
            "peak_memory_gb": self.peak_memory_gb(),
        }

    def peak_memory_gb(self) -> float:
        """The run's peak memory: this process's, or an interrupted earlier process's when that was higher."""
        return max(mx.get_peak_memory() / 1e9, self.earlier_peak_gb)

    def save(self, source: BatchSource) -> None:
        path = self.run.save_checkpoint(self.step, self.model, self.optimizer, self.adapter_cfg,
                                        self.trainer_state(source), keep=self.cfg.keep_checkpoints)
        self.reporter.event(f"checkpoint saved: {path.name}", step=self.step)

    def restore(self, path, source: BatchSource) -> None:
        state = load_checkpoint(path, self.model, self.optimizer)
        if state.get("world_size", 1) != self.world_size:
            raise MlxpostError(f"{path}: written by {state.get('world_size')} processes; resume with as many")
        self.step = state["step"]
        source.load_state(state["data"])
        self.best_val, self.best_step = state["best_val"], state["best_step"]
        self.bad_evals, self.patience_ref = state["bad_evals"], state["patience_ref"]
        self.tokens, self.trained_tokens = state["tokens"], state["trained_tokens"]
        self.train_seconds = state["train_seconds"]
        self.attention_pairs = state.get("attention_pairs", 0.0)  # checkpoints from before it was kept: 0
        self.stopped, self.last_loss, self.val = state.get("stopped"), state.get("last_loss"), state.get("val")
        self.earlier_peak_gb = state.get("peak_memory_gb") or 0.0

    @property
    def finished(self) -> bool:
        """Training is over: stopped early, or completed with no more steps to take (a resumed finished run)."""
        return self.stopped == "early_stopping" or (self.stopped is not None and self.step >= self.total_steps)

    # -- main loop ------------------------------------------------------------
    def fit(self, train_source: BatchSource, valid_source: BatchSource | None = None,
            resume_from=None) -> TrainResult:
        cfg, rep = self.cfg, self.reporter
        _wire_memory()
        if resume_from is not None:
            self._resume(resume_from, train_source)
            if self.finished:  # killed after its last checkpoint: only the final adapter is left to write
                return self._result()
        self.stopped, self.val = None, None
        self.model.train()
        batches: Iterator[Batch] = iter(train_source)
        stopped = "completed"
        window = _Window()
        rep.begin(self.total_steps, self.step, display=self.objective.display)
        if self.step == 0 and valid_source is not None and cfg.eval_at_start:
            self._validate(valid_source)

        while self.step < self.total_steps:
            out, used, dt = self._step(batches)
            # Host-side metrics of the batch source (online RL: rewards, lengths, rollout speed).
            host = dict(getattr(train_source, "last_metrics", None) or {})
            self._observe(out, host)
            window.add(out, dt)
            rep.advance(self.step)
            if self.step % cfg.report_every == 0 or self.step == self.total_steps or self.step == 1:
                self._report(window.metrics(out, host, train_source, self))
                window = _Window()
            last = self.step == self.total_steps
            stop = (valid_source is not None and cfg.eval_every > 0 and self.step % cfg.eval_every == 0
                    and not last and self._validate(valid_source))
            if self.measure is not None and cfg.measure_every > 0 and self.step % cfg.measure_every == 0 \
                    and not last:
                self._measure()
            if cfg.save_every > 0 and self.step % cfg.save_every == 0 and not last:
                self.save(train_source)
            if stop:
                stopped = "early_stopping"
                rep.event(f"early stopping: validation loss has not improved by more than "
                          f"{cfg.early_stopping_min_delta} for {self.bad_evals} evaluations "
                          f"(best {self.best_val:.4f} at step {self.best_step}, kept in best/)", step=self.step)
                break

        if stopped == "completed" and valid_source is not None:
            self._validate(valid_source)
        self.stopped = stopped
        self.save(train_source)  # marks training finished (trainer state "stopped"), before the final adapter
        return self._result()

    def _result(self) -> TrainResult:
        """Write the final adapter and sum the run up (also for a resumed run whose training had finished)."""
        self.run.save_final(self.model, self.adapter_cfg)
        val = self.val
        return TrainResult(
            steps=self.step, stopped=self.stopped, final_loss=self.last_loss, best_val_loss=self.best_val,
            best_step=self.best_step, val_loss=val["val_loss"] if val else None, tokens=self.tokens,
            trained_tokens=self.trained_tokens, train_seconds=self.train_seconds, attention_pairs=self.attention_pairs,
            peak_memory_gb=self.peak_memory_gb(), history=self.history, val_metrics=val,
            health=self.monitor.summary(val),
        )

    def _resume(self, checkpoint, source: BatchSource) -> None:
        """Continue from ``checkpoint``; the history and the health monitor are rebuilt from metrics.jsonl."""
        self.restore(checkpoint, source)
        what = "training had finished; completing the run" if self.finished else "training continues"
        self.run.log({"kind": "resume", "step": self.step, "checkpoint": checkpoint.name})
        self.reporter.event(f"resumed from {checkpoint.name} ({what})", step=self.step)
        records = records_until(self.run.read_metrics(), self.step)
        self.history = [r for r in records if r["kind"] in ("train", "eval")]
        for rec in records:
            if rec["kind"] == "step":
                self.monitor.observe(rec["step"], rec)
            elif rec["kind"] == "eval":
                self.monitor.observe_eval(rec["step"], rec)

    def _step(self, batches: Iterator[Batch]) -> tuple[dict, list[Batch], float]:
        """One optimizer step: ``grad_accum`` micro-batches, the update (each evaluated on its own). Returns its outputs."""
        t0 = time.perf_counter()
        # The random stream (LoRA dropout) restarts from (seed, step) at every
        # step, so a resumed run draws exactly what an uninterrupted one draws.
        mx.random.seed(self.cfg.seed * 1_000_003 + self.step)
        acc = None
        used: list[Batch] = []
        for i in range(self.cfg.grad_accum):
            batch = next(batches)
            used.append(batch)
            acc = self._micro_rows(batch, acc) if self.cfg.split_rows else self._micro(batch.arrays(), acc)
            # Bound memory to one micro-batch's graph, the last one's too: evaluated together with the
            # update, MLX allocated ahead and the peak grew by half the activations (Qwen2.5-0.5B's shapes,
            # checkpointed, 2 x 1024 positions: 4.03 GB against 3.07 GB).
            mx.eval(acc)
        local = mx.array([sum(b.n_tokens for b in used), sum(b.n_targets for b in used)], mx.float32)
        out = self._update(acc, local)
        mx.eval(self._state, out)
        dt = time.perf_counter() - t0
        self.step += 1
        out["n_tokens"], out["n_trained"] = (int(x) for x in out["tokens"].tolist())  # summed over ranks
        self.tokens += out["n_tokens"]
        self.trained_tokens += out["n_trained"]
        # Each sequence (a row, or an example packed in one) at the batch's mean sequence length; the other
        # ranks' taken as this one's.
        self.attention_pairs += self.world_size * sum(
            causal_pairs(b.n_tokens, max(b.n_examples, b.inputs.shape[0], 1)) for b in used)
        self.train_seconds += dt
        # Reading one flag that the eval above already computed costs no extra
        # sync, and stops a bad step before it can reach a checkpoint.
        if not out["ok"].item():
            self._non_finite(out["loss"].item(), out["grad_norm"].item(), used)
        return out, used, dt

    def _measure(self) -> None:
        """A held-out measurement in the middle of training (the model in evaluation mode meanwhile)."""
        was = self.model.training
        self.model.eval()
        try:
            found = self.measure(self.step)
        finally:
            if was:
                self.model.train()
        if found:
            record = {"step": self.step, **found}
            self.history.append({"kind": "heldout", **record})
            self.run.log({"kind": "heldout", **record})
            shown = ", ".join(f"{k} {v:.3f}" for k, v in found.items() if isinstance(v, float))
            self.reporter.event(f"held-out: {shown}", step=self.step)

    def _report(self, metrics: dict) -> None:
        self.last_loss = metrics["loss"]
        self.history.append({"kind": "train", "step": self.step, **metrics})
        self.run.log({"kind": "train", "step": self.step, **metrics})
        self.reporter.report(self.step, metrics)

    def _validate(self, source: BatchSource) -> bool:
        """Evaluate on ``source``, keep the best adapter, count patience; True when early stopping should stop."""
        cfg, t0 = self.cfg, time.perf_counter()
        self.reporter.event("evaluating", step=self.step, transient=True)
        val = self.evaluate(source, cfg.eval_batches)
        if val is None:
            return False
        self.val = val
        val["eval_seconds"] = round(time.perf_counter() - t0, 2)
        record = {"step": self.step, **val}
        self.history.append({"kind": "eval", **record})
        self.run.log({"kind": "eval", **record})
        # best/ keeps the lowest validation loss; patience counts evaluations
        # without an improvement of more than min_delta.
        v = val["val_loss"]
        improved = self.best_val is None or v < self.best_val
        if improved:
            self.best_val, self.best_step = v, self.step
            self.run.save_best(self.model, self.adapter_cfg, {"step": self.step, **val})
        if self.patience_ref is None or v < self.patience_ref - cfg.early_stopping_min_delta:
            self.patience_ref, self.bad_evals = v, 0
        else:
            self.bad_evals += 1
        self.reporter.eval(self.step, val, best=self.best_val, improved=improved)
        self._findings(self.monitor.observe_eval(self.step, val))
        return cfg.early_stopping_patience > 0 and self.bad_evals >= cfg.early_stopping_patience

    def _observe(self, out: dict, host: dict | None = None) -> None:
        """Give this step's metrics (already evaluated) to the health monitor; report what it finds."""
        m = {"loss": out["loss"].item(), "grad_norm": out["grad_norm"].item(),
             **{k: v.item() for k, v in out["metrics"].items()}, **(host or {})}
        # Kept so that a resumed run can replay the monitor's history.
        self.run.log({"kind": "step", "step": self.step, **m})
        self._findings(self.monitor.observe(self.step, m))

    def _findings(self, findings: list) -> None:
        """Show the health monitor's new findings live and log them."""
        for f in findings:
            self.reporter.warn(str(f))
            self.run.log({"kind": "health", "step": self.step, "check": f.check, "message": f.message,
                          "advice": f.advice})

    def _non_finite(self, loss: float, gnorm: float, used: list[Batch]) -> None:
        last = self.run.latest_checkpoint()
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        sources = sorted({s for b in used for s in (b.sources or [])})
        record = {
            "kind": "failure", "step": self.step, "reason": f"non-finite {what}", "loss": loss, "grad_norm": gnorm,
            "lr": float(self.optimizer.learning_rate.item()), "examples": sources[:50],
            "last_good_checkpoint": str(last) if last else None,
        }
        self.run.log(record)
        self.run.write_json("failure.json", record)
        hint = ("Try a lower learning rate (train.lr), gradient clipping (train.max_grad_norm), or float32 "
                "(model.dtype=float32); check the listed examples.")
        lower = f"{float(self.cfg.lr) / 10:.2g}"
        keep = (f"The last good checkpoint is {last}; resume from it with a lower learning rate (resuming "
                f"unchanged would diverge again): --resume {self.run.path} --set train.lr={lower}"
                if last else "No checkpoint had been written yet.")
        shown = ", ".join(sources[:5]) + (" ..." if len(sources) > 5 else "")
        raise NonFiniteError(
            f"non-finite {what} at step {self.step} (loss={loss}, grad_norm={gnorm}); "
            f"batch examples: {shown or 'unknown'}.\n{keep}\n{hint}")


def records_until(records: list[dict], step: int) -> list[dict]:
    """The step, train and eval records of metrics.jsonl up to ``step``, in step order, the last of each
    (kind, step) kept: a run resumed from an older checkpoint logged those steps twice.

    >>> records_until([{"kind": "step", "step": 1, "loss": 2.0}, {"kind": "step", "step": 2, "loss": 1.9},
    ...                {"kind": "step", "step": 1, "loss": 2.1}, {"kind": "eval", "step": 3}], 2)
    [{'kind': 'step', 'step': 1, 'loss': 2.1}, {'kind': 'step', 'step': 2, 'loss': 1.9}]
    """
    last = {}
    for r in records:
        if r.get("kind") in ("step", "train", "eval") and isinstance(r.get("step"), int) and r["step"] <= step:
            last[(r["kind"], r["step"])] = r
    return sorted(last.values(), key=lambda r: r["step"])


def steps_for_epochs(source: BatchSource, epochs: float, grad_accum: int) -> int:
    return max(1, int(math.ceil(source.batches_per_epoch() * epochs / grad_accum)))
