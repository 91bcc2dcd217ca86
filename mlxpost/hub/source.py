"""What an export reads: a run directory's adapter stack, base model and settings."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import yaml
from safetensors import SafetensorError, safe_open

from ..errors import MlxpostError
from ..files import read_json
from ..model.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    from_adapter_of,
    own_adapter_dir,
    read_adapter_config,
    split_layer_path,
)
from ..model.default import DEFAULT_MODEL_REPO
from ..model.load import resolve_model_path
from ..model.peft import _LEAF


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



def find_source(run_dir: str | Path, best: bool = False) -> Source:
    """The adapter of ``run_dir`` (or of its ``best/``), with the run's config and final metrics.

    ``run_dir`` may also be a bare adapter directory or a checkpoint
    (``RUN_DIR/checkpoints/step-N``); the run's files are then looked for in
    the directories above it. A run trained on top of others is read from its
    own adapter (``own/``, see :func:`mlxpost.model.adapters.own_adapter_dir`).
    """
    d = Path(run_dir).expanduser()
    if not d.exists():
        raise MlxpostError(f"{d}: no such directory")
    if not d.is_dir():
        raise MlxpostError(f"{d}: not a directory (give a run directory or an adapter directory)")
    top = d / "best" if best else d
    adapter_dir = own_adapter_dir(top)
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

    run_root = next((p for p in (top, top.parent, top.parent.parent) if (p / "config.yaml").exists()), None)
    run_cfg: dict = {}
    if run_root is not None:
        try:
            run_cfg = yaml.safe_load((run_root / "config.yaml").read_text()) or {}
        except yaml.YAMLError as e:
            raise MlxpostError(f"{run_root / 'config.yaml'}: not valid YAML ({e})") from None
    metrics: dict = {}
    if best and (top / "best.json").exists():
        metrics = {"best": read_json(top / "best.json")}
    elif run_root is not None and (run_root / "summary.json").exists() and top == run_root:
        metrics = read_json(run_root / "summary.json")
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
    """Tensor names and shapes of a Hugging Face model directory (safetensors headers only, via ``safe_open``)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="numpy") as fh:
                shapes.update({k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()})
        except (OSError, SafetensorError) as e:
            raise MlxpostError(f"{f}: not a readable safetensors file ({e})") from None
    if not shapes:
        raise MlxpostError(f"{model_dir}: no .safetensors weights")
    return shapes


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
    keys = lp.get("keys") or sorted({split_layer_path(p)[2] for p in modules if split_layer_path(p)})
    return Adapter(cfg.get("fine_tune_type", "lora"), int(rank), float(lp.get("scale", 20.0)), list(keys),
                   int(cfg.get("num_layers") or 0), modules, [directory])


def adapter_chain(directory: Path, purpose: str = "export this run") -> list[Path]:
    """The adapter directories of a stack, base first: ``[sft_run, dpo_run/own]`` for a DPO run ``--from`` sft_run.

    Each entry is the directory holding that run's own adapter (``own/`` when the run has one).
    """
    chain = [own_adapter_dir(directory)]
    while True:
        s = from_adapter_of(chain[0], purpose)
        if s is None:
            return chain
        s = own_adapter_dir(s)
        if s.resolve() in [c.resolve() for c in chain]:
            raise MlxpostError(f"{chain[0]}: its from_adapter chain loops back to {s}")
        chain.insert(0, s)



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
    prefix = {split_layer_path(p)[0] for p in paths if split_layer_path(p)}
    layers = sorted({split_layer_path(p)[1] for p in paths if split_layer_path(p)})
    keys: list[str] = []
    for a in adapters:
        keys += [k for k in a.keys if k not in keys]
    if len(prefix) == 1 and layers:  # mlx-lm's layout: the same keys in the last N blocks
        paths += [f"{next(iter(prefix))}.{i}.{k}" for i in range(layers[0], layers[-1] + 1) for k in keys
                  if f"{next(iter(prefix))}.{i}.{k}" not in paths]

    def dims(path: str) -> tuple[int, int]:
        split = split_layer_path(path)
        for a in adapters:
            for p, leaves in a.modules.items():
                if p == path or (split and split_layer_path(p) and split_layer_path(p)[2] == split[2]):
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


def stack_adapter(adapter_dir: Path, fmt: str, purpose: str = "export this run") -> Adapter:
    """The adapter of ``adapter_dir`` with everything it was trained on top of, as one adapter (:func:`combine`).

    A stack holding a DoRA adapter is refused: it is not one low-rank update of the base.
    """
    chain = adapter_chain(adapter_dir, purpose)
    adapters = [read_adapter(d) for d in chain]
    if len(adapters) > 1 and any(a.dora for a in adapters):
        which = ", ".join(str(a.sources[0]) for a in adapters if a.dora)
        raise MlxpostError(
            f"{adapter_dir} was trained on top of {chain[0]} (merged into the base), and the stack holds a "
            f"DoRA adapter ({which}): that is not one low-rank update of the base, so the {fmt} format cannot "
            "hold it. Use --format fused (a Hugging Face model with the adapters merged).")
    return combine(adapters)


def _stack_adapter(src: Source, fmt: str) -> Adapter:
    return stack_adapter(src.adapter_dir, fmt)


def combined_mlx_config(own_cfg: dict, adapter: Adapter) -> dict:
    """mlx-lm's adapter_config.json of a combined stack (:func:`combine`), from the last run's own one.

    The ``from_adapter`` record goes (mlxpost would merge the parent a second
    time); ``stacked_from`` lists the adapters it holds, base first.
    """
    cfg = json.loads(json.dumps(own_cfg))
    meta = cfg.setdefault("mlxpost", {})
    meta["stacked_from"] = [str(p) for p in adapter.sources]
    for k in ("from_adapter", "from_adapter_sha256"):
        meta.pop(k, None)
    cfg["fine_tune_type"] = "lora"
    cfg["num_layers"] = adapter.num_layers
    cfg["lora_parameters"] = {**cfg.get("lora_parameters", {}), "rank": adapter.rank, "scale": adapter.scale,
                              "keys": adapter.keys}
    meta["alpha"] = adapter.scale * adapter.rank
    return cfg


def adapter_tensors(adapter: Adapter) -> dict[str, mx.array]:
    """The adapter's tensors under mlx-lm's names (``model.layers.3.self_attn.q_proj.lora_a``, ...)."""
    return {f"{p}.{leaf}": v for p, leaves in adapter.modules.items() for leaf, v in leaves.items()}
