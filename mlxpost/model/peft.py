"""Hugging Face PEFT adapters read into mlxpost's LoRA / DoRA layers (``--adapter-init``)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..errors import MlxpostError
from ..files import read_json
from .adapters import ADAPTER_CONFIG, attach_adapters, load_adapters, split_layer_path

PEFT_WEIGHTS = "adapter_model.safetensors"

PEFT_PREFIX = "base_model.model."


_LEAF = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight", "m": "lora_magnitude_vector"}


def is_peft_dir(directory: str | Path) -> bool:
    d = Path(directory)
    if (d / PEFT_WEIGHTS).exists():
        return True
    f = d / ADAPTER_CONFIG
    return f.exists() and "peft_type" in read_json(f)


def load_peft_adapter(model: nn.Module, peft_dir: str | Path, dropout: float | None = None) -> dict:
    """Attach mlxpost LoRA/DoRA layers to ``model`` from a PEFT adapter directory (the inverse of ``peft``).

    The adapter must be one mlx-lm's layout can hold: LoRA (optionally DoRA)
    on linear layers inside the transformer blocks, the same modules in each
    of the last N blocks, one rank and one alpha. Returns the adapter's
    configuration in mlx-lm's layout (what :func:`mlxpost.model.adapters.load_adapters` returns).
    """
    d = Path(peft_dir)
    cfg, where = _peft_config(d)
    wf = d / PEFT_WEIGHTS
    modules = _peft_tensors(d)
    keys, n_blocks = _adapted_blocks(model, modules, d)
    r, scale, dora = _rank_scale_dora(cfg, modules, where)
    drop = float(cfg.get("lora_dropout") or 0.0) if dropout is None else dropout
    attach_adapters(model, rank=r, scale=scale, dropout=drop, keys=keys, num_layers=n_blocks, dora=dora)
    named = dict(model.named_modules())
    updates = []
    for path, leaves in modules.items():
        layer = named[path]
        for leaf, v in leaves.items():
            want = getattr(layer, leaf)
            if v.shape != want.shape:
                raise MlxpostError(f"{wf}: {path}: {leaf} has shape {tuple(v.shape)} in mlx-lm's layout but this "
                                   f"model needs {tuple(want.shape)}")
            updates.append((f"{path}.{leaf}", v.astype(want.dtype)))
    model.load_weights(updates, strict=False)
    mx.eval(model.parameters())
    return {"fine_tune_type": "dora" if dora else "lora", "num_layers": n_blocks,
            "lora_parameters": {"rank": r, "scale": scale, "dropout": drop, "keys": keys}}


def _peft_config(d: Path) -> tuple[dict, str]:
    """adapter_config.json of a PEFT LoRA that holds LoRA matrices only (and where it is, for messages)."""
    cfg_file = d / ADAPTER_CONFIG
    if not cfg_file.exists():
        raise MlxpostError(f"{d}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    cfg = read_json(cfg_file)
    where = str(cfg_file)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise MlxpostError(f"{where}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters can be loaded")
    for key, ok in (("modules_to_save", lambda v: not v), ("bias", lambda v: v in (None, "none")),
                    ("lora_bias", lambda v: not v), ("trainable_token_indices", lambda v: not v),
                    ("target_parameters", lambda v: not v), ("layer_replication", lambda v: not v)):
        if not ok(cfg.get(key)):
            raise MlxpostError(f"{where}: {key} is {cfg.get(key)!r}; mlxpost adapters hold LoRA matrices only")
    return cfg, where


def _peft_tensors(d: Path) -> dict[str, dict[str, mx.array]]:
    """Module path -> its tensors in mlx-lm's layout (``lora_a`` (in, r), ``lora_b`` (r, out), DoRA's ``m``)."""
    wf = d / PEFT_WEIGHTS
    if not wf.exists():
        other = "adapter_model.bin" if (d / "adapter_model.bin").exists() else None
        raise MlxpostError(f"{d}: no {PEFT_WEIGHTS}" + (f" (only {other}: save the adapter with safetensors, "
                                                          "safe_serialization=True)" if other else ""))
    pat = re.compile(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$")
    mag = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")
    modules: dict[str, dict[str, mx.array]] = {}
    for k, v in mx.load(str(wf)).items():
        m = pat.match(k)
        if m:
            modules.setdefault(m.group(1), {})["lora_a" if m.group(2) == "lora_A" else "lora_b"] = v.T
            continue
        m = mag.match(k)
        if m:
            modules.setdefault(m.group(1), {})["m"] = v.reshape(-1)
            continue
        raise MlxpostError(f"{wf}: tensor {k} is not a LoRA matrix of a linear layer (embedding LoRA, "
                           "modules_to_save and other PEFT extras are not supported)")
    if not modules:
        raise MlxpostError(f"{wf}: no LoRA tensors")
    for path, leaves in modules.items():
        if "lora_a" not in leaves or "lora_b" not in leaves:
            raise MlxpostError(f"{wf}: {path} lacks lora_A or lora_B")
    return modules


def _adapted_blocks(model: nn.Module, modules: dict, d: Path) -> tuple[list[str], int]:
    """The module keys adapted in each block and how many of the last blocks: mlx-lm's layout, or an error."""
    wf = d / PEFT_WEIGHTS
    named = dict(model.named_modules())
    by_layer: dict[int, set[str]] = {}
    prefixes = set()
    for path in modules:
        split = split_layer_path(path)
        if split is None:
            raise MlxpostError(f"{wf}: {path} is outside the transformer blocks; mlxpost adapters live inside "
                               "them only")
        mod = named.get(path)
        if not isinstance(mod, (nn.Linear, nn.QuantizedLinear)):
            raise MlxpostError(f"{wf}: {path}: " + ("no such module in this model" if mod is None else
                                                    f"a {type(mod).__name__}, not a linear layer"))
        prefixes.add(split[0])
        by_layer.setdefault(split[1], set()).add(split[2])
    n_layers = len(model.layers)
    ids = sorted(by_layer)
    keysets = {frozenset(v) for v in by_layer.values()}
    if ids != list(range(n_layers - len(ids), n_layers)) or len(keysets) != 1 or len(prefixes) != 1:
        raise MlxpostError(
            f"{d}: the adapter covers blocks {ids} of {n_layers}"
            + (" with different modules in different blocks" if len(keysets) != 1 else "")
            + "; mlxpost (like mlx-lm) holds the same modules in each of the last N blocks")
    return sorted(next(iter(keysets))), len(ids)


def _rank_scale_dora(cfg: dict, modules: dict, where: str) -> tuple[int, float, bool]:
    """One rank, one scale (alpha / r, or alpha / sqrt(r) with rsLoRA) and whether it is DoRA."""
    ranks = {leaves["lora_a"].shape[1] for leaves in modules.values()}
    if len(ranks) != 1:
        raise MlxpostError(f"{where}: modules have different ranks {sorted(ranks)}; mlxpost adapters use one rank")
    r = ranks.pop()
    if cfg.get("r") not in (None, r) and not cfg.get("rank_pattern"):
        raise MlxpostError(f"{where}: r is {cfg.get('r')} but the tensors have rank {r}")
    alpha = cfg.get("lora_alpha", 8)
    if cfg.get("alpha_pattern"):
        alphas = {_pattern_value(cfg["alpha_pattern"], p, alpha) for p in modules}
        if len(alphas) != 1:
            raise MlxpostError(f"{where}: alpha_pattern gives modules different alphas; mlxpost uses one scale")
        alpha = alphas.pop()
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    dora = bool(cfg.get("use_dora"))
    weights = where.replace(ADAPTER_CONFIG, PEFT_WEIGHTS)
    if dora and any("m" not in leaves for leaves in modules.values()):
        raise MlxpostError(f"{weights}: use_dora is set but some modules have no lora_magnitude_vector")
    if not dora and any("m" in leaves for leaves in modules.values()):
        raise MlxpostError(f"{weights}: holds lora_magnitude_vector tensors but {where} does not set use_dora")
    return r, scale, dora


def _pattern_value(pattern: dict, path: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def load_init_adapter(model: nn.Module, directory: str | Path, dropout: float = 0.0) -> dict:
    """``lora.init`` (``--adapter-init``): an adapter in mlx-lm's layout or in PEFT's."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise MlxpostError(f"lora.init: {d} is not a directory (give an adapter or run directory)")
    if is_peft_dir(d):
        return load_peft_adapter(model, d, dropout=dropout)
    return load_adapters(model, d, dropout=dropout)
