"""The FLOP model (mlxpost.core.flops) on a tiny llama: hand counts, LoRA vs full, checkpointing."""

from __future__ import annotations

import json

import pytest

from mlxpost.core.flops import causal_pairs, flop_model, mfu, step_flops
from mlxpost.model.adapters import attach_adapters
from mlxpost.model.load import load_model

# build_tiny_model's defaults: hidden 64, 2 blocks, 4 heads of 16, 2 kv heads, mlp 128, vocab 512, tied.
D, LAYERS, KV, FF, V = 64, 2, 32, 128, 512
BLOCK = 2 * (D * D + D * KV + D * KV + D * D + 3 * D * FF)  # q, k, v, o, gate, up, down: forward per token
HEAD = 2 * D * V


@pytest.fixture()
def model(tiny_model):
    return load_model(str(tiny_model), dtype="float32").model


def test_full_finetune_hand_count(model):
    fm = flop_model(model)
    assert fm.n_layers == LAYERS and fm.attn_dim == D and fm.first_trained_block == 0
    T, H, P = 40, 10, causal_pairs(40, 4)
    f = step_flops(fm, T, H, P)
    attn = 4 * D * P
    assert f["forward"] == LAYERS * (BLOCK * T + attn) + HEAD * H
    # every weight trained (the tied head too): 2x forward backward, attention 2x
    assert f["backward"] == LAYERS * (2 * BLOCK * T + 2 * attn) + 2 * HEAD * H
    assert f["model"] == f["hardware"]
    # the 6 N T rule with every position through the head and no attention bounds it from below
    n_matmul = LAYERS * BLOCK // 2 + D * V
    assert step_flops(fm, T, T, 0)["model"] == 6 * n_matmul * T


def test_lora_counts_frozen_backward_once(model):
    attach_adapters(model, rank=4, scale=2.0, keys=["self_attn.q_proj", "self_attn.v_proj"], num_layers=1)
    fm = flop_model(model)
    assert fm.first_trained_block == 1
    T, H, P = 40, 10, 100
    f = step_flops(fm, T, H, P)
    lora = 2 * (D * 4 + 4 * D) + 2 * (D * 4 + 4 * KV)  # q and v adapters' forward per token
    attn = 4 * D * P
    assert f["forward"] == LAYERS * (BLOCK * T + attn) + lora * T + HEAD * H
    # block 0: no backward; block 1: input gradients of the frozen weights (1x), adapters 2x; head input grad
    assert f["backward"] == BLOCK * T + 2 * lora * T + 2 * attn + HEAD * H
    model.unfreeze()  # everything trained: full fine-tuning of the same tree costs more
    assert f["model"] < step_flops(flop_model(model), T, H, P)["model"]


def test_checkpointing_is_hardware_only(model):
    attach_adapters(model, rank=4, scale=2.0, keys=["self_attn.q_proj"], num_layers=-1)
    plain = step_flops(flop_model(model), 40, 10, 100)
    ckpt = step_flops(flop_model(model, checkpointed=True), 40, 10, 100)
    assert ckpt["model"] == plain["model"]
    lora = 2 * (D * 4 + 4 * D)
    assert ckpt["hardware"] - plain["hardware"] == LAYERS * ((BLOCK + lora) * 40 + 4 * D * 100)


def test_forward_only_and_mfu(model):
    f = step_flops(flop_model(model), 40, 40, 0, backward=False)
    assert f["backward"] == 0 and f["forward"] == (LAYERS * BLOCK + HEAD) * 40
    assert mfu(1e9, None) is None and mfu(1e9, 4e9) == 0.25


def _train(tiny_model, data, out, name, method="sft", *extra):
    from click.testing import CliRunner

    from mlxpost.cli.main import cli

    r = CliRunner().invoke(cli, [method, "--model", str(tiny_model), "--data", str(data), "--out", str(out),
                                 "--name", name, "--steps", "3", "--plain", "--set", "train.eval_every=0",
                                 "--set", "train.batch_size=2", *extra])
    assert r.exit_code == 0, r.output
    return json.loads((out / name / "summary.json").read_text()), r.output


def test_summary_reports_flops_and_mfu_only_with_a_measured_peak(tiny_model, sft_data, tmp_path, monkeypatch):
    import mlx.core as mx

    from mlxpost.backend import doctor

    monkeypatch.setenv("MLXPOST_CACHE", str(tmp_path / "cache"))
    summary, output = _train(tiny_model, sft_data, tmp_path, "a")
    assert summary["mfu"] is None and summary["peak"] is None  # never measured: unknown, not invented
    assert "MFU unknown" in output and "model FLOP/s" in output
    # LoRA on the tiny llama: at least the forward and the frozen backward of every block over the tokens
    floor = step_flops(_base_flop_model(tiny_model), summary["tokens"], summary["trained_tokens"], 0)["forward"]
    assert summary["model_flops"] > floor
    assert summary["model_flops"] / summary["model_flops_per_s"] == pytest.approx(summary["train_seconds"], abs=0.006)
    assert summary["hardware_flops"] == summary["model_flops"]  # no checkpointing

    doctor.save_peak(mx, {"float32": {"gflops": 50.0, "size": 1024}})
    summary, output = _train(tiny_model, sft_data, tmp_path, "b", "sft", "--set", "train.grad_checkpoint=true")
    assert summary["peak_gflops"] == 50.0 and summary["peak"] == doctor.peak_key(mx)
    assert summary["peak_dtype"] == "float32"
    assert summary["mfu"] == pytest.approx(summary["model_flops_per_s"] / 50e9)
    assert summary["hardware_flops"] > summary["model_flops"]  # the recomputed forward
    assert "of a 50.0 GFLOP/s matmul peak" in output


def _base_flop_model(path):  # the base model, frozen: only its forward is used
    return flop_model(load_model(str(path), dtype="float32").model)


def test_dpo_counts_the_live_reference_forward(tiny_model, pref_data, tmp_path, monkeypatch):
    monkeypatch.setenv("MLXPOST_CACHE", str(tmp_path / "cache"))
    live, _ = _train(tiny_model, pref_data, tmp_path, "live", "dpo")
    pre, _ = _train(tiny_model, pref_data, tmp_path, "pre", "dpo", "--precompute-ref")
    assert live["tokens"] == pre["tokens"]
    assert live["model_flops"] > pre["model_flops"]  # the adapters-off pass of every step
    # Rows apart: the same model FLOPs; the pass that weighs the rows is hardware FLOPs only.
    apart, _ = _train(tiny_model, pref_data, tmp_path, "apart", "dpo", "--set", "train.split_rows=true")
    assert apart["tokens"] == live["tokens"] and live["hardware_flops"] == live["model_flops"]
    assert apart["model_flops"] == pytest.approx(live["model_flops"], rel=1e-9)
    policy_forward = step_flops(flop_model(load_model(str(tiny_model), dtype="float32").model), 1, 1, 0)
    assert apart["hardware_flops"] - apart["model_flops"] > policy_forward["forward"] * apart["tokens"] * 0.5


def test_a_trained_head_alone_costs_only_its_weight_gradient(model):
    model.freeze()
    model.model.embed_tokens.unfreeze()  # tied: the head's weight
    fm = flop_model(model)
    assert fm.first_trained_block is None
    f = step_flops(fm, 40, 10, 100)
    assert f["backward"] == HEAD * 10


def test_grpo_counts_rollout_generation_apart(tiny_model, tmp_path, monkeypatch):
    from mlxpost.assets import ARITH_TASKS_DIR
    from mlxpost.config import build_config
    from mlxpost.core.flops import generation_flops
    from mlxpost.training.pipeline import run
    from mlxpost.ui import NullReporter

    monkeypatch.setenv("MLXPOST_CACHE", str(tmp_path / "cache"))
    cfg = build_config(None, [f"model.path={tiny_model}", f"data.path={ARITH_TASKS_DIR}", "grpo.group_size=2",
                              "grpo.prompts_per_step=2", "grpo.max_new_tokens=5", "train.steps=2", "grpo.rewards=[format]",
                              f"output.dir={tmp_path}", "output.name=g", "model.dtype=float32",
                              "grpo.eval_prompts=0", "train.eval_every=0", "train.save_every=0"], method="grpo")
    run_dir, _ = run(cfg, reporter=NullReporter())
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["rollout_model_flops"] > 0 and s["rollout_seconds"] > 0
    assert s["rollout_model_flops"] / s["rollout_model_flops_per_s"] == pytest.approx(s["rollout_seconds"], abs=0.006)
    # at least the base model's forward over the sampled tokens (the 2 x 2 x 2 completions' lengths are <= 5)
    base = load_model(str(tiny_model), dtype="float32").model
    assert s["rollout_model_flops"] > generation_flops(flop_model(base), 0, 0, 8, 0)
    assert s["flops_scope"].startswith("training steps, over train_seconds less rollout_seconds")
    assert s["model_flops"] > 0 and s["mfu"] is None
