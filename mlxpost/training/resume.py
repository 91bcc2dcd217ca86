"""Continuing a run directory: which checkpoint, and which settings may change."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import RunConfig, load_recipe, parse_set, set_value, validate
from ..errors import ConfigError, MlxpostError
from .rundir import RunDir

# Keys that may change when a run is resumed (everything else must match).
RESUMABLE_KEYS = ("train.steps", "train.epochs", "train.eval_every", "train.save_every", "train.report_every",
                  "train.early_stopping_patience", "train.early_stopping_min_delta", "train.keep_checkpoints",
                  "train.eval_batches", "sample.max_tokens", "train.attention_chunk")


def checkpoint_step(ckpt: Path | None) -> int:
    return json.loads((ckpt / "trainer_state.json").read_text())["step"] if ckpt else -1


def resume_point(rundir: RunDir, steps: int) -> Path | None:
    """The checkpoint to resume from, or an error saying why the run cannot continue."""
    ckpt = rundir.latest_checkpoint()
    if ckpt is None:
        return None
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if state.get("stopped") == "early_stopping":
        raise MlxpostError(f"{rundir.path} stopped early at step {state['step']} (validation loss no longer "
                           "improved); its best adapter is in best/")
    if state["step"] >= steps:
        raise MlxpostError(f"{rundir.path} already finished {state['step']} of {steps} steps "
                           "(raise train.steps with --set train.steps=N to train longer; the "
                           "learning-rate schedule is then stretched over the new length)")
    return ckpt


def resume_config(run_dir: Path, sets: list[str]) -> RunConfig:
    f = run_dir / "config.yaml"
    if not f.exists():
        raise MlxpostError(f"{run_dir}: no config.yaml (not a run directory)")
    cfg = load_recipe(f)
    for item in sets:
        key, value = parse_set(item)
        if key not in RESUMABLE_KEYS:
            raise ConfigError(f"--set {item}: {key} cannot change when resuming (only {', '.join(RESUMABLE_KEYS)})")
        set_value(cfg, key, value, f"--set {item}", raw=item.split("=", 1)[1])
    validate(cfg)
    return cfg
