"""A conversation with a model or a trained run: what ``mlxpost chat`` (and ``generate``) loads and says.

The conversation is a list of messages. Every turn renders the whole of it
with the chat template and its generation prompt
(:meth:`mlxpost.data.render.Renderer.prompt`, as training renders prompts) and
streams the reply (:func:`mlxpost.core.generate.stream_text`). Rendering the
conversation anew each turn, instead of keeping a KV cache across turns,
costs one prefill of the conversation per turn (a few hundred tokens: well
under a second for a 135M model on a CPU) and is exact for every template,
including those that rewrite earlier turns (drop old reasoning, move the
system message); a cache carried over would silently hold the old rendering.

Commands (a line starting with ``/``): :data:`COMMANDS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import mlx.core as mx

from ..core.generate import stream_text
from ..errors import MlxpostError
from ..files import shown_path
from ..model.adapters import from_adapter_of, load_adapter_stack, own_adapter_dir, read_adapter_config
from ..model.load import LoadedModel, load_model

COMMANDS = {
    "/reset": "forget the conversation (the system message stays)",
    "/system TEXT": "set the system message (/system alone removes it)",
    "/temp X": "sampling temperature (0: greedy)",
    "/top-p X": "nucleus sampling (1: off)",
    "/max-tokens N": "longest reply in tokens",
    "/history": "show the conversation so far",
    "/help": "this list",
    "/quit": "end (also Ctrl-D)",
}


def load_for_generation(model: str | None = None, adapter: str | Path | None = None,
                        best: bool = False) -> tuple[LoadedModel, str]:
    """The model to talk to, and a line saying what it is.

    With ``adapter`` (a run or adapter directory; ``best``: its ``best/``):
    the base it was trained on (``model`` overrides it), loaded with the
    dtype and quantization of training, and the run's whole adapter stack
    rebuilt as it was trained (:func:`~mlxpost.model.adapters.load_adapter_stack`).
    Without: ``model``, or the built-in default.
    """
    quantize = group = None
    dtype = "auto"
    shown = model  # the base as people name it (a run records the local directory it loaded, too)
    if adapter is not None:
        adapter = Path(adapter) / "best" if best else Path(adapter)
        if best and not adapter.is_dir():
            raise MlxpostError(f"{adapter.parent}: no best/ adapter (it is written when the run evaluates on "
                               "validation data)")
        meta = read_adapter_config(own_adapter_dir(adapter)).get("mlxpost", {}) or {}
        local = meta.get("model_dir")
        shown = shown or meta.get("base_model")
        model = model or (local if local and Path(local).exists() else meta.get("base_model"))
        quantize, group = meta.get("quantize"), meta.get("quantize_group_size")
        dtype = meta.get("dtype") or "auto"
    loaded = load_model(model or "default", dtype=dtype, quantize=quantize, group_size=group or 64)
    what = f"model {shown or loaded.name}"
    if adapter is not None:
        load_adapter_stack(loaded.model, adapter)
        what += f" with the adapter of {adapter}" + "".join(f" ← {p}" for p in stack_names(adapter))
    return loaded, what


def stack_names(adapter: str | Path) -> list[str]:
    """The adapters ``adapter`` was trained on top of (``--from``), nearest first, as a user would name them:
    a run beside ``adapter`` by its directory name (the demo's ``dpo`` beside ``rlvr``), others by path.
    Each is checked as :func:`~mlxpost.model.adapters.from_adapter_of` checks it."""
    names, d = [], Path(adapter)
    while (d := from_adapter_of(d)) is not None and len(names) < 64:  # 64: a loop in damaged records
        same_parent = d.resolve().parent == Path(adapter).resolve().parent
        names.append(d.name if same_parent else shown_path(d))
    return names


@dataclass
class ChatSession:
    """One conversation: the messages so far, the system message and the sampling settings."""

    loaded: LoadedModel
    system: str | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int | None = 0  # the sampling of turn k starts from seed + k (None: not seeded)
    messages: list[dict] = field(default_factory=list)  # user and assistant turns, oldest first
    ended: bool = False

    def reply(self, text: str) -> Iterator[str]:
        """Stream the reply to the user's ``text``; the turn and the reply join the conversation.

        The sampling of the k-th user turn (from 0, counted since the last
        ``/reset``) is seeded with ``seed + k``: the same conversation gives
        the same replies, also when sampling. A reply cut short (Ctrl-C while
        it streams: the generator is closed) joins the conversation as far as it got.
        """
        if self.seed is not None:
            mx.random.seed(self.seed + sum(m["role"] == "user" for m in self.messages))
        self.messages.append({"role": "user", "content": text})
        pieces: list[str] = []
        try:
            for piece in stream_text(self.loaded.model, self.loaded.tokenizer, list(self.messages),
                                     max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                                     system=self.system):
                pieces.append(piece)
                yield piece
        finally:
            self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})

    def command(self, line: str) -> str:
        """Carry out one ``/`` command; returns what to show."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit", "/q"):
            self.ended = True
            return "bye"
        if name == "/reset":
            self.messages.clear()
            return "conversation reset" + (f" (system: {self.system})" if self.system else "")
        if name == "/system":
            self.system = arg or None
            return f"system message: {arg}" if arg else "no system message"
        if name in ("/temp", "/top-p", "/max-tokens"):
            return self._setting(name, arg)
        if name == "/history":
            turns = ([("system", self.system)] if self.system else []) + [(m["role"], m["content"])
                                                                           for m in self.messages]
            return "\n".join(f"{role}: {content}" for role, content in turns) or "(no conversation yet)"
        if name == "/help":
            return help_text()
        return f"unknown command {name}; /help lists them"

    def _setting(self, name: str, arg: str) -> str:
        kind = int if name == "/max-tokens" else float
        try:
            v = kind(arg)
        except ValueError:
            return f"{name} needs a{'n integer' if kind is int else ' number'}, got {arg!r}"
        if (name == "/temp" and v < 0) or (name == "/top-p" and not 0 < v <= 1) or (name == "/max-tokens" and v < 1):
            return f"{name}: {arg} is out of range"
        attr = {"/temp": "temperature", "/top-p": "top_p", "/max-tokens": "max_tokens"}[name]
        setattr(self, attr, v)
        return f"{attr.replace('_', '-')} = {v}"


def help_text() -> str:
    width = max(map(len, COMMANDS))
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in COMMANDS.items())
