"""Load models with mlx-lm: resolve a name to a local directory, read it, cast and quantize.

A model is named by a Hugging Face repo id, a local Hugging Face directory or
a ``.gguf`` file (converted once to a Hugging Face directory and cached), or
``default`` (:mod:`mlxpost.model.load.default`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import MlxpostError
from ..files import safetensors_problem
from .default import default_model_path
from .fetch import download_model
from .gguf import convert_gguf_cached

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any  # mlx_lm TokenizerWrapper
    path: Path  # local Hugging Face directory
    config: dict  # the model's config.json (as mlx-lm read it)
    name: str  # what the user asked for


def resolve_model_path(spec: str, revision: str | None = None, log=None) -> Path:
    """Local directory for ``spec`` (HF directory, ``.gguf`` file or hub id).

    ``log``: an optional callable for progress messages (downloads, conversion).
    """
    if spec in (None, "", "default"):
        return default_model_path(log=log)
    p = Path(spec).expanduser()
    if p.exists():
        if p.is_file() and p.suffix == ".gguf":
            return convert_gguf_cached(p, log=log)
        if p.is_dir():
            if not (p / "config.json").exists():
                raise MlxpostError(f"{p}: not a model directory (no config.json)")
            return p
        raise MlxpostError(f"{p}: expected a model directory or a .gguf file")
    if spec.endswith(".gguf") or spec.startswith((".", "/", "~")):
        raise MlxpostError(f"model not found: {spec}")
    return download_model(spec, revision)


TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"), ("tiktoken.model",))


def check_model_dir(path: Path) -> None:
    """Refuse a model directory that cannot load, naming the file and what is wrong with it.

    Checked before mlx-lm and transformers see the directory (their errors
    name no file, or come as tracebacks): ``config.json`` is a JSON object,
    and every ``*.safetensors`` file is as long as its header says (a
    download or copy cut short). (A tokenizer that fails to load is named
    after the fact, with :data:`TOKENIZER_FILES`: tokenizers come in more
    layouts than a list here would know.)
    """
    path = Path(path)
    cfg = path / "config.json"
    try:
        config = json.loads(cfg.read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        what = "missing" if isinstance(e, FileNotFoundError) else "not valid JSON"
        raise MlxpostError(f"{cfg}: {what} (not a usable model directory)") from None
    if not isinstance(config, dict):
        raise MlxpostError(f"{cfg}: expected a JSON object, got {type(config).__name__}")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise MlxpostError(f"{path}: no *.safetensors weights in this model directory")
    for w in weights:
        problem = safetensors_problem(w)
        if problem:
            raise MlxpostError(f"{path}: {problem} (an interrupted download or copy? fetch the model again)")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300] + ("..." if len(text) > 300 else "")


def default_dtype() -> str:
    """float32 on MLX's CPU backend (bf16/fp16 matmuls there are scalar loops); else bfloat16."""
    return "float32" if mx.default_device() == mx.cpu else "bfloat16"


def rope_theta_override(path: str | Path) -> dict:
    """``{"rope_theta": x}`` when config.json has it only inside ``rope_parameters`` (transformers 5).

    mlx-lm reads the top-level ``rope_theta`` only and silently falls back to
    10000 otherwise, which would train and generate with the wrong positions.
    """
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    rp = cfg.get("rope_parameters")
    if "rope_theta" in cfg or not isinstance(rp, dict) or "rope_theta" not in rp:
        return {}
    return {"rope_theta": float(rp["rope_theta"])}


def load_model(spec: str | None, *, dtype: str = "auto", quantize: int | None = None,
               group_size: int = 64, revision: str | None = None, trust_remote_code: bool = False,
               log=None) -> LoadedModel:
    """Load a model and its tokenizer; cast floating weights to ``dtype``.

    ``quantize`` (4 or 8) quantizes the linear layers of the transformer
    blocks after loading: QLoRA on a base that was not saved quantized.
    A base saved quantized (e.g. an ``mlx-community/...-4bit`` repo) stays so.
    """
    from mlx_lm.utils import load_model as _load_model  # here: importing mlx-lm loads transformers (over a second)
    from mlx_lm.utils import load_tokenizer

    path = resolve_model_path(spec, revision, log)
    check_model_dir(path)
    overrides = rope_theta_override(path)
    if overrides and log:
        log(f"{path}/config.json keeps rope_theta only in rope_parameters; using {overrides['rope_theta']} "
            "(mlx-lm would read 10000)")
    try:
        model, config = _load_model(path, lazy=True, trust_remote_code=trust_remote_code, model_config=overrides)
    except (ValueError, RuntimeError, OSError) as e:
        raise MlxpostError(f"mlx-lm cannot load {path}: {_one_line(e)}") from None
    try:
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError, OSError, KeyError, ... for bad files
        if not any(all((path / f).is_file() for f in files) for files in TOKENIZER_FILES):
            raise MlxpostError(f"{path}: no tokenizer (expected tokenizer.json, or tokenizer.model, or vocab.json "
                               "with merges.txt); copy the tokenizer files of the model into this directory") from None
        raise MlxpostError(f"{path}: the tokenizer cannot be loaded ({_one_line(e)})") from None

    name = dtype if dtype != "auto" else default_dtype()
    if name not in DTYPES:
        raise MlxpostError(f"model.dtype must be auto, float32, bfloat16 or float16; got {dtype!r}")
    model.set_dtype(DTYPES[name])
    if quantize:
        if quantize not in (2, 3, 4, 6, 8):
            raise MlxpostError(f"model.quantize must be 2, 3, 4, 6 or 8 bits; got {quantize}")
        quantize_blocks(model, bits=quantize, group_size=group_size)
    mx.eval(model.parameters())
    model.eval()
    return LoadedModel(model, tokenizer, path, config, spec or "default")


def quantize_blocks(model: nn.Module, bits: int, group_size: int = 64) -> None:
    """Quantize the linear layers inside the transformer blocks (QLoRA base)."""

    def pred(path: str, m: nn.Module) -> bool:
        return (isinstance(m, nn.Linear) and ".layers." in f".{path}"
                and m.weight.shape[-1] % group_size == 0)

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=pred)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def compute_dtype(model: nn.Module) -> mx.Dtype:
    """The dtype the model computes in: its first floating parameter's (a quantized model's packed
    weights are integers, its scales and norms are not); float32 for a model without one."""
    return next((v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)),
                mx.float32)
