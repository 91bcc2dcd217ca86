"""Adapters on a loaded model: attach LoRA / DoRA, save and load them, merge stacks.

Adapters are written in mlx-lm's layout (``adapter_config.json`` and
``adapters.safetensors``), which ``mlx_lm.generate --adapter-path`` loads.
A run trained ``--from`` another records that run's adapter (path and hash);
:func:`load_adapter_stack` rebuilds the model as it was trained.

A run trained on top of others keeps its own adapter in ``RUN/own/`` and
writes, at the top of the run directory, the whole stack as one mlx-lm
adapter (so ``mlx_lm.generate --adapter-path RUN`` loads what was trained);
:func:`own_adapter_dir` says where a directory's own adapter is, and every
reader here goes through it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import MlxpostError
from ..files import atomic_write_json, save_safetensors_atomic
from ..files import file_sha256 as file_hash
from .load import quantize_blocks
from .lora import ADAPTER_LEAVES, DoRALinear, LoRALinear, adapter_modules

ADAPTER_CONFIG = "adapter_config.json"

ADAPTER_WEIGHTS = "adapters.safetensors"

OWN_DIR = "own"  # a stacked run's own adapter (the top level holds the combined stack, for mlx-lm)


def own_adapter_dir(directory: str | Path) -> Path:
    """The directory holding ``directory``'s own adapter: ``directory/own`` when it has one, else itself.

    A run trained ``--from`` another writes its own adapter (the one it
    trained, with the ``from_adapter`` record) to ``own/`` and the combined
    stack at the top level, where mlx-lm looks. ``--from`` chains, exports and
    ``mlxpost generate`` read the own adapter and rebuild the stack from it;
    runs without ``own/`` (not stacked, or written before it existed) keep
    their own adapter at the top level.
    """
    d = Path(directory)
    return d / OWN_DIR if (d / OWN_DIR / ADAPTER_CONFIG).is_file() else d


def _linear_paths(block: nn.Module) -> list[str]:
    return [p for p, m in block.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear)) and p]


def resolve_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Module paths inside a transformer block that get adapters.

    ``targets`` is ``"all-linear"``, ``"attention"``, ``"mlp"`` or a list of
    names; a name matches a path equal to it or ending in ``.name``
    (``q_proj`` matches ``self_attn.q_proj``).
    """
    layers = getattr(model, "layers", None)
    if not layers:
        raise MlxpostError("this model exposes no transformer blocks (model.layers); LoRA cannot be attached")
    available = _linear_paths(layers[0])
    presets = {
        "attention": ["q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "out_proj", "wqkv", "wo", "c_attn", "c_proj"],
        "mlp": ["gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "w1", "w2", "w3"],
    }
    if isinstance(targets, str):
        if targets == "all-linear":
            return available
        if targets not in presets:
            raise MlxpostError(f"lora.targets: unknown preset {targets!r} (use all-linear, attention, mlp or a list)")
        names = [n for n in presets[targets]
                 if any(p == n or p.endswith("." + n) for p in available)]
        if targets == "attention":  # c_proj in GPT-2 blocks is also the MLP's output
            names = [n for n in names if n != "c_proj"] + (["attn.c_proj"] if "attn.c_proj" in available else [])
        targets = names
    keys: list[str] = []
    for t in targets:
        hit = [p for p in available if p == t or p.endswith("." + t)]
        if not hit:
            raise MlxpostError(f"lora.targets: {t!r} matches no linear layer in this model's blocks; "
                               f"available: {', '.join(available)}")
        keys += [h for h in hit if h not in keys]
    return keys


def attach_adapters(model: nn.Module, *, rank: int, scale: float, dropout: float = 0.0,
                    keys: list[str], num_layers: int | None = None, dora: bool = False) -> int:
    """Freeze the model and put adapters on ``keys`` in the last ``num_layers`` blocks.

    Returns the number of trainable parameters.
    """
    cls = DoRALinear if dora else LoRALinear
    layers = model.layers
    n = len(layers) if num_layers in (None, -1, 0) else num_layers
    if n > len(layers) or n < 0:
        raise MlxpostError(f"lora.num_layers is {num_layers} but the model has {len(layers)} blocks")
    model.freeze()
    for block in layers[len(layers) - n:]:
        mods = dict(block.named_modules())
        new = [(k, cls(mods[k], rank=rank, scale=scale, dropout=dropout)) for k in keys]
        block.update_modules(tree_unflatten(new))
    for _, m in adapter_modules(model):
        m.freeze()
        m.unfreeze(keys=[k for k in ADAPTER_LEAVES if k in m], recurse=False)
    return trainable_count(model)


def trainable_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def adapter_config(*, rank: int, scale: float, dropout: float, keys: list[str], num_layers: int,
                   dora: bool, extra: dict | None = None) -> dict:
    """mlx-lm's adapter_config.json (plus an ``mlxpost`` section mlx-lm ignores)."""
    cfg = {
        "fine_tune_type": "dora" if dora else "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": dropout, "keys": keys},
    }
    if extra:
        cfg["mlxpost"] = extra
    return cfg


def save_adapters(model: nn.Module, directory: str | Path, config: dict) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(d / ADAPTER_WEIGHTS, adapter_weights(model))
    atomic_write_json(d / ADAPTER_CONFIG, config)


def read_adapter_config(directory: str | Path) -> dict:
    d = Path(directory)
    f = d / ADAPTER_CONFIG
    if not f.exists():
        raise MlxpostError(f"{d}: no {ADAPTER_CONFIG} (not an adapter or run directory)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise MlxpostError(f"{f}:{e.lineno}: not valid JSON ({e.msg})") from None


def load_adapters(model: nn.Module, directory: str | Path, weights_file: str | Path | None = None,
                  dropout: float = 0.0) -> dict:
    """Attach adapters as described in ``directory`` and load their weights."""
    d = Path(directory)
    cfg = read_adapter_config(d)
    kind = cfg.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise MlxpostError(f"{d / ADAPTER_CONFIG}: fine_tune_type {kind!r} is not supported (lora or dora)")
    lp = dict(cfg.get("lora_parameters", {}))
    # mlx-lm's own adapter_config.json may leave keys and num_layers out; fill
    # them in as mlx-lm would, and return the resolved values.
    lp["keys"] = lp.get("keys") or resolve_targets(model, "all-linear")
    lp["rank"], lp["scale"] = lp.get("rank", 8), lp.get("scale", 20.0)
    n = cfg.get("num_layers") or len(model.layers)
    n = len(model.layers) if n < 0 else n
    attach_adapters(model, rank=lp["rank"], scale=lp["scale"], dropout=dropout, keys=lp["keys"],
                    num_layers=n, dora=kind == "dora")
    cfg = {**cfg, "lora_parameters": lp, "num_layers": n}
    wf = Path(weights_file) if weights_file else d / ADAPTER_WEIGHTS
    if not wf.exists():
        raise MlxpostError(f"{d}: no {wf.name}")
    load_adapter_weights(model, wf)
    return cfg


def load_adapter_weights(model: nn.Module, weights_file: Path) -> None:
    """Load adapter tensors into the model's (already attached) adapters.

    The file must hold exactly the model's trainable tensors, with their shapes.
    """
    weights = mx.load(str(weights_file))
    expected = dict(tree_flatten(model.trainable_parameters()))
    problems = [f"{k}: not an adapter parameter of this model" for k in weights if k not in expected]
    problems += [f"{k}: shape {tuple(weights[k].shape)} != {tuple(expected[k].shape)}"
                 for k in weights if k in expected and weights[k].shape != expected[k].shape]
    problems += [f"{k}: missing from {weights_file.name}" for k in expected if k not in weights]
    if problems:
        raise MlxpostError(f"{weights_file} does not fit this model:\n  " + "\n  ".join(problems[:10]))
    model.load_weights([(k, v.astype(expected[k].dtype)) for k, v in weights.items()], strict=False)
    mx.eval(model.parameters())


def fuse_adapters(model: nn.Module) -> None:
    """Merge every adapter into its base layer (dequantizing quantized ones)."""
    fused = [(n, m.fused()) for n, m in adapter_modules(model)]
    if fused:
        model.update_modules(tree_unflatten(fused))


def from_adapter_of(directory: str | Path, purpose: str = "rebuild the model") -> Path | None:
    """The adapter directory ``directory``'s adapter was trained on top of (``--from``), checked; or None.

    Its weights must still exist and match the hash recorded at training time.
    Both directories may be runs with an ``own/`` adapter (see :func:`own_adapter_dir`);
    the directory returned is the one recorded (the run's, not its ``own/``).
    """
    d = own_adapter_dir(directory)
    meta = read_adapter_config(d).get("mlxpost", {}) or {}
    src = meta.get("from_adapter")
    if not src:
        return None

    s = Path(src)
    weights = own_adapter_dir(s) / ADAPTER_WEIGHTS
    if not weights.exists():
        raise MlxpostError(f"{d} was trained on top of the adapter in {s}, which is gone; it is needed to {purpose}")
    want = meta.get("from_adapter_sha256")
    if want and file_hash(weights) != want:
        raise MlxpostError(f"{d} was trained on top of {weights}, which has changed since")
    return s


def load_adapter_stack(model: nn.Module, directory: str | Path) -> dict:
    """Load an adapter, first merging the adapter it was trained on top of (``--from``), if any.

    A DPO run started ``--from`` an SFT run records that run's adapter
    (path and hash); the SFT adapter is merged into the base, then the DPO
    adapter is attached, which reproduces the model as it was trained. A run
    directory's own adapter is read from ``own/`` when it has one.
    """
    d = own_adapter_dir(directory)
    meta = read_adapter_config(d).get("mlxpost", {})
    s = from_adapter_of(d)
    if s is not None:
        load_adapter_stack(model, s)
        fuse_adapters(model)
        if meta.get("quantize"):
            quantize_blocks(model, meta["quantize"], meta.get("quantize_group_size") or 64)
    return load_adapters(model, d)


LAYER_PATH = re.compile(r"^((?:.*?\.)?layers)\.(\d+)\.(.+)$")  # first numbered "layers" segment, as PEFT finds it


def split_layer_path(path: str) -> tuple[str, int, str] | None:
    """``model.layers.3.self_attn.q_proj`` -> ("model.layers", 3, "self_attn.q_proj"); None outside the blocks."""
    m = LAYER_PATH.match(path)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None
