"""Export a run's adapter for other tools, and import PEFT adapters.

``mlxpost export RUN_DIR --format FORMAT --out DIR`` writes one of

* ``peft``: ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's
  layout, for ``PeftModel.from_pretrained(<Hugging Face base>, DIR)``;
* ``fused``: the adapter(s) merged into the base weights (dequantized when the
  base was quantized), a Hugging Face model directory that
  ``AutoModelForCausalLM.from_pretrained`` and ``mlx_lm`` load;
* ``mlx``: mlx-lm's adapter layout (``adapter_config.json`` +
  ``adapters.safetensors``), for ``mlx_lm.generate --adapter-path``;

each with a model card (``README.md``).

Layouts. mlx-lm (and mlxpost) keep ``lora_a`` as (in, r) and ``lora_b`` as
(r, out) and compute ``y = W x + scale * (x @ lora_a) @ lora_b``; PEFT keeps
``lora_A.weight`` as (r, in) and ``lora_B.weight`` as (out, r) and computes
``y = W x + (lora_alpha / r) * B A x``. So A = lora_a.T, B = lora_b.T and
``lora_alpha = scale * r``. DoRA's magnitude is the same vector in both: one
entry per output row, ``y = m / ||W + dW||_row * (W + dW) x + bias``
(``lora_magnitude_vector`` in PEFT, ``m`` here).

A run trained ``--from`` another run (DPO on top of an SFT adapter merged into
the base) is a stack of LoRA updates ``s1 B1 A1 + s2 B2 A2``: that is exactly
one LoRA of rank r1 + r2 (A and B concatenated, B blocks rescaled to one
scale), which is what the ``peft`` and ``mlx`` formats write for it. A stack
holding a DoRA adapter is not a sum of low-rank updates; only ``fused`` can
represent it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import mlx.core as mx
import mlx.nn as nn
import yaml

from .errors import MlxpostError
from .model import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, DTYPES, attach_adapters, default_dtype, from_adapter_of,
                    fuse_adapters, load_adapter_stack, load_adapters, load_model, read_adapter_config, resolve_model_path)

FORMATS = ("peft", "fused", "mlx")
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
CARD = "README.md"

# Files of a Hugging Face model directory that describe the tokenizer and generation.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")

_LAYER = re.compile(r"^((?:.*?\.)?layers)\.(\d+)\.(.+)$")  # first numbered "layers" segment, as PEFT finds it
_LEAF = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight", "m": "lora_magnitude_vector"}


# ---------------------------------------------------------------------------
# The run or adapter being exported
# ---------------------------------------------------------------------------


@dataclass
class Source:
    adapter_dir: Path  # holds adapter_config.json + adapters.safetensors
    adapter_cfg: dict
    run_dir: Path | None  # the run directory (config.yaml, summary.json), when there is one
    run_cfg: dict = field(default_factory=dict)  # config.yaml as written by the run
    metrics: dict = field(default_factory=dict)  # summary.json (or best/best.json with --best)
    best: bool = False

    @property
    def meta(self) -> dict:
        return self.adapter_cfg.get("mlxpost", {}) or {}

    @property
    def method(self) -> str:
        return self.meta.get("method") or self.run_cfg.get("method") or "sft"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MlxpostError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def find_source(run_dir: str | Path, best: bool = False) -> Source:
    """The adapter of ``run_dir`` (or of its ``best/``), with the run's config and final metrics.

    ``run_dir`` may also be a bare adapter directory or a checkpoint
    (``RUN_DIR/checkpoints/step-N``); the run's files are then looked for in
    the directories above it.
    """
    d = Path(run_dir).expanduser()
    if not d.exists():
        raise MlxpostError(f"{d}: no such directory")
    if not d.is_dir():
        raise MlxpostError(f"{d}: not a directory (give a run directory or an adapter directory)")
    adapter_dir = d / "best" if best else d
    if best and not adapter_dir.is_dir():
        raise MlxpostError(f"{d}: no best/ adapter (it is written when the run evaluates on validation data)")
    if not (adapter_dir / ADAPTER_CONFIG).exists():
        hint = ""
        if not best and (d / "best" / ADAPTER_CONFIG).exists():
            hint = "; the run has not written its final adapter (still running, or killed): --best exports best/"
        elif (d / "checkpoints").is_dir():
            steps = sorted(p.name for p in (d / "checkpoints").glob("step-*") if (p / ADAPTER_CONFIG).exists())
            if steps:
                hint = f"; its latest checkpoint can be exported: {d / 'checkpoints' / steps[-1]}"
        raise MlxpostError(f"{adapter_dir}: no {ADAPTER_CONFIG} (not a run or adapter directory{hint})")
    if not (adapter_dir / ADAPTER_WEIGHTS).exists():
        raise MlxpostError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} beside {ADAPTER_CONFIG}")
    cfg = read_adapter_config(adapter_dir)
    kind = cfg.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise MlxpostError(f"{adapter_dir / ADAPTER_CONFIG}: fine_tune_type is {kind!r}; only lora and dora "
                           "adapters can be exported")

    run_root = next((p for p in (adapter_dir, adapter_dir.parent, adapter_dir.parent.parent)
                     if (p / "config.yaml").exists()), None)
    run_cfg: dict = {}
    if run_root is not None:
        try:
            run_cfg = yaml.safe_load((run_root / "config.yaml").read_text()) or {}
        except yaml.YAMLError as e:
            raise MlxpostError(f"{run_root / 'config.yaml'}: not valid YAML ({e})") from None
    metrics: dict = {}
    if best and (adapter_dir / "best.json").exists():
        metrics = {"best": _read_json(adapter_dir / "best.json")}
    elif run_root is not None and (run_root / "summary.json").exists() and adapter_dir == run_root:
        metrics = _read_json(run_root / "summary.json")
    return Source(adapter_dir, cfg, run_root, run_cfg, metrics, best)


def base_model_spec(src: Source, model: str | None = None) -> str:
    """What to load as the base: ``--model``, else the local directory the run trained on, else its name."""
    if model:
        return model
    meta = src.meta
    local = meta.get("model_dir")
    if local and Path(local).exists():
        return local
    base = meta.get("base_model") or (src.run_cfg.get("model") or {}).get("path")
    if not base:
        raise MlxpostError(f"{src.adapter_dir / ADAPTER_CONFIG}: no mlxpost.base_model (not written by mlxpost?) "
                           "and no config.yaml beside it; pass the base model with --model")
    return base


def base_model_name(src: Source, model: str | None = None) -> tuple[str, list[str]]:
    """The base model as other tools should name it (``base_model_name_or_path``), and notes about it."""
    from .defaults import DEFAULT_MODEL_REPO

    notes = []
    name = model or src.meta.get("base_model") or (src.run_cfg.get("model") or {}).get("path")
    if not name:
        base_model_spec(src, model)  # raises: says which file lacks the base model and to pass --model
    if name == "default":
        name = DEFAULT_MODEL_REPO
        local = src.meta.get("model_dir") or ""
        if "gguf" in local:
            notes.append(f"Trained on the built-in default model, read from a Q4_1 GGUF of {DEFAULT_MODEL_REPO} "
                         "(weights dequantized), not from the original bf16 weights.")
    elif name.endswith(".gguf"):
        local = src.meta.get("model_dir")
        notes.append(f"Trained on the GGUF file {name} (converted to a Hugging Face directory by mlxpost"
                     + (f": {local}" if local else "") + "); other tools need that directory as the base.")
        name = local or name
    return name, notes


def _local_base_dir(src: Source, model: str | None) -> Path:
    """A local Hugging Face directory of the base, to check module names and shapes against.

    ``--model`` when it is local; else the directory the run trained on; else
    ``--model`` or the recorded base, fetched as for training.
    """
    if model and Path(model).expanduser().exists():
        return resolve_model_path(model)
    local = src.meta.get("model_dir")
    if local and Path(local).exists():
        return Path(local)
    return resolve_model_path(base_model_spec(src, model))


def _hf_weight_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Hugging Face model directory (safetensors headers only)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    if not shapes:
        raise MlxpostError(f"{model_dir}: no .safetensors weights")
    return shapes


# ---------------------------------------------------------------------------
# Adapters as tensors: stacks, layers
# ---------------------------------------------------------------------------


@dataclass
class Adapter:
    """One LoRA/DoRA adapter in mlx-lm's layout: module path -> {"lora_a", "lora_b"[, "m"]}."""

    kind: str  # lora | dora
    rank: int
    scale: float
    keys: list[str]  # module paths inside a block
    num_layers: int
    modules: dict[str, dict[str, mx.array]]
    sources: list[Path] = field(default_factory=list)  # the adapter directories, base first

    @property
    def dora(self) -> bool:
        return self.kind == "dora"


def read_adapter(directory: Path) -> Adapter:
    cfg = read_adapter_config(directory)
    lp = cfg.get("lora_parameters", {})
    weights = mx.load(str(directory / ADAPTER_WEIGHTS))
    modules: dict[str, dict[str, mx.array]] = {}
    for k, v in weights.items():
        path, _, leaf = k.rpartition(".")
        if leaf not in _LEAF:
            raise MlxpostError(f"{directory / ADAPTER_WEIGHTS}: unexpected tensor {k} (expected only lora_a, "
                               "lora_b and m)")
        modules.setdefault(path, {})[leaf] = v
    for path, leaves in modules.items():
        if "lora_a" not in leaves or "lora_b" not in leaves:
            raise MlxpostError(f"{directory / ADAPTER_WEIGHTS}: {path} lacks lora_a or lora_b")
    ranks = {leaves["lora_a"].shape[1] for leaves in modules.values()}
    rank = lp.get("rank") or (ranks.pop() if len(ranks) == 1 else 0)
    keys = lp.get("keys") or sorted({_split_layer(p)[2] for p in modules if _split_layer(p)})
    return Adapter(cfg.get("fine_tune_type", "lora"), int(rank), float(lp.get("scale", 20.0)), list(keys),
                   int(cfg.get("num_layers") or 0), modules, [directory])


def adapter_chain(directory: Path) -> list[Path]:
    """The adapter directories of a stack, base first: ``[sft_run, dpo_run]`` for a DPO run ``--from`` sft_run."""
    chain = [Path(directory)]
    while True:
        s = from_adapter_of(chain[0], "export this run")
        if s is None:
            return chain
        if s.resolve() in [c.resolve() for c in chain]:
            raise MlxpostError(f"{chain[0]}: its from_adapter chain loops back to {s}")
        chain.insert(0, s)


def _split_layer(path: str) -> tuple[str, int, str] | None:
    """``model.layers.3.self_attn.q_proj`` -> ("model.layers", 3, "self_attn.q_proj"); None outside the blocks."""
    m = _LAYER.match(path)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def combine(adapters: list[Adapter]) -> Adapter:
    """A stack of LoRA adapters (each trained on the previous ones merged) as one LoRA of summed rank.

    ``sum_i s_i (x @ a_i) @ b_i`` equals ``s (x @ [a_1 .. a_n]) @ [s_1/s b_1; ..; s_n/s b_n]`` with
    ``s`` the last adapter's scale. A module that one adapter lacks gets zero blocks there.
    """
    if len(adapters) == 1:
        return adapters[0]
    if any(a.dora for a in adapters):
        raise MlxpostError("a DoRA adapter in a --from stack is not a sum of low-rank updates")
    s = adapters[-1].scale
    ranks = [max(leaves["lora_a"].shape[1] for leaves in a.modules.values()) for a in adapters]
    paths: list[str] = []
    for a in adapters:
        paths += [p for p in a.modules if p not in paths]
    prefix = {_split_layer(p)[0] for p in paths if _split_layer(p)}
    layers = sorted({_split_layer(p)[1] for p in paths if _split_layer(p)})
    keys: list[str] = []
    for a in adapters:
        keys += [k for k in a.keys if k not in keys]
    if len(prefix) == 1 and layers:  # mlx-lm's layout: the same keys in the last N blocks
        paths += [f"{next(iter(prefix))}.{i}.{k}" for i in range(layers[0], layers[-1] + 1) for k in keys
                  if f"{next(iter(prefix))}.{i}.{k}" not in paths]

    def dims(path: str) -> tuple[int, int]:
        split = _split_layer(path)
        for a in adapters:
            for p, leaves in a.modules.items():
                if p == path or (split and _split_layer(p) and _split_layer(p)[2] == split[2]):
                    return leaves["lora_a"].shape[0], leaves["lora_b"].shape[1]
        raise AssertionError(path)

    modules = {}
    for p in paths:
        d_in, d_out = dims(p)
        a_blocks, b_blocks = [], []
        for a, r in zip(adapters, ranks):
            leaves = a.modules.get(p)
            if leaves is None:
                a_blocks.append(mx.zeros((d_in, r), dtype=mx.float32))
                b_blocks.append(mx.zeros((r, d_out), dtype=mx.float32))
            else:
                la, lb = leaves["lora_a"].astype(mx.float32), leaves["lora_b"].astype(mx.float32)
                pad = r - la.shape[1]
                if pad:
                    la = mx.concatenate([la, mx.zeros((d_in, pad), dtype=la.dtype)], axis=1)
                    lb = mx.concatenate([lb, mx.zeros((pad, d_out), dtype=lb.dtype)], axis=0)
                a_blocks.append(la)
                b_blocks.append(lb * (a.scale / s) if a.scale != s else lb)
        modules[p] = {"lora_a": mx.concatenate(a_blocks, axis=1), "lora_b": mx.concatenate(b_blocks, axis=0)}
    num_layers = max(a.num_layers for a in adapters)
    return Adapter("lora", sum(ranks), s, keys, num_layers, modules, [d for a in adapters for d in a.sources])


def _stack_adapter(src: Source, fmt: str) -> Adapter:
    chain = adapter_chain(src.adapter_dir)
    adapters = [read_adapter(d) for d in chain]
    if len(adapters) > 1 and any(a.dora for a in adapters):
        which = ", ".join(str(a.sources[0]) for a in adapters if a.dora)
        raise MlxpostError(
            f"{src.adapter_dir} was trained on top of {chain[0]} (merged into the base), and the stack holds a "
            f"DoRA adapter ({which}): that is not one low-rank update of the base, so the {fmt} format cannot "
            "hold it. Use --format fused (a Hugging Face model with the adapters merged).")
    return combine(adapters)


# ---------------------------------------------------------------------------
# PEFT
# ---------------------------------------------------------------------------


def _peft_matches(target_modules: list[str] | str, layers: list[int] | None, key: str) -> bool:
    """Whether PEFT (``check_target_module_exists``) would put an adapter on module ``key``."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    if key in target_modules:
        return True
    if not any(key.endswith("." + t) for t in target_modules):
        return False
    if layers is None:
        return True
    m = re.match(r"(?:^|.*?\.)layers\.(?P<idx>\d+)\.", key)
    return bool(m) and int(m.group("idx")) in layers


def peft_targets(ours: set[str], candidates: set[str]) -> tuple[list[str] | str, list[int] | None]:
    """``target_modules`` (and ``layers_to_transform``) that make PEFT adapt exactly the modules ``ours``.

    ``candidates``: every module of the Hugging Face base. Tries short names
    (``q_proj``), then paths inside the block (``self_attn.q_proj``), each
    with the layer indices when only some blocks are adapted, and finally an
    exact regular expression.
    """
    splits = [_split_layer(p) for p in ours]
    layer_ids = sorted({s[1] for s in splits})
    in_block = sorted({s[2] for s in splits})
    all_layers = sorted({s[1] for s in (_split_layer(c) for c in candidates) if s and s[0] == splits[0][0]})
    layers = None if layer_ids == all_layers else layer_ids
    for names in (sorted({k.rsplit(".", 1)[-1] for k in in_block}), in_block):
        if {c for c in candidates if _peft_matches(names, layers, c)} == ours:
            return names, layers
    regex = "|".join(re.escape(p) for p in sorted(ours))
    return regex, None


def export_peft(src: Source, out: Path, model: str | None = None) -> dict:
    adapter = _stack_adapter(src, "peft")
    name, notes = base_model_name(src, model)
    base_dir = _local_base_dir(src, model)
    base_cfg = _read_json(base_dir / "config.json")
    shapes = _hf_weight_shapes(base_dir)
    mlx_quantized = "quantization" in base_cfg or "quantization_config" in base_cfg
    candidates = {k[: -len(".weight")] for k in shapes if k.endswith(".weight")}

    fan_in_fan_out = False
    for path, leaves in adapter.modules.items():
        d_in, d_out = leaves["lora_a"].shape[0], leaves["lora_b"].shape[1]
        if _split_layer(path) is None:
            tied = base_cfg.get("tie_word_embeddings", True) and "lm_head.weight" not in shapes
            name = path.rsplit(".", 1)[-1]
            is_embedding = "embed" in name or name == "wte" or d_in == base_cfg.get("vocab_size")
            if is_embedding and tied:
                raise MlxpostError(
                    f"{src.adapter_dir}: the adapter on {path} changes the input embedding, and this model ties "
                    "it to the output head, so the update acts on both; a PEFT adapter on the embedding changes "
                    "the input side only. It cannot be exported unmerged: use --format fused (the update merged "
                    "into the shared matrix).")
            raise MlxpostError(f"{src.adapter_dir}: the adapter on {path} is outside the transformer blocks; "
                               "the peft format maps adapters inside the blocks only (use --format fused)")
        hf = shapes.get(path + ".weight")
        if hf is None:
            raise MlxpostError(f"{src.adapter_dir}: module {path} has no weight {path}.weight in the base model "
                               f"{base_dir}: its mlx-lm name differs from the Hugging Face one, so a PEFT adapter "
                               "cannot name it (use --format fused)")
        if mlx_quantized:
            continue  # packed weights: shapes are not (out, in)
        if hf == (d_out, d_in):
            continue
        if hf == (d_in, d_out):  # GPT-2 style Conv1D keeps (in, out)
            fan_in_fan_out = True
            continue
        raise MlxpostError(f"{src.adapter_dir}: {path}: the adapter maps {d_in} -> {d_out} features but "
                           f"{path}.weight in {base_dir} has shape {hf}")

    targets, layers = peft_targets(set(adapter.modules), candidates)
    r = adapter.rank
    alpha = adapter.scale * r
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": name,
        "revision": (src.run_cfg.get("model") or {}).get("revision"),
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": float((src.adapter_cfg.get("lora_parameters") or {}).get("dropout", 0.0)),
        "target_modules": targets,
        "layers_to_transform": layers,
        "layers_pattern": "layers" if layers is not None else None,
        "use_dora": adapter.dora,
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    tensors = {}
    for path, leaves in adapter.modules.items():
        for leaf, v in leaves.items():
            tensors[f"{PEFT_PREFIX}{path}.{_LEAF[leaf]}"] = v.T if v.ndim == 2 else v
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / PEFT_WEIGHTS), tensors, metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    if len(adapter.sources) > 1:
        notes.append("This run was trained on top of another adapter (" + ", ".join(map(str, adapter.sources[:-1]))
                     + f"), merged into the base. The adapters are written here as one LoRA of rank {r} (the "
                     "low-rank updates concatenated), which is the same update of the base.")
    if src.meta.get("quantize") or src.meta.get("base_quantized"):
        notes.append(_qlora_note(src, "peft"))
    if mlx_quantized:
        notes.append(f"The base {name} is an MLX-quantized checkpoint, which transformers/PEFT cannot load as "
                     "is; load this adapter on the original unquantized model.")
    return {"config": config, "notes": notes, "base": name, "kind": adapter.kind}


def _qlora_note(src: Source, fmt: str) -> str:
    bits = src.meta.get("quantize")
    q = f"a {bits}-bit quantization (group size {src.meta.get('quantize_group_size') or 64})" if bits else \
        "a quantized copy"
    if fmt == "fused":
        return (f"QLoRA: trained against {q} of the base. The merged weights are the dequantized base plus the "
                "update, i.e. exactly the model that was trained, in full precision.")
    return (f"QLoRA: trained against {q} of the base. The adapter applies as is to the unquantized base "
            "model; outputs differ from the trained (quantized) model by the quantization error.")


def is_peft_dir(directory: str | Path) -> bool:
    d = Path(directory)
    if (d / PEFT_WEIGHTS).exists():
        return True
    f = d / ADAPTER_CONFIG
    return f.exists() and "peft_type" in _read_json(f)


def load_peft_adapter(model: nn.Module, peft_dir: str | Path, dropout: float | None = None) -> dict:
    """Attach mlxpost LoRA/DoRA layers to ``model`` from a PEFT adapter directory (the inverse of ``peft``).

    The adapter must be one mlx-lm's layout can hold: LoRA (optionally DoRA)
    on linear layers inside the transformer blocks, the same modules in each
    of the last N blocks, one rank and one alpha. Returns the adapter's
    configuration in mlx-lm's layout (what :func:`mlxpost.model.load_adapters` returns).
    """
    d = Path(peft_dir)
    cfg_file = d / ADAPTER_CONFIG
    if not cfg_file.exists():
        raise MlxpostError(f"{d}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    cfg = _read_json(cfg_file)
    where = str(cfg_file)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise MlxpostError(f"{where}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters can be loaded")
    for key, ok in (("modules_to_save", lambda v: not v), ("bias", lambda v: v in (None, "none")),
                    ("lora_bias", lambda v: not v), ("trainable_token_indices", lambda v: not v),
                    ("target_parameters", lambda v: not v), ("layer_replication", lambda v: not v)):
        if not ok(cfg.get(key)):
            raise MlxpostError(f"{where}: {key} is {cfg.get(key)!r}; mlxpost adapters hold LoRA matrices only")
    wf = d / PEFT_WEIGHTS
    if not wf.exists():
        other = "adapter_model.bin" if (d / "adapter_model.bin").exists() else None
        raise MlxpostError(f"{d}: no {PEFT_WEIGHTS}" + (f" (only {other}: save the adapter with safetensors, "
                                                          "safe_serialization=True)" if other else ""))
    weights = mx.load(str(wf))
    pat = re.compile(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$")
    mag = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")
    modules: dict[str, dict[str, mx.array]] = {}
    for k, v in weights.items():
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

    named = dict(model.named_modules())
    layers = model.layers
    by_layer: dict[int, set[str]] = {}
    prefixes = set()
    for path, leaves in modules.items():
        if "lora_a" not in leaves or "lora_b" not in leaves:
            raise MlxpostError(f"{wf}: {path} lacks lora_A or lora_B")
        split = _split_layer(path)
        if split is None:
            raise MlxpostError(f"{wf}: {path} is outside the transformer blocks; mlxpost adapters live inside "
                               "them only")
        mod = named.get(path)
        if not isinstance(mod, (nn.Linear, nn.QuantizedLinear)):
            raise MlxpostError(f"{wf}: {path}: " + ("no such module in this model" if mod is None else
                                                    f"a {type(mod).__name__}, not a linear layer"))
        prefixes.add(split[0])
        by_layer.setdefault(split[1], set()).add(split[2])
    n_layers = len(layers)
    ids = sorted(by_layer)
    keysets = {frozenset(v) for v in by_layer.values()}
    if ids != list(range(n_layers - len(ids), n_layers)) or len(keysets) != 1 or len(prefixes) != 1:
        raise MlxpostError(
            f"{d}: the adapter covers blocks {ids} of {n_layers}"
            + (" with different modules in different blocks" if len(keysets) != 1 else "")
            + "; mlxpost (like mlx-lm) holds the same modules in each of the last N blocks")
    keys = sorted(next(iter(keysets)))

    ranks = {leaves["lora_a"].shape[1] for leaves in modules.values()}
    if len(ranks) != 1:
        raise MlxpostError(f"{d}: modules have different ranks {sorted(ranks)}; mlxpost adapters use one rank")
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
    if dora and any("m" not in leaves for leaves in modules.values()):
        raise MlxpostError(f"{wf}: use_dora is set but some modules have no lora_magnitude_vector")
    if not dora and any("m" in leaves for leaves in modules.values()):
        raise MlxpostError(f"{wf}: holds lora_magnitude_vector tensors but {where} does not set use_dora")

    drop = float(cfg.get("lora_dropout") or 0.0) if dropout is None else dropout
    attach_adapters(model, rank=r, scale=scale, dropout=drop, keys=keys, num_layers=len(ids), dora=dora)
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
    return {"fine_tune_type": "dora" if dora else "lora", "num_layers": len(ids),
            "lora_parameters": {"rank": r, "scale": scale, "dropout": drop, "keys": keys}}


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


# ---------------------------------------------------------------------------
# mlx-lm's layout
# ---------------------------------------------------------------------------


def export_mlx(src: Source, out: Path, model: str | None = None) -> dict:
    adapter = _stack_adapter(src, "mlx")
    name, notes = base_model_name(src, model)
    cfg = json.loads(json.dumps(src.adapter_cfg))
    out.mkdir(parents=True, exist_ok=True)
    if len(adapter.sources) == 1:
        shutil.copyfile(src.adapter_dir / ADAPTER_WEIGHTS, out / ADAPTER_WEIGHTS)
    else:
        meta = cfg.setdefault("mlxpost", {})
        meta["stacked_from"] = [str(p) for p in adapter.sources]
        for k in ("from_adapter", "from_adapter_sha256"):
            meta.pop(k, None)
        cfg["fine_tune_type"] = "lora"
        cfg["num_layers"] = adapter.num_layers
        cfg["lora_parameters"] = {**cfg.get("lora_parameters", {}), "rank": adapter.rank, "scale": adapter.scale,
                                  "keys": adapter.keys}
        meta["alpha"] = adapter.scale * adapter.rank
        tensors = {f"{p}.{leaf}": v for p, leaves in adapter.modules.items() for leaf, v in leaves.items()}
        mx.save_safetensors(str(out / ADAPTER_WEIGHTS), tensors)
        notes.append("This run was trained on top of another adapter (" + ", ".join(map(str, adapter.sources[:-1]))
                     + f"), merged into the base; mlx-lm loads one adapter, so they are written here as one LoRA "
                     f"of rank {adapter.rank} (the low-rank updates concatenated), the same update of the base.")
    (out / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    check_mlx_adapter(out)
    if src.meta.get("quantize"):
        notes.append(_qlora_note(src, "mlx") + f" With mlx_lm, `--model` the quantized base "
                     f"(`mlx_lm.convert -q --q-bits {src.meta['quantize']}`) reproduces the trained model.")
    return {"config": cfg, "notes": notes, "base": name, "kind": adapter.kind}


def check_mlx_adapter(directory: Path) -> None:
    """The tensors are exactly the ones mlx-lm's loader will create for this adapter_config.json."""
    cfg = read_adapter_config(directory)
    lp = cfg["lora_parameters"]
    weights = mx.load(str(directory / ADAPTER_WEIGHTS))
    paths = {k.rpartition(".")[0] for k in weights}
    split = {_split_layer(p) for p in paths}
    if None in split or len({s[0] for s in split}) != 1:
        raise MlxpostError(f"{directory}: tensors outside the transformer blocks")
    layers = sorted({s[1] for s in split})
    n = cfg["num_layers"]
    want = {(i, k) for i in range(layers[-1] + 1 - n, layers[-1] + 1) for k in lp["keys"]}
    if {(s[1], s[2]) for s in split} != want:
        raise MlxpostError(f"{directory}: the tensors do not cover keys x last {n} blocks as adapter_config.json says")
    for k, v in weights.items():
        if k.endswith((".lora_a", ".lora_b")) and lp["rank"] not in v.shape:
            raise MlxpostError(f"{directory}: {k} has shape {tuple(v.shape)}, not rank {lp['rank']}")


# ---------------------------------------------------------------------------
# Fused Hugging Face model
# ---------------------------------------------------------------------------


def _float_dtype_name(cfg: dict) -> str | None:
    v = cfg.get("torch_dtype") or cfg.get("dtype")
    return v if v in DTYPES else None


def export_fused(src: Source, out: Path, model: str | None = None, dtype: str = "auto") -> dict:
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model, save_model

    name, notes = base_model_name(src, model)
    meta = src.meta
    spec = base_model_spec(src, model)
    train_dtype = meta.get("dtype") or "auto"
    loaded = load_model(spec, dtype=train_dtype, quantize=meta.get("quantize"),
                        group_size=meta.get("quantize_group_size") or 64)
    m = loaded.model
    load_adapter_stack(m, src.adapter_dir)  # merges a --from stack first, as it was trained
    fuse_adapters(m)
    dequantize_model(m)

    base_dir = Path(loaded.path)
    hf_cfg = _read_json(base_dir / "config.json")
    out_dtype = dtype if dtype != "auto" else (_float_dtype_name(hf_cfg) or
                                               (train_dtype if train_dtype != "auto" else default_dtype()))
    if out_dtype not in DTYPES:
        raise MlxpostError(f"--dtype must be auto, float32, bfloat16 or float16; got {dtype!r}")
    m.set_dtype(DTYPES[out_dtype])
    mx.eval(m.parameters())

    # The weights must be the base's tensors, under the base's names and shapes:
    # transformers would silently initialise anything it does not find.
    ours = {k: tuple(v.shape) for k, v in tree_flatten(m.parameters())}
    base = _hf_weight_shapes(base_dir)
    quantized_base = "quantization" in hf_cfg or "quantization_config" in hf_cfg
    if quantized_base:  # an MLX-quantized checkpoint: packed weights, plus scales and biases
        base = {k: v for k, v in base.items() if not k.endswith((".scales", ".biases"))}
    base = {k: v for k, v in base.items() if "rotary_emb" not in k}
    if hf_cfg.get("tie_word_embeddings", True) and "lm_head.weight" not in ours:
        base.pop("lm_head.weight", None)  # some tied checkpoints store the head too; transformers ties it
    missing, extra = sorted(set(base) - set(ours)), sorted(set(ours) - set(base))
    wrong = [] if quantized_base else [k for k in ours if k in base and ours[k] != base[k]]
    if missing or extra or wrong:
        problems = ([f"{k}: in the base, not in the merged model" for k in missing[:5]]
                    + [f"{k}: in the merged model, not in the base" for k in extra[:5]]
                    + [f"{k}: shape {ours[k]} here, {base[k]} in the base" for k in wrong[:5]])
        raise MlxpostError(f"cannot write {out} as a Hugging Face model: mlx-lm's names or shapes for this "
                           "architecture differ from the base's:\n  " + "\n  ".join(problems))

    out.mkdir(parents=True, exist_ok=True)
    save_model(out, m)
    for k in ("quantization", "quantization_config"):
        hf_cfg.pop(k, None)
    # mlx-lm reads rope_theta only at the top level (a transformers-5 config keeps
    # it in rope_parameters, which mlx-lm ignores, silently using its default):
    # write the value the model was trained with where both libraries read it.
    args = getattr(m, "args", None)
    theta = getattr(args, "rope_theta", None)
    if theta is not None:
        rp = hf_cfg.get("rope_parameters")
        if isinstance(rp, dict) and rp.get("rope_theta") not in (None, theta):
            notes.append(f"The base's config.json gives rope_parameters.rope_theta={rp['rope_theta']} but no "
                         f"top-level rope_theta, so mlx-lm trained with rope_theta={theta}; this export keeps "
                         f"{theta}, the value the weights were trained with.")
        hf_cfg["rope_theta"] = theta
        if isinstance(rp, dict):
            rp["rope_theta"] = theta
    for k in ("torch_dtype", "dtype"):
        if k in hf_cfg:
            hf_cfg[k] = out_dtype
    if "torch_dtype" not in hf_cfg and "dtype" not in hf_cfg:
        hf_cfg["torch_dtype"] = out_dtype
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    for f in TOKENIZER_FILES:
        if (base_dir / f).exists():
            shutil.copyfile(base_dir / f, out / f)
    for f in base_dir.glob("*.py"):  # remote code, when the base has some
        shutil.copyfile(f, out / f.name)

    if meta.get("from_adapter"):
        notes.append("This run was trained on top of another adapter (" + str(meta["from_adapter"])
                     + "); both are merged here, as they were trained.")
    if meta.get("quantize") or meta.get("base_quantized") or quantized_base:
        notes.append(_qlora_note(src, "fused"))
    return {"config": hf_cfg, "notes": notes, "base": name, "kind": src.adapter_cfg.get("fine_tune_type", "lora"),
            "dtype": out_dtype}


# ---------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------


def _dataset_ids(src: Source) -> list[str]:
    """Hub dataset ids the run trained on, when its data came from the Hub."""
    data = src.run_cfg.get("data") or {}
    ids = []
    for key in ("path", "valid"):
        v = data.get(key)
        if not isinstance(v, str) or not v:
            continue
        v = v[3:] if v.startswith("hf:") else v
        if not Path(v).expanduser().exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", v):
            ids.append(v)
    return list(dict.fromkeys(ids))


def _round(v: Any) -> Any:
    if isinstance(v, float):
        return float(f"{v:.6g}")
    if isinstance(v, dict):
        return {k: _round(x) for k, x in v.items()}
    return v


def _hyperparameters(src: Source) -> dict:
    lp = src.adapter_cfg.get("lora_parameters", {})
    rank, scale = lp.get("rank"), lp.get("scale")
    hp = {"adapter": src.adapter_cfg.get("fine_tune_type", "lora"), "rank": rank, "alpha":
          (src.meta.get("alpha") or (rank * scale if rank and scale else None)), "scale": scale,
          "dropout": lp.get("dropout"), "target_modules": lp.get("keys"), "num_layers": src.adapter_cfg.get("num_layers")}
    if src.meta.get("quantize"):
        hp["quantize_bits"] = src.meta["quantize"]
        hp["quantize_group_size"] = src.meta.get("quantize_group_size")
    train = src.run_cfg.get("train") or {}
    for k in ("steps", "epochs", "batch_size", "grad_accum", "lr", "schedule", "warmup_steps", "optimizer",
              "weight_decay", "max_grad_norm", "seed"):
        if train.get(k) is not None:
            hp[k] = train[k]
    data = src.run_cfg.get("data") or {}
    if data.get("max_seq_len") is not None:
        hp["max_seq_len"] = data["max_seq_len"]
    method = src.method
    section = src.run_cfg.get(method) if method != "sft" else None
    if isinstance(section, dict):
        hp.update({f"{method}.{k}": v for k, v in section.items() if v is not None})
    return _round({k: v for k, v in hp.items() if v is not None})


def _metrics(src: Source) -> dict:
    s = src.metrics
    if "best" in s:
        return _round({k: v for k, v in s["best"].items() if v is not None and k != "eval_seconds"})
    keep = ("steps", "stopped", "final_train_loss", "val_loss", "best_val_loss", "best_step", "trained_tokens")
    out = {k: s[k] for k in keep if s.get(k) is not None}
    for k, v in (s.get("val_metrics") or {}).items():
        if v is not None and k not in out:
            out[k] = v
    for k, v in (s.get("final_metrics") or {}).items():
        out.setdefault(f"train/{k}", v)
    gate = (s.get("health") or {}).get("quality_gate", {})
    if gate.get("verdict"):
        out["quality_gate"] = gate["verdict"]
    return _round(out)


def model_card(src: Source, fmt: str, result: dict) -> str:
    base, kind, method = result["base"], result["kind"], src.method
    library = {"peft": "peft", "fused": "transformers", "mlx": "mlx"}[fmt]
    tags = ["mlxpost", kind, method]
    if src.meta.get("quantize"):
        tags.append("qlora")
    tags += {"peft": ["lora", "peft"], "fused": ["merged"], "mlx": ["mlx", "mlx-lm"]}[fmt]
    hp, metrics = _hyperparameters(src), _metrics(src)
    front: dict[str, Any] = {"base_model": base, "library_name": library, "pipeline_tag": "text-generation",
                             "tags": list(dict.fromkeys(tags))}
    datasets = _dataset_ids(src)
    if datasets:
        front["datasets"] = datasets
    front["mlxpost"] = {"method": method, "format": fmt, "hyperparameters": hp, "metrics": metrics}
    kname = {"lora": "LoRA", "dora": "DoRA"}.get(kind, kind)
    what = {"peft": f"A {kname} adapter (PEFT format)",
            "fused": f"{base} with a {kname} adapter merged into its weights",
            "mlx": f"A {kname} adapter (mlx-lm format)"}[fmt]
    usage = {
        "peft": ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\nfrom peft import PeftModel\n\n"
                 f"base = AutoModelForCausalLM.from_pretrained(\"{base}\")\n"
                 "model = PeftModel.from_pretrained(base, \"<this directory or repo>\")\n"
                 f"tokenizer = AutoTokenizer.from_pretrained(\"{base}\")\n```"),
        "fused": ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                  "model = AutoModelForCausalLM.from_pretrained(\"<this directory or repo>\")\n"
                  "tokenizer = AutoTokenizer.from_pretrained(\"<this directory or repo>\")\n```\n\n"
                  "or `mlx_lm.generate --model <this directory> --prompt \"...\"`."),
        "mlx": f"```bash\nmlx_lm.generate --model {base} --adapter-path <this directory> --prompt \"...\"\n```",
    }[fmt]
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {method.upper()} of {base}", "",
             f"{what}, trained with mlxpost ({method.upper()}, "
             f"{'best validation checkpoint' if src.best else 'final adapter'}).", "", "## Use", "", usage, "",
             "## Training", "", "| hyperparameter | value |", "|---|---|"]
    lines += [f"| {k} | {', '.join(map(str, v)) if isinstance(v, list) else v} |" for k, v in hp.items()]
    if metrics:
        lines += ["", "## Results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in metrics.items()]
    else:
        lines += ["", "No final metrics (the run directory has no summary.json)."]
    if result["notes"]:
        lines += ["", "## Notes", ""] + [f"* {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def export(run_dir: str | Path, fmt: str, out: str | Path, *, best: bool = False, model: str | None = None,
           dtype: str = "auto", overwrite: bool = False) -> dict:
    """Export ``run_dir``'s adapter as ``fmt`` into ``out``; returns what was written (config, notes, base)."""
    if fmt not in FORMATS:
        raise MlxpostError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    src = find_source(run_dir, best)
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise MlxpostError(f"{out} exists and is not empty (pass --overwrite to replace it)")
        if out.resolve() in (src.adapter_dir.resolve(), *(p.resolve() for p in src.adapter_dir.parents)):
            raise MlxpostError(f"--out {out} would overwrite the run being exported")
    tmp = out.with_name(f".{out.name}.export-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if fmt == "peft":
            result = export_peft(src, tmp, model)
        elif fmt == "mlx":
            result = export_mlx(src, tmp, model)
        else:
            result = export_fused(src, tmp, model, dtype)
        (tmp / CARD).write_text(model_card(src, fmt, result))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["out"] = out
    result["source"] = src.adapter_dir
    return result


@click.command("export")
@click.argument("run_dir", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True,
              help="peft: PEFT adapter; fused: Hugging Face model with the adapter merged; mlx: mlx-lm adapter.")
@click.option("--out", required=True, type=click.Path(), help="Directory to write.")
@click.option("--best", is_flag=True, help="Export the run's best/ adapter (lowest validation loss).")
@click.option("--model", help="Base model (default: the one the run trained on).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="fused: weight dtype (auto: the base model's).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def export_command(run_dir, fmt, out, best, model, dtype, overwrite):
    """Export a run's adapter: PEFT adapter, merged Hugging Face model, or mlx-lm adapter.

    \b
    Examples:
      mlxpost export runs/sft-default --format peft --out exports/sft-peft
      mlxpost export runs/dpo-1 --format fused --out exports/dpo-merged --dtype bfloat16
      mlxpost export runs/sft-default --best --format mlx --out exports/sft-mlx
    """
    result = export(run_dir, fmt, out, best=best, model=model, dtype=dtype, overwrite=overwrite)
    click.echo(f"wrote {fmt} export of {result['source']} to {result['out']} (base: {result['base']})")
    for note in result["notes"]:
        click.echo(f"note: {note}")
