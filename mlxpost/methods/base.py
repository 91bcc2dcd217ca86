"""What a training method is: everything the shared pipeline asks of it, in one object.

A method is one module in this package that defines a subclass of
:class:`Method` and one line in the registry (:mod:`mlxpost.methods`). The
pipeline (:mod:`mlxpost.training.pipeline`), the configuration
(:mod:`mlxpost.config`) and the command line (:mod:`mlxpost.cli.train`)
hold no method names: they read what a method declares and call its hooks.

Declared (class attributes):

* ``name``: the command (``mlxpost <name>``) and ``method:`` in recipes;
* ``help``: the command's help text;
* ``data``: the kind of data the pipeline reads and batches for it:
  ``"sft"`` (rows trained on their completion tokens), ``"pairs"``
  (preference pairs, both sides in one batch) or ``"prompts"`` (online RL:
  the batch source samples its own completions);
* ``sections``: the configuration sections the method reads besides the
  common ones (``model``, ``lora``, ``data``, ``train``, ...), as
  ``{name: dataclass}``, in the order ``config.yaml`` lists them;
* ``defaults``: common settings it starts from (``{"train.lr": 5e-5}``);
* ``options``: the command's own click options (parameter ``section__key``
  sets ``section.key``);
* ``from_key``: the configuration key of ``--from`` (train on top of an
  earlier run), when the method has it;
* ``bundled``: what runs when neither ``--data`` nor ``--config`` is given;
* ``path_keys`` and ``plugin_keys``: its settings that name files (paths,
  and ``file.py:function`` specs), stored absolute in a run's config.yaml;
* ``rows_apart``: its objective gives ``tokens`` (see
  :class:`mlxpost.training.loop.Objective`), so a memory budget may run
  one backward pass per row (``train.split_rows``).

Hooks (methods with defaults that do nothing): :meth:`validate`,
:meth:`without_data`, :meth:`prepare`, :meth:`objective` (the one a method
must write), :meth:`setup_rows`, :meth:`setup_record` and
:meth:`summarize`; a ``pairs`` method also answers :meth:`share_prompt`,
a ``prompts`` method :meth:`rollout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import ConfigError

if TYPE_CHECKING:  # annotations only: the configuration and the pipeline import this package
    from ..config import RunConfig
    from ..training.loop import Objective, TrainResult
    from ..training.pipeline import Prepared


@dataclass
class Bundled:
    """What a method trains on when neither ``--data`` nor ``--config`` is given."""

    note: str  # shown to the user
    recipe: Path | None = None  # a recipe to run instead of the defaults


class Method:
    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    data: ClassVar[str] = "sft"
    sections: ClassVar[dict[str, type]] = {}
    defaults: ClassVar[dict[str, Any]] = {}
    options: ClassVar[tuple] = ()
    from_key: ClassVar[str | None] = None
    bundled: ClassVar[Bundled | None] = None
    path_keys: ClassVar[tuple] = ()  # settings naming files or directories (stored absolute in config.yaml)
    plugin_keys: ClassVar[tuple] = ()  # settings holding file.py:function specs (their files made absolute)
    rows_apart: ClassVar[bool] = False  # its objective has ``tokens`` (train.split_rows can apply)

    # -- configuration ---------------------------------------------------------
    def validate(self, cfg: RunConfig) -> None:
        """Check the method's own settings; raise :class:`mlxpost.errors.ConfigError` naming the key."""

    def without_data(self, values: dict) -> list[str]:
        """Fill command-line ``values`` (dotted keys) for a run on the bundled data; return notes to show."""
        return []

    # -- the run ----------------------------------------------------------------
    def prepare(self, prep: Prepared, rep) -> None:
        """Work before training that needs the loaded model and the batch sources (reference log-probs)."""

    def objective(self, prep: Prepared) -> Objective:
        """The loss the training loop runs (see :class:`mlxpost.training.loop.Objective`)."""
        raise NotImplementedError(f"method {self.name!r} has no objective")

    def reference_pass(self, prep: Prepared) -> str | None:
        """The live reference forward a training step runs, for the FLOP count (:mod:`mlxpost.core.flops`):
        None (none), ``"full"`` (every block) or ``"shared"`` (only the blocks from the lowest adapter up)."""
        return None

    def setup_rows(self, prep: Prepared) -> list[tuple[str, Any]]:
        """Rows the method adds to the setup table (after the common ones)."""
        return []

    def setup_record(self, prep: Prepared) -> dict:
        """Fields the method adds to the ``setup`` record of metrics.jsonl."""
        return {}

    def summarize(self, prep: Prepared, result: TrainResult, summary: dict, *, monitor=None,
                  evals: dict | None = None) -> None:
        """Add the method's lines to ``summary`` (final metrics, gates).

        ``monitor``: the objective's health monitor; ``evals``: what the data
        kind measured before and after training (``{"before": ..., "after": ...}``).
        """

    # -- kinds of data -----------------------------------------------------------
    def share_prompt(self, cfg: RunConfig) -> str:
        """``pairs``: whether pair batches put each prompt through the model once (auto | on | off)."""
        return "off"

    def rollout(self, cfg: RunConfig):
        """``prompts``: the rollout plan (:class:`mlxpost.methods.online_rl.RolloutPlan`)."""
        raise NotImplementedError(f"method {self.name!r} does not sample its own data")


# ---------------------------------------------------------------------------
# Checks of settings, for validate() hooks
# ---------------------------------------------------------------------------


def value(cfg: RunConfig, key: str) -> Any:
    """The value of a dotted key (``"dpo.beta"``)."""
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def from_run(cfg: RunConfig, method: Method) -> str | None:
    """The run (or adapter directory) this run trains on top of, when the method has ``--from`` and it is set."""
    return value(cfg, method.from_key) if method.from_key else None


def check_choice(cfg: RunConfig, key: str, choices: tuple) -> None:
    v = value(cfg, key)
    if v not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {v!r}")


def check_positive(cfg: RunConfig, *keys: str) -> None:
    for key in keys:
        if value(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be positive, got {value(cfg, key)}")


def check_non_negative(cfg: RunConfig, *keys: str) -> None:
    for key in keys:
        if value(cfg, key) < 0:
            raise ConfigError(f"{key}: must be 0 or more, got {value(cfg, key)}")


def check_fraction(cfg: RunConfig, *keys: str) -> None:
    for key in keys:
        if not 0 <= value(cfg, key) <= 1:
            raise ConfigError(f"{key}: must be between 0 and 1, got {value(cfg, key)}")
