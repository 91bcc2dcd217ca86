"""Convert a GGUF file (llama.cpp's format) into a Hugging Face model directory.

mlx-lm loads Hugging Face directories; a GGUF file is turned into one once and
cached (:func:`convert_gguf_cached`), so a ``.gguf`` file works wherever a
model is named.

What converts, and what is refused with a message that says so:

- tensor types: every type the ``gguf`` package (llama.cpp's own gguf-py)
  dequantizes in numpy: F32, F16, BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, the
  K-quants (Q2_K ... Q6_K, i.e. Q4_K_M files) and the I-quants, decoded into
  the training dtype. Reading and decoding are gguf-py's; MLX's own GGUF
  reader (``mx.load``) is not used: it fails on most K-quants and decodes
  Q4_K wrongly (MLX 0.32).
- architectures: ``llama`` (Llama 1-3, SmolLM; llama.cpp also writes Mistral
  7B as ``llama``), ``qwen2`` (Qwen2/2.5), ``qwen3``, ``phi3`` (fused qkv
  and gate/up tensors kept fused, as mlx-lm's phi3 reads them; not LongRoPE),
  ``gemma2`` and ``gemma3`` text models (llama.cpp stores their norm weights
  plus one; they come back minus one). RoPE scaling: none, linear, and Llama-3's (recovered from
  the ``rope_freqs`` tensor).
- tokenizers: byte-level BPE (``tokenizer.ggml.model == "gpt2"``) with one
  of the pre-tokenizers in :data:`PRE_TOKENIZERS`, and SentencePiece BPE
  (``"llama"``: Llama 1/2, Mistral) rebuilt from tokens and scores with byte
  fallback. Other tokenizer models (Unigram ``"t5"``, ...) are refused.

Two llama.cpp conventions are undone here. Its converter reorders the rows of
each q/k projection head from Hugging Face's half-split RoPE layout into
interleaved pairs (``blk.N.attn_q/attn_k``; ``llama`` only, ``qwen2`` is
stored as is). And the RoPE base lives in ``llama.rope.freq_base``;
config.json must carry it as top-level ``rope_theta``, because mlx-lm
silently falls back to 10000 without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gguf
import mlx.core as mx
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ..errors import MlxpostError
from ..files import cache_root

Log = Callable[[str], None] | None


# Bump when the output of convert_gguf changes, so old cache entries are redone.
CONVERTER_VERSION = 1


_MARKER = ".mlxpost-gguf.json"

_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}




# Pre-tokenizers (``tokenizer.ggml.pre``) whose splitting rules are known here.
# The regexes are the ones the models' own tokenizer.json files use.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

PRE_TOKENIZERS = {
    "gpt-2": "GPT-2's regex (ByteLevel)",
    "smollm": "each digit alone, then GPT-2's regex (SmolLM, StarCoder)",
    "starcoder": "each digit alone, then GPT-2's regex (SmolLM, StarCoder)",
    "llama-bpe": "Llama 3's regex (digits in groups of up to 3)",
    "qwen2": "NFC, then Qwen2's regex (each digit alone)",
}

_ARCHS = {
    # general.architecture -> (HF class, model_type, q/k rows permuted by llama.cpp)
    "llama": ("LlamaForCausalLM", "llama", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", False),
    "phi3": ("Phi3ForCausalLM", "phi3", False),  # llama.cpp's convert_hf_to_gguf keeps Phi-3's fused rows as they are
    "gemma2": ("Gemma2ForCausalLM", "gemma2", False),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text", False),  # the text model (mlx-lm's gemma3_text)
}


# GGUF tensor name (per block) -> Hugging Face name.
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",  # qwen3: RMSNorm over each head's queries / keys
    "attn_k_norm": "self_attn.k_norm",
}

# Architectures whose blocks differ from llama's: GGUF name -> Hugging Face name, replacing _BLOCK_NAMES.
# Phi-3 keeps q/k/v in one matrix (rows: all q heads, then k, then v) and gate/up in another (gate
# rows first); llama.cpp writes them whole as attn_qkv and ffn_up, and mlx-lm's phi3 model reads
# them whole as qkv_proj / gate_up_proj, so they are renamed, never split.
_ARCH_BLOCK_NAMES = {
    "phi3": {"attn_norm": "input_layernorm", "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"},
    # Gemma 2 normalizes before and after both attention and MLP; GGUF's ffn_norm is the pre-MLP one.
    "gemma2": {**{k: v for k, v in _BLOCK_NAMES.items() if k not in ("attn_q_norm", "attn_k_norm")},
               "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
    # Gemma 3 adds Qwen3-style RMSNorms over each head's queries and keys.
    "gemma3_text": {**_BLOCK_NAMES,
                    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
                    "post_ffw_norm": "post_feedforward_layernorm"},
}

# Gemma's RMSNorm multiplies by (1 + weight); llama.cpp's converter stores weight + 1 so its norm is a
# plain product. mlx-lm's gemma models add the 1 themselves, so every norm weight comes back minus 1.
_NORM_PLUS_ONE = {"gemma2", "gemma3_text"}

# Per-layer tensors every model of an architecture must have (beyond the llama set).
_ARCH_EXTRA = {
    "qwen2": [f"self_attn.{p}_proj.bias" for p in "qkv"],
    "qwen3": ["self_attn.q_norm.weight", "self_attn.k_norm.weight"],
    "gemma3_text": ["self_attn.q_norm.weight", "self_attn.k_norm.weight"],
}
_OPTIONAL_BLOCK = {"attn_q_norm", "attn_k_norm"}


_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


# Tensor types stored as plain numbers that are not weights (token ids, masks): never dequantized.
_NOT_WEIGHTS = {"I8", "I16", "I32", "I64", "F64"}


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # row-major (MLX / numpy order: ggml's dims reversed)
    type: int
    offset: int  # from the start of the file

    @property
    def type_name(self) -> str:
        try:
            return gguf.GGMLQuantizationType(self.type).name
        except ValueError:
            return f"type {self.type}"


def _open_reader(path: Path) -> "gguf.GGUFReader":
    """gguf-py's memory-mapped reader, with its errors turned into one-line messages."""
    if not path.is_file():
        raise MlxpostError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise MlxpostError(f"{path}: not a GGUF file (bad magic {magic!r})")
    try:
        return gguf.GGUFReader(str(path), "r")
    except (ValueError, IndexError, KeyError, UnicodeDecodeError, OSError) as e:
        raise MlxpostError(f"{path}: truncated or corrupt GGUF file ({e})") from None


def read_tensor_infos(path: str | Path) -> list[TensorInfo]:
    """Names, shapes, types and file offsets of the tensors in a GGUF file (header only)."""
    reader = _open_reader(Path(path))
    return [TensorInfo(t.name, tuple(int(d) for d in reversed(t.shape.tolist())), int(t.tensor_type),
                       int(t.data_offset)) for t in reader.tensors]


def can_dequantize(qtype: int) -> bool:
    """Whether gguf-py decodes this tensor type into floats (F32, F16 and every quant it has a
    dequantizer for: BF16, Q4_0 ... Q8_0, all K-quants, I-quants, TQ, MXFP4).

    >>> can_dequantize(gguf.GGMLQuantizationType.Q4_K), can_dequantize(gguf.GGMLQuantizationType.I32)
    (True, False)
    """
    t = gguf.GGMLQuantizationType(qtype)
    return t in (t.F32, t.F16) or (t in gguf.quants._type_traits and t.name not in _NOT_WEIGHTS)


def check_tensor_types(path: str | Path, infos: list[TensorInfo]) -> None:
    bad = [i for i in infos if not can_dequantize(i.type)]
    if not bad:
        return
    first = bad[0]
    others = f" (and {len(bad) - 1} more tensors of types {', '.join(sorted({b.type_name for b in bad}))})" \
        if len(bad) > 1 else ""
    raise MlxpostError(
        f"{path}: tensor {first.name!r} has GGUF type {first.type_name}{others}, which the gguf package "
        f"(gguf {_gguf_version()}) cannot dequantize; use another quantization of this model "
        "(Q8_0, Q4_K_M, F16, ...) or its Hugging Face repository."
    )


def _gguf_version() -> str:
    from importlib.metadata import version  # only for this message

    try:
        return version("gguf")
    except Exception:  # noqa: BLE001 - any metadata problem: the message just lacks the number
        return "?"


def _metadata(reader: "gguf.GGUFReader") -> dict[str, Any]:
    """Key/value metadata as Python values (``GGUF.*`` pseudo-fields of the header left out)."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def load_gguf(path: str | Path, dtype: str = "float32", *, log: Log = None
              ) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """All tensors of a GGUF file as plain arrays in ``dtype``, and its metadata.

    Reading and dequantizing is gguf-py's (llama.cpp's own Python package):
    every type it decodes works, K- and I-quants included, bit for bit as
    ``gguf.quants.dequantize`` gives them (float32), then cast to ``dtype``.
    Tensors are memory-mapped and decoded one at a time, so peak memory stays
    near the size of the output. ``log`` gets a progress line every ~10%.
    """
    path = Path(path)
    if dtype not in _DTYPES:
        raise MlxpostError(f"dtype must be one of {', '.join(_DTYPES)}; got {dtype!r}")
    reader = _open_reader(path)
    infos = [TensorInfo(t.name, tuple(int(d) for d in reversed(t.shape.tolist())), int(t.tensor_type),
                        int(t.data_offset)) for t in reader.tensors]
    check_tensor_types(path, infos)
    out_dtype = _DTYPES[dtype]
    tensors: dict[str, mx.array] = {}
    step = max(1, len(infos) // 10)
    for n, (t, info) in enumerate(zip(reader.tensors, infos), 1):
        x = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if x.size != int(np.prod(info.shape)):
            raise MlxpostError(f"{path}: tensor {info.name!r} decodes to {x.size} values, header says {info.shape}")
        tensors[info.name] = mx.array(x.reshape(info.shape)).astype(out_dtype)
        mx.eval(tensors[info.name])  # one tensor at a time keeps peak memory near the output size
        if log and (n % step == 0 or n == len(infos)):
            log(f"dequantized {n}/{len(infos)} tensors")
    return tensors, _metadata(reader)


def _plain(v: Any) -> Any:
    """MLX metadata value -> Python value (0-d arrays -> scalars, 1-d -> lists)."""
    if isinstance(v, mx.array):
        v = v.item() if v.ndim == 0 else v.tolist()
    if isinstance(v, float):
        # Most GGUF floats are float32 (1e-5 reads as 9.999999747378752e-06): take the
        # shortest decimal that gives the same float32.
        v = float(str(np.float32(v)))
    return v


def _unpermute_rope_rows(w: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's q/k row order: per head, interleaved pairs -> halves.

    Hugging Face rotates dimension ``i`` of a head with ``i + half`` (two
    halves); llama.cpp rotates ``2*i`` with ``2*i + 1`` (pairs), so its
    converter moves Hugging Face row ``j*half + i`` (j = 0, 1) to row
    ``2*i + j``: reshape ``(n_head, 2, half, ...)``, swap the middle axes.
    Reading the GGUF rows as ``(n_head, half, 2, ...)`` and swapping back
    restores Hugging Face's order. Works for weights (rows, in) and biases (rows,).
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_factors(theta: float, head_dim: int, factor: float, low: float, high: float,
                    original: int) -> np.ndarray:
    """Per-frequency divisors of Llama-3 RoPE scaling (what ``rope_freqs`` stores)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, mid))


def _llama3_scaling(freqs: np.ndarray, theta: float, head_dim: int) -> dict:
    """Recover Llama-3 rope_scaling parameters from a ``rope_freqs`` tensor.

    GGUF keeps only the resulting per-frequency factors; the few parameter
    sets in use are tried and one that reproduces them exactly is returned.
    """
    factor = float(freqs.max())
    for original in (8192, 4096, 2048, 16384, 32768, 65536, 131072):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0)):
            ref = _llama3_factors(theta, head_dim, factor, low, high, original)
            if ref.shape == freqs.shape and np.allclose(ref, freqs, rtol=1e-4, atol=1e-6):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                        "high_freq_factor": high, "original_max_position_embeddings": original}
    raise MlxpostError("this GGUF has a rope_freqs tensor that matches no known Llama-3 RoPE scaling; "
                       "use the model's Hugging Face repository instead")


def _model_config(path: Path, meta: dict, tensors: dict[str, mx.array]) -> tuple[dict, bool]:
    """config.json for the model; also whether q/k rows must be unpermuted."""
    arch = meta.get("general.architecture")
    if arch not in _ARCHS:
        raise MlxpostError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(_ARCHS)})")
    hf_class, model_type, permuted = _ARCHS[arch]

    def get(key: str, default: Any = KeyError) -> Any:
        full = f"{arch}.{key}"
        if full in meta:
            return _plain(meta[full])
        if default is KeyError:
            raise MlxpostError(f"{path}: GGUF metadata has no {full!r}")
        return default

    if get("expert_count", 0):
        raise MlxpostError(f"{path}: mixture-of-experts models ({arch}.expert_count) are not supported")
    hidden = get("embedding_length")
    n_head = get("attention.head_count")
    n_kv = get("attention.head_count_kv", n_head)
    if isinstance(n_head, list) or isinstance(n_kv, list):
        raise MlxpostError(f"{path}: per-layer head counts are not supported")
    head_dim = get("attention.key_length", hidden // n_head)
    if get("attention.value_length", head_dim) != head_dim:
        raise MlxpostError(f"{path}: different key and value head sizes are not supported")
    rope_dim = get("rope.dimension_count", head_dim)
    if rope_dim != head_dim and model_type != "phi3":  # phi3: partial_rotary_factor below
        raise MlxpostError(f"{path}: partial rotary embeddings (rope.dimension_count "
                           f"{get('rope.dimension_count')} < head size {head_dim}) are not supported")
    if model_type == "qwen2" and head_dim != hidden // n_head:  # qwen3 has its own head_dim
        raise MlxpostError(f"{path}: qwen2 with head size {head_dim} != hidden/heads is not supported by mlx-lm")
    rope_theta = float(get("rope.freq_base", 10000.0))

    vocab = tensors["token_embd.weight"].shape[0]
    tied = "output.weight" not in tensors
    cfg: dict[str, Any] = {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,  # top level: mlx-lm reads it only here
        "max_position_embeddings": get("context_length"),
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
    }
    if model_type == "phi3":
        if head_dim != hidden // n_head:
            raise MlxpostError(f"{path}: phi3 with head size {head_dim} != hidden/heads is not supported by mlx-lm")
        if "rope_factors_long.weight" in tensors or "rope_factors_short.weight" in tensors:
            raise MlxpostError(f"{path}: Phi-3 LongRoPE (rope_factors_long/short, the 128k-context models) is not "
                               "supported; use a 4k-context Phi-3 GGUF or the Hugging Face repository")
        cfg["partial_rotary_factor"] = rope_dim / head_dim
        cfg["original_max_position_embeddings"] = get("rope.scaling.original_context_length", cfg[
            "max_position_embeddings"])
    if model_type in ("gemma2", "gemma3_text"):
        _gemma_config(cfg, get, hidden, n_head, head_dim)
    if model_type == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in tensors
        cfg["mlp_bias"] = "blk.0.ffn_gate.bias" in tensors

    scaling = get("rope.scaling.type", "none")
    linear = get("rope.scale_linear", None)  # older files
    if "rope_freqs.weight" in tensors:
        freqs = np.array(tensors["rope_freqs.weight"].astype(mx.float32))
        cfg["rope_scaling"] = _llama3_scaling(freqs, rope_theta, head_dim)
    elif scaling == "linear" or linear:
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor", linear or 1.0))}
    elif scaling not in ("none", None):
        raise MlxpostError(f"{path}: RoPE scaling {scaling!r} is not supported (none, linear or llama3)")

    for key, hf in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                    ("padding_token_id", "pad_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            cfg[hf] = _plain(meta[f"tokenizer.ggml.{key}"])
    eos = _eos_ids(meta)
    if eos:
        cfg["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return cfg, permuted


def _gemma_config(cfg: dict, get, hidden: int, n_head: int, head_dim: int) -> None:
    """Gemma 2 / Gemma 3 extra config.json keys from GGUF metadata.

    GGUF has no ``query_pre_attn_scalar``: llama.cpp scales queries by
    1/sqrt(hidden/heads) for the 27B models (Gemma 2: 46 blocks, Gemma 3: 62)
    and by 1/sqrt(head size) otherwise, as the smaller configs say. Gemma 3's
    local layers (5 of every 6, RoPE base 10,000) are fixed in llama.cpp's
    code too, so they are written here as those constants. mlx-lm's gemma2
    attends over the whole context (no sliding window); gemma3_text uses it.
    """
    gemma3 = cfg["model_type"] == "gemma3_text"
    cfg["hidden_act"] = cfg["hidden_activation"] = "gelu_pytorch_tanh"
    if not gemma3:
        cfg["attn_logit_softcapping"] = float(get("attn_logit_softcapping", 50.0))
        cfg["final_logit_softcapping"] = float(get("final_logit_softcapping", 30.0))
    big = cfg["num_hidden_layers"] == (62 if gemma3 else 46)
    cfg["query_pre_attn_scalar"] = hidden // n_head if big else head_dim
    if (window := get("attention.sliding_window", None)) is not None:
        cfg["sliding_window"] = int(window)
    if gemma3:
        cfg.update(sliding_window_pattern=6, rope_local_base_freq=10000.0)


def _eos_ids(meta: dict) -> list[int]:
    """EOS plus end-of-turn / end-of-message ids (Llama 3 ends turns with <|eot_id|>)."""
    ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        v = meta.get(f"tokenizer.ggml.{key}")
        if v is not None and _plain(v) not in ids:
            ids.append(_plain(v))
    return ids


def _hf_weights(path: Path, tensors: dict[str, mx.array], cfg: dict, unpermute: bool) -> dict[str, mx.array]:
    """Rename GGUF tensors to Hugging Face names (undoing the q/k row order)."""
    out: dict[str, mx.array] = {}
    block_names = _ARCH_BLOCK_NAMES.get(cfg["model_type"], _BLOCK_NAMES)
    for name, t in tensors.items():
        parts = name.split(".")
        if name == "rope_freqs.weight":
            continue  # now in config.json's rope_scaling
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in block_names:
            _, layer, kind, leaf = parts
            if unpermute and kind == "attn_q":
                t = _unpermute_rope_rows(t, cfg["num_attention_heads"])
            elif unpermute and kind == "attn_k":
                t = _unpermute_rope_rows(t, cfg["num_key_value_heads"])
            if cfg["model_type"] in _NORM_PLUS_ONE and kind.endswith("norm"):
                t = t - 1
            out[f"model.layers.{layer}.{block_names[kind]}.{leaf}"] = t
        elif len(parts) == 2 and parts[0] in _TOP_NAMES:
            if cfg["model_type"] in _NORM_PLUS_ONE and parts[0] == "output_norm":
                t = t - 1
            out[f"{_TOP_NAMES[parts[0]]}.{parts[1]}"] = t
        else:
            raise MlxpostError(f"{path}: unexpected tensor {name!r} for a {cfg['model_type']} model")

    expected = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(cfg["num_hidden_layers"]):
        expected += [f"model.layers.{i}.{n}.weight" for k, n in block_names.items() if k not in _OPTIONAL_BLOCK]
        expected += [f"model.layers.{i}.{n}" for n in _ARCH_EXTRA.get(cfg["model_type"], [])]
    missing = [k for k in expected if k not in out]
    if missing:
        raise MlxpostError(f"{path}: missing tensors for a {cfg['model_type']} model: {', '.join(missing[:5])}"
                           + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return out


_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _pre_tokenizer(pre: str):
    if pre == "gpt-2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    split = {"llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}[pre]
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def build_tokenizer(path: Path, meta: dict):
    """A ``tokenizers.Tokenizer`` equivalent to the GGUF's tokenizer, and its add_bos/add_eos flags.

    Byte-level BPE (``tokenizer.ggml.model`` ``gpt2``) or SentencePiece BPE
    (``llama``: Llama 1/2, Mistral, TinyLlama, ...).
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama":
        return _finish_tokenizer(_spm_tokenizer(path, meta), meta, default_bos=True)
    if kind != "gpt2":
        raise MlxpostError(f"{path}: tokenizer.ggml.model {kind!r} is not supported, only byte-level BPE ('gpt2') "
                           "and SentencePiece ('llama'). Use the model's Hugging Face repository instead.")
    pre = meta.get("tokenizer.ggml.pre")
    if pre is None:  # older files; guessing a split rule could tokenize silently wrong
        raise MlxpostError(f"{path}: no tokenizer.ggml.pre in this (older) GGUF file, so its pre-tokenizer is "
                           "unknown; convert the model again with a recent llama.cpp or use its Hugging Face repository")
    if pre not in PRE_TOKENIZERS:
        raise MlxpostError(f"{path}: pre-tokenizer {pre!r} is not supported "
                           f"(supported: {', '.join(PRE_TOKENIZERS)}); use the model's Hugging Face repository")

    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise MlxpostError(f"{path}: the GGUF vocabulary has duplicate tokens; cannot build a tokenizer")
    merges = []
    for m in meta.get("tokenizer.ggml.merges", []):
        # "left right"; the separator is the first space after the first character,
        # so a left part that is itself a space still splits correctly.
        cut = m.find(" ", 1)
        if cut < 0:
            raise MlxpostError(f"{path}: malformed BPE merge {m!r}")
        merges.append((m[:cut], m[cut + 1:]))

    # Llama 3's tokenizer looks whole words up in the vocabulary before merging.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre == "llama-bpe",
                               fuse_unk=False, byte_fallback=False))
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    return _finish_tokenizer(tok, meta, default_bos=False)


def _finish_tokenizer(tok, meta: dict, *, default_bos: bool):
    """Add the control / user-defined tokens and the BOS/EOS post-processor; return (tok, flags)."""
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    vocab = {t: i for i, t in enumerate(tokens)}
    types = _plain(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    specials = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    tok.add_special_tokens(specials)
    tok.add_tokens(user)

    add_bos = bool(_plain(meta.get("tokenizer.ggml.add_bos_token", default_bos)))
    add_eos = bool(_plain(meta.get("tokenizer.ggml.add_eos_token", False)))
    bos, eos = _token(meta, tokens, "bos_token_id"), _token(meta, tokens, "eos_token_id")
    head = [bos] if add_bos and bos else []
    tail = [eos] if add_eos and eos else []
    if head or tail:
        # What Hugging Face writes for such tokenizers: "<bos> $A <eos>" per sequence.
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(head + ["$A"] + tail),
            pair=" ".join(head + ["$A"] + tail + [f"{t}:1" for t in head] + ["$B:1"] + [f"{t}:1" for t in tail]),
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(head + tail)])
    return tok, {"add_bos_token": add_bos, "add_eos_token": add_eos}


_UNKNOWN, _BYTE = 2, 6


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to a SentencePiece BPE vocabulary.

    SentencePiece BPE keeps no merge list: it joins the adjacent pair whose
    joined piece has the highest score. As merges, that is every split of a
    normal piece into two vocabulary pieces, ranked by the joined piece's
    score (ties: lower ids first), which is what Hugging Face's converter does.

    >>> _spm_merges(["a", "b", "ab", "abb"], [0.0, 0.0, -1.0, -2.0], [1, 1, 1, 1])
    [('a', 'b'), ('ab', 'b')]
    """
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for i, piece in enumerate(tokens):
        if types[i] not in (1, _USER_DEFINED) or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in ids and right in ids:
                ranked.append((-scores[i], i, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _spm_tokenizer(path: Path, meta: dict) -> Tokenizer:
    """SentencePiece BPE (llama.cpp's ``llama`` tokenizer) as a ``tokenizers`` BPE with byte fallback.

    No pre-splitting (merges cross spaces, as in llama.cpp); spaces become
    ``▁`` and one is put in front of the text
    (``tokenizer.ggml.add_space_prefix``, default true), pieces not in the
    vocabulary fall back to ``<0xNN>`` byte tokens, and decoding undoes both.
    """
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise MlxpostError(f"{path}: SentencePiece tokenizer without one tokenizer.ggml.scores value per token; "
                           "cannot rebuild its merges. Use the model's Hugging Face repository instead.")
    types = list(_plain(meta.get("tokenizer.ggml.token_type", [1] * len(tokens))))
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise MlxpostError(f"{path}: the GGUF vocabulary has duplicate tokens; cannot build a tokenizer")
    unk = _token(meta, tokens, "unknown_token_id") or next((t for t, k in zip(tokens, types) if k == _UNKNOWN), None)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_spm_merges(tokens, [float(x) for x in scores], types),
                               unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(_plain(meta.get("tokenizer.ggml.add_space_prefix", True)))
    # A normalizer, not the Metaspace pre-tokenizer: Metaspace skips the prefix when the text already
    # starts with a space, llama.cpp does not. (Like Hugging Face's own Llama tokenizer.json files, text
    # after a special token gets the prefix too.)
    replace = normalizers.Replace(" ", "▁")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace]) if prefix else replace
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def _token(meta: dict, tokens: list[str], key: str) -> str | None:
    v = meta.get(f"tokenizer.ggml.{key}")
    if v is None:
        return None
    i = _plain(v)
    return tokens[i] if 0 <= i < len(tokens) else None


def _write_tokenizer(tok, flags: dict, meta: dict, out: Path, context_length: int | None) -> None:
    """tokenizer.json, tokenizer_config.json (chat template) and special_tokens_map.json."""
    tok.save(str(out / "tokenizer.json"))
    tokens = meta["tokenizer.ggml.tokens"]
    named = {
        "bos_token": _token(meta, tokens, "bos_token_id"),
        "eos_token": _token(meta, tokens, "eos_token_id"),
        "pad_token": _token(meta, tokens, "padding_token_id"),
        "unk_token": _token(meta, tokens, "unknown_token_id"),
    }
    named = {k: v for k, v in named.items() if v is not None}
    tcfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        **flags,
        "clean_up_tokenization_spaces": False,  # else decode() would not give the text back
    }
    if context_length:
        tcfg["model_max_length"] = context_length
    if "tokenizer.chat_template" in meta:
        tcfg["chat_template"] = meta["tokenizer.chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(named, indent=2, ensure_ascii=False) + "\n")


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32", *, log: Log = None) -> Path:
    """Write a Hugging Face model directory for ``gguf_path`` into ``out_dir``.

    Writes config.json, model.safetensors (dequantized to ``dtype``),
    tokenizer.json, tokenizer_config.json (with the GGUF's chat template),
    special_tokens_map.json and generation_config.json. Returns ``out_dir``.
    """
    src, out = Path(gguf_path), Path(out_dir)
    if not src.is_file():
        raise MlxpostError(f"GGUF file not found: {src}")
    if log:
        log(f"converting {src.name} to a Hugging Face directory ({dtype})")
    tensors, meta = load_gguf(src, dtype, log=log)
    if "token_embd.weight" not in tensors:
        raise MlxpostError(f"{src}: no token_embd.weight tensor; not a language model GGUF")
    cfg, unpermute = _model_config(src, meta, tensors)
    tok, tok_flags = build_tokenizer(src, meta)  # may refuse: before anything is written
    weights = _hf_weights(src, tensors, cfg, unpermute)
    cfg["torch_dtype"] = dtype

    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    _write_tokenizer(tok, tok_flags, meta, out, cfg.get("max_position_embeddings"))
    return out


_SAMPLE = 1 << 20  # bytes read at each sampled place
_SAMPLES = 16


def gguf_fingerprint(path: str | Path) -> str:
    """A 16-hex-digit cache key for a GGUF file, read in milliseconds whatever its size.

    Hashing a multi-GB file with sha256 on every run costs seconds to
    minutes, so the key hashes the size, the first and last MiB (the header:
    metadata, tokenizer, tensor table and offsets) and 16 MiB-sized blocks at
    evenly spaced places of the tensor data. Any re-quantization or other
    model changes the header or the sampled bytes; the file's name, location
    and mtime are left out, so a copied or re-downloaded file reuses its entry.
    """
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(f"gguf-fingerprint-1:{size}".encode())
    starts = {0, max(0, size - _SAMPLE)} | {size * i // (_SAMPLES + 1) for i in range(1, _SAMPLES + 1)}
    with open(path, "rb") as f:
        for start in sorted(starts):
            f.seek(start)
            h.update(f.read(_SAMPLE))
    return h.hexdigest()[:16]


def _complete(d: Path) -> bool:
    try:
        marker = json.loads((d / _MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return marker.get("converter_version") == CONVERTER_VERSION and (d / "model.safetensors").exists()


def convert_gguf_cached(gguf_path: str | Path, *, dtype: str = "float32", cache_dir: str | Path | None = None,
                        log: Log = None) -> Path:
    """Convert ``gguf_path`` once; later calls return the cached directory.

    The cache entry is ``<cache>/gguf/<gguf_fingerprint(file)>/`` (``-<dtype>``
    appended unless float32), where ``<cache>`` is
    ``cache_dir``, ``$MLXPOST_CACHE`` or ``~/.cache/mlxpost``. It is written
    into a temporary directory and renamed into place, so an interrupted
    conversion never leaves a half-written entry behind.
    """
    src = Path(gguf_path).expanduser()
    if not src.is_file():
        raise MlxpostError(f"GGUF file not found: {src}")
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    key = gguf_fingerprint(src) + ("" if dtype == "float32" else f"-{dtype}")
    final = root / "gguf" / key
    if _complete(final):
        return final

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp", dir=final.parent))
    try:
        convert_gguf(src, tmp, dtype, log=log)
        (tmp / _MARKER).write_text(json.dumps(
            {"converter_version": CONVERTER_VERSION, "source": str(src.resolve()), "dtype": dtype}) + "\n")
        if _complete(final):  # another process finished first
            return final
        if final.exists():  # stale (older converter) or incomplete: move it aside first
            stale = final.with_name(f".{key}.stale{os.getpid()}")
            os.replace(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not _complete(final):  # not just another process finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if log:
        log(f"converted model cached at {final}")
    return final
