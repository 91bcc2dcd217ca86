"""Model cards of exports: base model, datasets, hyperparameters and final metrics."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCardData

from .source import Source


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
    library = {"peft": "peft", "fused": "transformers", "mlx": "mlx", "gguf": "gguf"}[fmt]
    tags = ["mlxpost", kind, method]
    if src.meta.get("quantize"):
        tags.append("qlora")
    tags += {"peft": ["lora", "peft"], "fused": ["merged"], "mlx": ["mlx", "mlx-lm"],
             "gguf": ["gguf", "merged", str(result.get("quant", ""))]}[fmt]
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
            "mlx": f"A {kname} adapter (mlx-lm format)",
            "gguf": f"{base} with a {kname} adapter merged into its weights, as GGUF ({result.get('quant')})"}[fmt]
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
        "gguf": (f"```bash\nllama-cli -m {result.get('file')} -cnv          # llama.cpp (chat template from the file)\n"
                 f"printf 'FROM ./{result.get('file')}\\n' > Modelfile && ollama create my-model -f Modelfile\n"
                 f"lms import {result.get('file')}                  # LM Studio\n```"),
    }[fmt]
    lines = ["---", ModelCardData(**front).to_yaml(), "---", "",
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
