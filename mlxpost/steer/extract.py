"""The three contrast sources of ``mlxpost steer extract``, reduced to two sets of pooled hidden states.

* two row files (``--positive``/``--negative``): any SFT row (messages,
  prompt/completion, text: rendered as training renders it, completion
  included) or prompt row (the prompt with its generation prompt);
* two models (``--against MODEL_OR_RUN``, with ``--prompts``): the same prompts
  through the loaded model (positive) and the other one (negative). The
  models are loaded one after the other, never both at once;
* ``--against adapters-off``: the same prompts through ONE loaded model with
  its adapters on (positive) and off (negative, :func:`adapters_off`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import mlx.nn as nn
import numpy as np

from ..data.render import Renderer
from ..data.rows import read_jsonl, row_format, validate_prompt_row, validate_sft_row
from ..errors import MlxpostError
from ..model.adapters import load_adapter_stack, read_adapter_config
from ..model.load import load_model
from ..model.lora import adapter_modules, adapters_off
from .hooks import model_blocks
from .vectors import best_layer, hidden_states, mean_difference, parse_layers, save_vectors


def read_sequences(path: str | Path, renderer: Renderer, limit: int | None = None) -> list[list[int]]:
    """Token ids of each row of a JSONL file (SFT rows with their completion, or prompt rows)."""
    return [ids for ids, _ in read_rows(path, renderer, limit)]


def read_rows(path: str | Path, renderer: Renderer, limit: int | None = None) -> list[tuple[list[int], int | None]]:
    """``(ids, start)`` of each row: ``start`` is the index of the first completion token of an SFT row
    (the first position its training mask marks), None for a prompt row (see ``--position completion``)."""
    path = Path(path)
    if not path.is_file():
        raise MlxpostError(f"{path}: no such file")
    out = []
    for line, row, issue in read_jsonl(path):
        if issue is not None:
            raise MlxpostError(str(issue))
        prompt_only = "prompt" in row and "completion" not in row
        if not prompt_only and row_format(row) is not None:  # an SFT row: its own problems, not the prompt format's
            problems = validate_sft_row(row)
            if problems:
                field, msg = problems[0]
                raise MlxpostError(f"{path}:{line}: {field}: {msg}")
            ids, mask, _ = renderer.render(row)
            start = next((t for t, m in enumerate(mask) if m), None)
        else:
            problems = validate_prompt_row(row)
            if problems:
                field, msg = problems[0]
                raise MlxpostError(f"{path}:{line}: {field}: {msg} (expected an SFT row or a prompt row)")
            ids, start = renderer.prompt(row["prompt"])[0], None
        out.append((ids, start))
        if limit and len(out) >= limit:
            break
    if not out:
        raise MlxpostError(f"{path}: no rows")
    return out


def _states(model, rows, layers, **kw):
    return hidden_states(model, [r[0] for r in rows], layers, starts=[r[1] for r in rows], **kw)


def from_files(model: nn.Module, renderer: Renderer, positive, negative, layers: Sequence[int], **kw):
    pos = _states(model, read_rows(positive, renderer), layers, **kw)
    neg = _states(model, read_rows(negative, renderer), layers, **kw)
    return pos, neg


def from_adapters_off(model: nn.Module, rows, layers: Sequence[int], **kw):
    """Adapters on (positive) vs off (negative) in the same model; ``rows``: ``(ids, start)`` (:func:`read_rows`)."""
    if not adapter_modules(model):
        raise MlxpostError("--against adapters-off needs --adapter RUN (the loaded model has no adapters)")
    rows = [(r, None) if r and isinstance(r[0], int) else r for r in rows]  # bare id lists too
    pos = _states(model, rows, layers, **kw)
    with adapters_off(model):
        neg = _states(model, rows, layers, **kw)
    return pos, neg


def counts(pos: dict[int, np.ndarray], neg: dict[int, np.ndarray]) -> dict:
    l = next(iter(pos))
    return {"positive": int(len(pos[l])), "negative": int(len(neg[l]))}


def load_for_steering(model: str | None, adapter: str | Path | None):
    """Load a base model (default: the adapter's recorded base) and, when given, its adapter stack."""
    quantize, group, dtype = None, None, "auto"
    if adapter:
        meta = read_adapter_config(adapter).get("mlxpost", {})
        local = meta.get("model_dir")
        model = model or (local if local and Path(local).exists() else meta.get("base_model"))
        quantize, group, dtype = meta.get("quantize"), meta.get("quantize_group_size"), meta.get("dtype") or "auto"
    loaded = load_model(model or "default", dtype=dtype, quantize=quantize, group_size=group or 64)
    if adapter:
        load_adapter_stack(loaded.model, adapter)
    return loaded


def extract(*, model: str | None, adapter: str | None, out: str | Path, layers: str = "all",
            position: str = "last", positive=None, negative=None, against: str | None = None,
            prompts=None, batch_size: int = 8, limit: int | None = None) -> dict:
    """Extract per-layer steering vectors and write them with their report; returns ``steer.json``'s content."""
    if (positive is None) != (negative is None):
        raise MlxpostError("--positive and --negative go together")
    if (positive is None) == (against is None):
        raise MlxpostError("give either --positive FILE --negative FILE, or --against MODEL_OR_RUN|adapters-off")
    if against is not None and prompts is None:
        raise MlxpostError("--against needs --prompts FILE (the prompts both sides read)")
    loaded = load_for_steering(model, adapter)
    renderer = Renderer(loaded.tokenizer)
    pad = renderer.eos_id or 0
    idx = parse_layers(layers, len(model_blocks(loaded.model)))
    kw = dict(position=position, batch_size=batch_size, pad_id=pad)
    if positive is not None:
        pos, neg = from_files(loaded.model, renderer, positive, negative, idx, **kw)
        source = {"kind": "files", "positive": str(positive), "negative": str(negative)}
    else:
        seqs = read_rows(prompts, renderer, limit)
        if against == "adapters-off":
            pos, neg = from_adapters_off(loaded.model, seqs, idx, **kw)
        else:
            pos = _states(loaded.model, seqs, idx, **kw)
            del loaded  # the second model is loaded only after the first is dropped
            other = Path(against)
            if (other / "adapter_config.json").is_file():
                second = load_for_steering(model, other)
            else:
                second = load_model(against)
            neg = _states(second.model, seqs, idx, **kw)
        source = {"kind": "against", "against": against, "prompts": str(prompts)}
    vectors, report = mean_difference(pos, neg)
    meta = {"model": model or "default", "adapter": str(adapter) if adapter else None, "layers": idx,
            "position": position, "source": source, "counts": counts(pos, neg),
            "best_layer": best_layer(report), "report": {str(l): r for l, r in report.items()}}
    save_vectors(out, vectors, meta)
    return meta
