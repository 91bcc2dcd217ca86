"""Export (PEFT, fused Hugging Face model, mlx-lm) and PEFT import, checked against transformers + peft.

Every adapter here has random, non-zero weights large enough to move the
logits far beyond the tolerance, so a wrong transpose, scale, magnitude or
module selection fails the comparison.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten

from mlxpost.cli.tools import export_command
from mlxpost.config import build_config, dump_yaml
from mlxpost.errors import MlxpostError
from mlxpost.hub.export import export
from mlxpost.model.adapters import (
    adapter_config,
    attach_adapters,
    fuse_adapters,
    load_adapter_stack,
    resolve_targets,
    save_adapters,
)
from mlxpost.model.load import is_quantized, load_model, quantize_blocks
from mlxpost.model.lora import DoRALinear, adapter_modules
from mlxpost.model.peft import load_init_adapter, load_peft_adapter

IDS = [[1, 5, 9, 14, 3, 7, 22, 8, 40, 2, 17, 99]]
TOL = 1e-4
EFFECT = 1e-2  # the adapter must move the logits at least this much


def make_run(root: Path, base: Path, name: str, *, targets="all-linear", num_layers=-1, rank=4, scale=2.0,
             dora=False, quantize=None, from_run: Path | None = None, method="sft", seed=1) -> Path:
    """A run directory as mlxpost writes it, with random non-zero adapter weights (no training)."""
    mx.random.seed(seed)
    run = root / name
    lm = load_model(str(base), dtype="float32", quantize=quantize)
    model = lm.model
    extra = {}
    if from_run is not None:
        from mlxpost.files import file_sha256 as file_hash

        load_adapter_stack(model, from_run)
        fuse_adapters(model)
        if quantize:
            quantize_blocks(model, quantize, 64)
        extra = {"from_adapter": str(from_run), "from_adapter_sha256": file_hash(from_run / "adapters.safetensors")}
    keys = resolve_targets(model, targets)
    n = len(model.layers) if num_layers == -1 else num_layers
    attach_adapters(model, rank=rank, scale=scale, keys=keys, num_layers=n, dora=dora)
    for _, m in adapter_modules(model):
        m.lora_a = mx.random.normal(m.lora_a.shape) * 0.2
        m.lora_b = mx.random.normal(m.lora_b.shape) * 0.2
        if isinstance(m, DoRALinear):
            m.m = m.m * (1 + 0.3 * mx.random.normal(m.m.shape))
    mx.eval(model.parameters())
    meta = {"base_model": str(base), "model_dir": str(lm.path), "method": method, "alpha": scale * rank,
            "quantize": quantize, "quantize_group_size": 64 if quantize else None,
            "base_quantized": is_quantized(model), "dtype": "float32", **extra}
    save_adapters(model, run, adapter_config(rank=rank, scale=scale, dropout=0.0, keys=keys, num_layers=n, dora=dora,
                                             extra=meta))
    sets = [f"model.path={base}", f"lora.rank={rank}", f"lora.scale={scale}", f"lora.type={'dora' if dora else 'lora'}",
            "train.steps=30", "train.lr=1e-4", "data.path=someone/arithmetic-chats"]
    if method != "sft":
        sets.append(f"preference.from_run={from_run}" if from_run else "dpo.beta=0.2")
    (run / "config.yaml").write_text(dump_yaml(build_config(None, sets, method=method)))
    (run / "summary.json").write_text(json.dumps({"method": method, "steps": 30, "stopped": "completed",
                                                  "final_train_loss": 1.2345678, "val_loss": 1.5, "best_val_loss": 1.4,
                                                  "best_step": 20}))
    return run


def mlx_logits(base: Path, adapter: Path | None = None, quantize=None) -> np.ndarray:
    lm = load_model(str(base), dtype="float32", quantize=quantize)
    if adapter is not None:
        load_adapter_stack(lm.model, adapter)
    return np.array(lm.model(mx.array(IDS)))


def torch_logits(model_dir: Path, peft_dir: Path | None = None, expect_lora: int | None = None) -> np.ndarray:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir)).float()
    if peft_dir is not None:
        peft = pytest.importorskip("peft")
        model = peft.PeftModel.from_pretrained(model, str(peft_dir))
        if expect_lora is not None:
            adapted = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
            assert len(adapted) == expect_lora
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float().numpy()


def front_matter(readme: Path) -> dict:
    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def close(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


# ---------------------------------------------------------------------------
# PEFT
# ---------------------------------------------------------------------------

PEFT_CASES = {
    # name: (fixture, targets, num_layers, dora, rank, scale, expected target_modules, layers_to_transform)
    "llama-attention": ("tiny_model", "attention", -1, False, 4, 2.0, ["k_proj", "o_proj", "q_proj", "v_proj"], None),
    "llama-all-linear": ("tiny_model", "all-linear", -1, False, 8, 0.75, None, None),
    "llama-last-block-qv": ("tiny_model", ["q_proj", "v_proj"], 1, False, 4, 3.0, ["q_proj", "v_proj"], [1]),
    "qwen2-all-linear": ("tiny_qwen", "all-linear", -1, False, 4, 2.0, None, None),
    "llama-dora": ("tiny_model", "all-linear", -1, True, 4, 2.0, None, None),
    "qwen2-dora-mlp-last-block": ("tiny_qwen", "mlp", 1, True, 2, 4.0, ["down_proj", "gate_proj", "up_proj"], [1]),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_export_gives_the_same_logits_in_transformers(tmp_path, request, case):
    fixture, targets, num_layers, dora, rank, scale, want_targets, want_layers = PEFT_CASES[case]
    base = request.getfixturevalue(fixture)
    run = make_run(tmp_path, base, "run", targets=targets, num_layers=num_layers, dora=dora, rank=rank, scale=scale)
    out = tmp_path / "peft"
    export(run, "peft", out)

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == rank and cfg["lora_alpha"] == pytest.approx(scale * rank) and cfg["use_dora"] == dora
    assert cfg["base_model_name_or_path"] == str(base)
    if want_targets is not None:
        assert cfg["target_modules"] == want_targets
    assert cfg["layers_to_transform"] == want_layers

    from safetensors.numpy import load_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    a = tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" if targets != "mlp" else
                "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"]
    assert a.shape == (rank, 64)  # PEFT: (r, in)

    n_keys = len(json.loads((run / "adapter_config.json").read_text())["lora_parameters"]["keys"])
    n_layers = 2 if num_layers == -1 else num_layers
    want = mlx_logits(base, run)
    base_mlx = mlx_logits(base)
    assert close(want, base_mlx) > EFFECT
    assert close(torch_logits(base), base_mlx) < TOL
    got = torch_logits(base, out, expect_lora=n_keys * n_layers)
    assert close(got, want) < TOL

    card = front_matter(out / "README.md")
    assert card["base_model"] == str(base) and card["library_name"] == "peft"
    assert {"mlxpost", "sft", "dora" if dora else "lora"} <= set(card["tags"])
    assert card["datasets"] == ["someone/arithmetic-chats"]
    assert card["mlxpost"]["metrics"]["final_train_loss"] == pytest.approx(1.23457)
    assert card["mlxpost"]["hyperparameters"]["rank"] == rank


def test_peft_export_of_a_qlora_run_notes_the_quantization(tmp_path, tiny_model):
    run = make_run(tmp_path, tiny_model, "q", quantize=4)
    out = tmp_path / "peft"
    result = export(run, "peft", out)
    assert any("QLoRA" in n for n in result["notes"])
    assert "QLoRA" in (out / "README.md").read_text() and "qlora" in front_matter(out / "README.md")["tags"]
    # Against the unquantized base, the adapter gives the unquantized base plus the same update.
    lm = load_model(str(tiny_model), dtype="float32")
    load_adapter_stack(lm.model, run)  # run's meta says quantize=4, but this base is full precision
    want = np.array(lm.model(mx.array(IDS)))
    assert close(torch_logits(tiny_model, out), want) < TOL


def test_tied_input_embedding_adapter_is_refused(tmp_path, tiny_model, tiny_qwen):
    for base, match in ((tiny_model, r"ties it to the output head.*--format fused"),
                        (tiny_qwen, r"outside the transformer blocks")):
        run = make_run(tmp_path, base, f"emb-{base.name}", targets="attention")
        weights = dict(mx.load(str(run / "adapters.safetensors")))
        weights["model.embed_tokens.lora_a"] = mx.random.normal((512, 4))
        weights["model.embed_tokens.lora_b"] = mx.random.normal((4, 64))
        mx.save_safetensors(str(run / "adapters.safetensors"), weights)
        with pytest.raises(MlxpostError, match=match):
            export(run, "peft", tmp_path / f"out-{base.name}")
        assert not (tmp_path / f"out-{base.name}").exists()


# ---------------------------------------------------------------------------
# PEFT -> mlxpost
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dora", [False, True])
def test_round_trip_mlx_peft_mlx_is_exact(tmp_path, tiny_qwen, dora):
    run = make_run(tmp_path, tiny_qwen, "run", targets=["q_proj", "down_proj"], num_layers=1, dora=dora, rank=4,
                   scale=0.3)
    export(run, "peft", tmp_path / "peft")
    orig = dict(mx.load(str(run / "adapters.safetensors")))

    lm = load_model(str(tiny_qwen), dtype="float32")
    cfg = load_peft_adapter(lm.model, tmp_path / "peft")
    back = dict(tree_flatten(lm.model.trainable_parameters()))
    assert set(back) == set(orig)
    for k in orig:
        assert np.array_equal(np.array(back[k]), np.array(orig[k])), k
    lp = cfg["lora_parameters"]
    assert cfg["num_layers"] == 1 and cfg["fine_tune_type"] == ("dora" if dora else "lora")
    assert lp["rank"] == 4 and lp["scale"] == pytest.approx(0.3, rel=1e-12)
    assert sorted(lp["keys"]) == ["mlp.down_proj", "self_attn.q_proj"]
    assert close(np.array(lm.model(mx.array(IDS))), mlx_logits(tiny_qwen, run)) < 1e-5


def test_peft_adapter_made_by_peft_loads_and_matches(tmp_path, tiny_model):
    """An adapter trained (here: randomised) in PEFT gives the same logits in mlxpost."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model)).float()
    config = peft.LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "up_proj"],
                             layers_to_transform=[1], layers_pattern="layers", task_type="CAUSAL_LM")
    pm = peft.get_peft_model(base, config)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.2)
    pm.save_pretrained(str(tmp_path / "from-peft"))
    pm.eval()
    with torch.no_grad():
        want = pm(torch.tensor(IDS)).logits.numpy()

    lm = load_model(str(tiny_model), dtype="float32")
    cfg = load_init_adapter(lm.model, tmp_path / "from-peft")
    assert cfg["lora_parameters"]["scale"] == pytest.approx(16 / 2.0)  # rsLoRA: alpha / sqrt(r)
    assert close(np.array(lm.model(mx.array(IDS))), want) < TOL
    assert close(want, mlx_logits(tiny_model)) > EFFECT

    # Adapters on other than the last blocks do not fit mlx-lm's layout: refused, clearly.
    lm = load_model(str(tiny_model), dtype="float32")
    config0 = peft.LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="layers")
    peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model)), config0) \
        .save_pretrained(str(tmp_path / "first-block"))
    with pytest.raises(MlxpostError, match=r"covers blocks \[0\] of 2.*last N blocks"):
        load_peft_adapter(lm.model, tmp_path / "first-block")


def test_sft_adapter_init_from_a_peft_directory(tmp_path, tiny_model, sft_data):
    from mlxpost.training.pipeline import prepare
    from mlxpost.ui import NullReporter

    run = make_run(tmp_path, tiny_model, "run", targets="attention", num_layers=1, rank=4, scale=2.0)
    export(run, "peft", tmp_path / "peft")
    cfg = build_config(None, [f"model.path={tiny_model}", f"data.path={sft_data}", f"lora.init={tmp_path / 'peft'}",
                              "train.steps=1"])
    prep = prepare(cfg, NullReporter())
    got = dict(tree_flatten(prep.loaded.model.trainable_parameters()))
    orig = dict(mx.load(str(run / "adapters.safetensors")))
    assert set(got) == set(orig) and all(np.array_equal(np.array(got[k]), np.array(orig[k])) for k in orig)
    lp = prep.adapter_cfg["lora_parameters"]
    assert prep.adapter_cfg["num_layers"] == 1 and lp["rank"] == 4 and lp["scale"] == 2.0


# ---------------------------------------------------------------------------
# Fused
# ---------------------------------------------------------------------------

FUSED_CASES = {
    "llama-lora": ("tiny_model", dict(targets="all-linear")),
    "qwen2-dora-partial": ("tiny_qwen", dict(targets=["q_proj", "o_proj", "up_proj"], num_layers=1, dora=True)),
    "llama-qlora-4bit": ("tiny_model", dict(targets="all-linear", quantize=4)),
}


@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_export_loads_in_transformers_with_the_same_logits(tmp_path, request, case):
    fixture, kw = FUSED_CASES[case]
    base = request.getfixturevalue(fixture)
    run = make_run(tmp_path, base, "run", **kw)
    out = tmp_path / "fused"
    export(run, "fused", out)

    want = mlx_logits(base, run, quantize=kw.get("quantize"))
    assert close(want, mlx_logits(base)) > EFFECT
    assert close(torch_logits(out), want) < TOL
    # mlx-lm reads it back as a plain (unquantized) model with the same output.
    back = load_model(str(out), dtype="float32")
    assert not is_quantized(back.model)
    assert close(np.array(back.model(mx.array(IDS))), want) < 1e-5

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == 10000.0 and "quantization" not in cfg
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (base / f).read_bytes()
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    msgs = [{"role": "user", "content": "hello"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == \
        transformers.AutoTokenizer.from_pretrained(str(base)).apply_chat_template(msgs, tokenize=False)
    card = front_matter(out / "README.md")
    assert card["library_name"] == "transformers" and "mlxpost" in card["tags"]
    if kw.get("quantize"):
        assert "QLoRA" in (out / "README.md").read_text()


def test_fused_config_keeps_the_rope_theta_that_was_trained(tmp_path, tiny_model):
    """A config with rope_theta only inside rope_parameters (transformers 5): mlx-lm alone would use 10000;
    mlxpost loads it with the real theta, trains with it and exports it at the top level."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg.pop("rope_theta")
    cfg["rope_parameters"] = {"rope_theta": 500.0, "rope_type": "default"}
    (base / "config.json").write_text(json.dumps(cfg))
    run = make_run(tmp_path, base, "run", targets="attention")
    export(run, "fused", tmp_path / "fused")
    out_cfg = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert out_cfg["rope_theta"] == 500.0 and out_cfg["rope_parameters"]["rope_theta"] == 500.0
    from mlxpost.model.load import load_model

    assert load_model(str(base), dtype="float32").model.args.rope_theta == 500.0
    assert close(torch_logits(tmp_path / "fused"), mlx_logits(base, run)) < TOL


# ---------------------------------------------------------------------------
# Stacks (DPO --from an SFT run) and the mlx format
# ---------------------------------------------------------------------------


def test_a_from_stack_exports_as_one_adapter_in_every_format(tmp_path, tiny_model):
    sft = make_run(tmp_path, tiny_model, "sft", targets="attention", rank=4, scale=2.0, seed=1)
    dpo = make_run(tmp_path, tiny_model, "dpo", targets="mlp", num_layers=1, rank=2, scale=5.0, from_run=sft,
                   method="dpo", seed=2)
    want = mlx_logits(tiny_model, dpo)
    assert close(want, mlx_logits(tiny_model, sft)) > EFFECT

    export(dpo, "peft", tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 6 and cfg["lora_alpha"] == pytest.approx(30.0)
    assert close(torch_logits(tiny_model, tmp_path / "peft"), want) < TOL

    export(dpo, "fused", tmp_path / "fused")
    assert close(torch_logits(tmp_path / "fused"), want) < TOL

    export(dpo, "mlx", tmp_path / "mlx")
    from mlx_lm.utils import load as mlx_lm_load

    model, _ = mlx_lm_load(str(tiny_model), adapter_path=str(tmp_path / "mlx"))
    assert close(np.array(model(mx.array(IDS))), want) < 1e-5
    assert "dpo" in front_matter(tmp_path / "mlx" / "README.md")["tags"]


def test_a_stack_with_dora_is_refused_unless_fused(tmp_path, tiny_model):
    sft = make_run(tmp_path, tiny_model, "sft", targets="attention", dora=True)
    dpo = make_run(tmp_path, tiny_model, "dpo", targets="attention", from_run=sft, method="dpo", seed=3)
    for fmt in ("peft", "mlx"):
        with pytest.raises(MlxpostError, match="DoRA.*--format fused"):
            export(dpo, fmt, tmp_path / fmt)
    export(dpo, "fused", tmp_path / "fused")
    assert close(torch_logits(tmp_path / "fused"), mlx_logits(tiny_model, dpo)) < TOL


@pytest.mark.parametrize("dora", [False, True])
def test_mlx_export_loads_in_mlx_lm(tmp_path, tiny_qwen, dora):
    run = make_run(tmp_path, tiny_qwen, "run", targets="all-linear", num_layers=1, dora=dora)
    export(run, "mlx", tmp_path / "mlx")
    assert (tmp_path / "mlx" / "adapters.safetensors").read_bytes() == (run / "adapters.safetensors").read_bytes()
    from mlx_lm.utils import load as mlx_lm_load

    model, _ = mlx_lm_load(str(tiny_qwen), adapter_path=str(tmp_path / "mlx"))
    assert close(np.array(model(mx.array(IDS))), mlx_logits(tiny_qwen, run)) < 1e-5
    assert front_matter(tmp_path / "mlx" / "README.md")["library_name"] == "mlx"


# ---------------------------------------------------------------------------
# Command line, --best, --model, errors
# ---------------------------------------------------------------------------


def test_command_line_best_and_model_override(tmp_path, tiny_model):
    from click.testing import CliRunner

    run = make_run(tmp_path, tiny_model, "run", targets="attention")
    best = make_run(tmp_path, tiny_model, "best-tmp", targets="mlp", seed=7)
    (run / "best").mkdir()
    for f in ("adapter_config.json", "adapters.safetensors"):
        shutil.copyfile(best / f, run / "best" / f)
    (run / "best" / "best.json").write_text(json.dumps({"step": 20, "val_loss": 1.4, "val_ppl": 4.0552}))

    r = CliRunner().invoke(export_command, [str(run), "--format", "peft", "--out", str(tmp_path / "o"), "--best",
                                            "--model", "my-org/tiny-llama"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "up_proj"]  # best/, not the final adapter
    assert cfg["base_model_name_or_path"] == "my-org/tiny-llama"
    card = front_matter(tmp_path / "o" / "README.md")
    assert card["base_model"] == "my-org/tiny-llama" and card["mlxpost"]["metrics"] == {
        "step": 20, "val_loss": 1.4, "val_ppl": 4.0552}

    r = CliRunner().invoke(export_command, [str(run), "--format", "mlx", "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "not empty" in str(r.exception)


def test_clear_errors(tmp_path, tiny_model):
    with pytest.raises(MlxpostError, match="no such directory"):
        export(tmp_path / "nope", "peft", tmp_path / "o")
    empty = tmp_path / "empty"
    (empty / "best").mkdir(parents=True)
    (empty / "best" / "adapter_config.json").write_text("{}")
    with pytest.raises(MlxpostError, match=r"empty: no adapter_config.json.*--best exports best/"):
        export(empty, "peft", tmp_path / "o")
    with pytest.raises(MlxpostError, match="no best/"):
        export(tmp_path / "empty" / "best", "peft", tmp_path / "o", best=True)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"fine_tune_type": "lora",\n oops}')
    (bad / "adapters.safetensors").write_bytes(b"")
    with pytest.raises(MlxpostError, match=r"bad/adapter_config.json:2: not valid JSON"):
        export(bad, "peft", tmp_path / "o")
    run = make_run(tmp_path, tiny_model, "run", targets="attention")
    cfg = json.loads((run / "adapter_config.json").read_text())
    cfg.pop("mlxpost")
    (run / "adapter_config.json").write_text(json.dumps(cfg))
    (run / "config.yaml").unlink()
    with pytest.raises(MlxpostError, match=r"adapter_config.json: no mlxpost.base_model.*--model"):
        export(run, "fused", tmp_path / "o")
    export(run, "fused", tmp_path / "o", model=str(tiny_model))  # --model fills it in
    assert (tmp_path / "o" / "model.safetensors").exists()


def test_export_without_out_writes_exports_run_format(tmp_path, tiny_model, monkeypatch):
    from click.testing import CliRunner

    run = make_run(tmp_path / "runs", tiny_model, "my-run", targets="attention")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(export_command, [str(run), "--format", "mlx"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "exports" / "my-run-mlx"
    assert (out / "adapters.safetensors").read_bytes() == (run / "adapters.safetensors").read_bytes()
    assert f"to {Path('exports') / 'my-run-mlx'}" in r.output
    r = CliRunner().invoke(export_command, [str(run), "--format", "mlx"])  # a second time: refused, not replaced
    assert r.exit_code != 0 and "not empty (pass --overwrite" in str(r.exception)
    assert CliRunner().invoke(export_command, [str(run), "--format", "mlx", "--overwrite"]).exit_code == 0


# ---------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fixture, quant, tol", [("tiny_model", "f16", 2e-3), ("tiny_model", "q8_0", 5e-2),
                                                  ("tiny_qwen", "q8_0", 5e-2)])
def test_gguf_export_reads_back_and_converts_to_the_same_model(tmp_path, request, fixture, quant, tol):
    """gguf-py's reader sees the types, tokenizer and template; our importer gives back the fused model's logits."""
    import gguf
    from mlx_lm import load

    from mlxpost.model.gguf import convert_gguf

    base = request.getfixturevalue(fixture)
    run = make_run(tmp_path, base, "run")
    result = export(run, "gguf", tmp_path / "out", quant=quant)
    path = tmp_path / "out" / f"model.{quant}.gguf"
    assert result["file"] == path.name and (tmp_path / "out" / "README.md").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", path.name]

    r = gguf.GGUFReader(str(path))
    types = {t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == quant.upper() and types["blk.0.attn_norm.weight"] == "F32"
    tcfg = json.loads((base / "tokenizer_config.json").read_text())
    assert r.fields["tokenizer.chat_template"].contents() == tcfg["chat_template"]
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"

    back = convert_gguf(path, tmp_path / "back")
    want = mlx_logits(base, run)
    assert close(mlx_logits(base), want) > EFFECT  # the adapter is in there
    assert close(mlx_logits(back), want) < tol
    _, tok, = load(str(back))
    _, tok_base = load(str(base))
    for text in ["Hello world 123", "<|im_start|>user\nhi<|im_end|>\n"]:
        assert tok.encode(text) == tok_base.encode(text)


@pytest.fixture(scope="module")
def tiny_k_model(tmp_path_factory) -> Path:
    """Llama with rows of 256 and 512 (K-quant super-blocks fit), 4 layers so the Q4_K_M mix has both kinds."""
    from mlxpost.model.tiny import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("kq") / "m", hidden_size=256, intermediate_size=512,
                            num_layers=4, num_heads=4, num_kv_heads=2)


def _with_weights_through(src: Path, out: Path, qtype) -> Path:
    """Copy of the model directory ``src`` whose 2-D weights went through gguf-py's ``qtype`` and back."""
    import gguf
    shutil.copytree(src, out)
    w = mx.load(str(out / "model.safetensors"))
    mx.save_safetensors(str(out / "model.safetensors"), {
        k: mx.array(gguf.quants.dequantize(gguf.quants.quantize(np.array(v), qtype), qtype)) if v.ndim == 2 else v
        for k, v in w.items()})
    return out


def test_gguf_export_q4_k_m_follows_llama_cpp_mix_and_converts_back(tmp_path, tiny_k_model):
    """q4_k_m: Q4_K with Q6_K for the tied embedding and the attn_v/ffn_down layers llama.cpp picks.

    Read back through our importer, the logits move more than a q8_0 export's and less than the same
    model with every weight through Q4_0 (gguf-py's), the sanity bounds a 4.5-bit format must sit
    between. Measured as RMS over all logits: this random-weight model amplifies weight noise, and the
    single largest change is noisy (there it is about equal for Q4_0 and Q4_K_M; RMS 0.19 vs 0.25).
    """
    import gguf

    from mlxpost.hub.gguf_export import _use_more_bits
    from mlxpost.model.gguf import convert_gguf

    run = make_run(tmp_path, tiny_k_model, "run")
    export(run, "gguf", tmp_path / "out", quant="q4_k_m")
    r = gguf.GGUFReader(str(tmp_path / "out" / "model.q4_k_m.gguf"))
    types = {t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in r.tensors}
    assert r.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert types["token_embd.weight"] == "Q6_K" and types["blk.0.attn_norm.weight"] == "F32"
    for i in range(4):
        more = "Q6_K" if _use_more_bits(i, 4) else "Q4_K"
        assert (types[f"blk.{i}.attn_v.weight"], types[f"blk.{i}.ffn_down.weight"]) == (more, more)
        assert types[f"blk.{i}.attn_q.weight"] == types[f"blk.{i}.ffn_up.weight"] == "Q4_K"
    assert {types[f"blk.{i}.ffn_down.weight"] for i in range(4)} == {"Q4_K", "Q6_K"}

    want = mlx_logits(tiny_k_model, run)
    export(run, "gguf", tmp_path / "out8", quant="q8_0")
    fused = convert_gguf(tmp_path / "out8" / "model.q8_0.gguf", tmp_path / "back8")
    def rms(a: np.ndarray) -> float:
        return float(np.sqrt(np.mean((a - want) ** 2)))

    gap_q8 = rms(mlx_logits(fused))
    export(run, "gguf", tmp_path / "out16", quant="f16")
    q4_0 = _with_weights_through(convert_gguf(tmp_path / "out16" / "model.f16.gguf", tmp_path / "back16"),
                                 tmp_path / "q4_0", gguf.GGMLQuantizationType.Q4_0)
    gap_q4_0 = rms(mlx_logits(q4_0))
    gap = rms(mlx_logits(convert_gguf(tmp_path / "out" / "model.q4_k_m.gguf", tmp_path / "back")))
    assert gap_q8 < gap < gap_q4_0, (gap_q8, gap, gap_q4_0)


def test_gguf_export_rejects_an_unknown_quant(tmp_path, tiny_model):
    run = make_run(tmp_path, tiny_model, "run")
    with pytest.raises(MlxpostError, match="--quant must be one of f16, q8_0, q4_k_m"):
        export(run, "gguf", tmp_path / "out", quant="q2_k")
    assert not (tmp_path / "out").exists()