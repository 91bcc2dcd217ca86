"""Representation-engineering commands: ``steer extract`` (and, where built, ``steer sweep``, ``aqi``, ``abliterate``)."""

from __future__ import annotations

import click

from ..data.render import Renderer
from ..steer.extract import extract, load_for_steering, read_sequences
from ..steer.hooks import SteerSpec
from ..steer.sweep import run_sweep, table, write_outputs
from ..steer.vectors import load_vectors
from ..errors import MlxpostError
from ..ui import make_reporter


@click.group()
def steer():
    """Steering vectors: extract them from a contrast, then apply them with `mlxpost generate --steer DIR@λ`."""


@steer.command("extract")
@click.option("--model", help="Base model (default: the adapter's base, else the built-in default).")
@click.option("--adapter", type=click.Path(file_okay=False, exists=True), help="Run or adapter directory to load.")
@click.option("--positive", type=click.Path(dir_okay=False, exists=True), help="JSONL rows of the positive side.")
@click.option("--negative", type=click.Path(dir_okay=False, exists=True), help="JSONL rows of the negative side.")
@click.option("--against", help="Another model or run (negative side), or 'adapters-off' (the same model without adapters).")
@click.option("--prompts", type=click.Path(dir_okay=False, exists=True), help="Prompts both sides read (with --against).")
@click.option("--limit", type=int, help="Read at most this many prompts.")
@click.option("--layers", default="all", show_default=True, help="Blocks to extract: 8,12,16 or all.")
@click.option("--position", type=click.Choice(["last", "mean"]), default="last", show_default=True,
              help="last real token, or the mean over real tokens.")
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
@click.option("--vectors", required=True, type=click.Path(file_okay=False, exists=True), help="A steer extract directory.")
@click.option("--layer", type=int, help="Block to steer (default: the directory's best layer).")
@click.option("--model", help="Model to steer (default: the built-in default).")
@click.option("--adapter", type=click.Path(file_okay=False, exists=True), help="Run or adapter directory to load.")
@click.option("--lambdas", default="-2,-1,0,0.5,1,2,4", show_default=True, help="Comma-separated strengths.")
@click.option("--prompts", required=True, type=click.Path(dir_okay=False, exists=True), help="Behaviour prompts (JSONL).")
@click.option("--neutral", type=click.Path(dir_okay=False, exists=True), help="Neutral prompts for the side-effect rate.")
@click.option("--score", type=click.Choice(["json", "refusal", "length"]), default="json", show_default=True)
@click.option("--limit", type=int, help="Read at most this many prompts of each file.")
@click.option("--max-new-tokens", type=int, default=48, show_default=True)
@click.option("--max-side-effects", type=float, default=0.10, show_default=True)
@click.option("--out", required=True, type=click.Path(), help="Directory for sweep.json, sweep.md, sweep.png.")
def sweep_command(vectors, layer, model, adapter, lambdas, prompts, neutral, score, limit, max_new_tokens,
                  max_side_effects, out):
    """Answer prompts greedily at each λ: behaviour score, side-effect rate, verdicts, table and plot.

    \b
    Example:
      mlxpost steer sweep --vectors vecs/sft --prompts q.jsonl --neutral chat.jsonl --lambdas -2,0,2,4 --out sweeps/sft
    """
    try:
        grid = [float(x) for x in lambdas.split(",")]
    except ValueError:
        raise MlxpostError(f"--lambdas {lambdas!r}: expected numbers separated by commas") from None
    vecs, meta = load_vectors(vectors)
    layer = meta.get("best_layer") if layer is None else layer
    if layer not in vecs:
        raise MlxpostError(f"--layer {layer}: {vectors} has vectors for layers {sorted(vecs)}")
    loaded = load_for_steering(model, adapter)
    r = Renderer(loaded.tokenizer)
    ps = read_sequences(prompts, r, limit)
    ns = read_sequences(neutral, r, limit) if neutral else None
    rep = make_reporter()
    result = run_sweep(loaded.model, loaded.tokenizer, SteerSpec(layer, vecs[layer], 1.0, str(vectors)), grid, ps, ns,
                       score=score, max_new_tokens=max_new_tokens, max_side_effects=max_side_effects, log=rep.info)
    result.update(vectors=str(vectors), model=model or "default", adapter=adapter, prompts=str(prompts),
                  neutral=neutral and str(neutral))
    write_outputs(result, out)
    for line in table(result):
        rep.info(line)
    v = result["verdicts"]
    rep.info(f"score increases with λ: {v['score_increases']} (Spearman ρ {v['spearman_rho']:.2f}); "
             f"within side-effect budget {v['max_side_effects']:.0%}: {v['within_budget'] if v['side_effects_measured'] else 'not measured (no --neutral)'}; "
             f"recommended λ {v['recommended_lambda']}")
    rep.info(f"wrote {out}")
