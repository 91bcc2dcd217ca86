"""Export a run's adapter for other tools, and import PEFT adapters.

``mlxpost export RUN_DIR --format FORMAT --out DIR`` writes one of

* ``peft``: ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's
  layout, for ``PeftModel.from_pretrained(<Hugging Face base>, DIR)``;
* ``fused``: the adapter(s) merged into the base weights (dequantized when the
  base was quantized), a Hugging Face model directory that
  ``AutoModelForCausalLM.from_pretrained`` and ``mlx_lm`` load;
* ``mlx``: mlx-lm's adapter layout (``adapter_config.json`` +
  ``adapters.safetensors``), for ``mlx_lm.generate --adapter-path``;
* ``gguf``: the fused model as one ``model.<quant>.gguf`` file (f16, q8_0 or q4_k_m,
  :mod:`mlxpost.hub.gguf_export`), for llama.cpp, Ollama and LM Studio;

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
import re
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import MlxpostError
from ..files import atomic_write_json, read_json, save_safetensors_atomic
from ..model.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    OWN_DIR,
    fuse_adapters,
    load_adapter_stack,
    read_adapter_config,
    split_layer_path,
)
from ..model.load import DTYPES, default_dtype, load_model
from ..model.peft import _LEAF, PEFT_PREFIX, PEFT_WEIGHTS
from .card import model_card
from .gguf_export import check_quant, write_gguf
from .source import (
    Source,
    _hf_weight_shapes,
    _local_base_dir,
    _stack_adapter,
    adapter_tensors,
    base_model_name,
    base_model_spec,
    combined_mlx_config,
    find_source,
    stack_adapter,
)

FORMATS = ("peft", "fused", "mlx", "gguf")

CARD = "README.md"


# Files of a Hugging Face model directory that describe the tokenizer and generation.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


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
    splits = [split_layer_path(p) for p in ours]
    layer_ids = sorted({s[1] for s in splits})
    in_block = sorted({s[2] for s in splits})
    all_layers = sorted({s[1] for s in (split_layer_path(c) for c in candidates) if s and s[0] == splits[0][0]})
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
    base_cfg = read_json(base_dir / "config.json")
    shapes = _hf_weight_shapes(base_dir)
    mlx_quantized = "quantization" in base_cfg or "quantization_config" in base_cfg
    fan_in_fan_out = _peft_layout(src, adapter, base_cfg, shapes, base_dir, mlx_quantized)
    candidates = {k[: -len(".weight")] for k in shapes if k.endswith(".weight")}
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


def _peft_layout(src: Source, adapter, base_cfg: dict, shapes: dict, base_dir: Path, mlx_quantized: bool) -> bool:
    """Check that PEFT can name and shape every adapted module of the base; True for (in, out) weights (Conv1D)."""
    fan_in_fan_out = False
    for path, leaves in adapter.modules.items():
        d_in, d_out = leaves["lora_a"].shape[0], leaves["lora_b"].shape[1]
        if split_layer_path(path) is None:
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
        if mlx_quantized or hf == (d_out, d_in):  # packed quantized weights: shapes are not (out, in)
            continue
        if hf == (d_in, d_out):  # GPT-2 style Conv1D keeps (in, out)
            fan_in_fan_out = True
            continue
        raise MlxpostError(f"{src.adapter_dir}: {path}: the adapter maps {d_in} -> {d_out} features but "
                           f"{path}.weight in {base_dir} has shape {hf}")
    return fan_in_fan_out


def _qlora_note(src: Source, fmt: str) -> str:
    bits = src.meta.get("quantize")
    q = f"a {bits}-bit quantization (group size {src.meta.get('quantize_group_size') or 64})" if bits else \
        "a quantized copy"
    if fmt == "fused":
        return (f"QLoRA: trained against {q} of the base. The merged weights are the dequantized base plus the "
                "update, i.e. exactly the model that was trained, in full precision.")
    return (f"QLoRA: trained against {q} of the base. The adapter applies as is to the unquantized base "
            "model; outputs differ from the trained (quantized) model by the quantization error.")


def export_mlx(src: Source, out: Path, model: str | None = None) -> dict:
    adapter = _stack_adapter(src, "mlx")
    name, notes = base_model_name(src, model)
    cfg = json.loads(json.dumps(src.adapter_cfg))
    out.mkdir(parents=True, exist_ok=True)
    if len(adapter.sources) == 1:
        shutil.copyfile(src.adapter_dir / ADAPTER_WEIGHTS, out / ADAPTER_WEIGHTS)
    else:
        cfg = combined_mlx_config(cfg, adapter)
        mx.save_safetensors(str(out / ADAPTER_WEIGHTS), adapter_tensors(adapter))
        notes.append("This run was trained on top of another adapter (" + ", ".join(map(str, adapter.sources[:-1]))
                     + f"), merged into the base; mlx-lm loads one adapter, so they are written here as one LoRA "
                     f"of rank {adapter.rank} (the low-rank updates concatenated), the same update of the base.")
    (out / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    check_mlx_adapter(out)
    if src.meta.get("quantize"):
        notes.append(_qlora_note(src, "mlx") + f" With mlx_lm, `--model` the quantized base "
                     f"(`mlx_lm.convert -q --q-bits {src.meta['quantize']}`) reproduces the trained model.")
    return {"config": cfg, "notes": notes, "base": name, "kind": adapter.kind}


def write_combined_adapter(run_dir: Path) -> str | None:
    """Write a stacked run's adapters (``run_dir/own`` and what it was trained on top of) as one mlx-lm
    adapter at ``run_dir``'s top level, so that ``mlx_lm.generate --adapter-path run_dir`` loads the model
    that was trained. The same adapter as ``export --format mlx`` (:func:`export_mlx`).

    Returns None, or why mlx-lm cannot load this stack (a DoRA adapter in it); then no adapter is left at
    the top level, since mlx-lm loading the last adapter alone would silently be another model.
    """
    own = run_dir / OWN_DIR
    try:
        adapter = stack_adapter(own, "mlx", "write the combined adapter for mlx-lm")
        cfg = combined_mlx_config(read_adapter_config(own), adapter)
        save_safetensors_atomic(run_dir / ADAPTER_WEIGHTS, adapter_tensors(adapter))
        atomic_write_json(run_dir / ADAPTER_CONFIG, cfg)
        check_mlx_adapter(run_dir)
        return None
    except MlxpostError as e:
        for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            (run_dir / f).unlink(missing_ok=True)
        return str(e)


def check_mlx_adapter(directory: Path) -> None:
    """The tensors are exactly the ones mlx-lm's loader will create for this adapter_config.json."""
    cfg = read_adapter_config(directory)
    lp = cfg["lora_parameters"]
    weights = mx.load(str(directory / ADAPTER_WEIGHTS))
    paths = {k.rpartition(".")[0] for k in weights}
    split = {split_layer_path(p) for p in paths}
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


def _float_dtype_name(cfg: dict) -> str | None:
    v = cfg.get("torch_dtype") or cfg.get("dtype")
    return v if v in DTYPES else None


def export_fused(src: Source, out: Path, model: str | None = None, dtype: str = "auto") -> dict:
    from mlx_lm.utils import dequantize_model, save_model  # here: importing mlx-lm loads transformers

    name, notes = base_model_name(src, model)
    meta = src.meta
    train_dtype = meta.get("dtype") or "auto"
    loaded = load_model(base_model_spec(src, model), dtype=train_dtype, quantize=meta.get("quantize"),
                        group_size=meta.get("quantize_group_size") or 64)
    m = loaded.model
    load_adapter_stack(m, src.adapter_dir)  # merges a --from stack first, as it was trained
    fuse_adapters(m)
    dequantize_model(m)

    base_dir = Path(loaded.path)
    hf_cfg = read_json(base_dir / "config.json")
    out_dtype = dtype if dtype != "auto" else (_float_dtype_name(hf_cfg) or
                                               (train_dtype if train_dtype != "auto" else default_dtype()))
    if out_dtype not in DTYPES:
        raise MlxpostError(f"--dtype must be auto, float32, bfloat16 or float16; got {dtype!r}")
    m.set_dtype(DTYPES[out_dtype])
    mx.eval(m.parameters())
    quantized_base = "quantization" in hf_cfg or "quantization_config" in hf_cfg
    _check_base_names(m, base_dir, hf_cfg, out, quantized_base)

    out.mkdir(parents=True, exist_ok=True)
    save_model(out, m)
    (out / "config.json").write_text(json.dumps(_fused_config(hf_cfg, m, out_dtype, notes), indent=2) + "\n")
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


def _check_base_names(m, base_dir: Path, hf_cfg: dict, out: Path, quantized_base: bool) -> None:
    """The merged weights must be the base's tensors, under the base's names and shapes: transformers
    would silently initialise anything it does not find."""
    ours = {k: tuple(v.shape) for k, v in tree_flatten(m.parameters())}
    base = _hf_weight_shapes(base_dir)
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


def _fused_config(hf_cfg: dict, m, out_dtype: str, notes: list[str]) -> dict:
    """The base's config.json for the merged weights: unquantized, their dtype, the rope_theta they were trained with."""
    for k in ("quantization", "quantization_config"):
        hf_cfg.pop(k, None)
    # mlx-lm reads rope_theta only at the top level (a transformers-5 config keeps
    # it in rope_parameters, which mlx-lm ignores, silently using its default):
    # write the value the model was trained with where both libraries read it.
    theta = getattr(getattr(m, "args", None), "rope_theta", None)
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
    return hf_cfg


def default_out(run_dir: str | Path, fmt: str, best: bool = False) -> Path:
    """Where an export goes without ``--out``: ``exports/<run>-<format>`` under the current directory.

    ``<run>`` is the run directory's name (``<run>-best`` for its best/, ``<run>-step-N`` for a checkpoint).

    >>> default_out("runs/demo/dpo", "peft").as_posix()
    'exports/dpo-peft'
    >>> default_out("runs/sft-1/", "mlx", best=True).as_posix()
    'exports/sft-1-best-mlx'
    >>> default_out("runs/sft-1/checkpoints/step-0000040", "fused").as_posix()
    'exports/sft-1-step-0000040-fused'
    """
    d = Path(run_dir).expanduser().resolve()
    name = f"{d.parent.parent.name}-{d.name}" if d.parent.name == "checkpoints" else d.name
    return Path("exports") / f"{name}{'-best' if best else ''}-{fmt}"


def export_gguf(src: Source, out: Path, model: str | None = None, quant: str = "q8_0") -> dict:
    """The fused model (merged in float32, so the only rounding is the GGUF's own) as ``out/model.<quant>.gguf``."""
    fused = out.with_name(f".{out.name}.fused-tmp")
    shutil.rmtree(fused, ignore_errors=True)
    try:
        result = export_fused(src, fused, model, "float32")
        out.mkdir(parents=True, exist_ok=True)
        write_gguf(fused, out / f"model.{quant}.gguf", quant, name=result["base"])
    finally:
        shutil.rmtree(fused, ignore_errors=True)
    result["quant"] = quant
    result["file"] = f"model.{quant}.gguf"
    return result


def export(run_dir: str | Path, fmt: str, out: str | Path | None = None, *, best: bool = False,
           model: str | None = None, dtype: str = "auto", overwrite: bool = False, quant: str = "q8_0") -> dict:
    """Export ``run_dir``'s adapter as ``fmt`` into ``out`` (default: :func:`default_out`); returns what was
    written (config, notes, base).

    ``quant`` is the GGUF tensor type (``gguf`` format only): f16, q8_0 or q4_k_m.
    """
    if fmt not in FORMATS:
        raise MlxpostError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if fmt == "gguf":
        check_quant(quant)  # before minutes of merging
    src = find_source(run_dir, best)
    out = Path(out).expanduser() if out is not None else default_out(run_dir, fmt, best)
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
        elif fmt == "gguf":
            result = export_gguf(src, tmp, model, quant)
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
