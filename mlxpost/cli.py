"""The ``mlxpost`` command line. Each command parses, then calls one library function."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import MlxpostError

# Options default to None so that only what the user typed overrides a recipe.
_TRAIN_OPTIONS = [
    click.option("--model", "model__path", help="HF repo id, local HF directory or .gguf file (default: SmolLM2-135M-Instruct)."),
    click.option("--data", "data__path", help="A .jsonl file or a directory with train.jsonl / valid.jsonl (default: bundled example)."),
    click.option("--valid", "data__valid", help="Validation .jsonl (default: valid.jsonl beside the data, else a held-out 5%)."),
    click.option("--out", "output__dir", help="Parent directory of run directories (default: runs)."),
    click.option("--name", "output__name", help="Run directory name (default: <method>-<timestamp>)."),
    click.option("--steps", "train__steps", type=int, help="Optimizer steps (default: one epoch)."),
    click.option("--epochs", "train__epochs", type=float, help="Epochs, when --steps is not given."),
    click.option("--batch-size", "train__batch_size", type=int, help="Rows per micro-batch."),
    click.option("--grad-accum", "train__grad_accum", type=int, help="Micro-batches per optimizer step."),
    click.option("--lr", "train__lr", type=float, help="Peak learning rate."),
    click.option("--rank", "lora__rank", type=int, help="LoRA rank."),
    click.option("--max-seq-len", "data__max_seq_len", type=int, help="Longest sequence in tokens."),
    click.option("--batching", "data__batching", type=click.Choice(["auto", "pack", "pad"]), help="Pack several examples per row, or pad."),
    click.option("--quantize", "model__quantize", type=int, help="Quantize the base to 4 or 8 bits (QLoRA)."),
    click.option("--seed", "train__seed", type=int, help="Random seed."),
]


def _train_options(f):
    f = click.option("--config", "config", type=click.Path(dir_okay=False), help="A recipe YAML file.")(f)
    f = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="Override any config key, e.g. --set train.lr=2e-4 (repeatable).")(f)
    f = click.option("--dora", is_flag=True, default=None, help="DoRA instead of LoRA.")(f)
    f = click.option("--skip-bad-rows", is_flag=True, default=None, help="Skip invalid data rows (counted) instead of failing.")(f)
    f = click.option("--adapter-init", "lora__init", help="Start from this adapter directory.")(f)
    f = click.option("--resume", type=click.Path(file_okay=False, exists=True), help="Continue a killed or finished run directory.")(f)
    f = click.option("--overwrite", is_flag=True, default=None, help="Replace an existing run directory of the same name.")(f)
    f = click.option("--plain", is_flag=True, default=False, help="Plain line logs instead of the live display.")(f)
    for opt in reversed(_TRAIN_OPTIONS):
        f = opt(f)
    return f


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MlxpostError as e:
            from .train import NonFiniteError

            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(3 if isinstance(e, NonFiniteError) else 2)
        except KeyboardInterrupt:
            click.secho("\ninterrupted. A run directory can be continued with --resume RUN_DIR.", fg="yellow", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="mlxpost")
def cli():
    """mlxpost: post-training for MLX: LoRA SFT, then DPO / ORPO / CPO / SimPO, and online RL (GRPO, step-verified RLVR).

    \b
    Quick start (built-in model and example data, a few minutes on a laptop CPU):
      mlxpost sft
    """


def _training_command(method: str, kwargs: dict):
    from .config import build_config
    from .runner import resume_config, run
    from .ui import make_reporter

    config = kwargs.pop("config")
    sets = list(kwargs.pop("sets"))
    resume = kwargs.pop("resume")
    plain = kwargs.pop("plain")
    dora = kwargs.pop("dora")
    if dora:
        kwargs["lora.type"] = "dora"
    skip = kwargs.pop("skip_bad_rows")
    if skip:
        kwargs["data.skip_bad_rows"] = True
    if kwargs.pop("overwrite"):
        kwargs["output.overwrite"] = True
    kwargs = {k.replace("__", "."): v for k, v in kwargs.items()}
    for key in ("grpo.rewards", "grpo.stop"):  # repeatable options: empty means not given
        if key in kwargs:
            kwargs[key] = list(kwargs[key]) or None

    import mlx.core as mx

    from .runner import agree

    group = mx.distributed.init()
    rank = group.rank()
    world = group if group.size() > 1 else None
    rep = make_reporter(rank, plain=True if plain else None)
    _blas_advice(rep)
    if resume:
        given = [k for k, v in kwargs.items() if v is not None]
        if config or given:
            raise MlxpostError("--resume uses the run's saved config.yaml; only --set of train.steps, eval/save "
                               f"frequencies and early stopping may change (got {', '.join(given) or '--config'})")
        cfg = agree(world, lambda: resume_config(Path(resume), sets), "reading the run's config.yaml")
    else:
        if config is None and kwargs.get("data.path") is None and method == "sft":
            # No recipe and no data: the built-in default run (bundled data).
            from .assets import DEFAULT_SFT_RECIPE

            config = DEFAULT_SFT_RECIPE
            rep.info(f"no --data and no --config: the built-in default run ({Path(config).name})")
        elif config is None and kwargs.get("data.path") is None and method in ("grpo", "rlvr"):
            rep.info("no --data and no --config: the bundled multi-step arithmetic tasks")
            if method == "grpo" and not kwargs.get("grpo.rewards"):
                kwargs["grpo.rewards"] = ["accuracy", "format@0.2"]
                rep.info("no --reward: accuracy (final answer) and format@0.2 (an 'Answer: N' last line)")
        elif config is None and kwargs.get("data.path") is None:
            rep.info("no --data and no --config: the bundled example preference pairs")
        cfg = agree(world, lambda: build_config(config, sets, cli=kwargs, method=method), "reading the configuration")

    run_dir, result = run(cfg, reporter=rep, resume=Path(resume) if resume else None)
    if rank == 0:
        from .model import read_adapter_config

        meta = read_adapter_config(run_dir).get("mlxpost", {})
        model_dir = meta.get("model_dir", "<model dir>")
        hint = f"\nadapter written to {run_dir}. Try it:\n  mlxpost generate --adapter {run_dir} --prompt \"...\""
        if meta.get("from_adapter"):
            hint += (f"\n(it was trained on top of {meta['from_adapter']}, which mlxpost generate merges first; "
                     "mlx_lm.generate takes one adapter only)")
        else:
            hint += f"\n  mlx_lm.generate --model {model_dir} --adapter-path {run_dir} --prompt \"...\""
        rep.info(hint)


def _blas_advice(rep) -> None:
    from .system import blas_advice

    advice = blas_advice()
    if advice:
        rep.warn(advice)


@cli.command()
@_train_options
def sft(**kwargs):
    """Fine-tune with LoRA on chat, prompt/completion or text data.

    \b
    Examples:
      mlxpost sft                                   # built-in default
      mlxpost sft --model Qwen/Qwen2.5-0.5B-Instruct --data data/ --steps 500
      mlxpost sft --config recipes/smollm2-135m-sft.yaml --set train.lr=2e-4
      mlxpost sft --resume runs/sft-20260101-120000  # continue after a kill
    """
    _training_command("sft", kwargs)


def _preference_options(f):
    f = click.option("--from", "preference__from_run", type=click.Path(file_okay=False, exists=True),
                     help="An SFT run (or adapter) directory: merged into the base, it is the start and the reference.")(f)
    return _train_options(f)


_PREF_EXAMPLES = """
    \b
    Data: JSONL rows {"prompt", "chosen", "rejected"} as strings or message lists
    (a system message may lead the prompt; without "prompt", chosen and rejected
    are whole conversations sharing their first turns). With no --data and no
    --config: the bundled example pairs.
"""


@cli.command()
@_preference_options
@click.option("--loss", "dpo__loss", type=click.Choice(["sigmoid", "ipo", "hinge", "robust"]), help="DPO variant (default: sigmoid).")
@click.option("--beta", "dpo__beta", type=float, help="Strength of the tie to the reference (default 0.1).")
@click.option("--label-smoothing", "dpo__label_smoothing", type=float, help="Label noise (sigmoid, robust).")
@click.option("--precompute-ref", "preference__precompute_ref", is_flag=True, default=None,
              help="Reference log-probs once before training (cached beside the data).")
def dpo(**kwargs):
    """Direct Preference Optimization (reference = the same weights with adapters off).

    \b
    Examples:
      mlxpost dpo --model Qwen/Qwen2.5-0.5B-Instruct --data prefs.jsonl
      mlxpost dpo --from runs/my-sft --data prefs/ --loss ipo --beta 0.5
      mlxpost dpo --config recipes/smollm2-135m-dpo.yaml --precompute-ref
    """
    _training_command("dpo", kwargs)


dpo.help += _PREF_EXAMPLES


@cli.command()
@_preference_options
@click.option("--lam", "orpo__lam", type=float, help="Weight of the odds-ratio term (default 0.1).")
def orpo(**kwargs):
    """ORPO: NLL of the chosen answer plus an odds-ratio preference term; no reference model.

    \b
    Examples:
      mlxpost orpo --model Qwen/Qwen2.5-0.5B-Instruct --data prefs.jsonl --lam 0.1
    """
    _training_command("orpo", kwargs)


orpo.help += _PREF_EXAMPLES


@cli.command()
@_preference_options
@click.option("--beta", "cpo__beta", type=float, help="Scale of the preference logit (default 0.1).")
@click.option("--alpha", "cpo__alpha", type=float, help="Weight of the NLL (behaviour cloning) term (default 1.0).")
@click.option("--label-smoothing", "cpo__label_smoothing", type=float, help="Label noise.")
def cpo(**kwargs):
    """CPO: reference-free DPO on summed log-probs, plus NLL of the chosen answer."""
    _training_command("cpo", kwargs)


cpo.help += _PREF_EXAMPLES


@cli.command()
@_preference_options
@click.option("--beta", "simpo__beta", type=float, help="Scale of the length-normalized reward (default 2.0).")
@click.option("--gamma", "simpo__gamma", type=float, help="Target reward margin (default 0.5).")
@click.option("--alpha", "simpo__alpha", type=float, help="Optional NLL of the chosen answer (default 0).")
@click.option("--label-smoothing", "simpo__label_smoothing", type=float, help="Label noise.")
def simpo(**kwargs):
    """SimPO: length-normalized, reference-free preference loss with a target margin."""
    _training_command("simpo", kwargs)


simpo.help += _PREF_EXAMPLES


@cli.command()
@click.option("--model", help="Base model (default: the one recorded in the adapter, else the built-in default).")
@click.option("--adapter", type=click.Path(file_okay=False, exists=True), help="Run or adapter directory.")
@click.option("--best", is_flag=True, help="Use the run's best/ adapter (lowest validation loss).")
@click.option("--prompt", "-p", required=True, help="The user message.")
@click.option("--system", help="An optional system message.")
@click.option("--max-tokens", type=int, default=256, show_default=True)
@click.option("--temp", type=float, default=0.0, show_default=True, help="Sampling temperature (0 = greedy).")
@click.option("--top-p", type=float, default=1.0, show_default=True)
def generate(model, adapter, best, prompt, system, max_tokens, temp, top_p):
    """Generate a reply (chat template applied), optionally with a trained adapter."""
    from .generate import stream_text
    from .model import load_adapter_stack, load_model, read_adapter_config

    quantize = group = None
    dtype = "auto"
    if adapter:
        adapter = Path(adapter)
        if best:
            adapter = adapter / "best"
        meta = read_adapter_config(adapter).get("mlxpost", {})
        local = meta.get("model_dir")
        model = model or (local if local and Path(local).exists() else meta.get("base_model"))
        quantize, group = meta.get("quantize"), meta.get("quantize_group_size")
        dtype = meta.get("dtype") or "auto"
    loaded = load_model(model or "default", dtype=dtype, quantize=quantize, group_size=group or 64)
    if adapter:
        load_adapter_stack(loaded.model, adapter)
    said = False
    for piece in stream_text(loaded.model, loaded.tokenizer, prompt, max_tokens=max_tokens, temperature=temp,
                             top_p=top_p, system=system):
        said = said or bool(piece.strip())
        click.echo(piece, nl=False)
    click.echo()
    if not said:
        click.secho("(empty reply: the model wrote nothing but whitespace before ending its turn)", fg="yellow", err=True)


@cli.command()
@click.option("--no-measure", is_flag=True, help="Skip the matmul speed measurement.")
def doctor(no_measure):
    """Report the MLX backend, BLAS, memory and versions."""
    from .system import doctor_rows
    from .ui import make_reporter

    rows = doctor_rows(measure=not no_measure)
    rep = make_reporter()
    width = max(len(r[0]) for r in rows)
    marks = {"ok": "ok  ", "warn": "WARN", "info": "    "}
    for item, value, status in rows:
        rep.info(f"{marks.get(status, status)} {item.ljust(width)}  {value}")




def _rl_options(f):
    opts = [
        click.option("--group-size", "grpo__group_size", type=int, help="Completions sampled per prompt (default 8)."),
        click.option("--prompts-per-step", "grpo__prompts_per_step", type=int, help="Prompts per optimizer step (default 2)."),
        click.option("--num-iterations", "grpo__num_iterations", type=int,
                     help="Optimizer steps per rollout (default 1; more: the ratio is clipped)."),
        click.option("--max-new-tokens", "grpo__max_new_tokens", type=int, help="Longest completion (default 128)."),
        click.option("--temperature", "grpo__temperature", type=float, help="Sampling temperature (default 1.0)."),
        click.option("--top-p", "grpo__top_p", type=float, help="Nucleus sampling (default 1.0)."),
        click.option("--stop", "grpo__stop", multiple=True, help="A stop string (repeatable)."),
        click.option("--beta", "grpo__beta", type=float, help="KL penalty to the reference, adapters off (default 0)."),
        click.option("--loss-norm", "grpo__loss_norm", type=click.Choice(["grpo", "dapo", "dr_grpo"]),
                     help="Per sequence (grpo), per token (dapo) or a constant (dr_grpo)."),
        click.option("--scale-rewards", "grpo__scale_rewards", type=click.Choice(["group", "batch", "none"]),
                     help="Divide advantages by the group's std, the batch's, or nothing."),
        click.option("--mask-truncated", "grpo__mask_truncated", is_flag=True, default=None,
                     help="No loss on completions that hit --max-new-tokens."),
        click.option("--from", "grpo__from_run", type=click.Path(file_okay=False, exists=True),
                     help="An earlier run (SFT, DPO, ...): merged into the base, it is the start and the reference."),
        click.option("--reward", "grpo__rewards", multiple=True, metavar="NAME[@WEIGHT]",
                     help="accuracy, format, path/to/file.py:function or package.module:function (repeatable)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return _train_options(f)


_RL_EXAMPLES = """

\b
A reward is a Python function (completions, **columns) -> list[float | None];
the columns are the data rows' fields (answer, ...), aligned with completions.
"""


@cli.command()
@_rl_options
def grpo(**kwargs):
    """GRPO: sample a group of completions per prompt, reward them, reinforce the better ones.

    \b
    Examples:
      mlxpost grpo                                   # bundled arithmetic tasks, accuracy + format rewards
      mlxpost grpo --model Qwen/Qwen2.5-0.5B-Instruct --data prompts.jsonl --reward accuracy --reward format@0.2
      mlxpost grpo --data prompts.jsonl --reward my_rewards.py:brevity --group-size 16 --loss-norm dapo
    """
    _training_command("grpo", kwargs)


grpo.help += _RL_EXAMPLES


@cli.command()
@_rl_options
@click.option("--verifier", "rlvr__verifier", metavar="NAME",
              help="arithmetic, exact, path/to/file.py:function or package.module:function (default arithmetic).")
@click.option("--step-weight", "rlvr__step_weight", type=float, help="Penalty on the tokens of a wrong step (default 1).")
def rlvr(**kwargs):
    """Step-verified RL: a verifier checks every reasoning step; wrong steps are penalized on their own tokens.

    \b
    Examples:
      mlxpost rlvr                                   # bundled arithmetic tasks, arithmetic verifier
      mlxpost rlvr --model Qwen/Qwen2.5-0.5B-Instruct --data tasks.jsonl --verifier arithmetic
      mlxpost rlvr --data tasks.jsonl --verifier my_checks.py:verify --reward format@0.2
    """
    _training_command("rlvr", kwargs)


rlvr.help += _RL_EXAMPLES


@cli.command()
@click.option("--out", default="runs/demo", show_default=True, help="Directory of the three stage runs.")
@click.option("--full", is_flag=True, help="The recipes' full lengths instead of the few-minute version.")
@click.option("--model", help="Another base model (default: SmolLM2-135M-Instruct).")
@click.option("--stage", "stages", multiple=True, type=click.Choice(["sft", "dpo", "rlvr"]),
              help="Run only these stages (each needs the one before it in --out).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a key in every stage.")
@click.option("--plain", is_flag=True, default=False, help="Plain line logs instead of the live display.")
def demo(out, full, model, stages, sets, plain):
    """The whole pipeline on the built-in model: SFT, then DPO from it, then step-verified RLVR, compared.

    \b
    SFT teaches one-line JSON answers (bundled chats); DPO prefers concise,
    correct JSON (bundled pairs); RLVR checks every step of multi-step
    arithmetic (generated tasks). A few minutes on a 2-core CPU; finished
    stages in --out are reused, a killed stage resumes.
    """
    from .demo import run_demo
    from .ui import make_reporter

    rep = make_reporter(0, plain=True if plain else None)
    _blas_advice(rep)
    run_demo(out, full=full, model=model, reporter=rep, stages=list(stages) or None, extra_sets=list(sets))


def _register_more() -> None:
    from .cli_data import data, push
    from .export import export_command

    cli.add_command(export_command)
    cli.add_command(data)
    cli.add_command(push)
    from .cli_sweep import ablate, compare_command

    cli.add_command(ablate)
    cli.add_command(compare_command)


_register_more()


def main():
    from .system import maybe_reexec

    maybe_reexec()  # before MLX does any work: LD_PRELOAD only acts at process start
    cli(prog_name="mlxpost")


if __name__ == "__main__":
    main()
