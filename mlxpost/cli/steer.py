"""Representation-engineering commands: ``steer extract`` (and, where built, ``steer sweep``, ``aqi``, ``abliterate``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
import numpy as np

from ..data.render import Renderer
from ..data.rows import read_jsonl
from ..errors import MlxpostError
from ..files import atomic_write_json
from ..steer.abliterate import run_abliterate
from ..steer.aqi import aqi, bootstrap_interval
from ..steer.extract import extract, load_for_steering, read_rows, read_sequences
from ..steer.hooks import SteerSpec, model_blocks, steered
from ..steer.sweep import Behaviour, run_sweep, table, write_outputs
from ..steer.vectors import (
    directory_specs,
    hidden_states,
    parse_layers,
    parse_steer,
    steer_positions,
    steer_specs,
)
from ..ui import make_reporter


@click.group()
def steer():
    """Steering vectors: extract them from a contrast, then apply them with `mlxpost generate --steer DIR@λ`.

    \b
    Example:
      mlxpost steer extract --adapter runs/demo/sft --against adapters-off --prompts q.jsonl --out vecs/sft
    """


@steer.command("extract")
@click.option("--model", help="Base model (default: the adapter's base, else the built-in default).")
@click.option("--adapter", type=click.Path(file_okay=False, exists=True), help="Run or adapter directory to load.")
@click.option("--positive", type=click.Path(dir_okay=False, exists=True), help="JSONL rows of the positive side.")
@click.option("--negative", type=click.Path(dir_okay=False, exists=True), help="JSONL rows of the negative side.")
@click.option("--against", help="Another model or run (negative side), or 'adapters-off' (the same model without adapters).")
@click.option("--prompts", type=click.Path(dir_okay=False, exists=True), help="Prompts both sides read (with --against).")
@click.option("--limit", type=int, help="Read at most this many prompts.")
@click.option("--layers", default="all", show_default=True, help="Blocks to extract: 8,12,16 or all.")
@click.option("--position", type=click.Choice(["last", "mean", "completion"]), default="last", show_default=True,
              help="last real token, the mean over real tokens, or the mean over the completion's tokens "
                   "(SFT rows only).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--out", required=True, type=click.Path(), help="Directory for vectors.safetensors and steer.json.")
def extract_command(model, adapter, positive, negative, against, prompts, limit, layers, position, batch_size, out):
    """Extract steering vectors v = mean(h⁺) − mean(h⁻) of each block's output.

    \b
    Examples:
      mlxpost steer extract --adapter runs/sft --against adapters-off --prompts prompts.jsonl --out vecs/sft
      mlxpost steer extract --positive json.jsonl --negative prose.jsonl --layers 8,12,16 --out vecs/json
    """
    meta = extract(model=model, adapter=adapter, out=out, layers=layers, position=position, positive=positive,
                   negative=negative, against=against, prompts=prompts, batch_size=batch_size, limit=limit)
    rep = make_reporter()
    rep.info(f"{meta['counts']['positive']} positive / {meta['counts']['negative']} negative rows; "
             f"position {meta['position']}")
    rep.info("layer  norm      gap/spread  half-agreement")
    for l, r in meta["report"].items():
        agree = "-" if r["half_agreement"] is None else f"{r['half_agreement']:.3f}"
        rep.info(f"{int(l):>5}  {r['norm']:<8.3f}  {r['gap_over_spread']:<10.2f}  {agree}")
    rep.info(f"best layer (largest gap/spread): {meta['best_layer']}; wrote {out}")


@steer.command("sweep")
@click.option("--vectors", "vectors_opts", required=True, multiple=True, metavar="DIR[@W[:LAYER|:all]]",
              help="A steer extract directory; repeatable: the vectors sum, each weighted by W (default 1), "
                   "all scaled by λ.")
@click.option("--layer", help="Block(s) to steer: 18, or 12,18,24 (each its own vector), or all (every block "
                              "with its increment, as --steer DIR@λ:all) (default: the directory's best layer).")
@click.option("--model", help="Model to steer (default: the built-in default).")
@click.option("--adapter", type=click.Path(file_okay=False, exists=True), help="Run or adapter directory to load.")
@click.option("--lambdas", default="-2,-1,0,0.5,1,2,4", show_default=True, help="Comma-separated strengths.")
@click.option("--relative", is_flag=True,
              help="λ in units of the block's mean residual norm (the vector normalized to length 1).")
@click.option("--prompts", required=True, type=click.Path(dir_okay=False, exists=True), help="Behaviour prompts (JSONL).")
@click.option("--neutral", type=click.Path(dir_okay=False, exists=True), help="Neutral prompts for the side-effect rate.")
@click.option("--reference", type=click.Path(dir_okay=False, exists=True),
              help="SFT rows whose completions' perplexity is measured at each λ (default: the neutral "
                   "prompts with their greedy replies at λ=0).")
@click.option("--score", type=click.Choice(["json", "json-object", "refusal", "length"]), default="json",
              show_default=True, help="json: the demo's exact answer object; json-object: any JSON object.")
@click.option("--prompt-only", is_flag=True,
              help="Add the vectors in the prompt's pass only; the decode steps run unsteered (as --steer DIR@λ:prompt).")
@click.option("--reward", "rewards", multiple=True, metavar="SPEC[@W]",
              help="Behaviour score from reward functions as grpo takes them (accuracy, FILE.py:fn, ...), fed "
                   "the prompt rows' columns; replaces --score.")
@click.option("--limit", type=int, help="Read at most this many prompts of each file.")
@click.option("--max-new-tokens", type=int, default=48, show_default=True)
@click.option("--max-side-effects", type=float, default=0.10, show_default=True)
@click.option("--aqi", "aqi_data", type=click.Path(dir_okay=False, exists=True),
              help="Labelled JSONL (label: aligned/misaligned): AQI at each λ, mean-pooled over every block.")
@click.option("--out", required=True, type=click.Path(), help="Directory for sweep.json, sweep.md, sweep.png.")
def sweep_command(vectors_opts, layer, model, adapter, lambdas, relative, prompts, neutral, reference, score,
                  prompt_only, rewards, limit, max_new_tokens, max_side_effects, aqi_data, out):
    """Answer prompts greedily at each λ: behaviour score, side effects, verdicts, table and plot.

    \b
    Examples:
      mlxpost steer sweep --vectors vecs/sft --prompts q.jsonl --neutral chat.jsonl --lambdas -2,0,2,4 --out sweeps/sft
      mlxpost steer sweep --vectors vecs/sft --layer 12 --relative --prompts q.jsonl --reward accuracy --out sweeps/acc
    """
    try:
        grid = [float(x) for x in lambdas.split(",")]
    except ValueError:
        raise MlxpostError(f"--lambdas {lambdas!r}: expected numbers separated by commas") from None
    specs = [s for v in vectors_opts for s in _sweep_specs(v, layer)]
    if prompt_only:
        specs = [dataclasses.replace(s, prompt_only=True) for s in specs]
    vectors = ",".join(vectors_opts)
    loaded = load_for_steering(model, adapter)
    r = Renderer(loaded.tokenizer)
    ps = read_sequences(prompts, r, limit)
    ns = read_sequences(neutral, r, limit) if neutral else None
    ref = None
    if reference:
        rows = [(ids, s) for ids, s in read_rows(reference, r, limit) if s is not None]
        if not rows:
            raise MlxpostError(f"{reference}: --reference needs SFT rows (a prompt with its completion)")
        ref = ([ids[:s] for ids, s in rows], [ids[s:] for ids, s in rows])
    behaviour = _reward_behaviour(rewards, prompts, r, limit) if rewards else score
    labelled = None
    if aqi_data:
        seqs, labels = _labelled(aqi_data, r)
        labelled = (seqs, np.array(labels), list(range(len(model_blocks(loaded.model)))), r.eos_id or 0)
    rep = make_reporter()
    result = run_sweep(loaded.model, loaded.tokenizer, specs, grid, ps, ns, score=behaviour,
                       max_new_tokens=max_new_tokens, max_side_effects=max_side_effects, log=rep.info,
                       labelled=labelled, relative=relative, reference=ref)
    result.update(vectors=str(vectors), positions="prompt" if any(s.prompt_only for s in specs) else "all",
                  model=model or "default", adapter=adapter, prompts=str(prompts),
                  neutral=neutral and str(neutral), reference=reference and str(reference))
    write_outputs(result, out)
    _report_sweep(rep, result, out)


def _sweep_specs(option: str, layer: str | None) -> list[SteerSpec]:
    """One ``--vectors DIR[@W[:LAYER|:all]][:prompt]``: its vectors at weight W (λ multiplies them in the sweep);
    without a layer of its own, ``--layer``'s."""
    plain, prompt_only = steer_positions(option)
    path, weight, own = parse_steer(plain) if "@" in plain else (plain, 1.0, None)
    return directory_specs(path, weight, own if own is not None else layer, option=f"--vectors {option}",
                           prompt_only=prompt_only)


def _reward_behaviour(rewards, prompts, renderer, limit) -> Behaviour:
    """Reward functions as the behaviour score, fed the prompt rows' columns (as GRPO feeds them)."""
    rows = []
    for line, row, issue in read_jsonl(prompts):
        if issue is not None:
            raise MlxpostError(str(issue))
        rows.append((line, row))
        if limit and len(rows) >= limit:
            break
    keys = sorted({k for _, row in rows for k in row} - {"prompt", "messages", "completion", "completions"})
    columns = {k: [row.get(k) for _, row in rows] for k in keys}
    texts = [renderer.prompt(row["prompt"])[1] if "prompt" in row else "" for _, row in rows]
    return Behaviour.rewards(rewards, columns, texts, [f"{prompts}:{line}" for line, _ in rows])


def _report_sweep(rep, result: dict, out) -> None:
    for line in table(result):
        rep.info(line)
    v = result["verdicts"]
    budget = v["within_budget"] if v["side_effects_measured"] else "not measured (no --neutral)"
    rep.info(f"score increases with λ: {v['score_increases']} (Spearman ρ {v['spearman_rho']:.2f}); "
             f"within side-effect budget {v['max_side_effects']:.0%}: {budget}; "
             f"recommended λ {v['recommended_lambda']}")
    if "aqi_increases" in v:
        rep.info(f"AQI increases with λ: {v['aqi_increases']} (ρ {v['aqi_spearman_rho']:.2f}; AQI at the largest λ "
                 f"above the λ=0 bootstrap interval: {v['aqi_top_above_zero_interval']})")
    if result["relative"]:
        rep.info("λ relative to the mean residual norm " + ", ".join(
            f"{n:.1f} (block {l})" for l, n in zip(result["layers"], result["residual_norm"])) +
            "; raw λ is what --steer DIR@λ takes")
    rep.info(f"wrote {out}")


LABELS = {"aligned": 1, "misaligned": 0, 1: 1, 0: 0}  # True and False are 1 and 0 as dict keys


def _labelled(path, renderer):
    """Rows with a ``label`` (aligned/misaligned or 1/0) and any SFT or prompt fields; returns (seqs, labels)."""
    seqs = read_sequences(path, renderer)
    labels = []
    with open(path, encoding="utf-8") as f:
        rows = [(i, json.loads(t)) for i, t in enumerate(f, 1) if t.strip()]
    for line, row in rows:
        lab = row.get("label")
        if lab not in LABELS:
            raise MlxpostError(f"{path}:{line}: label: expected aligned or misaligned (or 1/0), got {lab!r}")
        labels.append(LABELS[lab])
    return seqs, labels


@click.command("aqi")
@click.option("--model", help="Model (default: the adapter's base, else the built-in default).")
@click.option("--adapter", type=click.Path(file_okay=False, exists=True), help="Run or adapter directory to load.")
@click.option("--steer", "steer_", multiple=True, metavar="VEC_DIR@λ[:LAYER]", help="Steer while measuring (repeatable).")
@click.option("--data", required=True, type=click.Path(dir_okay=False, exists=True),
              help="JSONL rows with a 'label' (aligned/misaligned) and a prompt, messages or prompt/completion.")
@click.option("--layers", default="all", show_default=True, help="Blocks whose pooled states are averaged.")
@click.option("--position", type=click.Choice(["last", "mean"]), default="mean", show_default=True)
def aqi_command(model, adapter, steer_, data, layers, position):
    """Alignment Quality Index (Borah et al. 2025) of layer-pooled hidden states of labelled examples.

    \b
    Example:
      mlxpost aqi --adapter runs/demo/dpo --data labelled.jsonl --layers 12,18,24
    """
    loaded = load_for_steering(model, adapter)
    r = Renderer(loaded.tokenizer)
    seqs, labels = _labelled(data, r)
    idx = parse_layers(layers, len(model_blocks(loaded.model)))
    with steered(loaded.model, steer_specs(loaded.model, steer_)):
        h = hidden_states(loaded.model, seqs, idx, position=position, pad_id=r.eos_id or 0)
    x, y = np.mean([h[l] for l in idx], axis=0), np.array(labels)
    res = aqi(x, y)
    lo, hi = bootstrap_interval(x, y)
    rep = make_reporter()
    rep.info(f"AQI {res['aqi']:.4f} (95% bootstrap {lo:.4f}..{hi:.4f}) on {res['n']} examples; "
             f"CH {res['calinski_harabasz']:.3f}, XB {res['xie_beni']:.4f}, DB {res['davies_bouldin']:.3f}, "
             f"Dunn {res['dunn']:.4f}")


@click.command("abliterate")
@click.option("--model", help="Model (default: the adapter's base, else the built-in default).")
@click.option("--adapter", type=click.Path(file_okay=False, exists=True), help="Run or adapter directory (fused first).")
@click.option("--harmful", type=click.Path(dir_okay=False, exists=True), help="Prompts the model refuses (default: bundled).")
@click.option("--harmless", type=click.Path(dir_okay=False, exists=True), help="Prompts it answers (default: bundled).")
@click.option("--layer", default="auto", show_default=True, help="Block of the refusal direction, or auto.")
@click.option("--max-new-tokens", type=int, default=48, show_default=True)
@click.option("--out", required=True, type=click.Path(), help="Directory for the edited Hugging Face model.")
def abliterate_command(model, adapter, harmful, harmless, layer, max_new_tokens, out):
    """Remove the refusal direction from every residual-stream writer; report refusal and retention before/after.

    Use it only on models you are allowed to modify, for research on refusal behaviour; see the README.

    \b
    Example:
      mlxpost abliterate --model default --layer auto --out exports/smollm2-abliterated
    """
    assets = Path(__file__).resolve().parent.parent / "assets"
    rep = make_reporter()
    res = run_abliterate(model=model, adapter=adapter, harmful=harmful or assets / "abliterate_harmful.jsonl",
                         harmless=harmless or assets / "abliterate_harmless.jsonl", layer=layer, out=out,
                         max_new_tokens=max_new_tokens, log=rep.info)
    atomic_write_json(Path(out) / "abliteration.json", res)
    v = res["verdicts"]
    rep.info(f"block {res['layer']}; max |rᵀW| after the edit {res['max_residual']:.2e}")
    rep.info(f"refusal rate on {res['n_heldout'][0]} held-out harmful prompts: {res['refusal_before']:.0%} -> "
             f"{res['refusal_after']:.0%} (under 5%: {v['refusals_under_5pct']})")
    rep.info(f"harmless: refusals {res['harmless_refusal_before']:.0%} -> {res['harmless_refusal_after']:.0%}; "
             f"perplexity of the original replies {res['harmless_ppl_before']:.2f} -> {res['harmless_ppl_after']:.2f} "
             f"(retention {res['retention']:.0%}, over 90%: {v['retention_over_90pct']})")
    rep.info(f"wrote {out}")
