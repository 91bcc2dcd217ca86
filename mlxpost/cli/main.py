"""The ``mlxpost`` command line: the group, its error handling, and every command family.

Each command parses its options, then calls one library function. The
training commands come from the method registry (:mod:`mlxpost.cli.train`);
the others from :mod:`.tools` (export, generate, doctor, demo), :mod:`.chat`, :mod:`.runs`,
:mod:`.compare`, :mod:`.sweep` (ablate), :mod:`.data` (data, push), :mod:`.steer`
(steer, aqi, abliterate) and :mod:`.eval` (eval).
"""

from __future__ import annotations

import sys

import click

from ..errors import MlxpostError
from ..methods import METHODS
from ..training.loop import NonFiniteError
from .chat import chat
from .compare import compare_command
from .data import data, push
from .eval import eval_command
from .runs import runs_command
from .steer import abliterate_command, aqi_command, steer
from .sweep import ablate
from .tools import demo, doctor, export_command, generate
from .train import method_command


class _Group(click.Group):
    """Commands by name, the training methods' from the registry; errors as one line, never a traceback."""

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(METHODS))

    def get_command(self, ctx, name):
        cmd = super().get_command(ctx, name)
        if cmd is None and name in METHODS:
            cmd = method_command(METHODS[name])
        return cmd

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MlxpostError as e:
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


for command in (export_command, generate, chat, doctor, demo, compare_command, runs_command, ablate, data, push,
                steer, aqi_command, abliterate_command, eval_command):
    cli.add_command(command)

