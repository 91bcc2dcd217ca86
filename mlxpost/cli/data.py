"""``mlxpost data convert``, ``mlxpost data push`` and ``mlxpost push``: each parses, then calls one library function.

Registered on the main group in :mod:`mlxpost.cli.main` (``cli.add_command(data)``,
``cli.add_command(push)``), whose error handling prints an
:class:`~mlxpost.errors.MlxpostError` as one ``error:`` line.
"""

from __future__ import annotations

import click

from ..data.convert import convert
from ..data.formats import LAYOUTS
from ..data.hub import PREFIX as HUB_PREFIX
from ..data.hub import stage_split
from ..hub.upload import push_dataset, push_model
from ..ui import make_reporter


@click.group("data")
def data():
    """Convert datasets to mlxpost's formats, and push them to the Hugging Face Hub.

    \b
    Examples:
      mlxpost data convert alpaca_data.json --out data/ --split 0.05
      mlxpost data convert hh/ --from hh-rlhf --out prefs/ --tokenizer Qwen/Qwen2.5-0.5B-Instruct
      mlxpost data push data/ --repo me/my-sft-data --private
    """


@data.command("convert")
@click.argument("src", metavar="IN")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output directory (train.jsonl, test.jsonl).")
@click.option("--to", type=click.Choice(["sft", "preference"]),
              help="Row kind to write (default: the input layout's; preference layouts can become sft).")
@click.option("--from", "layout", type=click.Choice([*LAYOUTS, "auto"]), default="auto", show_default=True,
              help="Input layout; auto decides from each file's columns.")
@click.option("--split", type=float, default=0.0, show_default=True, help="Fraction of rows held out as test.jsonl.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the test split.")
@click.option("--tokenizer", metavar="MODEL_OR_DIR", help="Report token lengths under this model's chat template.")
@click.option("--system", metavar="TEXT", help="System message for rows that have none.")
@click.option("--skip-bad-rows", is_flag=True, help="Drop invalid rows (counted per reason) instead of failing.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT/train.jsonl.")
@click.option("--plain", is_flag=True, help="Plain text output instead of a Rich table.")
def convert_cmd(src, out, to, layout, split, seed, tokenizer, system, skip_bad_rows, overwrite, plain):
    """Convert alpaca / sharegpt / openai / hh-rlhf / ultrafeedback data (.jsonl, .json, .parquet) to mlxpost rows.

    \b
    Examples:
      mlxpost data convert alpaca_data.json --out data/ --split 0.05
      mlxpost data convert hh/ --from hh-rlhf --out prefs/ --tokenizer Qwen/Qwen2.5-0.5B-Instruct
    \b
    Writes OUT/train.jsonl (+ OUT/test.jsonl with --split) and OUT/conversion.json.
    Every row is checked with mlxpost's own validators; exact duplicates and
    pairs without a preference (identical answers, tied ratings) are dropped
    and counted.
    """
    rep = make_reporter(plain=True if plain else None)
    if str(src).startswith(HUB_PREFIX):  # hf:ORG/NAME[:CONFIG][@SPLIT]: that split's files, downloaded
        src = stage_split(src)
    result = convert(src, out, to=to, layout=layout, split=split, seed=seed, tokenizer=tokenizer, system=system,
                     skip_bad_rows=skip_bad_rows, overwrite=overwrite, log=rep.info)
    rep.table("data convert", result.table_rows())


def _print_push(rep, result) -> None:
    if result.uploaded or result.deleted:
        rep.info(f"committed {len(result.uploaded)} file(s)"
                 + (f", {len(result.unchanged)} unchanged" if result.unchanged else "")
                 + (f", deleted {len(result.deleted)} stale file(s)" if result.deleted else "")
                 + (f": {result.commit_url}" if result.commit_url else ""))
    else:
        rep.info(f"nothing to do: the Hub already has these {len(result.unchanged)} file(s)")
    rep.info(f"{result.url}")


@data.command("push")
@click.argument("folder", metavar="DIR", type=click.Path(exists=True, file_okay=False))
@click.option("--repo", required=True, metavar="USER/NAME", help="Dataset repo on the Hub (created if needed).")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--message", "-m", help="Commit message.")
@click.option("--plain", is_flag=True, help="Plain text output.")
def push_data_cmd(folder, repo, private, message, plain):
    """Push a converted dataset folder to the Hub as Parquet shards with a dataset card.

    \b
    Examples:
      mlxpost data push data/ --repo me/my-sft-data --private
    \b
    The shards and README.md are staged in DIR/.hub/ (DIR is otherwise left as is);
    the token comes from HF_TOKEN or `hf auth login`, the endpoint from HF_ENDPOINT.
    Re-running is safe: files the Hub already has are skipped.
    """
    rep = make_reporter(plain=True if plain else None)
    _print_push(rep, push_dataset(folder, repo, private=private, message=message, log=rep.info))


@click.command("push")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--repo", required=True, metavar="USER/NAME", help="Model repo on the Hub (created if needed).")
@click.option("--format", "fmt", type=click.Choice(["peft", "fused", "mlx"]),
              help="Export the run now (to a temporary folder) in this format, and push that.")
@click.option("--best", is_flag=True, help="With --format: export the run's best/ adapter.")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--message", "-m", help="Commit message.")
@click.option("--plain", is_flag=True, help="Plain text output.")
def push(run_dir, repo, fmt, best, private, message, plain):
    """Push a model export (README.md model card + weights) to the Hub as a model repo.

    \b
    RUN_DIR is an export folder (mlxpost export ... --out DIR), a run directory holding
    one, or, with --format, a run directory to export now.
    The token comes from HF_TOKEN or `hf auth login`, the endpoint from HF_ENDPOINT.

    \b
    Examples:
      mlxpost export runs/sft-default --format peft --out exports/sft-peft
      mlxpost push exports/sft-peft --repo me/smollm2-json-lora
      mlxpost push runs/dpo-1 --format fused --repo me/smollm2-dpo --private
    """
    rep = make_reporter(plain=True if plain else None)
    _print_push(rep, push_model(run_dir, repo, fmt=fmt, best=best, private=private, message=message, log=rep.info))
