"""``mlxpost steer sweep``: a behaviour score and the side-effect rate of greedy replies at each steering strength λ.

Per λ, the behaviour prompts and the neutral prompts are answered greedily
(the batched KV-cached sampler of :mod:`mlxpost.rl.rollout`, inside
:func:`~mlxpost.steer.hooks.steered`, so every position is steered: the
prompt's and each generated token's; a prompt-only spec, the prompt's alone). The behaviour score is a built-in of
:mod:`.scores` or the mean weighted total of reward functions with the RL API
(:class:`Behaviour`, :mod:`mlxpost.rl.rewards`). Two side effects: the share
of neutral prompts whose greedy reply differs from the reply at λ=0, and the
change of the perplexity of reference replies (by default the neutral
prompts' replies at λ=0) under the steered model. λ is raw (``λ·v``) or
relative to the block's mean residual norm (``λ·r·v/‖v‖``). Verdicts: every λ whose
side-effect rate is at most ``max_side_effects`` is "within budget"; the
recommended λ is the one with the best score among those; "score increases
with λ" is Spearman's ρ > 0 over the λ grid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..core.sampling import Sampling
from ..errors import MlxpostError
from ..files import atomic_write_json
from ..rl.rewards import RewardSet
from ..rl.rollout import kv_caches, sample_groups
from .aqi import aqi, bootstrap_interval
from .hooks import SteerSpec, after_prompt, recording, steered
from .scores import SCORES
from .vectors import hidden_states


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); 0 when either side is constant.

    >>> spearman([0, 1, 2, 3], [0.1, 0.2, 0.2, 0.9])
    0.9486832980505138
    >>> spearman([0, 1, 2], [3, 2, 1])
    -1.0
    """
    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = v.argsort(kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for val in np.unique(v):  # ties share their mean rank
            r[v == val] = r[v == val].mean()
        return r
    a, b = ranks(x), ranks(y)
    a, b = a - a.mean(), b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch: int = 16
           ) -> tuple[list[str], list[list[int]]]:
    """Greedy replies of token-id prompts, ``batch`` prompts per KV-cached batch: (stripped texts, token ids)."""
    s = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)
    eos = set(getattr(tokenizer, "eos_token_ids", None) or {tokenizer.eos_token_id})
    texts, ids = [], []
    for i in range(0, len(prompts), batch):
        ro = sample_groups(model, tokenizer, prompts[i:i + batch], 1, s)
        texts += [t.strip() for t in ro.texts]
        ids += [[t for t in c if t not in eos] for c in ro.completions]
    return texts, ids


def greedy_replies(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch: int = 16) -> list[str]:
    """Greedy replies of token-id prompts (texts only; see :func:`greedy`)."""
    return greedy(model, tokenizer, prompts, max_new_tokens, batch)[0]


def residual_norms(model, seqs: Sequence[Sequence[int]], layers: Sequence[int], limit: int = 32) -> dict[int, float]:
    """Mean L2 norm of each listed block's output over the real tokens of ``seqs`` after the first.

    The first token's state is left out: in many models (SmolLM2 included) it
    is an attention sink whose norm is tens of times the others'. This is the
    unit of ``relative`` λ: ``λ=1`` adds a vector as long as a typical token's
    residual stream at that block. One forward pass per sequence records every block.
    """
    layers = sorted(set(layers))
    tot, n = dict.fromkeys(layers, 0.0), 0
    with recording(model, layers) as sink:
        for s in list(seqs)[:limit]:
            if len(s) < 2:
                continue
            model(mx.array([list(s)]))
            for l in layers:
                tot[l] += float(mx.linalg.norm(sink[l][0, 1:].astype(mx.float32), axis=-1).sum())
            n += len(s) - 1
    if n == 0:
        raise MlxpostError("residual norm: every sequence has a single token")
    return {l: t / n for l, t in tot.items()}


def residual_norm(model, seqs: Sequence[Sequence[int]], layer: int, limit: int = 32) -> float:
    """:func:`residual_norms` of one block."""
    return residual_norms(model, seqs, [layer], limit)[layer]


@dataclass
class Behaviour:
    """A behaviour score of a list of replies: a built-in of :mod:`.scores`, or reward functions (RL API)."""

    name: str
    fn: Callable[[list[str]], float]

    @classmethod
    def builtin(cls, name: str) -> "Behaviour":
        if name not in SCORES:
            raise MlxpostError(f"--score must be one of {', '.join(SCORES)}; got {name!r}")
        return cls(name, SCORES[name])

    @classmethod
    def rewards(cls, specs: Sequence[str], columns: dict[str, list], prompts: list[str],
                sources: list[str]) -> "Behaviour":
        """Mean weighted total of reward functions (``--reward`` specs as ``mlxpost grpo`` takes them).

        ``columns``: the prompt rows' fields (``answer``, ...), aligned with the prompts, passed to the
        functions as GRPO passes dataset columns; ``sources`` (``file:line``) point errors at the data.
        """
        rs = RewardSet(list(specs))

        def fn(texts: list[str]) -> float:
            return float(np.mean(rs.score(texts, columns, prompts=prompts, sources=sources).total))
        return cls("reward:" + "+".join(rs.names), fn)


def reply_perplexity(model: nn.Module, prompts: list[list[int]], replies: list[list[int]]) -> float:
    """exp(mean NLL) of the reply tokens given their prompts (one sequence at a time; few, short).

    The side effect on fluency: the same replies scored under the steered and the unsteered model. The
    prompt is read first into a KV cache, then the reply in one more pass (:func:`after_prompt`), so
    prompt-only steering shifts the prompt and not the reply, as it does while generating.
    """
    nll, n = 0.0, 0
    for p, c in zip(prompts, replies):
        if not c:
            continue
        cache = kv_caches().make_prompt_cache(model)
        parts = [model(mx.array([p]), cache=cache)[:, -1:]]  # predicts c[0]
        if len(c) > 1:
            with after_prompt():
                parts.append(model(mx.array([c[:-1]]), cache=cache))
        logits = mx.concatenate(parts, axis=1).astype(mx.float32)[0]
        nll += float(nn.losses.cross_entropy(logits, mx.array(c), reduction="sum"))
        n += len(c)
    return float(np.exp(nll / n)) if n else float("nan")


def _scaled(specs: Sequence[SteerSpec], lam: float, unit: Sequence[float]) -> list[SteerSpec]:
    return [SteerSpec(s.layer, s.vector, s.scale * lam * u, s.name, s.prompt_only) for s, u in zip(specs, unit)]


def run_sweep(model, tokenizer, spec: SteerSpec | Sequence[SteerSpec], lambdas: Sequence[float],
              prompts: list[list[int]], neutral: list[list[int]] | None, *, score: str | Behaviour = "json",
              max_new_tokens: int = 48, max_side_effects: float = 0.10, batch: int = 16, log=None,
              labelled=None, relative: bool = False, reference: tuple[list, list] | None = None) -> dict:
    """Score every λ (see the module docstring); returns the rows, the verdicts and example replies.

    ``spec``: one vector or several (e.g. on several blocks), each added at ``λ · spec.scale · v``.
    ``relative``: λ is in units of the block's mean residual norm (:func:`residual_norm`, read on the
    prompts at λ=0), the vector normalized to length 1; each row gives the equivalent ``raw_lambda``
    of the first spec (what ``--steer DIR@λ`` takes). ``reference``: ``(prompt ids, reply ids)`` whose
    perplexity is measured at each λ; default: the neutral prompts with their greedy replies at λ=0.
    ``labelled``: ``(seqs, labels (N,), layers, pad_id)``: AQI of the mean-pooled states, averaged over
    ``layers``, is measured at each λ too (with a 95% bootstrap interval).
    """
    specs = [spec] if isinstance(spec, SteerSpec) else list(spec)
    behaviour = Behaviour.builtin(score) if isinstance(score, str) else score
    norms = [float(mx.linalg.norm(mx.array(s.vector).astype(mx.float32))) for s in specs]
    by_layer = residual_norms(model, prompts, [s.layer for s in specs])
    resid = [by_layer[s.layer] for s in specs]
    if relative and 0.0 in norms:
        raise MlxpostError("--relative: a steering vector of length 0 cannot be normalized")
    unit = [r / n for r, n in zip(resid, norms)] if relative else [1.0] * len(specs)
    grid = [0.0] + [x for x in sorted(set(float(x) for x in lambdas)) if x != 0.0]  # λ=0 first: the reference
    replies, rows = {}, []
    for lam in grid:
        t0 = time.perf_counter()
        with steered(model, _scaled(specs, lam, unit)):
            texts = greedy_replies(model, tokenizer, prompts, max_new_tokens, batch)
            side, side_ids = greedy(model, tokenizer, neutral, max_new_tokens, batch) if neutral else (None, None)
            if lam == 0.0 and reference is None and neutral:
                reference = (neutral, side_ids)
            row = {"lambda": lam, "raw_lambda": lam * unit[0] * specs[0].scale, "score": behaviour.fn(texts)}
            if reference is not None:
                row["perplexity"] = reply_perplexity(model, *reference)
            if labelled is not None:
                seqs, labels, layers, pad = labelled
                h = hidden_states(model, seqs, layers, position="mean", pad_id=pad)
                x = np.mean([h[l] for l in layers], axis=0)
                row["aqi"], row["aqi_interval"] = aqi(x, labels)["aqi"], bootstrap_interval(x, labels)
        replies[lam] = (texts, side)
        rows.append({**row, "seconds": time.perf_counter() - t0})
        if log:
            log(f"λ={lam:g}: {behaviour.name} {rows[-1]['score']:.3f} ({rows[-1]['seconds']:.0f}s)")
    rows.sort(key=lambda r: r["lambda"])
    _side_effects(rows, replies)
    return {"score_name": behaviour.name, "layer": specs[0].layer, "layers": [s.layer for s in specs],
            "relative": relative, "residual_norm": resid, "vector_norm": norms, "rows": rows,
            "verdicts": verdicts(rows, max_side_effects),
            "examples": {str(lam): v[0][:3] for lam, v in replies.items()}}


def _side_effects(rows: list[dict], replies: dict) -> None:
    """Per row: share of neutral replies that differ from λ=0's; perplexity change against λ=0's."""
    ref = replies[0.0][1]
    ppl0 = next(r.get("perplexity") for r in rows if r["lambda"] == 0.0)
    for r in rows:
        side = replies[r["lambda"]][1]
        r["side_effects"] = None if side is None else sum(a != b for a, b in zip(side, ref)) / len(ref)
        if ppl0 is not None:
            r["perplexity_change"] = r["perplexity"] / ppl0 - 1.0


def verdicts(rows: list[dict], max_side_effects: float) -> dict:
    """Budget, recommended λ and the trend of the score over λ.

    >>> v = verdicts([{"lambda": 0.0, "score": 0.1, "side_effects": 0.0},
    ...               {"lambda": 1.0, "score": 0.5, "side_effects": 0.05},
    ...               {"lambda": 2.0, "score": 0.9, "side_effects": 0.4}], 0.10)
    >>> v["within_budget"], v["recommended_lambda"], v["score_increases"]
    ([0.0, 1.0], 1.0, True)
    """
    measured = all(r["side_effects"] is not None for r in rows)
    ok = [r for r in rows if not measured or r["side_effects"] <= max_side_effects]
    best = max(ok, key=lambda r: (r["score"], -abs(r["lambda"]))) if ok else None
    rho = spearman([r["lambda"] for r in rows], [r["score"] for r in rows])
    out = {"max_side_effects": max_side_effects, "side_effects_measured": measured,
           "within_budget": [r["lambda"] for r in ok], "recommended_lambda": best and best["lambda"],
           "spearman_rho": rho, "score_increases": rho > 0}
    if all("aqi" in r for r in rows):
        arho = spearman([r["lambda"] for r in rows], [r["aqi"] for r in rows])
        zero = next(r for r in rows if r["lambda"] == 0.0)
        top = max(rows, key=lambda r: r["lambda"])
        above = top["aqi"] > zero["aqi_interval"][1]
        out.update(aqi_spearman_rho=arho, aqi_top_above_zero_interval=above, aqi_increases=arho > 0 and above)
    return out


def table(result: dict) -> list[str]:
    """The sweep as markdown table lines (``raw λ``: the λ to give ``--steer DIR@λ`` when λ is relative)."""
    name = result["score_name"]
    lines = [f"| λ | raw λ | {name} | side effects | perplexity change | AQI | seconds |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        side = "-" if r["side_effects"] is None else f"{r['side_effects']:.2f}"
        ppl = f"{r['perplexity_change']:+.1%}" if "perplexity_change" in r else "-"
        q = f"{r['aqi']:.3f}" if "aqi" in r else "-"
        lines.append(f"| {r['lambda']:g} | {r.get('raw_lambda', r['lambda']):.3g} | {r['score']:.3f} | {side} | "
                     f"{ppl} | {q} | {r['seconds']:.0f} |")
    return lines


def write_outputs(result: dict, out: str | Path) -> list[Path]:
    """``sweep.json``, ``sweep.md`` and, when matplotlib is installed, ``sweep.png`` (score and side effects vs λ)."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_json(d / "sweep.json", result)
    (d / "sweep.md").write_text("\n".join(table(result)) + "\n", encoding="utf-8")
    written = [d / "sweep.json", d / "sweep.md"]
    try:
        import matplotlib  # optional extra: only needed for the figure
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    lam = [r["lambda"] for r in result["rows"]]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(lam, [r["score"] for r in result["rows"]], "o-", label=result["score_name"])
    if result["verdicts"]["side_effects_measured"]:
        ax.plot(lam, [r["side_effects"] for r in result["rows"]], "s--", label="side effects")
        ax.axhline(result["verdicts"]["max_side_effects"], color="grey", lw=0.8)
    ax.set_xlabel("λ"), ax.set_ylabel("rate"), ax.legend(), fig.tight_layout()
    fig.savefig(d / "sweep.png", dpi=120)
    plt.close(fig)
    return written + [d / "sweep.png"]
