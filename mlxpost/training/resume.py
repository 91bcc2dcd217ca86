"""Continuing a run directory: which checkpoint, which settings may change, and what is left to do.

``--resume RUN`` continues from the newest checkpoint that verifies (see
:func:`mlxpost.training.rundir.verify_checkpoint`); a damaged one is said,
set aside and the next older one tried, so a run never trains on from a
damaged state. A run whose training finished but whose end (final adapter,
after-training samples or evaluation, summary) was cut short by a kill is
*finished*: the resume writes only what is missing. The configuration comes
from the run's config.yaml: a missing section or a setting that identifies
the run is an error, never a default (a setting added to mlxpost since the run
started takes its default, and the resume says so).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ..config import (
    RunConfig,
    check_complete,
    load_recipe,
    parse_set,
    set_value,
    validate,
)
from ..errors import ConfigError, MlxpostError
from .rundir import RunDir, verify_checkpoint

# Keys that may change when a run is resumed (everything else must match).
RESUMABLE_KEYS = ("train.steps", "train.epochs", "train.eval_every", "train.save_every", "train.report_every",
                  "train.early_stopping_patience", "train.early_stopping_min_delta", "train.keep_checkpoints",
                  "train.eval_batches", "sample.max_tokens", "train.attention_chunk", "train.stuck_steps")

# Keys that may also change after a non-finite stop: resuming with the settings that diverged would
# diverge again. (Any other time they would make the run differ from one that was never interrupted.)
AFTER_FAILURE_KEYS = ("train.lr", "train.schedule", "train.warmup_steps", "train.warmup_ratio",
                      "train.min_lr_ratio", "train.max_grad_norm")


def usable_checkpoint(rundir: RunDir, rep) -> tuple[Path, dict] | None:
    """The newest checkpoint whose files verify, and its trainer state; None when the run has none.

    A damaged checkpoint is reported, moved to ``checkpoints/damaged/`` and
    skipped; when every checkpoint is damaged the run cannot continue.
    """
    damaged = []
    for ckpt in rundir.checkpoints():
        state, problem = verify_checkpoint(ckpt)
        if problem is None:
            if damaged:
                rep.warn(f"resuming from {ckpt.name}, the newest intact checkpoint")
            return ckpt, state
        moved = rundir.set_aside(ckpt)
        damaged.append(f"{ckpt.name}: {problem}")
        rep.warn(f"checkpoint {ckpt.name} is damaged: {problem}; not using it"
                 + (f" (moved to {moved.relative_to(rundir.path)})" if moved else ""))
    if damaged:
        raise MlxpostError(f"no intact checkpoint in {rundir.path} ({'; '.join(damaged)}); the run cannot continue "
                           "(start it again with --overwrite)")
    return None


def summary_complete(rundir: RunDir, state: dict) -> bool:
    """Whether summary.json describes the end of the training in ``state`` (the last thing a run writes)."""
    summary = rundir.read_json("summary.json")
    return (isinstance(summary, dict) and summary.get("steps") == state["step"]
            and summary.get("stopped") == state.get("stopped"))


def resume_point(rundir: RunDir, steps: int, rep) -> tuple[Path, dict] | None:
    """The checkpoint to resume from and its trainer state (None: start afresh), or an error saying why the
    run cannot continue. A checkpoint whose training is done is returned when the run's end is incomplete."""
    found = usable_checkpoint(rundir, rep)
    if found is None:
        return None
    ckpt, state = found
    stopped = state.get("stopped")
    if stopped != "early_stopping" and state["step"] < steps:
        return ckpt, state
    if stopped is None:
        raise MlxpostError(f"{ckpt} is at step {state['step']}, beyond train.steps={steps}; resume with at least "
                           f"--set train.steps={state['step'] + 1}")
    if not summary_complete(rundir, state):
        return ckpt, state  # training finished, the end did not: the pipeline completes it
    if stopped == "early_stopping":
        raise MlxpostError(f"{rundir.path} stopped early at step {state['step']} (validation loss no longer "
                           "improved); its best adapter is in best/")
    raise MlxpostError(f"{rundir.path} already finished {state['step']} of {steps} steps "
                       "(raise train.steps with --set train.steps=N to train longer; the "
                       "learning-rate schedule is then stretched over the new length)")


def stopped_non_finite(run_dir: Path) -> bool:
    """Whether the run's last end was a non-finite stop (its summary says so, or it has only failure.json)."""
    summary = RunDir(run_dir, writer=False).read_json("summary.json")
    if isinstance(summary, dict):
        return summary.get("stopped") == "non_finite"
    return (Path(run_dir) / "failure.json").exists()


def read_run_config(run_dir: Path, warn=None) -> RunConfig:
    """The run's config.yaml, checked (see :func:`mlxpost.config.check_complete`); ``warn`` hears which
    settings it lacked and took their defaults."""
    f = Path(run_dir) / "config.yaml"
    if not f.exists():
        raise MlxpostError(f"{run_dir}: no config.yaml (not a run directory)")
    try:
        data = yaml.safe_load(f.read_bytes())
    except yaml.YAMLError:
        data = None
        load_recipe(f)  # raises with the line of the problem
    filled = check_complete(f, data)
    if filled and warn is not None:
        warn(f"{f} has no {', '.join(filled)} (settings added since the run started?): using the defaults")
    return load_recipe(f)


def resume_config(run_dir: Path, sets: list[str], warn=None) -> RunConfig:
    """The configuration a resumed run continues with: config.yaml, with the ``--set`` changes allowed now."""
    cfg = read_run_config(run_dir, warn)
    after_failure = stopped_non_finite(run_dir)
    allowed = RESUMABLE_KEYS + (AFTER_FAILURE_KEYS if after_failure else ())
    for item in sets:
        key, value = parse_set(item)
        if key in AFTER_FAILURE_KEYS and not after_failure:
            raise ConfigError(f"--set {item}: {key} may change when resuming only after a non-finite stop "
                              "(otherwise the resumed run would differ from one that was never interrupted)")
        if key not in allowed:
            raise ConfigError(f"--set {item}: {key} cannot change when resuming (only {', '.join(allowed)})")
        set_value(cfg, key, value, f"--set {item}", raw=item.split("=", 1)[1])
    validate(cfg)
    return cfg


def config_changes(old: dict, new: dict) -> dict[str, list]:
    """``{"section.key": [old, new]}`` for every setting that differs between two config dicts.

    >>> config_changes({"method": "sft", "train": {"lr": 0.001, "steps": 40}},
    ...                {"method": "sft", "train": {"lr": 0.0001, "steps": 40}})
    {'train.lr': [0.001, 0.0001]}
    """
    out = {}
    for section, values in new.items():
        if not isinstance(values, dict):
            continue
        before = old.get(section) if isinstance(old.get(section), dict) else {}
        for key, v in values.items():
            if before.get(key) != v:
                out[f"{section}.{key}"] = [before.get(key), v]
    return out
