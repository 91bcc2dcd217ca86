"""Representation-engineering commands: ``steer extract`` (and, where built, ``steer sweep``, ``aqi``, ``abliterate``)."""

from __future__ import annotations

import click

from ..steer.extract import extract
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
