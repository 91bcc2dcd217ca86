"""Experiment trackers (``--report-to``): every metric that metrics.jsonl holds, also sent elsewhere.

The run directory's :meth:`~mlxpost.training.rundir.RunDir.log` is the one
place every record passes through (train reports, evaluations, steps,
held-out measurements, health events), so the trackers hang there: each
record's numbers go to the tracker as ``<kind>/<field>`` at the record's
step, e.g. ``train/loss`` or ``eval/val_loss``. The resolved configuration is
logged once as hyperparameters.

- ``tensorboard``: event files under ``RUN_DIR/tensorboard`` written with the
  ``tensorboard`` package's own event writer and protos (no TensorFlow or
  PyTorch needed); the configuration as a text summary (``config``, shown in
  TensorBoard's Text tab) because the hparams plugin's writer needs
  TensorFlow. ``pip install tensorboard``.
- ``wandb``, ``trackio`` (``init`` / ``log`` / ``finish``) and ``mlflow``
  (``start_run`` / ``log_params`` / ``log_metrics`` / ``end_run``): used when
  installed; otherwise the run stops before training with a message naming
  the package to install.

Only the process that writes the run directory (rank 0) reports.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import yaml

from ..errors import MlxpostError

TRACKERS = ("none", "tensorboard", "wandb", "trackio", "mlflow")

# The pip package each tracker needs (mlflow's light client is enough).
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}

_SKIP = ("time", "step", "kind")


def scalars(record: dict) -> dict[str, float]:
    """The finite numbers of a metrics.jsonl record, as ``kind/field`` (nested dicts: ``kind/field/sub``).

    >>> scalars({"kind": "train", "step": 3, "time": 1.0, "loss": 2.5, "lr": 1e-4, "ok": True,
    ...          "note": "x", "data": {"rows": 7}, "bad": float("nan")})
    {'train/loss': 2.5, 'train/lr': 0.0001, 'train/data/rows': 7.0}
    """
    kind = record.get("kind", "log")
    out: dict[str, float] = {}

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, bool):
            return
        if isinstance(value, (int, float)):
            if math.isfinite(value):
                out[prefix] = float(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                add(f"{prefix}/{k}", v)

    for key, value in record.items():
        if key not in _SKIP:
            add(f"{kind}/{key}", value)
    return out


def flat_config(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"train.lr": 2e-4, ...}`` (lists as text), for hyperparameter tables.

    >>> flat_config({"train": {"lr": 0.1, "steps": None}, "lora": {"targets": ["q", "v"]}})
    {'train.lr': 0.1, 'train.steps': 'None', 'lora.targets': "['q', 'v']"}
    """
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class Tracker:
    """One experiment tracker: ``log`` gets every metrics.jsonl record, ``close`` ends the run."""

    step = 0

    def log(self, record: dict) -> None:
        values = scalars(record)
        if isinstance(record.get("step"), int):
            self.step = record["step"]
        if values:
            self.write(values, self.step)

    def write(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Scalars and the configuration (as text) in TensorBoard event files under ``logdir``."""

    def __init__(self, logdir: Path, config: dict):
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2  # optional extra
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._pb = (event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2)
        logdir.mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(logdir))
        text = yaml.safe_dump(config, sort_keys=False).encode()
        meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
        tensor = tensor_pb2.TensorProto(dtype=7, string_val=[text],  # 7: DT_STRING
                                        tensor_shape=tensor_shape_pb2.TensorShapeProto(
                                            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]))
        self._event(summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag="config", metadata=meta,
                                                                         tensor=tensor)]), 0)

    def _event(self, summary, step: int) -> None:
        self._writer.add_event(self._pb[0].Event(wall_time=time.time(), step=step, summary=summary))

    def write(self, values: dict[str, float], step: int) -> None:
        summary_pb2 = self._pb[1]
        self._event(summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=v)
                                               for k, v in values.items()]), step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbLikeTracker(Tracker):
    """wandb or trackio: the same ``init(project, name, config)`` / ``log(dict, step)`` / ``finish()``."""

    def __init__(self, module, project: str, name: str, config: dict, run_dir: Path):
        self._m = module
        kwargs = {"dir": str(run_dir)} if module.__name__ == "wandb" else {}
        module.init(project=project, name=name, config=config, **kwargs)

    def write(self, values: dict[str, float], step: int) -> None:
        self._m.log(values, step=step)

    def close(self) -> None:
        self._m.finish()


class MlflowTracker(Tracker):
    def __init__(self, module, name: str, config: dict):
        self._m = module
        module.start_run(run_name=name)
        module.log_params({k[:250]: str(v)[:500] for k, v in flat_config(config).items()})  # mlflow's limits

    def write(self, values: dict[str, float], step: int) -> None:
        # mlflow metric names allow only [A-Za-z0-9_./ -].
        self._m.log_metrics({k.replace(":", "_"): v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self._m.end_run()


def _import(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise MlxpostError(f"--report-to {name}: the '{PACKAGES[name]}' package is not installed "
                           f"(pip install {PACKAGES[name]}), or choose another tracker or none") from None


def require_tracker(kind: str | None) -> None:
    """Stop with a clear message when ``kind``'s package is not installed."""
    if kind not in (None, "none"):
        if kind not in TRACKERS:
            raise MlxpostError(f"--report-to must be one of {', '.join(TRACKERS)}; got {kind!r}")
        _import(kind)


def open_tracker(kind: str | None, run_dir: Path, config: dict, *, project: str = "mlxpost") -> Tracker | None:
    """The tracker ``kind`` (one of :data:`TRACKERS`) for the run in ``run_dir``; None for none."""
    require_tracker(kind)
    if kind in (None, "none"):
        return None
    if kind == "tensorboard":
        return TensorBoardTracker(run_dir / "tensorboard", config)
    module = _import(kind)
    if kind == "mlflow":
        return MlflowTracker(module, run_dir.name, config)
    return WandbLikeTracker(module, project, run_dir.name, config, run_dir)
