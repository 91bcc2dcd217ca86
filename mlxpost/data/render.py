"""Rendering rows into token ids with a per-token loss mask.

Rendering produces ``(ids, mask)`` where ``mask[t]`` is True when token ``t``
is a training target (the model is scored on predicting it from the tokens
before it). Prompts for generation are rendered the same way, ending with the
chat template's generation prompt.
"""

from __future__ import annotations

from typing import Any

from ..errors import MlxpostError
from .rows import normalize_pair_row, row_format


class Renderer:
    """Turn validated rows into token ids and a per-token target mask.

    ``chat_template``: ``"auto"`` uses the tokenizer's chat template when it has
    one (always for ``messages`` rows); ``"none"`` renders prompt/completion
    rows as plain text. ``add_eos``: end plain-text rows with the EOS token so
    the model learns to stop (chat templates already end turns themselves).
    """

    def __init__(self, tokenizer, *, chat_template: str = "auto", add_eos: bool = True):
        # mlx-lm's TokenizerWrapper forwards to the Hugging Face tokenizer; we
        # need the real one for offsets and assistant masks.
        self.hf = getattr(tokenizer, "_tokenizer", tokenizer)
        if not getattr(self.hf, "is_fast", True):
            raise MlxpostError("this tokenizer is a slow (Python) tokenizer; mlxpost needs a fast one "
                               "(a tokenizer.json in the model directory) to locate assistant tokens")
        self.has_template = getattr(self.hf, "chat_template", None) is not None
        if chat_template not in ("auto", "none"):
            raise MlxpostError(f"data.chat_template must be 'auto' or 'none', got {chat_template!r}")
        self.use_template = chat_template == "auto" and self.has_template
        self.add_eos = add_eos
        self.bos_id = self.hf.bos_token_id
        self.eos_id = self.hf.eos_token_id
        # Does this tokenizer start sequences with BOS? (Llama: yes; Qwen: no.)
        probe = self.hf("a", add_special_tokens=True)["input_ids"]
        self.wants_bos = self.bos_id is not None and len(probe) > 0 and probe[0] == self.bos_id
        template = self.hf.chat_template if self.has_template else ""
        self.generation_markers = isinstance(template, str) and "{% generation %}" in template.replace(
            "{%- generation %}", "{% generation %}")
        self.prefix_fallbacks = 0

    # -- small helpers ------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def text_ids(self, text: str) -> list[int]:
        """Token ids of plain text (no template), with one BOS where this tokenizer wants one."""
        ids = self._encode(text)
        return self._fix_bos(ids, [False] * len(ids))[0]

    def _fix_bos(self, ids: list[int], mask: list[bool]) -> tuple[list[int], list[bool]]:
        """Exactly one BOS where the tokenizer wants one, never two."""
        if self.bos_id is None:
            return ids, mask
        while len(ids) >= 2 and ids[0] == self.bos_id and ids[1] == self.bos_id:
            ids, mask = ids[1:], mask[1:]
        if self.wants_bos and (not ids or ids[0] != self.bos_id):
            ids, mask = [self.bos_id] + ids, [False] + mask
        return ids, mask

    def _template(self, messages, tools, **kw) -> str:
        return self.hf.apply_chat_template(messages, tools=tools, tokenize=False, **kw)

    # -- chat ---------------------------------------------------------------

    def render_chat(self, messages: list[dict], tools=None, train_from: int = 0) -> tuple[list[int], list[bool]]:
        """Tokens and mask for a conversation; assistant turns at index >= train_from are targets."""
        messages = [_normalize_message(m) for m in messages]
        if self.generation_markers and train_from == 0:
            out = self.hf.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
            ids = list(out["input_ids"])
            mask = [bool(x) for x in out["assistant_masks"]]
            if any(mask):
                return self._fix_bos(ids, mask)
        return self._render_by_prefixes(messages, tools, train_from)

    def _render_by_prefixes(self, messages, tools, train_from):
        """Find assistant spans by rendering growing prefixes of the conversation.

        For assistant turn i the span starts where ``render(messages[:i],
        add_generation_prompt=True)`` ends and stops where ``render(messages[:i+1])``
        ends (trailing whitespace after the end-of-turn token excluded). Works
        for any template whose renders of prefixes are prefixes of the whole.
        """
        full = self._template(messages, tools)
        spans = []
        skipped = False
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or i < train_from:
                continue
            before = self._template(messages[:i], tools, add_generation_prompt=True)
            through = self._template(messages[: i + 1], tools)
            if not (full.startswith(through) and through.startswith(before)):
                if i != len(messages) - 1:
                    # Template rewrites earlier turns (e.g. drops old reasoning):
                    # only the final turn can be located reliably.
                    skipped = True
                    continue
                raise MlxpostError(
                    "the chat template does not render conversations prefix by prefix, "
                    "so assistant turns cannot be located; use a template with {% generation %} markers")
            end = len(through.rstrip())
            if end > len(before):
                spans.append((len(before), end))
        self.prefix_fallbacks += skipped
        enc = self.hf(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [False] * len(ids)
        for t, (s, _e) in enumerate(enc["offset_mapping"]):
            for a, b in spans:
                if a <= s < b:
                    mask[t] = True
                    break
        return self._fix_bos(ids, mask)

    # -- rows ---------------------------------------------------------------

    def render(self, row: dict) -> tuple[list[int], list[bool], str]:
        """Return ``(ids, mask, format)`` for a validated row."""
        fmt = row_format(row)
        if fmt == "messages":
            if not self.has_template:
                raise MlxpostError("'messages' rows need a tokenizer with a chat template; "
                                   "this tokenizer has none (use 'text' or 'prompt'/'completion' rows)")
            ids, mask = self.render_chat(row["messages"], row.get("tools"))
            return ids, mask, fmt
        if fmt == "text":
            ids = self._encode(row["text"])
            if self.add_eos and self.eos_id is not None:
                ids = ids + [self.eos_id]
            ids, mask = self._fix_bos(ids, [True] * len(ids))
            return ids, mask, fmt
        p, c = row["prompt"], row["completion"]
        if isinstance(p, list):
            if not self.has_template:
                raise MlxpostError("conversational prompt/completion rows need a tokenizer with a chat template")
            ids, mask = self.render_chat(list(p) + list(c), row.get("tools"), train_from=len(p))
            return ids, mask, fmt
        if self.use_template:
            msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
            ids, mask = self.render_chat(msgs)
            return ids, mask, fmt
        # Plain text: prompt and completion are encoded separately so the
        # boundary is exact; the completion (and EOS) are the targets.
        pi, ci = self._encode(p), self._encode(c)
        if self.add_eos and self.eos_id is not None:
            ci = ci + [self.eos_id]
        ids, mask = self._fix_bos(pi + ci, [False] * len(pi) + [True] * len(ci))
        return ids, mask, fmt

    # -- prompts for generation ------------------------------------------------

    def prompt(self, prompt: Any, system: str | None = None) -> tuple[list[int], str]:
        """Token ids and text of a prompt (a string or messages), ready for the model to answer.

        With a chat template: the template with its generation prompt; else the
        messages' contents, one per line. ``system``: a system message put first.
        """
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system:
            messages = [{"role": "system", "content": system}] + messages
        if self.use_template:
            text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = "\n".join(m["content"] for m in messages)
        ids = self._encode(text)
        ids, _ = self._fix_bos(ids, [False] * len(ids))
        return ids, text


def _normalize_message(m: dict) -> dict:
    out = dict(m)
    if out.get("content") is None:
        out["content"] = ""
    return out


def render_pair(renderer: Renderer, row: dict) -> tuple[tuple[list[int], list[bool]], tuple[list[int], list[bool]], str]:
    """Tokens and masks of (chosen, rejected) for a validated preference row."""
    norm, _ = normalize_pair_row(row)
    sides = []
    for side in ("chosen", "rejected"):
        sub = {"prompt": norm["prompt"], "completion": norm[side]}
        if "tools" in norm:
            sub["tools"] = norm["tools"]
        ids, mask, _ = renderer.render(sub)
        sides.append((ids, mask))
    fmt = "conversation" if isinstance(norm["prompt"], list) else "strings"
    return sides[0], sides[1], fmt


def prompt_ids(tokenizer, prompt: str | list[dict], system: str | None = None) -> list[int]:
    """Token ids of a prompt, rendered as training renders it (:meth:`Renderer.prompt`)."""
    return Renderer(tokenizer).prompt(prompt, system)[0]
