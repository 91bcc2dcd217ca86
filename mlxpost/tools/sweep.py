"""Ablation sweeps: one base configuration, a grid of overrides, every point an ordinary run.

``mlxpost ablate --config recipe.yaml --grid lora.rank=4,8,16 --grid dpo.beta=0.05,0.1 --seeds 3``
expands the cartesian product of the grid (or ``--random N`` points of it,
drawn without replacement), times the seeds, checks every point's
configuration before anything runs, and trains the points one after the
other in this process. The sweep directory holds ``sweep.json`` (the grid,
the points, their overrides, run names and status, rewritten atomically at
every change of status) and one ordinary run directory per point::

    runs/sweep-20261122-101500/
      sweep.json
      r04-b0.05-s0/      config.yaml, metrics.jsonl, adapters, summary.json, ...
      r04-b0.05-s1/
      ...

A point that fails (bad data for that setting, a non-finite loss, any
exception) is recorded with its reason and the sweep goes on; Ctrl-C marks
the running point interrupted and stops. ``--resume SWEEP_DIR`` runs only
what is missing: finished points are skipped, an interrupted or failed point
continues from its last checkpoint when it has one and starts over
otherwise.

Work shared between points (:class:`RunCache`): the base model is loaded
once; every run gets it back with the weights and module tree it had right
after loading (adapters of the previous run removed), and tokenized data is
kept by (files, tokenizer, data settings). Reference log-probs
(``--precompute-ref``) are cached on disk already (:mod:`mlxpost.methods.reference`).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx

from ..config import RunConfig
from ..errors import ConfigError, MlxpostError
from ..files import atomic_write_json
from ..training.loop import NonFiniteError
from ..training.pipeline import run as runner_run
from ..training.resume import resume_config
from ..training.rundir import RunDir
from ..ui import PlainReporter
from .compare import run_verdict
from .run_cache import RunCache
from .sweep_plan import Point, SweepPlan, _jsonable, config_from_dict, grid_size

SWEEP_FILE = "sweep.json"

STATUSES = ("pending", "running", "done", "failed", "interrupted")


class PlainView:
    """The sweep as lines: a point starts, a point ends (the run's own lines come from its reporter)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.sweep: Sweep | None = None

    def _print(self, msg: str) -> None:
        print(msg, file=self.stream, flush=True)

    def start(self, sweep: "Sweep") -> None:
        self.sweep = sweep
        todo = sum(p.status != "done" for p in sweep.points)
        self._print(f"sweep {sweep.path}: {len(sweep.points)} points, {todo} to run")

    def point_started(self, p: Point) -> None:
        n = len(self.sweep.points) if self.sweep else "?"
        self._print(f"[{p.index + 1}/{n}] {p.name}: started ({p.label})")

    def update(self, p: Point) -> None: ...

    def point_finished(self, p: Point) -> None:
        n = len(self.sweep.points) if self.sweep else "?"
        extra = f" in {p.seconds:.1f}s" if p.seconds is not None else ""
        self._print(f"[{p.index + 1}/{n}] {p.name}: {p.status}{extra}: {p.verdict or p.reason or ''}")

    def log(self, msg: str) -> None:
        self._print(msg)

    def stop(self) -> None: ...


class _Prefixed:
    """Plain lines of one point's run, prefixed with the point's name."""

    def __init__(self, name: str, stream=None):
        class Reporter(PlainReporter):
            def _print(self, msg: str) -> None:
                for line in str(msg).splitlines() or [""]:
                    super()._print(f"[{name}] {line}")

        self.reporter = Reporter(stream)

    def __getattr__(self, item):
        return getattr(self.reporter, item)


class ViewOnlyReporter:
    """For the live table: the run says nothing itself; its warnings and errors go to the view."""

    def __init__(self, view, name: str):
        self.view, self.name = view, name

    def __getattr__(self, item):  # info, tables, samples, progress: shown by the table, not here
        return lambda *a, **k: None

    def status(self, msg: str):
        return contextlib.nullcontext()

    def warn(self, msg: str) -> None:
        self.view.log(f"[{self.name}] warning: {msg}")

    def error(self, msg: str) -> None:
        self.view.log(f"[{self.name}] error: {msg}")


class PointReporter:
    """Wraps the reporter of one point's run: forwards every call, and keeps the point's progress."""

    def __init__(self, inner, point: Point, view):
        self.inner, self.point, self.view = inner, point, view
        self._last = 0.0

    def __getattr__(self, item):
        return getattr(self.inner, item)

    def _changed(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last > 0.2:
            self._last = now
            self.view.update(self.point)

    def begin(self, total: int, start: int = 0, display: tuple = ()) -> None:
        self.point.total, self.point.step = total, start
        self.inner.begin(total, start, display)
        self._changed(force=True)

    def advance(self, step: int) -> None:
        self.point.step = step
        self.inner.advance(step)
        self._changed()

    def report(self, step: int, metrics: dict) -> None:
        self.point.step = step
        if metrics.get("loss") is not None:
            self.point.loss = float(metrics["loss"])
        self.inner.report(step, metrics)
        self._changed(force=True)

    def eval(self, step: int, val: dict, best: float | None = None, improved: bool = False) -> None:
        self.point.val_loss = val.get("val_loss")
        self.point.best_val = best
        self.inner.eval(step, val, best=best, improved=improved)
        self._changed(force=True)

    def warn(self, msg: str) -> None:
        self.point.warnings += 1
        self.inner.warn(msg)


class SweepInterrupted(Exception):
    pass


def _first_line(text: str, limit: int = 300) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


class Sweep:
    def __init__(self, path: Path, meta: dict, points: list[Point]):
        self.path = Path(path)
        self.meta = meta
        self.points = points

    # -- creation and storage ------------------------------------------------
    @classmethod
    def create(cls, plan: SweepPlan, out: str | Path | None = None, name: str | None = None) -> "Sweep":
        root = Path(out) if out else Path(plan.base.output.dir)
        name = name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
        if "/" in name or name in (".", ".."):
            raise ConfigError(f"--name {name}: a directory name, not a path (use --out for the parent)")
        path = root / name
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            hint = f"resume it with --resume {path}" if (path / SWEEP_FILE).exists() else "pick another --name"
            raise MlxpostError(f"{path} exists; {hint}")
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "kind": "mlxpost-sweep", "version": 1, "name": name, "method": plan.method,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "status": "pending",
            "recipe": plan.recipe, "sets": plan.sets, "cli": plan.cli,
            "grid": {a.key: [_jsonable(v) for v in a.values] for a in plan.axes},
            "grid_options": [a.option for a in plan.axes], "seeds": plan.seeds,
            "random": plan.random_n, "random_seed": plan.random_seed, "grid_size": grid_size(plan.axes),
        }
        sweep = cls(path, meta, plan.points)
        sweep.save()
        return sweep

    @classmethod
    def load(cls, path: str | Path) -> "Sweep":
        path = Path(path)
        f = path / SWEEP_FILE
        if not f.exists():
            raise MlxpostError(f"{path}: no {SWEEP_FILE} (not a sweep directory)")
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise MlxpostError(f"{f}:{e.lineno}: not valid JSON ({e.msg})") from None
        if data.get("kind") != "mlxpost-sweep":
            raise MlxpostError(f"{f}: not an mlxpost sweep file")
        points = [Point.from_json(p) for p in data.pop("points")]
        return cls(path, data, points)

    def save(self) -> None:
        self.meta["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_json(self.path / SWEEP_FILE, {**self.meta, "points": [p.to_json() for p in self.points]})

    def run_dir(self, p: Point) -> Path:
        return self.path / p.name

    def counts(self) -> dict:
        return {s: sum(p.status == s for p in self.points) for s in STATUSES}

    def exit_code(self) -> int:
        c = self.counts()
        if c["interrupted"] or self.meta.get("status") == "interrupted":
            return 130
        if c["failed"]:
            return 1
        return 0 if c["done"] == len(self.points) else 1

    # -- running --------------------------------------------------------------
    def _point_config(self, p: Point, restart: bool) -> RunConfig:
        cfg = config_from_dict(p.config, f"{self.path / SWEEP_FILE} ({p.name})")
        cfg.output.dir = str(self.path)
        cfg.output.name = p.name
        cfg.output.overwrite = restart
        return cfg

    def _how_to_start(self, p: Point) -> tuple[str, Path | None]:
        """``fresh``, ``restart`` (a run directory without a usable checkpoint), ``resume`` or ``finished``."""
        d = self.run_dir(p)
        if not d.exists() or not any(d.iterdir()):
            return "fresh", None
        summary = d / "summary.json"
        if summary.exists():
            try:
                s = json.loads(summary.read_text())
            except json.JSONDecodeError:
                s = {}
            if s.get("stopped") in ("completed", "early_stopping"):
                return "finished", None
        if not (d / "config.yaml").exists() or not RunDir(d, writer=False).checkpoints():
            return "restart", None
        # A checkpoint: continue from it (a damaged one is skipped by the resume; a run trained to the
        # end but killed before its summary only has its end written).
        return "resume", d

    def run(self, *, view=None, inner_reporter: Callable[[Point], Any] | None = None,
            cache: RunCache | None = None, run_fn: Callable | None = None) -> int:
        """Run every point that is not done; returns the exit code (0 all done, 1 some failed, 130 interrupted).

        ``inner_reporter(point)``: the reporter the point's run talks to
        (wrapped to track progress); default: the view's choice.
        ``run_fn``: :func:`mlxpost.training.pipeline.run` (tests may wrap it).
        """
        if mx.distributed.init().size() > 1:
            raise MlxpostError("a sweep runs in one process; start it without mpirun / mlx.launch")
        run_fn = run_fn or runner_run
        view = view or PlainView()
        cache = cache if cache is not None else RunCache()
        if inner_reporter is None:
            inner_reporter = getattr(view, "reporter_for", None) or (lambda p: _Prefixed(p.name))
        self.meta["status"] = "running"
        self.save()
        view.start(self)
        try:
            for p in self.points:
                if p.status == "done":
                    continue
                self._run_point(p, view, inner_reporter, cache, run_fn)
        except (SweepInterrupted, KeyboardInterrupt):
            for p in self.points:  # Ctrl-C outside a run (between points): nothing half-done is left "running"
                if p.status == "running":
                    p.status, p.reason, p.exit_code = "interrupted", "interrupted (Ctrl-C)", 130
            self.meta["status"] = "interrupted"
        else:
            self.meta["status"] = "done" if self.exit_code() == 0 else "failed"
        finally:
            self.save()
            view.stop()
        return self.exit_code()

    def _run_point(self, p: Point, view, inner_reporter, cache: RunCache, run_fn) -> None:
        how, resume = self._how_to_start(p)
        if how == "finished":  # finished, but the sweep was stopped before it could say so
            p.status, p.reason = "done", None
            p.verdict = point_verdict(p, self.run_dir(p))
            self.save()
            view.point_finished(p)
            return
        p.status, p.reason, p.error_type, p.exit_code, p.traceback = "running", None, None, None, None
        p.started, p.finished, p.seconds = time.time(), None, None
        p.attempts += 1
        p.step, p.loss, p.val_loss, p.best_val, p.warnings = 0, None, None, None, 0
        self.save()
        view.point_started(p)
        rep = PointReporter(inner_reporter(p), p, view)
        try:
            if how == "resume":
                rep.info(f"continuing {resume} from its last checkpoint")
                cfg = resume_config(resume, [])
            else:
                cfg = self._point_config(p, restart=how == "restart")
            mx.reset_peak_memory()  # the summary's peak memory is this run's, not the process's
            run_fn(cfg, reporter=rep, resume=resume, cache=cache)
        except KeyboardInterrupt:
            p.status = "interrupted"
            p.reason = f"interrupted (Ctrl-C) at step {p.step}" + (f" of {p.total}" if p.total else "")
            p.exit_code = 130
            self._finish(p, view)
            raise SweepInterrupted from None
        except NonFiniteError as e:
            self._failed(p, e, 3)
        except MlxpostError as e:
            self._failed(p, e, 2)
        except Exception as e:  # noqa: BLE001 - one point's bug must not end the sweep; recorded below
            self._failed(p, e, 1, tb=traceback.format_exc())
        else:
            p.status, p.exit_code = "done", 0
        finally:
            mx.clear_cache()
        if p.status != "interrupted":
            self._finish(p, view)

    def _failed(self, p: Point, e: BaseException, code: int, tb: str | None = None) -> None:
        p.status, p.exit_code, p.error_type = "failed", code, type(e).__name__
        msg = _first_line(str(e)) or type(e).__name__
        p.reason = msg if isinstance(e, MlxpostError) else f"{type(e).__name__}: {msg}"
        if tb:
            p.traceback = tb[-4000:]

    def _finish(self, p: Point, view) -> None:
        p.finished = time.time()
        p.seconds = round(p.finished - (p.started or p.finished), 1)
        p.verdict = point_verdict(p, self.run_dir(p))
        self.save()
        view.point_finished(p)


def point_verdict(p: Point, run_dir: Path) -> str:
    summary = None
    f = run_dir / "summary.json"
    if f.exists():
        try:
            summary = json.loads(f.read_text())
        except json.JSONDecodeError:
            summary = None
    return run_verdict(summary, status=p.status, reason=p.reason, run_dir=run_dir)
