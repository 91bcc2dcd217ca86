"""Data-parallel runs: the process group, and failing together."""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

from ..errors import MlxpostError


def world_group():
    """The group of processes of a distributed run, or None in a single process."""
    world = mx.distributed.init()
    return world if world.size() > 1 else None


def agree(world, fn: Callable, what: str):
    """Run ``fn`` on every rank; if it fails on any rank, fail on every rank.

    Without this a rank that hit an error (bad data row, existing run
    directory, missing checkpoint) would exit while the others wait forever
    in the next collective operation.
    """
    error = None
    try:
        value = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the vote
        error, value = e, None
    if world is not None:
        failed = mx.distributed.all_sum(mx.array(int(error is not None)), group=world, stream=mx.cpu).item()
        if failed and error is None:
            raise MlxpostError(f"{what} failed on another process (its own message says why)")
    if error is not None:
        raise error
    return value
