"""Commands around runs: export, generate, doctor, demo, compare."""

from __future__ import annotations

import click

from ..backend.doctor import doctor_rows
from ..core.generate import stream_text
from ..hub.export import FORMATS, export
from ..hub.gguf_export import QUANTS
from ..steer.hooks import steered
from ..steer.vectors import steer_specs
from ..tools.chat import load_for_generation
from ..tools.demo import STAGES, run_demo
from ..ui import make_reporter
from .train import show_blas_advice


@click.command("export")
@click.argument("run_dir", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(FORMATS), required=True,
              help="peft: PEFT adapter; fused: Hugging Face model with the adapter merged; mlx: mlx-lm adapter; "
                   "gguf: the merged model as one GGUF file (llama.cpp, Ollama, LM Studio).")
@click.option("--out", type=click.Path(), help="Directory to write (default: exports/<run>-<format>).")
@click.option("--best", is_flag=True, help="Export the run's best/ adapter (lowest validation loss).")
@click.option("--model", help="Base model (default: the one the run trained on).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="fused: weight dtype (auto: the base model's).")
@click.option("--quant", type=click.Choice(QUANTS), default="q8_0", show_default=True,
              help="gguf: tensor type (q4_k_m: llama.cpp's Q4_K_M mix of Q4_K and Q6_K).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def export_command(run_dir, fmt, out, best, model, dtype, quant, overwrite):
    """Export a run's adapter: PEFT adapter, merged Hugging Face model, mlx-lm adapter, or GGUF file.

    \b
    Examples:
      mlxpost export runs/demo/dpo --format mlx                    # writes exports/dpo-mlx
      mlxpost export runs/sft-default --format peft --out exports/sft-peft
      mlxpost export runs/dpo-1 --format fused --out exports/dpo-merged --dtype bfloat16
      mlxpost export runs/sft-default --best --format mlx --out exports/sft-mlx
      mlxpost export runs/sft-default --format gguf --quant q8_0 --out exports/sft-gguf
    """
    result = export(run_dir, fmt, out, best=best, model=model, dtype=dtype, overwrite=overwrite, quant=quant)
    click.echo(f"wrote {fmt} export of {run_dir}{' (best/)' if best else ''} to {result['out']} "
               f"(base: {result['base']})")
    for note in result["notes"]:
        click.echo(f"note: {note}")


@click.command()
@click.option("--model", help="Base model (default: the one recorded in the adapter, else the built-in default).")
@click.option("--adapter", type=click.Path(file_okay=False, exists=True), help="Run or adapter directory.")
@click.option("--best", is_flag=True, help="Use the run's best/ adapter (lowest validation loss).")
@click.option("--prompt", "-p", required=True, help="The user message.")
@click.option("--system", help="An optional system message.")
@click.option("--max-tokens", type=int, default=256, show_default=True)
@click.option("--temp", type=float, default=0.0, show_default=True, help="Sampling temperature (0 = greedy).")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--steer", "steer", multiple=True, metavar="VEC_DIR@λ[:LAYER]",
              help="Add λ·v to a block's output (repeatable: vectors sum; layer default: the directory's best).")
def generate(model, adapter, best, prompt, system, max_tokens, temp, top_p, steer):
    """Generate one reply (chat template applied), optionally with a trained run's adapter stack.

    \b
    Examples:
      mlxpost generate --adapter runs/demo/dpo --prompt "What is 38 + 47?"
      mlxpost generate --model HuggingFaceTB/SmolLM2-135M-Instruct -p "Hi" --temp 0.7
      mlxpost generate --adapter runs/demo/sft --steer vectors/json@2 -p "What is 38 + 47?"
    """
    loaded, _ = load_for_generation(model, adapter, best)
    said = False
    with steered(loaded.model, steer_specs(loaded.model, steer)):
        for piece in stream_text(loaded.model, loaded.tokenizer, prompt, max_tokens=max_tokens, temperature=temp,
                                 top_p=top_p, system=system):
            said = said or bool(piece.strip())
            click.echo(piece, nl=False)
    click.echo()
    if not said:
        click.secho("(empty reply: the model wrote nothing but whitespace before ending its turn)", fg="yellow", err=True)


@click.command()
@click.option("--no-measure", is_flag=True, help="Skip the matmul speed measurement.")
def doctor(no_measure):
    """Report the MLX backend, BLAS, memory and versions.

    \b
    Examples:
      mlxpost doctor
      mlxpost doctor --no-measure        # skip the matmul speed measurement
    """
    rows = doctor_rows(measure=not no_measure)
    rep = make_reporter()
    width = max(len(r[0]) for r in rows)
    marks = {"ok": "ok  ", "warn": "WARN", "info": "    "}
    for item, value, status in rows:
        rep.info(f"{marks.get(status, status)} {item.ljust(width)}  {value}")


@click.command()
@click.option("--out", default="runs/demo", show_default=True, help="Directory of the stage runs (sft, dpo, grpo, rlvr).")
@click.option("--full", is_flag=True, help="The recipes' full lengths instead of the few-minute version.")
@click.option("--model", help="Another base model (default: SmolLM2-135M-Instruct).")
@click.option("--stage", "stages", multiple=True, type=click.Choice([s.name for s in STAGES]),
              help="Run only these stages (each needs the one before it in --out).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a key in every stage that has it (grpo.* in the RL stages); STAGE:KEY=VALUE: in that "
                   "stage only.")
@click.option("--plain", is_flag=True, default=False, help="Plain line logs instead of the live display.")
def demo(out, full, model, stages, sets, plain):
    """The whole pipeline on the built-in model, each stage measured on held-out data: SFT, DPO, GRPO, RLVR.

    \b
    SFT teaches one-line JSON answers (bundled chats); DPO teaches reasoning
    before answering (explanation first; bundled pairs); GRPO and RLVR raise
    the accuracy on arithmetic questions (one-step facts, then two-digit sums).
    Every stage reports what it changed on held-out prompts, with a 95%
    interval, and what it cost: the perplexity of everyday prose before and
    after (the share kept, at least 0.9 to pass). A few minutes on a 2-core CPU; finished stages in --out are
    reused, a killed stage resumes.

    \b
    Examples:
      mlxpost demo
      mlxpost demo --full --out runs/demo-full     # the recipes' lengths, and the curves
    """
    rep = make_reporter(0, plain=True if plain else None)
    show_blas_advice(rep)
    run_demo(out, full=full, model=model, reporter=rep, stages=list(stages) or None, extra_sets=list(sets))
