"""Write a Hugging Face model directory as one GGUF file (llama.cpp, Ollama, LM Studio).

``mlxpost export RUN --format gguf --quant f16|q8_0`` merges the run's
adapter into the base (:func:`mlxpost.hub.export.export_fused`) and hands
the merged directory to :func:`write_gguf`, which lays it out the way
llama.cpp's own ``convert_hf_to_gguf.py`` does, using llama.cpp's ``gguf``
package (gguf-py) for the file format and the quantization:

- tensor names ``token_embd``, ``blk.N.attn_q``, ... (the inverse of the
  importer's table in :mod:`mlxpost.model.gguf`), and for ``llama`` the q/k
  rows of each head reordered from Hugging Face's half-split RoPE layout into
  llama.cpp's interleaved pairs;
- 1-D tensors (norms, biases) stay F32, as llama.cpp keeps them; 2-D weights
  are F16, or Q8_0 (blocks of 32 with one fp16 scale) where the row length is
  a multiple of 32, or the Q4_K_M mix (see :func:`q4_k_m_type`, encoded by
  :mod:`mlxpost.hub.kquants` since gguf-py only decodes K-quants);
- the tokenizer (byte-level BPE: tokens, token types, merges and the
  pre-tokenizer name that llama.cpp knows it by), the special token ids and
  the chat template go into the metadata.

``q4_k_m`` follows llama.cpp's ``llama_tensor_get_type`` for that file
type: Q4_K by default, Q6_K for the output matrix (the token embedding when
tied) and for ``attn_v`` / ``ffn_down`` in the layers ``_use_more_bits``
picks, and where a row is not a multiple of 256 llama.cpp's fallback
(Q4_K -> Q5_0, Q6_K -> Q8_0), so a model with hidden size 896 (Qwen2.5-0.5B)
gets mostly Q5_0, exactly as ``llama-quantize`` would give it.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer

from ..errors import MlxpostError
from ..files import read_json
from ..model.gguf import _ARCHS, _BLOCK_NAMES, _TOP_NAMES, _pre_tokenizer
from .kquants import QK_K, quantize_k

QUANTS = ("f16", "q8_0", "q4_k_m")

_FILE_TYPE = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M}

# Architectures written here (the importer reads more, e.g. phi3, whose fused tensors this writer does not name).
_WRITABLE = ("llama", "qwen2", "qwen3")

# llama.cpp's substitutes when a row length is not a multiple of 256 (tensor_type_fallback).
_K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

# Text on which each known pre-tokenizer splits differently (digits, contractions, runs of newlines/spaces).
_PROBE = "Hello world 12345 it's\n\n  x\tcafé"


def _gguf_names(cfg: dict) -> dict[str, str]:
    """Hugging Face tensor name -> GGUF name, for every tensor of this config's model."""
    top = {f"{hf}.weight": f"{g}.weight" for g, hf in _TOP_NAMES.items()}
    out = dict(top)
    for i in range(cfg["num_hidden_layers"]):
        for g, hf in _BLOCK_NAMES.items():
            for leaf in ("weight", "bias"):
                out[f"model.layers.{i}.{hf}.{leaf}"] = f"blk.{i}.{g}.{leaf}"
    return out


def _permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face q/k rows -> llama.cpp's order: per head, halves -> interleaved pairs.

    >>> _permute_rope_rows(np.arange(8), 1).tolist()
    [0, 4, 1, 5, 2, 6, 3, 7]
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _arch(cfg: dict, path: Path) -> tuple[str, bool]:
    writable = {a: v for a, v in _ARCHS.items() if a in _WRITABLE}
    for arch, (_, model_type, permuted) in writable.items():
        if cfg.get("model_type") == model_type:
            return arch, permuted
    raise MlxpostError(f"{path}: model_type {cfg.get('model_type')!r} cannot be written as GGUF here "
                       f"(supported: {', '.join(m for _, m, _ in writable.values())}); use --format fused")


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits in the _M mixes: the first and last eighth, and
    every third layer between.

    >>> [i for i in range(24) if _use_more_bits(i, 24)]
    [0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23]
    """
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def q4_k_m_type(name: str, ncols: int, n_layers: int, has_output: bool) -> str:
    """GGUF tensor type of the 2-D weight ``name`` (row length ``ncols``) in a Q4_K_M file.

    >>> q4_k_m_type("blk.0.ffn_down.weight", 4864, 24, False), q4_k_m_type("blk.3.ffn_down.weight", 4864, 24, False)
    ('Q6_K', 'Q4_K')
    >>> q4_k_m_type("token_embd.weight", 896, 24, False), q4_k_m_type("blk.3.attn_q.weight", 896, 24, False)
    ('Q8_0', 'Q5_0')
    """
    if name == "output.weight" or (name == "token_embd.weight" and not has_output):
        kind = "Q6_K"
    elif name.endswith((".attn_v.weight", ".ffn_down.weight")):
        kind = "Q6_K" if _use_more_bits(int(name.split(".")[1]), n_layers) else "Q4_K"
    else:
        kind = "Q4_K"
    if ncols % QK_K:
        kind = _K_FALLBACK[kind]
    return kind if ncols % 32 == 0 else "F16"


def _add_tensor(w: gguf.GGUFWriter, name: str, x: np.ndarray, kind: str) -> None:
    """Write ``x`` as GGUF type ``kind`` (F32, F16, Q8_0, Q5_0, Q5_1: gguf-py; Q4_K, Q5_K, Q6_K: ours)."""
    if kind in ("F32", "F16"):
        w.add_tensor(name, x.astype(np.float32 if kind == "F32" else np.float16))
        return
    t = gguf.GGMLQuantizationType[kind]
    q = quantize_k(x, kind) if kind.endswith("_K") else gguf.quants.quantize(x.astype(np.float32), t)
    w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=t)


def _tensor_type(name: str, x: np.ndarray, quant: str, n_layers: int, has_output: bool) -> str:
    if x.ndim == 1:
        return "F32"
    if quant == "q4_k_m":
        return q4_k_m_type(name, x.shape[-1], n_layers, has_output)
    return "Q8_0" if quant == "q8_0" and x.shape[-1] % 32 == 0 else "F16"


def _pre_name(tok: Tokenizer, path: Path) -> str:
    """The llama.cpp pre-tokenizer name whose splitting this tokenizer reproduces (on a probe text)."""
    text = tok.normalizer.normalize_str(_PROBE) if tok.normalizer else _PROBE
    if tok.pre_tokenizer is None:
        raise MlxpostError(f"{path}: tokenizer.json has no pre-tokenizer; only byte-level BPE tokenizers "
                           "can be written as GGUF here")
    ours = [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(text)]
    for name in ("smollm", "gpt-2", "llama-bpe", "qwen2"):
        if [w for w, _ in _pre_tokenizer(name).pre_tokenize_str(text)] == ours:
            return name
    raise MlxpostError(f"{path}: this tokenizer's pre-tokenizer matches none that llama.cpp names here "
                       "(gpt-2, smollm, llama-bpe, qwen2); cannot write its GGUF")


def _add_tokenizer(w: gguf.GGUFWriter, d: Path) -> None:
    """Byte-level BPE vocabulary, merges, special ids and chat template from ``d``'s tokenizer files."""
    tj = read_json(d / "tokenizer.json")
    model = tj.get("model", {})
    if model.get("type") != "BPE" or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise MlxpostError(f"{d / 'tokenizer.json'}: only byte-level BPE tokenizers can be written as GGUF here "
                           f"(model type {model.get('type')!r})")
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    vocab = dict(model["vocab"])
    added = {a["content"]: a for a in tj.get("added_tokens", [])}
    for a in added.values():
        vocab[a["content"]] = a["id"]
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    for t, i in vocab.items():
        tokens[i] = t
        a = added.get(t)
        types[i] = (gguf.TokenType.NORMAL if a is None else
                    gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_name(tok, d / "tokenizer.json"))
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_merges(merges)

    tcfg = read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").exists() else {}

    def tid(key: str) -> int | None:
        v = tcfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return vocab.get(v) if v else None

    for key, add in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                     ("pad_token", w.add_pad_token_id), ("unk_token", w.add_unk_token_id)):
        if (i := tid(key)) is not None:
            add(i)
    w.add_add_bos_token(bool(tcfg.get("add_bos_token", False)))
    template = tcfg.get("chat_template")
    if template is None and (d / "chat_template.jinja").exists():
        template = (d / "chat_template.jinja").read_text()
    if template:
        w.add_chat_template(template)


def check_quant(quant: str) -> None:
    """Refuse a --quant this writer cannot produce."""
    if quant not in QUANTS:
        raise MlxpostError(f"--quant must be one of {', '.join(QUANTS)}; got {quant!r}")


def write_gguf(model_dir: str | Path, out_file: str | Path, quant: str = "f16", *, name: str = "mlxpost") -> Path:
    """Write the Hugging Face model in ``model_dir`` (llama / qwen2 / qwen3, unquantized
    safetensors) as one GGUF file with its tokenizer and chat template; returns ``out_file``."""
    d, out = Path(model_dir), Path(out_file)
    check_quant(quant)
    cfg = read_json(d / "config.json")
    arch, permuted = _arch(cfg, d / "config.json")
    names = _gguf_names(cfg)
    weights = {}
    for f in sorted(d.glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head

    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(name)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_file_type(_FILE_TYPE[quant])
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    elif scaling:
        raise MlxpostError(f"{d / 'config.json'}: rope_scaling {scaling} cannot be written as GGUF here")
    _add_tokenizer(w, d)

    for hf_name in sorted(weights, key=lambda k: (k.count("."), k)):
        if hf_name not in names:
            raise MlxpostError(f"{d}: tensor {hf_name!r} has no GGUF name for a {arch} model")
        x = np.array(weights[hf_name].astype(mx.float32))
        part = names[hf_name].split(".")[2] if hf_name.startswith("model.layers.") else ""
        if permuted and part in ("attn_q", "attn_k"):
            x = _permute_rope_rows(x, n_head if part == "attn_q" else n_kv)
        kind = _tensor_type(names[hf_name], x, quant, cfg["num_hidden_layers"], "lm_head.weight" in weights)
        _add_tensor(w, names[hf_name], x, kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def describe(path: str | Path) -> dict:
    """Architecture, tensor count and tensor types of a GGUF file, read back with gguf-py's reader."""
    r = gguf.GGUFReader(str(path))
    arch = r.fields["general.architecture"].contents()
    types = sorted({gguf.GGMLQuantizationType(t.tensor_type).name for t in r.tensors})
    return {"architecture": arch, "tensors": len(r.tensors), "types": types,
            "chat_template": "tokenizer.chat_template" in r.fields}

