"""Fault points: kill this process at a named point of a run, as ``kill -9`` would.

Tests of what survives a crash need the crash at an exact place (in the
middle of the final adapter save, before the summary); a timer cannot aim
that well. With ``MLXPOST_FAULT=<name>`` in the environment the process
sends itself SIGKILL when it reaches the point of that name: nothing runs
after it (no ``finally``, no atexit), exactly like a kill from outside.

Points: ``final_save`` (between the final adapter's weights and its
config), ``after_training`` (training and the final checkpoint done, before
the after-training samples or evaluation), ``summary`` (before summary.json).
"""

from __future__ import annotations

import os
import signal

ENV = "MLXPOST_FAULT"


def fault_point(name: str) -> None:
    """Die here by SIGKILL when ``MLXPOST_FAULT`` names this point; otherwise nothing."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
