"""Q4_K_M export at a real model's shape: Qwen2.5-0.5B's architecture, random weights.

    python benchmarks/bench_gguf_q4_k_m.py --out /tmp/qwen-shape     # writes DIR/hf and DIR/model.q4_k_m.gguf
    mlxpost sft --model /tmp/qwen-shape/model.q4_k_m.gguf --steps 3   # then train on it (bundled data)

The model: Qwen2.5-0.5B's config in Hugging Face layout (qwen2, hidden 896,
24 layers, 14 heads / 2 KV heads, intermediate 4864, tied embeddings, q/k/v
biases, rope theta 1e6), but with SmolLM2-135M's byte-level BPE tokenizer
(49,152 entries, the one on disk: Qwen's own 151,936-entry tokenizer is not)
and so a 49,152-row embedding. Weights are normal(0, 0.02).

Written with :func:`mlxpost.hub.gguf_export.write_gguf` (``q4_k_m``), i.e.
llama.cpp's Q4_K_M rules. Hidden 896 is not a multiple of 256, so as in
llama.cpp the tensors whose rows are 896 long take the fallback types
(Q4_K -> Q5_0, Q6_K -> Q8_0) and only ``ffn_down`` (rows of 4864) is
K-quantized: Q6_K in the 12 layers ``use_more_bits`` picks, Q4_K in the
other 12. Reported: time to write, file size, tensor types, and per type the
relative RMS error of the weights as gguf-py decodes them. Results: a table
on stdout and ``benchmarks/results/gguf_q4_k_m.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections import defaultdict
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np

from mlxpost.hub.gguf_export import write_gguf
from mlxpost.model.load import resolve_model_path

HERE = Path(__file__).resolve().parent
CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 49152,
    "tie_word_embeddings": True, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
    "hidden_act": "silu", "torch_dtype": "float32",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build(out: Path, seed: int = 0) -> Path:
    """Write the Qwen-shaped model (random weights, SmolLM2's tokenizer) as a Hugging Face directory."""
    out.mkdir(parents=True, exist_ok=True)
    src = Path(resolve_model_path("default"))
    for f in TOKENIZER_FILES:
        shutil.copy(src / f, out / f)
    c = CONFIG
    (out / "config.json").write_text(json.dumps(c, indent=2))
    rng = np.random.default_rng(seed)
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = d // c["num_attention_heads"] * c["num_key_value_heads"]

    def w(*shape):
        return mx.array(rng.standard_normal(shape, dtype=np.float32) * 0.02)

    weights = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": mx.ones(d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights.update({
            p + "self_attn.q_proj.weight": w(d, d), p + "self_attn.q_proj.bias": w(d),
            p + "self_attn.k_proj.weight": w(kv, d), p + "self_attn.k_proj.bias": w(kv),
            p + "self_attn.v_proj.weight": w(kv, d), p + "self_attn.v_proj.bias": w(kv),
            p + "self_attn.o_proj.weight": w(d, d),
            p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d), p + "mlp.down_proj.weight": w(d, f),
            p + "input_layernorm.weight": mx.ones(d), p + "post_attention_layernorm.weight": mx.ones(d)})
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    return out


def weight_errors(hf: Path, path: Path) -> dict[str, float]:
    """Relative RMS error per GGUF type, over every 2-D tensor of that type (qwen2: rows not reordered)."""
    ref = mx.load(str(hf / "model.safetensors"))
    names = {"token_embd.weight": "model.embed_tokens.weight"}
    parts = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    err, norm = defaultdict(float), defaultdict(float)
    for t in gguf.GGUFReader(str(path)).tensors:
        kind = gguf.GGMLQuantizationType(t.tensor_type).name
        if kind == "F32":
            continue
        _, i, part, _ = (t.name.split(".") + ["", "", ""])[:4] if t.name.startswith("blk.") else ("", "", "", "")
        hf_name = names.get(t.name) or f"model.layers.{i}.{parts[part]}.weight"
        x = np.array(ref[hf_name])
        y = gguf.quants.dequantize(t.data, t.tensor_type).reshape(x.shape)
        err[kind] += float(np.sum((y - x) ** 2))
        norm[kind] += float(np.sum(x ** 2))
    return {k: (err[k] / norm[k]) ** 0.5 for k in err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/qwen-shape"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    hf = build(args.out / "hf")
    t1 = time.perf_counter()
    path = write_gguf(hf, args.out / "model.q4_k_m.gguf", "q4_k_m", name="qwen2.5-0.5b-shape")
    t2 = time.perf_counter()
    counts: dict[str, int] = defaultdict(int)
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[gguf.GGMLQuantizationType(t.tensor_type).name] += 1
    errors = weight_errors(hf, path)
    result = {"config": CONFIG, "build_s": round(t1 - t0, 1), "write_q4_k_m_s": round(t2 - t1, 1),
              "file_mb": round(path.stat().st_size / 1e6, 1),
              "f32_safetensors_mb": round((hf / "model.safetensors").stat().st_size / 1e6, 1),
              "tensor_types": dict(counts), "relative_rms_error": {k: round(v, 4) for k, v in errors.items()}}
    print(f"wrote {path}: {result['file_mb']} MB (float32 safetensors {result['f32_safetensors_mb']} MB) "
          f"in {result['write_q4_k_m_s']} s")
    print("| type | tensors | relative RMS error of the weights |\n|---|---|---|")
    for k in sorted(counts):
        print(f"| {k} | {counts[k]} | {errors.get(k, float('nan')):.4f} |")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "gguf_q4_k_m.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
