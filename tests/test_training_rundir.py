"""Run directories after crashes: what a kill in the middle of a save leaves behind."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
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


# ---------------------------------------------------------------------------
# A run trained on top of others: its own adapter in own/, the stack for mlx-lm at the top
# ---------------------------------------------------------------------------

X = mx.array([[1, 5, 9, 13, 17, 21, 25, 3, 7]])


def _run(tmp_path, name, method, *sets):
    from mlxpost.config import build_config
    from mlxpost.training.pipeline import run
    from mlxpost.ui import NullReporter

    cfg = build_config(None, ["train.eval_every=2", "train.save_every=0", "train.eval_at_start=false",
                              "train.steps=4", f"output.dir={tmp_path}", f"output.name={name}", *sets], method=method)
    return run(cfg, reporter=NullReporter())[0]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model, sft_data, pref_data):
    """sft, dpo --from sft, dpo2 --from dpo: a stack of three LoRA adapters of different ranks, trained."""
    root = tmp_path_factory.mktemp("stack")
    sft = _run(root, "sft", "sft", f"model.path={tiny_model}", f"data.path={sft_data}", "train.lr=1e-2")
    dpo = _run(root, "dpo", "dpo", f"preference.from_run={sft}", f"data.path={pref_data}", "train.lr=1e-2",
               "lora.rank=4", "lora.targets=attention")
    dpo2 = _run(root, "dpo2", "dpo", f"preference.from_run={dpo}", f"data.path={pref_data}", "train.lr=1e-2",
                "lora.rank=2", "lora.num_layers=1")
    return root, sft, dpo, dpo2


def _mlxpost_logits(base, adapter):
    from mlxpost.model.adapters import load_adapter_stack
    from mlxpost.model.load import load_model

    lm = load_model(str(base))
    load_adapter_stack(lm.model, adapter)
    return np.array(lm.model(X)), lm


def _mlx_lm(base, adapter):
    from mlx_lm.utils import load as mlx_lm_load  # mlx-lm's own loader, as mlx_lm.generate --adapter-path uses it

    return mlx_lm_load(str(base), adapter_path=str(adapter))


def test_a_stacked_run_keeps_its_own_adapter_and_the_stack_for_mlx_lm(stack):
    from mlxpost.files import file_sha256

    root, sft, dpo, dpo2 = stack
    assert not (sft / "own").exists() and (sft / "adapter_config.json").exists()  # not stacked: as before
    for run, parent in ((dpo, sft), (dpo2, dpo)):
        own = json.loads((run / "own" / "adapter_config.json").read_text())["mlxpost"]
        assert own["from_adapter"] == str(parent.resolve())
        parent_own = parent / "own" if (parent / "own").exists() else parent
        assert own["from_adapter_sha256"] == file_sha256(parent_own / "adapters.safetensors")
        top = json.loads((run / "adapter_config.json").read_text())
        assert "from_adapter" not in top["mlxpost"] and top["fine_tune_type"] == "lora"
    top = json.loads((dpo2 / "adapter_config.json").read_text())
    assert top["mlxpost"]["stacked_from"] == [str(sft.resolve()), str((dpo / "own").resolve()),
                                              str((dpo2 / "own").resolve())]
    assert top["lora_parameters"]["rank"] == 8 + 4 + 2 and top["num_layers"] == 2
    # best/ has the same layout (mlx-lm can load it too)
    assert (dpo2 / "best" / "own" / "adapter_config.json").exists() and (dpo2 / "best" / "adapters.safetensors").exists()


def test_mlx_lm_loads_a_stacked_run_as_mlxpost_rebuilds_it(stack, tiny_model):
    root, sft, dpo, dpo2 = stack
    for run in (dpo, dpo2, dpo2 / "best"):
        want, _ = _mlxpost_logits(tiny_model, run)
        model, _ = _mlx_lm(tiny_model, run)
        assert np.abs(np.array(model(X)) - want).max() < 1e-4, run
        # The stack matters: the run's own adapter alone (what mlx-lm loaded before) is another model.
        own_only, _ = _mlx_lm(tiny_model, run / "own")
        assert np.abs(np.array(own_only(X)) - want).max() > 1e-3, run
    # And the text: mlx_lm.generate's greedy reply equals mlxpost generate's.
    from click.testing import CliRunner
    from mlx_lm.generate import generate

    from mlxpost.cli.tools import generate as generate_command
    from mlxpost.data.render import prompt_ids

    model, tokenizer = _mlx_lm(tiny_model, dpo2)
    theirs = generate(model, tokenizer, prompt=prompt_ids(tokenizer, "What is 2 plus 3?"), max_tokens=12)
    ours = CliRunner().invoke(generate_command, ["--adapter", str(dpo2), "-p", "What is 2 plus 3?",
                                                 "--max-tokens", "12"])
    assert ours.exit_code == 0, ours.output
    assert ours.output.strip() == theirs.strip() and theirs.strip()


def test_the_stack_at_the_top_is_what_export_mlx_writes_and_chains_read_own(stack, tmp_path, tiny_model):
    from mlxpost.hub.export import export
    from mlxpost.hub.source import find_source

    root, sft, dpo, dpo2 = stack
    export(dpo2, "mlx", tmp_path / "mlx")
    a, b = mx.load(str(tmp_path / "mlx" / "adapters.safetensors")), mx.load(str(dpo2 / "adapters.safetensors"))
    assert sorted(a) == sorted(b) and all(mx.array_equal(a[k], b[k]).item() for k in a)
    src = find_source(dpo2)
    assert src.adapter_dir == dpo2 / "own" and src.run_dir == dpo2 and src.metrics["method"] == "dpo"
    assert find_source(dpo2, best=True).adapter_dir == dpo2 / "best" / "own"


def test_a_stack_mlx_lm_cannot_hold_leaves_no_adapter_at_the_top(tmp_path, tiny_model, sft_data, pref_data):
    sft = _run(tmp_path, "sft", "sft", f"model.path={tiny_model}", f"data.path={sft_data}", "lora.type=dora",
               "train.steps=2")
    dpo = _run(tmp_path, "dpo", "dpo", f"preference.from_run={sft}", f"data.path={pref_data}", "train.steps=2")
    assert (dpo / "own" / "adapters.safetensors").exists()
    assert not (dpo / "adapter_config.json").exists() and not (dpo / "adapters.safetensors").exists()
    notes = [r for r in RunDir(dpo, writer=False).read_metrics() if r["kind"] == "mlx_lm"]
    assert len(notes) == 1 and "DoRA" in notes[0]["message"]
    _mlxpost_logits(tiny_model, dpo)  # mlxpost still rebuilds it
    from mlxpost.cli.train import try_it

    assert "mlx-lm cannot load this stack" in try_it(dpo) and "--format fused" in try_it(dpo)
