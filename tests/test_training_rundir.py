"""Run directories after crashes: what a kill in the middle of a save leaves behind."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from test_training_loop import make_cfg, trainer_for

from mlxpost.errors import MlxpostError
from mlxpost.training.rundir import RunDir, _replace_dir, load_checkpoint, new_run_dir


@pytest.fixture()
def trained(tmp_path, tiny_model, sft_data):
    cfg = make_cfg(tiny_model, sft_data, "train.steps=4", "train.save_every=2", "train.eval_every=2")
    prep, tr = trainer_for(cfg, tmp_path)
    tr.fit(prep.train, prep.valid)
    return tmp_path / "run", prep, tr


def test_half_written_checkpoint_is_ignored_and_cleaned(trained):
    run, _, _ = trained
    ckpts = run / "checkpoints"
    # A kill while writing step 6: the temporary directory has files but no trainer state.
    tmp = ckpts / ".tmp-step-0000006"
    tmp.mkdir()
    (tmp / "adapters.safetensors").write_bytes(b"partial")
    assert RunDir(run, writer=False).latest_checkpoint().name == "step-0000004"
    RunDir(run)  # a writer cleans up on start
    assert not tmp.exists()


def test_latest_pointer_to_a_missing_checkpoint_falls_back(trained):
    run, _, _ = trained
    (run / "checkpoints" / "latest").write_text("step-0000099")
    assert RunDir(run, writer=False).latest_checkpoint().name == "step-0000004"


def test_kill_between_the_renames_of_best_is_recovered(trained):
    run, _, _ = trained
    before = (run / "best" / "adapters.safetensors").read_bytes()
    (run / "best").rename(run / ".old-best")  # _replace_dir moved the old one away, then died
    RunDir(run)
    assert (run / "best" / "adapters.safetensors").read_bytes() == before
    assert not (run / ".old-best").exists()


def test_replace_dir_swaps_whole_directories(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_text("old")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "f").write_text("new")
    _replace_dir(tmp_path / "t", tmp_path / "a")
    assert (tmp_path / "a" / "f").read_text() == "new" and not (tmp_path / "t").exists()


def test_checkpoint_of_another_run_is_refused(trained, tmp_path, tiny_model, sft_data):
    run, _, _ = trained
    cfg = make_cfg(tiny_model, sft_data, "train.steps=4", "lora.targets=[q_proj]")
    prep, tr = trainer_for(cfg, tmp_path, name="other")
    with pytest.raises(MlxpostError, match="does not match this run"):
        load_checkpoint(run / "checkpoints" / "step-0000004", prep.loaded.model, tr.optimizer)


def test_checkpoint_holds_what_resume_needs(trained):
    run, _, tr = trained
    state = json.loads((run / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["stopped"] == "completed"
    assert set(state["data"]) == {"epoch", "index"}
    opt = mx.load(str(run / "checkpoints" / "step-0000004" / "optimizer.safetensors"))
    assert "step" in opt and any(k.endswith(".m") for k in opt) and any(k.endswith(".v") for k in opt)


def test_overwrite_only_replaces_run_directories(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "code.py").write_text("precious")
    with pytest.raises(MlxpostError, match="not an mlxpost run directory"):
        new_run_dir(tmp_path, "src", "sft", overwrite=True)
    assert (tmp_path / "src" / "code.py").exists()
    with pytest.raises(MlxpostError, match="exists; resume it"):
        new_run_dir(tmp_path, "src", "sft", overwrite=False)
