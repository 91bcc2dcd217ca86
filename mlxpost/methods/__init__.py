"""The training methods: one module each, and the registry that names them.

A method is a :class:`mlxpost.methods.base.Method`: its configuration
section, command-line options, data kind, objective (a pure loss on arrays)
and the hooks the shared pipeline calls. Adding a method is one module in
this package and one line in :data:`METHODS`; the training loop, the
pipeline, the configuration and the command line hold no method names.

Families share what their members do alike: :mod:`.preference` (DPO, ORPO,
CPO, SimPO: pair scores, the reference, health checks) and :mod:`.online_rl`
(GRPO, RLVR: advantages, the clipped objective, rollout plans). A method
imports its family, never another method.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import Method
from .cpo import CPO
from .dpo import DPO
from .grpo import GRPO
from .orpo import ORPO
from .rlvr import RLVR
from .sft import SFT
from .simpo import SimPO

METHODS: dict[str, Method] = {m.name: m for m in (SFT(), DPO(), ORPO(), CPO(), SimPO(), GRPO(), RLVR())}


def get(name: str) -> Method:
    """The method called ``name``; an error listing the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r} (known: {', '.join(METHODS)})") from None


def register(method: Method) -> Method:
    """Add a method (a plugin, or a test's) to the registry; its command appears in the CLI."""
    if not method.name or method.name in METHODS:
        raise ValueError(f"a method needs a new name, got {method.name!r}")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    METHODS.pop(name, None)
