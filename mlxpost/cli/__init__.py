"""The ``mlxpost`` command line: the group and its commands are in :mod:`.main`."""

from __future__ import annotations

from ..backend.blas import maybe_reexec


def main():
    maybe_reexec()  # before MLX loads: LD_PRELOAD only acts at process start (this module never imports MLX)
    from .main import cli  # after the re-exec decision: importing the commands loads MLX

    cli(prog_name="mlxpost")
