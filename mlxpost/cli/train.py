"""The training commands: one per registered method (``mlxpost sft``, ``mlxpost dpo``, ...).

Every command takes the common options below plus the method's own
(:attr:`mlxpost.methods.base.Method.options`), builds the configuration
(defaults < the method's defaults < recipe < options < ``--set``) and runs the
shared pipeline. Options default to None so that only what the user typed
overrides a recipe.
"""

from __future__ import annotations

from pathlib import Path

import click
import mlx.core as mx

from ..backend.blas import blas_advice
from ..config import build_config
from ..errors import MlxpostError
from ..files import shown_path
from ..methods.base import Method
from ..model.adapters import ADAPTER_CONFIG, own_adapter_dir, read_adapter_config
from ..training.distributed import agree
from ..training.pipeline import run
from ..training.resume import resume_config
from ..ui import make_reporter

COMMON_OPTIONS = [
    click.option("--model", "model__path",
                 help="HF repo id, local HF directory or .gguf file (default: SmolLM2-135M-Instruct)."),
    click.option("--data", "data__path",
                 help="A .jsonl file or a directory with train.jsonl / valid.jsonl (default: bundled example)."),
    click.option("--valid", "data__valid",
                 help="Validation .jsonl (default: valid.jsonl beside the data, else a held-out 5%)."),
    click.option("--out", "output__dir", help="Parent directory of run directories (default: runs)."),
    click.option("--name", "output__name", help="Run directory name (default: <method>-<timestamp>)."),
    click.option("--steps", "train__steps", type=int, help="Optimizer steps (default: one epoch)."),
    click.option("--epochs", "train__epochs", type=float, help="Epochs, when --steps is not given."),
    click.option("--batch-size", "train__batch_size", type=int, help="Rows per micro-batch."),
    click.option("--grad-accum", "train__grad_accum", type=int, help="Micro-batches per optimizer step."),
    click.option("--max-memory", "train__max_memory_gb", type=float,
                 help="Peak-memory budget in GB: gradient checkpointing and smaller micro-batches when needed "
                      "(default: 2/3 of this machine's memory; 0: no budget)."),
    click.option("--lr", "train__lr", type=float, help="Peak learning rate."),
    click.option("--rank", "lora__rank", type=int, help="LoRA rank."),
    click.option("--max-seq-len", "data__max_seq_len", type=int, help="Longest sequence in tokens."),
    click.option("--batching", "data__batching", type=click.Choice(["auto", "pack", "pad"]),
                 help="Pack several examples per row, or pad."),
    click.option("--quantize", "model__quantize", type=int, help="Quantize the base to 4 or 8 bits (QLoRA)."),
    click.option("--seed", "train__seed", type=int, help="Random seed."),
    click.option("--config", "config", type=click.Path(dir_okay=False), help="A recipe YAML file."),
    click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                 help="Override any config key, e.g. --set train.lr=2e-4 (repeatable)."),
    click.option("--dora", is_flag=True, default=None, help="DoRA instead of LoRA."),
    click.option("--skip-bad-rows", is_flag=True, default=None,
                 help="Skip invalid data rows (counted) instead of failing."),
    click.option("--adapter-init", "lora__init", help="Start from this adapter directory."),
    click.option("--resume", type=click.Path(file_okay=False, exists=True),
                 help="Continue a killed or finished run directory."),
    click.option("--overwrite", is_flag=True, default=None, help="Replace an existing run directory of the same name."),
    click.option("--plain", is_flag=True, default=False, help="Plain line logs instead of the live display."),
    click.option("--report-to", "train__report_to",
                 type=click.Choice(["none", "tensorboard", "wandb", "trackio", "mlflow"]),
                 help="Also send every metric to this experiment tracker (tensorboard: RUN_DIR/tensorboard)."),
]


# mlx_lm.lora's option names, accepted as hidden aliases so that habits and scripts carry over:
# mlx-lm name -> our config key (``--adapter-path DIR``: the run directory, i.e. --out + --name).
MLX_LM_ALIASES = {
    "iters": ("train.steps", int),
    "learning-rate": ("train.lr", float),
    "adapter-path": ("output.path", str),
    "num-layers": ("lora.num_layers", int),
    "fine-tune-type": ("lora.type", click.Choice(["lora", "dora", "full"])),
    "max-seq-length": ("data.max_seq_len", int),
    "grad-accumulation-steps": ("train.grad_accum", int),
}

COMMON_OPTIONS += [click.option(f"--{name}", f"alias__{name.replace('-', '_')}", type=kind, hidden=True)
                   for name, (_, kind) in MLX_LM_ALIASES.items()]


def apply_aliases(kwargs: dict) -> None:
    """Move mlx-lm-named options onto our keys in ``kwargs`` (in place); refuse one given both ways differently.

    >>> kw = {"train__steps": None, "alias__iters": 7, "alias__learning_rate": None}
    >>> apply_aliases(kw); kw
    {'train__steps': 7}
    """
    for name, (key, _) in MLX_LM_ALIASES.items():
        value = kwargs.pop(f"alias__{name.replace('-', '_')}", None)
        if value is None:
            continue
        if key == "lora.type" and value == "full":
            raise MlxpostError("--fine-tune-type full: mlxpost trains LoRA or DoRA adapters only (full fine-tuning "
                               "is not offered); use --fine-tune-type lora or dora")
        if key == "output.path":
            path = Path(value)
            for k, v in (("output__dir", str(path.parent)), ("output__name", path.name)):
                if kwargs.get(k) not in (None, v):
                    raise MlxpostError(f"--adapter-path {value} and --{k.split('__')[1]} {kwargs[k]} disagree; "
                                       "give one of them")
                kwargs[k] = v
            continue
        ours = key.replace(".", "__")
        if kwargs.get(ours) not in (None, value):
            raise MlxpostError(f"--{name} {value} and its mlxpost name (config key {key}) = {kwargs[ours]} "
                               "disagree; give one of them")
        kwargs[ours] = value


def method_command(method: Method) -> click.Command:
    """The command of ``method``: the common options, then the method's own."""

    def callback(**kwargs):
        train_command(method, kwargs)

    f = callback
    for opt in reversed(COMMON_OPTIONS + list(method.options)):
        f = opt(f)
    return click.command(method.name, help=method.help)(f)


def config_values(kwargs: dict) -> dict:
    """Command-line values by dotted key (``train__lr`` -> ``train.lr``); a repeatable option not given is None."""
    apply_aliases(kwargs)
    if kwargs.pop("dora"):
        kwargs["lora.type"] = "dora"
    if kwargs.pop("skip_bad_rows"):
        kwargs["data.skip_bad_rows"] = True
    if kwargs.pop("overwrite"):
        kwargs["output.overwrite"] = True
    out = {}
    for k, v in kwargs.items():
        out[k.replace("__", ".")] = (list(v) or None) if isinstance(v, tuple) else v
    return out


def show_blas_advice(rep) -> None:
    advice = blas_advice()
    if advice:
        rep.warn(advice)


def train_command(method: Method, kwargs: dict) -> None:
    config, sets, resume, plain = (kwargs.pop(k) for k in ("config", "sets", "resume", "plain"))
    values = config_values(kwargs)
    group = mx.distributed.init()
    rank = group.rank()
    world = group if group.size() > 1 else None
    rep = make_reporter(rank, plain=True if plain else None)
    show_blas_advice(rep)
    if resume:
        given = [k for k, v in values.items() if v is not None]
        if config or given:
            raise MlxpostError("--resume uses the run's saved config.yaml; only --set of train.steps, eval/save "
                               "frequencies and early stopping (and, after a non-finite stop, the learning rate, "
                               f"its schedule and clipping) may change (got {', '.join(given) or '--config'})")
        cfg = agree(world, lambda: resume_config(Path(resume), list(sets), warn=rep.warn), "reading the run's config.yaml")
        if cfg.method != method.name:
            raise MlxpostError(f"{resume} is a {cfg.method} run, not a {method.name} run; continue it with "
                               f"mlxpost {cfg.method} --resume {resume}")
    else:
        if config is None and values.get("data.path") is None and method.bundled is not None:
            config = method.bundled.recipe
            for note in [method.bundled.note] + method.without_data(values):
                rep.info(note)
        cfg = agree(world, lambda: build_config(config, list(sets), cli=values, method=method.name),
                    "reading the configuration")
    run_dir, _ = run(cfg, reporter=rep, resume=Path(resume) if resume else None)
    if rank == 0:
        rep.info(try_it(run_dir))


def try_it(run_dir: Path) -> str:
    """What to type next: chat or generate with the run's adapter, and what mlx-lm can load of it."""
    own = own_adapter_dir(run_dir)
    meta = read_adapter_config(own).get("mlxpost", {})
    model_dir = shown_path(meta.get("model_dir", "<model dir>"))
    shown = shown_path(run_dir)
    hint = (f"\nadapter written to {shown}. Try it:\n  mlxpost chat --adapter {shown}"
            f"\n  mlxpost generate --adapter {shown} --prompt \"...\"")
    if (Path(run_dir) / ADAPTER_CONFIG).exists():
        hint += f"\n  mlx_lm.generate --model {model_dir} --adapter-path {shown} --prompt \"...\""
        if own != Path(run_dir):
            hint += (f"\n(trained on top of {shown_path(meta['from_adapter'])}: the run directory holds the whole "
                     f"stack as one adapter for mlx-lm, and this run's own adapter in {shown_path(own)})")
    elif meta.get("from_adapter"):
        hint += (f"\n(trained on top of {shown_path(meta['from_adapter'])}; mlx-lm cannot load this stack as one "
                 f"adapter (it holds a DoRA adapter): mlxpost export {shown} --format fused writes the merged model)")
    return hint
