"""``mlxpost steer sweep``: a behaviour score and the side-effect rate of greedy replies at each steering strength λ.

Per λ, the behaviour prompts and the neutral prompts are answered greedily
(the batched KV-cached sampler of :mod:`mlxpost.rl.rollout`, inside
:func:`~mlxpost.steer.hooks.steered`). The behaviour score is a built-in of
:mod:`.scores`; the side-effect rate is the share of neutral prompts whose
greedy reply differs from the reply at λ=0. Verdicts: every λ whose
side-effect rate is at most ``max_side_effects`` is "within budget"; the
recommended λ is the one with the best score among those; "score increases
with λ" is Spearman's ρ > 0 over the λ grid.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.sampling import Sampling
from ..errors import MlxpostError
from ..files import atomic_write_json
from ..rl.rollout import sample_groups
from .aqi import aqi, bootstrap_interval
from .hooks import SteerSpec, steered
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


def greedy_replies(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch: int = 16) -> list[str]:
    """Greedy replies of token-id prompts, ``batch`` prompts per KV-cached batch."""
    s = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)
    out = []
    for i in range(0, len(prompts), batch):
        out += [t.strip() for t in sample_groups(model, tokenizer, prompts[i:i + batch], 1, s).texts]
    return out


def run_sweep(model, tokenizer, spec: SteerSpec, lambdas: Sequence[float], prompts: list[list[int]],
              neutral: list[list[int]] | None, *, score: str = "json", max_new_tokens: int = 48,
              max_side_effects: float = 0.10, batch: int = 16, log=None, labelled=None) -> dict:
    """Score every λ (see the module docstring); returns the rows, the verdicts and example replies.

    ``labelled``: ``(seqs, labels (N,), layers, pad_id)``: AQI of the mean-pooled states, averaged over
    ``layers``, is measured at each λ too (with a 95% bootstrap interval).
    """
    if score not in SCORES:
        raise MlxpostError(f"--score must be one of {', '.join(SCORES)}; got {score!r}")
    grid = sorted(set(float(x) for x in lambdas) | {0.0})
    replies, rows = {}, []
    for lam in grid:
        t0 = time.perf_counter()
        with steered(model, [SteerSpec(spec.layer, spec.vector, lam, spec.name)]):
            texts = greedy_replies(model, tokenizer, prompts, max_new_tokens, batch)
            side = greedy_replies(model, tokenizer, neutral, max_new_tokens, batch) if neutral else None
            row = {"lambda": lam, "score": SCORES[score](texts)}
            if labelled is not None:
                seqs, labels, layers, pad = labelled
                h = hidden_states(model, seqs, layers, position="mean", pad_id=pad)
                x = np.mean([h[l] for l in layers], axis=0)
                row["aqi"], row["aqi_interval"] = aqi(x, labels)["aqi"], bootstrap_interval(x, labels)
        replies[lam] = (texts, side)
        rows.append({**row, "seconds": time.perf_counter() - t0})
        if log:
            log(f"λ={lam:g}: {score} {rows[-1]['score']:.3f} ({rows[-1]['seconds']:.0f}s)")
    ref = replies[0.0][1]
    for r in rows:
        side = replies[r["lambda"]][1]
        r["side_effects"] = None if side is None else sum(a != b for a, b in zip(side, ref)) / len(ref)
    return {"score_name": score, "layer": spec.layer, "rows": rows,
            "verdicts": verdicts(rows, max_side_effects),
            "examples": {str(lam): v[0][:3] for lam, v in replies.items()}}


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
    """The sweep as markdown table lines."""
    name = result["score_name"]
    lines = [f"| λ | {name} | side effects | AQI | seconds |", "|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        side = "-" if r["side_effects"] is None else f"{r['side_effects']:.2f}"
        q = f"{r['aqi']:.3f}" if "aqi" in r else "-"
        lines.append(f"| {r['lambda']:g} | {r['score']:.3f} | {side} | {q} | {r['seconds']:.0f} |")
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
