"""lm-evaluation-harness tasks: any task lm-eval knows, or one defined in a local YAML file.

:class:`LmEvalTask` runs one task (or group: ``mmlu`` is 57 tasks) through
lm-eval's ``simple_evaluate`` with our model class
(:mod:`mlxpost.eval.lm_eval_model`), one task at a time so each gets its
own progress bar and a Ctrl-C keeps the tasks already done. Its metrics
(``acc,none`` in lm-eval's naming, ``acc`` here; a filter other than
``none`` stays in the name: ``exact_match,strict-match`` becomes
``exact_match[strict-match]``) keep lm-eval's standard errors, its
``higher_is_better``, the number of samples, the lm-eval version and the
hash of the task's configuration as lm-eval resolved it.

Offline, a task reads local files: a YAML with ``dataset_path: json`` and
``dataset_kwargs: {data_files: {test: /path/rows.jsonl}}`` works without
the Hub. A task whose data cannot be downloaded fails with one line naming
the task and that alternative.
"""

from __future__ import annotations

import contextlib
import logging
import os
from functools import lru_cache
from pathlib import Path

import yaml

from ..errors import MlxpostError
from .context import EvalContext, Task, TaskResult, stable_hash, unknown_task
from .lm_eval_model import make_lm

EXTRA_HINT = 'lm-evaluation-harness is not installed: pip install -e ".[eval]" (or pip install lm-eval)'

LOCAL_YAML_HINT = ("offline, define the task in a local YAML file whose dataset_kwargs.data_files point at local "
                   "JSONL files (dataset_path: json) and pass its path to --tasks")


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401  (an optional extra: only checked here)
    except ImportError:
        raise MlxpostError(EXTRA_HINT) from None


@lru_cache(maxsize=4)
def task_manager(include: tuple[str, ...]):
    """lm-eval's index of tasks (built once per set of local directories: it reads every task YAML, seconds)."""
    from lm_eval.tasks import TaskManager  # an optional extra (eval)

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return TaskManager(include_path=list(include) or None)


class LmEvalTask(Task):
    """One lm-eval task or group, by name or from a local YAML file."""

    kind = "lm-eval"

    def __init__(self, spec: str, name: str | None = None, yaml_path: Path | None = None):
        super().__init__(spec)
        self.name = name
        self.yaml_path = yaml_path.expanduser() if yaml_path is not None else None
        self.index_dirs: tuple[str, ...] = self.include  # the index checked against (all local YAML directories)

    @property
    def include(self) -> tuple[str, ...]:
        return (str(self.yaml_path.resolve().parent),) if self.yaml_path is not None else ()

    def check(self) -> None:
        require_lm_eval()
        if self.yaml_path is None:
            return
        if not self.yaml_path.is_file():
            raise MlxpostError(f"{self.yaml_path}: no such file (an lm-eval task YAML)")
        try:
            cfg = yaml.safe_load(self.yaml_path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise MlxpostError(f"{self.yaml_path}{f':{mark.line + 1}' if mark else ''}: not valid YAML") from None
        name = cfg.get("task") if isinstance(cfg, dict) else None
        if not isinstance(name, str) or not name:
            raise MlxpostError(f"{self.yaml_path}: task: missing (an lm-eval task YAML names its task)")
        self.name = name

    def config(self, ctx: EvalContext) -> dict:
        yaml_text = self.yaml_path.read_text() if self.yaml_path is not None else None
        return {"spec": self.key, "task": self.name, "limit": ctx.limit, "num_fewshot": ctx.num_fewshot,
                "chat_template": ctx.chat_template, "yaml": yaml_text, "lm_eval": lm_eval_version()}

    def run(self, ctx: EvalContext) -> TaskResult:
        import lm_eval  # an optional extra (eval)

        lm = make_lm(ctx.model, ctx.tokenizer, scorer=ctx.scorer, batch_size=ctx.batch_size,
                     max_length=ctx.max_length, seed=ctx.seed,
                     progress=lambda what, n: ctx.progress(f"{self.key}: {what}", n))
        with quiet():
            try:
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=[self.name], task_manager=task_manager(self.index_dirs), limit=ctx.limit,
                    num_fewshot=ctx.num_fewshot, apply_chat_template=ctx.chat_template,
                    fewshot_as_multiturn=ctx.chat_template, log_samples=False, bootstrap_iters=1000,
                    random_seed=ctx.seed, numpy_random_seed=ctx.seed, torch_random_seed=None,  # no torch needed
                    fewshot_random_seed=ctx.seed, confirm_run_unsafe_code=ctx.allow_code_exec)
            except Exception as e:  # noqa: BLE001 - lm-eval and the Hub raise many kinds; sort them
                err = download_error(self.key, e)
                if err is None:
                    raise
                raise err from None
        return parse_results(out, self.name)


def download_error(spec: str, e: Exception) -> MlxpostError | None:
    """One line for an exception that says the task's data could not be fetched; None for other exceptions."""
    names = {c.__module__.split(".")[0] for c in type(e).__mro__}
    text = f"{type(e).__name__}: {e}"
    offline = any(w in text for w in ("offline", "Offline", "connect", "Connection", "resolve", "Temporary failure",
                                      "couldn't reach", "Couldn't reach", "not find", "doesn't exist on the Hub"))
    if names & {"requests", "urllib3", "huggingface_hub", "datasets", "fsspec", "aiohttp", "httpx"} or (
            isinstance(e, (ConnectionError, TimeoutError, OSError)) and offline):
        first = text.splitlines()[0][:200]
        return MlxpostError(f"task {spec!r}: its data could not be downloaded ({first}); {LOCAL_YAML_HINT}")
    return None


@contextlib.contextmanager
def quiet():
    """lm-eval and datasets without their INFO logs and progress bars (mlxpost shows its own)."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "datasets", "lm-eval")]
    levels = [lg.level for lg in loggers]
    old = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import datasets  # installed with lm-eval

        datasets.disable_progress_bars()
    except ImportError:
        pass
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        if old is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old


def metric_name(key: str) -> str | None:
    """lm-eval's ``metric,filter`` result key as our metric name; None for standard errors and aliases.

    >>> metric_name("acc,none"), metric_name("exact_match,strict-match"), metric_name("acc_stderr,none")
    ('acc', 'exact_match[strict-match]', None)
    """
    if "," not in key:
        return None
    name, filt = key.split(",", 1)
    if name.endswith("_stderr"):
        return None
    return name if filt == "none" else f"{name}[{filt}]"


def parse_results(out: dict, name: str) -> TaskResult:
    """Our :class:`TaskResult` from ``simple_evaluate``'s output for task (or group) ``name``."""
    res = out["results"].get(name) or next(iter(out["results"].values()))
    metrics, hib = {}, {}
    directions = out.get("higher_is_better", {}).get(name, {})
    for key, value in res.items():
        m = metric_name(key)
        if m is None or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        base, _, filt = key.partition(",")
        se = res.get(f"{base}_stderr,{filt}")
        metrics[m] = {"value": float(value), "stderr": float(se) if isinstance(se, (int, float)) else None}
        hib[m] = directions.get(base)
    subtasks = [t for t in out.get("n-samples", {})]
    n = sum(int(out["n-samples"][t]["effective"]) for t in subtasks)
    configs = out.get("configs", {})
    info = {"lm_eval_version": lm_eval_version(), "lm_eval_config_hash": stable_hash(configs),
            "subtasks": len(subtasks), "n_shot": out.get("n-shot", {}).get(name)}
    return TaskResult(metrics, n, hib, info)


def check_lm_eval_tasks(tasks: list[LmEvalTask]) -> None:
    """Every lm-eval task name is one lm-eval knows (with the local YAML directories included)."""
    if not tasks:
        return
    include = tuple(sorted({p for t in tasks for p in t.include}))
    known = set(task_manager(include).all_tasks)
    for t in tasks:
        t.index_dirs = include
        if t.name not in known:
            raise unknown_task(t.key, "neither a built-in task nor an lm-eval task"
                               + (f" (the YAML {t.yaml_path} names {t.name!r})" if t.yaml_path else ""))
