"""Steering vectors: hidden states of many layers in one forward pass, mean differences, separation report, files.

A steering vector for block ``l`` is ``v_l = mean(h⁺_l) − mean(h⁻_l)``, where
``h_l`` (D,) is the block's output (the residual stream after the block) at
the chosen position of each sequence: ``last`` (the last real token),
``mean`` (the mean over real tokens; pads excluded by the mask) or
``completion`` (the mean over the completion's tokens of SFT rows only: the
prompt's states are the same on both sides of a completion contrast, so
averaging them in only shrinks the difference). Both sides
are read with :func:`hidden_states`, which batches sequences right-padded
(a causal model's real positions do not see the pads) and records every
requested layer in one forward pass per batch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import MlxpostError
from ..files import atomic_write_json
from .hooks import SteerSpec, model_blocks, recording

VECTORS_FILE, META_FILE = "vectors.safetensors", "steer.json"
POSITIONS = ("last", "mean", "completion")


def parse_layers(spec: str, n_blocks: int) -> list[int]:
    """``"8,12,16"`` or ``"all"`` to block indices (negative ones count from the end).

    >>> parse_layers("1,-1", 4)
    [1, 3]
    >>> parse_layers("all", 3)
    [0, 1, 2]
    """
    if spec.strip() == "all":
        return list(range(n_blocks))
    out = []
    for part in spec.split(","):
        try:
            i = int(part)
        except ValueError:
            raise MlxpostError(f"--layers: {part!r} is not a block index (use e.g. 8,12,16 or all)") from None
        i = i + n_blocks if i < 0 else i
        if not 0 <= i < n_blocks:
            raise MlxpostError(f"--layers: block {part} is outside 0..{n_blocks - 1}")
        out.append(i)
    return sorted(set(out))


def pool(h: np.ndarray, lengths: np.ndarray, position: str, starts: np.ndarray | None = None) -> np.ndarray:
    """Pool hidden states ``h`` (B, T, D) of right-padded rows with ``lengths`` (B,) to (B, D).

    ``completion`` averages positions ``starts[b] .. lengths[b] - 1`` (the
    completion's tokens; ``starts`` (B,) is required).

    >>> h = np.arange(12, dtype=np.float32).reshape(2, 3, 2)
    >>> pool(h, np.array([3, 1]), "last").tolist()
    [[4.0, 5.0], [6.0, 7.0]]
    >>> pool(h, np.array([3, 1]), "mean").tolist()
    [[2.0, 3.0], [6.0, 7.0]]
    >>> pool(h, np.array([3, 1]), "completion", np.array([1, 0])).tolist()
    [[3.0, 4.0], [6.0, 7.0]]
    """
    if position == "last":
        return h[np.arange(len(h)), lengths - 1]
    first = np.zeros_like(lengths) if position == "mean" else np.asarray(starts)
    t = np.arange(h.shape[1])[None, :]
    mask = ((t >= first[:, None]) & (t < lengths[:, None])).astype(h.dtype)
    return (h * mask[..., None]).sum(1) / (lengths - first)[:, None].astype(h.dtype)


def hidden_states(model: nn.Module, seqs: Sequence[Sequence[int]], layers: Sequence[int], *,
                  position: str = "last", batch_size: int = 8, pad_id: int = 0,
                  starts: Sequence[int | None] | None = None) -> dict[int, np.ndarray]:
    """Pooled block outputs ``{layer: (N, D) float32}`` of ``seqs``: one forward pass per batch of ``batch_size``.

    Rows are sorted by length before batching (less padding) and returned in
    the input order. ``starts``: each sequence's first completion token (for
    ``position="completion"``; None for a prompt without completion).
    """
    if position not in POSITIONS:
        raise MlxpostError(f"--position must be one of {', '.join(POSITIONS)}; got {position!r}")
    if not seqs:
        raise MlxpostError("no sequences to read hidden states from")
    if position == "completion" and (starts is None or any(s is None or s >= len(q) for s, q in zip(starts, seqs))):
        raise MlxpostError("--position completion needs rows with a completion (SFT rows: messages with an "
                           "assistant reply, or prompt/completion); prompt-only rows have none")
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = {l: [None] * len(seqs) for l in layers}
    with recording(model, layers) as sink:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            lengths = np.array([len(seqs[i]) for i in idx])
            ids = np.full((len(idx), int(lengths.max())), pad_id, dtype=np.int32)
            for r, i in enumerate(idx):
                ids[r, :lengths[r]] = seqs[i]
            model(mx.array(ids))
            mx.eval(list(sink.values()))
            first = None if starts is None else np.array([starts[i] or 0 for i in idx])
            for l in layers:
                pooled = pool(np.array(sink[l].astype(mx.float32)), lengths, position, first)
                for r, i in enumerate(idx):
                    out[l][i] = pooled[r]
            sink.clear()
    return {l: np.stack(v) for l, v in out.items()}


def separation(pos: np.ndarray, neg: np.ndarray) -> dict:
    """How well one layer's mean difference separates the two sides (pos, neg: (N, D)).

    ``gap_over_spread``: gap of the projections on the unit vector over their
    pooled standard deviation (Cohen's d along v). ``half_agreement``: cosine
    between the vectors of the even-indexed and odd-indexed halves (1 = the
    direction is stable across the data; needs 2 rows a side).

    >>> rng = np.random.default_rng(0)
    >>> neg = rng.normal(size=(40, 8)); pos = neg + np.eye(8)[0] * 3
    >>> r = separation(pos, neg); r["gap_over_spread"] > 2, r["half_agreement"] > 0.9
    (True, True)
    >>> separation(neg, neg)["gap_over_spread"]  # identical sides (a block below every adapter)
    0.0
    """
    v = pos.mean(0) - neg.mean(0)
    norm = float(np.linalg.norm(v))
    u = v / norm if norm > 0 else v
    pp, pn = pos @ u, neg @ u
    spread = float(np.sqrt((pp.var() + pn.var()) / 2))
    gap = float(pp.mean() - pn.mean())
    agree = None
    if len(pos) >= 2 and len(neg) >= 2:
        a = pos[0::2].mean(0) - neg[0::2].mean(0)
        b = pos[1::2].mean(0) - neg[1::2].mean(0)
        den = float(np.linalg.norm(a) * np.linalg.norm(b))
        agree = float(a @ b / den) if den > 0 else 0.0
    return {"norm": norm, "gap": gap, "spread": spread,
            "gap_over_spread": 0.0 if norm == 0 else (gap / spread if spread > 0 else float("inf")),
            "half_agreement": agree}


def mean_difference(pos: dict[int, np.ndarray], neg: dict[int, np.ndarray]) -> tuple[dict[int, np.ndarray], dict]:
    """Per layer: ``v = mean(pos) − mean(neg)`` (D,) and its :func:`separation` report."""
    vectors, report = {}, {}
    for l in pos:
        vectors[l] = (pos[l].mean(0) - neg[l].mean(0)).astype(np.float32)
        report[l] = separation(pos[l], neg[l])
    return vectors, report


def best_layer(report: dict) -> int:
    """The layer with the largest gap over spread."""
    return max(report, key=lambda l: report[l]["gap_over_spread"])


def save_vectors(out: str | Path, vectors: dict[int, np.ndarray], meta: dict) -> Path:
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(d / VECTORS_FILE), {f"layer.{l}": mx.array(v) for l, v in vectors.items()})
    atomic_write_json(d / META_FILE, meta)
    return d


def load_vectors(directory: str | Path) -> tuple[dict[int, mx.array], dict]:
    d = Path(directory)
    if not (d / VECTORS_FILE).is_file() or not (d / META_FILE).is_file():
        raise MlxpostError(f"{d}: not a steering-vector directory (expected {VECTORS_FILE} and {META_FILE}; "
                           "make one with mlxpost steer extract)")
    arrays = mx.load(str(d / VECTORS_FILE))
    meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
    return {int(k.split(".")[1]): v for k, v in arrays.items()}, meta


PROMPT_ONLY = ":prompt"  # the suffix of a --steer spec added at the prompt's positions only


def steer_positions(spec: str) -> tuple[str, bool]:
    """``(spec without a trailing :prompt, whether it had one)``.

    >>> steer_positions("v@2:18:prompt"), steer_positions("v@2")
    (('v@2:18', True), ('v@2', False))
    """
    return (spec[: -len(PROMPT_ONLY)], True) if spec.endswith(PROMPT_ONLY) else (spec, False)


def parse_steer(spec: str) -> tuple[str, float, int | str | None]:
    """``VEC_DIR@λ[:layer|:all][:prompt]`` to ``(dir, λ, layer, "all" or None)`` (``:prompt``:
    :func:`steer_positions`).

    >>> parse_steer("vecs/json@1.5:12")
    ('vecs/json', 1.5, 12)
    >>> parse_steer("v@-2")
    ('v', -2.0, None)
    >>> parse_steer("v@0.3:all"), parse_steer("v@1:12:prompt")
    (('v', 0.3, 'all'), ('v', 1.0, 12))
    """
    spec, _ = steer_positions(spec)
    path, at, rest = spec.rpartition("@")
    if not at or not path:
        raise MlxpostError(f"--steer {spec!r}: expected VEC_DIR@LAMBDA[:LAYER|:all][:prompt], e.g. vecs/json@2:12")
    scale, _, layer = rest.partition(":")
    try:
        return path, float(scale), (layer if layer == "all" else int(layer) if layer else None)
    except ValueError:
        raise MlxpostError(f"--steer {spec!r}: λ must be a number and the layer an integer or all") from None


def increments(vectors: dict[int, mx.array | np.ndarray]) -> dict[int, np.ndarray]:
    """Per block, what the contrast adds there: ``v_l − v_(previous block)`` (the first block: ``v_l``).

    ``v_l`` is the difference of the residual stream *after* block ``l``, so it accumulates everything
    the blocks below did; adding ``v_l`` at every block would count the lower blocks' part many times.
    Adding the increments instead shifts the stream after block ``l`` by ``v_l`` (to first order), at
    every block at once (``--steer DIR@λ:all``).

    >>> {l: v.tolist() for l, v in increments({0: np.array([1.0]), 1: np.array([3.0])}).items()}
    {0: [1.0], 1: [2.0]}
    """
    out, prev = {}, None
    for l in sorted(vectors):
        v = np.array(vectors[l], dtype=np.float32)
        out[l] = v if prev is None else v - prev
        prev = v
    return out


def directory_specs(path: str, scale: float, layers: int | str | None, *, option: str, prompt_only: bool = False,
                    n_blocks: int | None = None) -> list[SteerSpec]:
    """The :class:`SteerSpec` s of one vector directory at ``scale``.

    ``layers``: None, the directory's best block; ``"all"``, every block with
    its :func:`increments`; a block; or a list such as ``"12,18"``
    (:func:`parse_layers`), each block its own vector. ``option`` names what
    the user typed in errors; ``n_blocks``, when known, the model's blocks.
    """
    vectors, meta = load_vectors(path)
    if layers == "all":
        chosen = sorted(vectors)
    elif layers is None or isinstance(layers, int):
        chosen = [meta.get("best_layer") if layers is None else layers]
    else:
        chosen = parse_layers(layers, max(vectors) + 1)
    for l in chosen:
        if l not in vectors:
            raise MlxpostError(f"{option}: {path} has vectors for layers {sorted(vectors)}, not {l}")
        if n_blocks is not None and l >= n_blocks:
            raise MlxpostError(f"{option}: {path} has a vector for block {l}; the model has {n_blocks} blocks")
    if layers == "all":
        return [SteerSpec(l, mx.array(v), scale, path, prompt_only) for l, v in increments(vectors).items()]
    return [SteerSpec(l, vectors[l], scale, path, prompt_only) for l in chosen]


def steer_specs(model: nn.Module, specs: Sequence[str]) -> list[SteerSpec]:
    """``--steer`` options to :class:`SteerSpec` s (the layer defaults to the directory's best layer;
    ``all``: every block of the directory with its :func:`increments`; ``:prompt`` at the end: added at the
    prompt's positions only)."""
    n = len(model_blocks(model))
    out = []
    for s in specs:
        path, scale, layer = parse_steer(s)
        out += directory_specs(path, scale, layer, option=f"--steer {s}", prompt_only=steer_positions(s)[1],
                               n_blocks=n)
    return out
