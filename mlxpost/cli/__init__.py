"""The ``mlxpost`` command line (see :mod:`.main`)."""

from .main import cli, main

__all__ = ["cli", "main"]
