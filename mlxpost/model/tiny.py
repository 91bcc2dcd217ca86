"""Build small random-weight models in the exact Hugging Face layout.

Tests and benchmarks need real model directories (``config.json``,
``model.safetensors``, ``tokenizer.json`` trained with ``tokenizers``,
``tokenizer_config.json`` with a chat template) so that the same loading code
that serves real models is exercised. Nothing here downloads anything.

    build_tiny_model(path)                      # ~100k parameters, llama, ChatML
    build_tiny_model(path, hidden_size=384,     # ~30M parameters (benchmarks)
                     num_layers=6, vocab_size=16384)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# ChatML, as SmolLM2 and Qwen write it. The variant with {% generation %}
# markers lets Hugging Face compute the assistant mask itself; the plain one
# forces mlxpost's prefix-rendering fallback.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


CHATML_GENERATION_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# A Llama-3 style template that writes the BOS token itself: tokenizing its
# output with add_special_tokens=True would give a second BOS.
BOS_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


TEMPLATES = {
    "chatml": CHATML_TEMPLATE,
    "chatml-generation": CHATML_GENERATION_TEMPLATE,
    "llama3": BOS_TEMPLATE,
}

_WORDS = (
    "the a an of to and in is it that for on with as was at by be this from or "
    "have not are but what all were when we there can been has more if will one "
    "do no about time up out them so some would into its than then two could "
    "user assistant system answer question number add plus minus times equals "
    "hello world model train data token learn step check right wrong yes ok "
    "red green blue cat dog sun moon tree river stone bread apple sky"
).split()


def default_corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
    """Deterministic English-like lines with digits and punctuation."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.4:
            words.append(f"{rng.randint(0, 999)} + {rng.randint(0, 999)} = {rng.randint(0, 1998)}")
        line = " ".join(words)
        lines.append(line[0].upper() + line[1:] + rng.choice(".!?"))
    return lines


def train_tokenizer(vocab_size: int, special_tokens: list[str], corpus: list[str]):
    """A byte-level BPE tokenizer (the GPT-2 / Llama-3 / Qwen family)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def build_tiny_model(
    path: str | Path,
    *,
    model_type: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    tie_word_embeddings: bool = True,
    template: str = "chatml",
    corpus: list[str] | None = None,
    seed: int = 0,
    dtype: str = "float32",
    rope_theta: float = 10000.0,
    max_position_embeddings: int = 4096,
    embed_std: float = 0.02,
) -> Path:
    """Write a random-weight model directory in Hugging Face layout; return its path.

    ``model_type`` is ``llama`` or ``qwen2`` (q/k/v biases). ``template`` picks
    one of :data:`TEMPLATES`; ``None`` writes no chat template at all.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    special = _write_tokenizer(path, template=template, vocab_size=vocab_size, corpus=corpus, seed=seed,
                               max_length=max_position_embeddings)
    head_dim = hidden_size // num_heads
    config = {
        "architectures": ["Qwen2ForCausalLM" if model_type == "qwen2" else "LlamaForCausalLM"],
        "model_type": model_type,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": dtype,
        **special,
    }
    if model_type == "llama":
        config.update(attention_bias=False, mlp_bias=False, head_dim=head_dim)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": special["eos_token_id"]}))
    tensors = _random_weights(config, np.random.default_rng(seed), {"float32": np.float32, "float16": np.float16}[dtype],
                              embed_std=embed_std)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _write_tokenizer(path: Path, *, template: str | None, vocab_size: int, corpus: list[str] | None, seed: int,
                     max_length: int) -> dict:
    """tokenizer.json (a BPE trained on ``corpus``) and its configuration; returns the special tokens' ids."""
    if template == "llama3":
        bos, eos, specials = "<|begin_of_text|>", "<|eot_id|>", [
            "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|pad|>"]
        pad = "<|pad|>"
    else:
        bos, eos, specials = None, "<|im_end|>", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        pad = "<|endoftext|>"
    tok = train_tokenizer(vocab_size, specials, corpus or default_corpus(seed=seed))
    if bos is not None:
        # Like real Llama-3 tokenizers: encoding with special tokens prepends BOS.
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    if tok.get_vocab_size() > vocab_size:
        raise ValueError("tokenizer came out larger than vocab_size")
    tok.save(str(path / "tokenizer.json"))
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "eos_token": eos,
        "pad_token": pad,
        "bos_token": bos,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if template is not None:
        tcfg["chat_template"] = TEMPLATES[template]
    (path / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
    (path / "special_tokens_map.json").write_text(
        json.dumps({k: v for k, v in {"bos_token": bos, "eos_token": eos, "pad_token": pad}.items() if v})
    )
    vocab = tok.get_vocab()
    return {"bos_token_id": vocab.get(bos) if bos else None, "eos_token_id": vocab[eos], "pad_token_id": vocab[pad]}


def _random_weights(config: dict, rng: np.random.Generator, dtype, *, embed_std: float, std: float = 0.02) -> dict:
    """Random weights in Hugging Face names for ``config`` (drawn in a fixed order: the same seed, the same model).

    ``embed_std``: a larger scale of the (tied) embeddings and output head
    lets logits, and so next-token probabilities, move far from uniform.
    """
    def w(*shape):
        return (rng.standard_normal(shape) * std).astype(dtype)

    V, D, F = config["vocab_size"], config["hidden_size"], config["intermediate_size"]
    H, head_dim = config["num_attention_heads"], D // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    tensors = {"model.embed_tokens.weight": (rng.standard_normal((V, D)) * embed_std).astype(dtype),
               "model.norm.weight": np.ones(D, dtype)}
    if not config["tie_word_embeddings"]:
        tensors["lm_head.weight"] = (rng.standard_normal((V, D)) * embed_std).astype(dtype)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = np.ones(D, dtype)
        tensors[p + "post_attention_layernorm.weight"] = np.ones(D, dtype)
        tensors[p + "self_attn.q_proj.weight"] = w(H * head_dim, D)
        tensors[p + "self_attn.k_proj.weight"] = w(kv, D)
        tensors[p + "self_attn.v_proj.weight"] = w(kv, D)
        tensors[p + "self_attn.o_proj.weight"] = w(D, H * head_dim)
        if config["model_type"] == "qwen2":
            tensors[p + "self_attn.q_proj.bias"] = w(H * head_dim)
            tensors[p + "self_attn.k_proj.bias"] = w(kv)
            tensors[p + "self_attn.v_proj.bias"] = w(kv)
        tensors[p + "mlp.gate_proj.weight"] = w(F, D)
        tensors[p + "mlp.up_proj.weight"] = w(F, D)
        tensors[p + "mlp.down_proj.weight"] = w(D, F)
    return tensors


def count_parameters(path: str | Path) -> int:
    n = 0
    with safe_open(str(Path(path) / "model.safetensors"), "numpy") as f:
        for k in f.keys():
            n += int(np.prod(f.get_slice(k).get_shape()))
    return n
