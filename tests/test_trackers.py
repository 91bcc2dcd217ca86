"""--report-to: every metrics.jsonl number goes to the tracker (tensorboard read back; others faked)."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
from conftest import mlxpost_env

from mlxpost.errors import MlxpostError
from mlxpost.training.trackers import open_tracker, require_tracker, scalars


def test_tensorboard_events_hold_every_metric_and_the_config(tmp_path, tiny_model, sft_data):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = subprocess.run([sys.executable, "-m", "mlxpost", "sft", "--model", str(tiny_model), "--data", str(sft_data),
                          "--steps", "4", "--out", str(tmp_path), "--name", "r", "--report-to", "tensorboard",
                          "--set", "train.eval_every=2", "--set", "train.report_every=1"],
                         capture_output=True, text=True, env=mlxpost_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    run = tmp_path / "r"
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 4
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert got == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in train]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [e.step for e in acc.Scalars("eval/val_loss")] == [r["step"] for r in evals]
    expected = set()
    for r in records:
        expected |= set(scalars(r))
    assert expected <= set(acc.Tags()["scalars"])  # every number of metrics.jsonl is there
    config = acc.Tensors("config")[0].tensor_proto.string_val[0].decode()
    assert "report_to: tensorboard" in config and "steps: 4" in config


def test_missing_tracker_package_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(MlxpostError, match=r"'wandb' package is not installed \(pip install wandb\)"):
        require_tracker("wandb")
    with pytest.raises(MlxpostError, match="must be one of"):
        require_tracker("comet")
    assert open_tracker("none", tmp_path, {}) is None


def test_wandb_like_and_mlflow_trackers_get_steps_and_config(monkeypatch, tmp_path):
    calls = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw["project"], kw["name"], kw["config"]))
    fake.log = lambda values, step: calls.append(("log", values, step))
    fake.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    t = open_tracker("wandb", tmp_path / "run-1", {"train": {"lr": 0.1}})
    t.log({"kind": "train", "step": 2, "loss": 1.5, "time": 9.0})
    t.log({"kind": "end", "stage": "x"})  # nothing numeric: not sent
    t.close()
    assert calls == [("init", "mlxpost", "run-1", {"train": {"lr": 0.1}}), ("log", {"train/loss": 1.5}, 2),
                     ("finish",)]

    mcalls = []
    ml = types.ModuleType("mlflow")
    ml.start_run = lambda run_name: mcalls.append(("start", run_name))
    ml.log_params = lambda p: mcalls.append(("params", p))
    ml.log_metrics = lambda m, step: mcalls.append(("metrics", m, step))
    ml.end_run = lambda: mcalls.append(("end",))
    monkeypatch.setitem(sys.modules, "mlflow", ml)
    t = open_tracker("mlflow", tmp_path / "run-2", {"train": {"lr": 0.1, "steps": None}})
    t.log({"kind": "eval", "step": 5, "val_loss": 2.0})
    t.close()
    assert mcalls == [("start", "run-2"), ("params", {"train.lr": "0.1", "train.steps": "None"}),
                      ("metrics", {"eval/val_loss": 2.0}, 5), ("end",)]
