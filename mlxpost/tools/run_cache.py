"""Work shared by the runs of one process (a sweep): the loaded base model and tokenized data."""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import mlx.nn as nn

from ..config import RunConfig


def _copy_tree(v: Any) -> Any:
    """A copy of the containers (lists, tuples, plain dicts) around modules and arrays, which are kept."""
    if isinstance(v, nn.Module):
        return v
    if isinstance(v, list):
        return [_copy_tree(x) for x in v]
    if isinstance(v, tuple):
        return tuple(_copy_tree(x) for x in v)
    if isinstance(v, dict):
        return {k: _copy_tree(x) for k, x in v.items()}
    return v


def _modules_in(v: Any):
    if isinstance(v, nn.Module):
        yield v
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from _modules_in(x)
    elif isinstance(v, dict):
        for x in v.values():
            yield from _modules_in(x)


def _copy_attrs(attrs: dict) -> dict:
    return {k: (copy.copy(v) if isinstance(v, (set, list, dict)) else v) for k, v in attrs.items()}


class ModelSnapshot:
    """The module tree of a model as loaded: restoring it undoes everything a run did.

    A run attaches adapters by replacing linear layers with LoRA layers (which
    keep the original layer inside), freezes and unfreezes parameters,
    switches train/eval mode, may swap block classes (gradient checkpointing)
    and, with ``--from``, replaces layers by merged ones. The base weights
    themselves are never changed in place: the optimizer updates adapter
    leaves only, and frozen arrays are immutable. So restoring means putting
    back, in every module of the original tree, its children and arrays
    (the very same objects), its class and its attributes.
    """

    def __init__(self, model):
        self.entries = []
        seen: set[int] = set()
        stack = [model]
        while stack:
            m = stack.pop()
            if id(m) in seen:
                continue
            seen.add(id(m))
            items = {k: _copy_tree(v) for k, v in dict.items(m)}
            self.entries.append((m, type(m), items, _copy_attrs(vars(m))))
            for v in dict.values(m):
                stack.extend(_modules_in(v))

    def restore(self) -> None:
        for m, cls, items, attrs in self.entries:
            if type(m) is not cls:
                m.__class__ = cls
            dict.clear(m)
            dict.update(m, {k: _copy_tree(v) for k, v in items.items()})
            vars(m).clear()
            vars(m).update(_copy_attrs(attrs))


def _file_key(path: Path) -> tuple:
    try:
        st = path.stat()
        return (str(path.resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        return (str(path),)


class RunCache:
    """What consecutive runs in one process share: the loaded base model and tokenized data.

    Passed to :func:`mlxpost.training.pipeline.run` (``cache=``). ``model()`` returns
    the cached model restored to its state right after loading (one model is
    kept: a sweep over ``model.path`` loads each in turn); ``data()`` returns
    the tokenized examples of a (files, tokenizer, data settings, seed) seen before.
    """

    def __init__(self, max_data: int = 4):
        self._model_key = None
        self._model = None
        self._snapshot: ModelSnapshot | None = None
        self._data: OrderedDict = OrderedDict()
        self.max_data = max_data
        self.stats = {"model_hits": 0, "model_loads": 0, "data_hits": 0, "data_reads": 0}

    @staticmethod
    def model_key(m) -> tuple:
        p = Path(str(m.path)).expanduser()
        where = _file_key(p / "config.json" if p.is_dir() else p) if p.exists() else (m.path,)
        return (m.path, where, m.revision, m.dtype, m.quantize, m.quantize_group_size if m.quantize else None,
                m.trust_remote_code)

    def model(self, m, load: Callable):
        key = self.model_key(m)
        if self._model is not None and key == self._model_key:
            self._snapshot.restore()
            self.stats["model_hits"] += 1
            return self._model
        self.clear_model()  # never two models in memory at once
        loaded = load()
        self._model_key, self._model, self._snapshot = key, loaded, ModelSnapshot(loaded.model)
        self.stats["model_loads"] += 1
        return loaded

    def clear_model(self) -> None:
        self._model_key = self._model = self._snapshot = None
        gc.collect()

    def data(self, cfg: RunConfig, loaded, kind: str, files: dict, rank: int, world: int, read: Callable):
        d = cfg.data
        # The seed picks the held-out validation rows when there is no validation file.
        seed = cfg.train.seed if "valid" not in files else None
        key = (kind, rank, world, str(Path(loaded.path).resolve()), json.dumps(dataclasses.asdict(d), default=str),
               seed, tuple(sorted((k, _file_key(v)) for k, v in files.items())))
        if key in self._data:
            self._data.move_to_end(key)
            self.stats["data_hits"] += 1
        else:
            self._data[key] = read()
            self.stats["data_reads"] += 1
            while len(self._data) > self.max_data:
                self._data.popitem(last=False)
        train, valid, stats, tstats = self._data[key]
        return list(train), (list(valid) if valid is not None else None), copy.deepcopy(stats), tstats
