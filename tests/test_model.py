"""Models and adapters: targets, mlx-lm compatibility, QLoRA, saving and loading."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from test_core import randomize_adapters

from mlxpost.errors import MlxpostError
from mlxpost.model.adapters import adapter_config, attach_adapters, load_adapters, resolve_targets, save_adapters
from mlxpost.model.load import load_model
from mlxpost.model.lora import LoRALinear

X = mx.array([[1, 5, 9, 14, 3, 7, 22, 8]])


def test_target_presets_and_errors(tiny_model, tiny_qwen):
    m = load_model(str(tiny_model)).model
    assert set(resolve_targets(m, "attention")) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                   "self_attn.o_proj"}
    assert set(resolve_targets(m, "mlp")) == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert len(resolve_targets(m, "all-linear")) == 7
    assert resolve_targets(m, ["q_proj", "self_attn.v_proj"]) == ["self_attn.q_proj", "self_attn.v_proj"]
    with pytest.raises(MlxpostError, match="'qproj' matches no linear layer.*available: .*self_attn.q_proj"):
        resolve_targets(m, ["qproj"])
    with pytest.raises(MlxpostError, match="unknown preset"):
        resolve_targets(m, "everything")


def test_num_layers_and_trainable_count(tiny_model):
    m = load_model(str(tiny_model)).model
    n = attach_adapters(m, rank=4, scale=1.0, keys=["self_attn.q_proj"], num_layers=1)
    adapted = [name for name, mod in m.named_modules() if isinstance(mod, LoRALinear)]
    assert adapted == ["model.layers.1.self_attn.q_proj"]  # only the last block
    assert n == 64 * 4 + 4 * 64
    with pytest.raises(MlxpostError, match="num_layers"):
        attach_adapters(load_model(str(tiny_model)).model, rank=4, scale=1.0, keys=["self_attn.q_proj"],
                        num_layers=5)


@pytest.mark.parametrize("dora", [False, True])
def test_saved_adapter_loads_in_mlx_lm_and_in_mlxpost(tmp_path, tiny_model, dora):
    lm = load_model(str(tiny_model))
    keys = resolve_targets(lm.model, "all-linear")
    attach_adapters(lm.model, rank=4, scale=2.0, keys=keys, num_layers=1, dora=dora)
    randomize_adapters(lm.model)
    want = lm.model(X)
    save_adapters(lm.model, tmp_path, adapter_config(rank=4, scale=2.0, dropout=0.0, keys=keys, num_layers=1,
                                                     dora=dora, extra={"base_model": str(tiny_model)}))
    # mlx-lm's own loader, as `mlx_lm.generate --adapter-path` uses it.
    from mlx_lm.utils import load as mlx_lm_load

    model, _ = mlx_lm_load(str(tiny_model), adapter_path=str(tmp_path))
    assert mx.abs(model(X) - want).max().item() < 1e-5
    # And ours.
    again = load_model(str(tiny_model))
    cfg = load_adapters(again.model, tmp_path)
    assert cfg["fine_tune_type"] == ("dora" if dora else "lora")
    assert mx.abs(again.model(X) - want).max().item() < 1e-6


def test_adapter_that_does_not_fit_is_refused(tmp_path, tiny_model, tiny_qwen):
    lm = load_model(str(tiny_model))
    keys = resolve_targets(lm.model, "attention")
    attach_adapters(lm.model, rank=4, scale=2.0, keys=keys)
    save_adapters(lm.model, tmp_path, adapter_config(rank=4, scale=2.0, dropout=0.0, keys=keys, num_layers=2,
                                                     dora=False))
    import json

    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["lora_parameters"]["rank"] = 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MlxpostError, match="does not fit this model"):
        load_adapters(load_model(str(tiny_model)).model, tmp_path)
    with pytest.raises(MlxpostError, match="no adapter_config.json"):
        load_adapters(load_model(str(tiny_model)).model, tmp_path / "nowhere")


def test_qlora_on_a_quantized_base(tiny_model):
    lm = load_model(str(tiny_model), quantize=4, group_size=32)
    quantized = [n for n, m in lm.model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert len(quantized) == 14  # every block linear, not the embedding
    ref = load_model(str(tiny_model)).model(X)
    assert mx.abs(lm.model(X) - ref).max().item() < 0.2  # 4-bit: near the float model
    q8 = load_model(str(tiny_model), quantize=8, group_size=32).model
    assert mx.abs(q8(X) - ref).max().item() < 0.01
    attach_adapters(lm.model, rank=4, scale=2.0, keys=resolve_targets(lm.model, "all-linear"))
    from mlx.utils import tree_flatten

    trainable = dict(tree_flatten(lm.model.trainable_parameters()))
    assert trainable and all(k.endswith(("lora_a", "lora_b")) for k in trainable)

    def loss(model):
        return model(X).astype(mx.float32).logsumexp(-1).sum()

    _, grads = nn.value_and_grad(lm.model, loss)(lm.model)
    # B starts at zero, so the gradient reaches B (and A only after B moves).
    lora_b = [g for k, g in tree_flatten(grads) if k.endswith("lora_b")]
    assert len(lora_b) == 14 and all(mx.abs(g).sum().item() > 0 for g in lora_b)


def test_dtype_policy(tiny_model):
    from mlxpost.model.load import default_dtype

    lm = load_model(str(tiny_model), dtype="auto")
    want = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    assert lm.model.model.embed_tokens.weight.dtype == want
    assert default_dtype() == ("float32" if want == mx.float32 else "bfloat16")
    lm = load_model(str(tiny_model), dtype="float16")
    assert lm.model.model.norm.weight.dtype == mx.float16
    with pytest.raises(MlxpostError, match="model.dtype"):
        load_model(str(tiny_model), dtype="fp8")


def test_model_resolution_errors(tmp_path):
    with pytest.raises(MlxpostError, match="model not found"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MlxpostError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


@pytest.mark.parametrize("dora", [False, True])
def test_merged_adapters_give_the_same_logits_and_restore_the_model_exactly(tiny_model, dora):
    """adapters_merged (used while sampling) computes what the adapters compute, and leaves the very same
    arrays and modules behind; quantized layers and switched-off adapters stay as they are."""
    from mlx.utils import tree_flatten

    from mlxpost.model.lora import adapters_merged, adapters_off

    m = load_model(str(tiny_model)).model
    attach_adapters(m, rank=4, scale=2.0, keys=resolve_targets(m, "all-linear"), num_layers=2, dora=dora)
    randomize_adapters(m)
    m.eval()
    want = m(X)
    before = dict(tree_flatten(m.parameters()))
    linears = [mod.linear for _, mod in m.named_modules() if isinstance(mod, LoRALinear)]
    state = mx.random.state[0]
    with adapters_merged(m):
        got = m(X)
        assert not any(mod.adapter_enabled for _, mod in m.named_modules() if isinstance(mod, LoRALinear))
    assert (state == mx.random.state[0]).all()  # merging draws nothing from the random stream
    assert mx.abs(got - want).max().item() < 1e-4
    after = dict(tree_flatten(m.parameters()))
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert [mod.linear for _, mod in m.named_modules() if isinstance(mod, LoRALinear)] == linears
    assert mx.array_equal(m(X), want)
    with adapters_off(m), adapters_merged(m):  # switched-off adapters are left alone
        assert mx.array_equal(m(X), load_model(str(tiny_model)).model(X))
