"""Dataset layouts and how each row becomes an mlxpost row.

A layout is recognised by its columns (:func:`detect_layout`); :func:`convert_row`
turns one row of it into an SFT row (``messages``) or a preference pair
(``prompt``, ``chosen``, ``rejected``). A problem names the field of the
*input* row (:class:`_Problem`); a row that cannot hold a pair (a tie, no
rejected answer) is dropped with its reason (:class:`_Drop`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import MlxpostError

SFT_LAYOUTS = ("alpaca", "sharegpt", "openai")


PREFERENCE_LAYOUTS = ("hh-rlhf", "ultrafeedback")


LAYOUTS = SFT_LAYOUTS + PREFERENCE_LAYOUTS


LAYOUT_COLUMNS = {
    "alpaca": "instruction, input (optional), output",
    "sharegpt": "conversations (a list of {from, value} turns)",
    "openai": "messages (a list of {role, content})",
    "hh-rlhf": "chosen, rejected (whole '\\n\\nHuman: ...\\n\\nAssistant: ...' transcripts)",
    "ultrafeedback": "instruction + completions with ratings, or prompt + chosen/rejected message lists",
}


_REQUIRED = {
    "alpaca": (("instruction", "output"),),
    "sharegpt": (("conversations",),),
    "openai": (("messages",),),
    "hh-rlhf": (("chosen", "rejected"),),
    "ultrafeedback": (("completions",), ("chosen", "rejected")),
}


_SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
    "system": "system",
}


def layout_kind(layout: str) -> str:
    return "preference" if layout in PREFERENCE_LAYOUTS else "sft"


def _columns(row: dict) -> set[str]:
    return set(row)  # a null value still names a column (Parquet rows carry all of the file's columns)


def layout_candidates(row: dict) -> list[str]:
    """The layouts whose columns this row has. chosen + rejected make it a preference layout
    (binarized UltraFeedback also carries a ``messages`` column)."""
    cols = _columns(row)
    pair = {"chosen", "rejected"} <= cols
    out = []
    if {"instruction", "output"} <= cols:
        out.append("alpaca")
    if "conversations" in cols:
        out.append("sharegpt")
    if "messages" in cols and not pair:
        out.append("openai")
    if pair and "prompt" not in cols and not isinstance(row["chosen"], list):
        out.append("hh-rlhf")
    if ("completions" in cols and cols & {"instruction", "prompt"}) or (pair and isinstance(row["chosen"], list)):
        out.append("ultrafeedback")
    return out


def detect_layout(row: dict, where: str) -> str:
    """The one layout ``row`` fits, or a clear error naming ``where`` (file:row)."""
    cands = layout_candidates(row)
    if len(cands) == 1:
        return cands[0]
    cols = ", ".join(sorted(_columns(row))) or "none"
    if cands:
        raise MlxpostError(f"{where}: ambiguous layout: the columns ({cols}) fit {' and '.join(cands)}; "
                      f"pass --from {cands[0]} (or another)")
    hint = ""
    if {"prompt", "chosen", "rejected"} <= _columns(row) or {"prompt", "completion"} <= _columns(row):
        hint = " (this looks like mlxpost's own format already: train on it directly, no conversion needed)"
    known = "; ".join(f"{k}: {v}" for k, v in LAYOUT_COLUMNS.items())
    raise MlxpostError(f"{where}: cannot tell the layout from the columns ({cols}){hint}. "
                  f"Known layouts: {known}. Pass --from LAYOUT")


def _layout_mismatch(layout: str, row: dict, auto: bool) -> str | None:
    """Why ``row`` does not belong to a file of ``layout`` (None when it does)."""
    cols = _columns(row)
    cands = layout_candidates(row)
    fits = any(set(req) <= cols for req in _REQUIRED[layout])
    if fits and not (auto and cands and layout not in cands):
        return None
    if cands:
        detail = f"this row looks like {cands[0]} ({', '.join(sorted(cols))})"
        return (f"mixed layouts in one file: the file is {layout}, {detail}" if auto else
                f"not a row of the {layout} layout: {detail}")
    missing = min((sorted(set(req) - cols) for req in _REQUIRED[layout]), key=len)
    return (f"missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} of the {layout} layout "
            f"(the row has: {', '.join(sorted(cols)) or 'nothing'})")


class _Problem(Exception):
    """A bad field in an input row (reported as file:row: field: message)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


class _Drop(Exception):
    """A row that carries nothing to learn (no preference); dropped and counted."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Msgs:
    """Converted messages and, for each, where it came from in the input row."""

    column: str  # the input field the whole list comes from
    msgs: list[dict] = field(default_factory=list)
    where: list[tuple[str, str, str]] = field(default_factory=list)  # (message, content, role) input fields

    def add(self, msg: dict, at: str, content: str | None = None, role: str | None = None) -> None:
        self.msgs.append(msg)
        self.where.append((at, content or at, role or at))

    def __add__(self, other: "_Msgs") -> "_Msgs":
        return _Msgs(self.column, self.msgs + other.msgs, self.where + other.where)

    def origins(self, name: str) -> dict[str, str]:
        out = {name: self.column}
        for i, (at, content, role) in enumerate(self.where):
            out[f"{name}[{i}]"] = at
            out[f"{name}[{i}].content"] = content
            out[f"{name}[{i}].role"] = role
        return out


def _type(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _text(row: dict, key: str, required: bool = True) -> str | None:
    v = row.get(key)
    if v is None:
        if required:
            raise _Problem(key, "missing")
        return None
    if not isinstance(v, str):
        raise _Problem(key, f"expected a string, got {_type(v)}")
    return v


def _system(row: dict, system: str | None) -> tuple[str, str] | None:
    """The row's own ``system`` column, else ``--system``: ``(text, origin)``."""
    v = _text(row, "system", required=False)
    if v is not None and v.strip():
        return v, "system"
    if system:
        return system, "--system"
    return None


def _msg(role: str, content: Any) -> dict:
    return {"role": role, "content": content}


def _alpaca(row: dict, system: str | None) -> _Msgs:
    instruction = _text(row, "instruction")
    inp = _text(row, "input", required=False) or ""
    output = _text(row, "output")
    if not instruction.strip() and not inp.strip():
        raise _Problem("instruction", "is empty (and there is no input)")
    parts = [p for p in (instruction, inp) if p.strip()]
    user_from = "instruction" if not inp.strip() else "input" if not instruction.strip() else "instruction/input"
    m = _Msgs("row")
    sys_ = _system(row, system)
    if sys_:
        m.add(_msg("system", sys_[0]), sys_[1])
    m.add(_msg("user", "\n\n".join(parts)), user_from)
    m.add(_msg("assistant", output), "output")
    return m


def _sharegpt(row: dict, system: str | None) -> _Msgs:
    conv = row.get("conversations")
    if not isinstance(conv, list):
        raise _Problem("conversations", f"expected a list of turns, got {_type(conv)}")
    if not conv:
        raise _Problem("conversations", "is empty")
    m = _Msgs("conversations")
    turns = []
    for i, t in enumerate(conv):
        at = f"conversations[{i}]"
        if not isinstance(t, dict):
            raise _Problem(at, f"expected an object with 'from' and 'value', got {_type(t)}")
        sk = "from" if "from" in t else "role" if "role" in t else None
        vk = "value" if "value" in t else "content" if "content" in t else None
        if sk is None:
            raise _Problem(f"{at}.from", "missing")
        if vk is None:
            raise _Problem(f"{at}.value", "missing")
        speaker, value = t[sk], t[vk]
        role = _SHAREGPT_ROLES.get(speaker.strip().lower()) if isinstance(speaker, str) else None
        if role is None:
            raise _Problem(f"{at}.{sk}", f"unknown speaker {speaker!r} (expected human, gpt or system)")
        if not isinstance(value, str):
            raise _Problem(f"{at}.{vk}", f"expected a string, got {_type(value)}")
        turns.append((role, value, at, f"{at}.{vk}", f"{at}.{sk}"))
    if turns[0][0] != "system":
        sys_ = _system(row, system)
        if sys_:
            m.add(_msg("system", sys_[0]), sys_[1])
    for role, value, at, vf, sf in turns:
        m.add(_msg(role, value), at, vf, sf)
    return m


def _openai_content(content: Any, at: str) -> Any:
    if not isinstance(content, list):
        return content
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, dict) else _type(part)
            raise _Problem(f"{at}.content[{j}]", f"only text parts can be converted, got {kind!r}")
    return "\n".join(texts)


def _openai(row: dict, system: str | None) -> tuple[_Msgs, Any]:
    msgs = row.get("messages")
    if not isinstance(msgs, list):
        raise _Problem("messages", f"expected a list of messages, got {_type(msgs)}")
    if not msgs:
        raise _Problem("messages", "is empty")
    m = _Msgs("messages")
    first = msgs[0].get("role") if isinstance(msgs[0], dict) else None
    if first not in ("system", "developer"):
        sys_ = _system(row, system)
        if sys_:
            m.add(_msg("system", sys_[0]), sys_[1])
    for i, x in enumerate(msgs):
        at = f"messages[{i}]"
        if not isinstance(x, dict):
            raise _Problem(at, f"expected an object with 'role' and 'content', got {_type(x)}")
        role = x.get("role")
        if not isinstance(role, str):
            raise _Problem(f"{at}.role", "missing" if role is None else f"expected a string, got {_type(role)}")
        role = "system" if role == "developer" else role
        out = _msg(role, _openai_content(x.get("content"), at))
        if x.get("tool_calls") is not None:
            out["tool_calls"] = x["tool_calls"]
        if role == "tool":
            for k in ("tool_call_id", "name"):
                if x.get(k) is not None:
                    out[k] = x[k]
        m.add(out, at, f"{at}.content", f"{at}.role")
    return m, row.get("tools")


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")


def _hh_parse(text: Any, side: str) -> list[tuple[str, str]]:
    if not isinstance(text, str):
        raise _Problem(side, f"expected a transcript string, got {_type(text)}")
    stripped = text.lstrip()
    s = "\n\n" + stripped if stripped.startswith(("Human:", "Assistant:")) else text
    parts = _HH_TURN.split(s)
    if len(parts) < 3:
        raise _Problem(side, "no '\\n\\nHuman:' / '\\n\\nAssistant:' turns found")
    if parts[0].strip():
        raise _Problem(side, f"text before the first turn: {parts[0].strip()[:40]!r}")
    return [("user" if parts[j] == "Human" else "assistant", parts[j + 1].strip()) for j in range(1, len(parts), 2)]


def _split_shared(c: list, r: list, what: str) -> int:
    """Length of the shared leading turns of two conversations, which must first differ at an assistant turn."""
    if c == r:
        raise _Drop("identical chosen and rejected")
    k = 0
    while k < min(len(c), len(r)) and c[k] == r[k]:
        k += 1
    if k == 0:
        raise _Problem("rejected", f"chosen and rejected share no leading {what}, so the prompt cannot be found")
    for side, conv in (("chosen", c), ("rejected", r)):
        if k == len(conv):
            raise _Problem(side, f"has no {what} after the {k} it shares with the other side")
        if conv[k][0] != "assistant":
            raise _Problem(side, f"chosen and rejected first differ at {what[:-1]} {k + 1}, which is not the "
                                 "assistant's: a pair must share everything before its answers")
    return k


def _hh(row: dict, system: str | None) -> tuple[_Msgs, _Msgs, _Msgs]:
    c, r = _hh_parse(row.get("chosen"), "chosen"), _hh_parse(row.get("rejected"), "rejected")
    k = _split_shared(c, r, "turns")
    names = {"user": "Human", "assistant": "Assistant"}
    prompt, chosen, rejected = _Msgs("chosen"), _Msgs("chosen"), _Msgs("rejected")
    sys_ = _system(row, system)
    if sys_:
        prompt.add(_msg("system", sys_[0]), sys_[1])
    for i, (role, text) in enumerate(c[:k]):
        prompt.add(_msg(role, text), f"chosen (turn {i + 1}, {names[role]})")
    for out, side, conv in ((chosen, "chosen", c), (rejected, "rejected", r)):
        for i, (role, text) in enumerate(conv[k:], start=k):
            out.add(_msg(role, text), f"{side} (turn {i + 1}, {names[role]})")
    return prompt, chosen, rejected


def _plain_messages(value: Any, at: str) -> list[tuple[str, Any]]:
    if not isinstance(value, list):
        raise _Problem(at, f"expected a list of messages, got {_type(value)}")
    out = []
    for i, x in enumerate(value):
        if not isinstance(x, dict):
            raise _Problem(f"{at}[{i}]", f"expected an object with 'role' and 'content', got {_type(x)}")
        role = x.get("role")
        if not isinstance(role, str):
            raise _Problem(f"{at}[{i}].role", "missing" if role is None else f"expected a string, got {_type(role)}")
        out.append((role, _openai_content(x.get("content"), f"{at}[{i}]")))
    return out


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v) if np.isfinite(v) else None
    if isinstance(v, str):
        try:
            f = float(v.strip())
        except ValueError:
            return None
        return f if np.isfinite(f) else None
    return None


def completion_rating(c: dict) -> float | None:
    """A completion's rating (see the module docstring for the rule), or None when it has none."""
    v = _number(c.get("fine-grained_score"))
    if v is not None:
        return v
    ann = c.get("annotations")
    if isinstance(ann, dict):
        ratings = [_number(a.get("Rating")) for a in ann.values() if isinstance(a, dict)]
        ratings = [x for x in ratings if x is not None]
        if ratings:
            return float(np.mean(ratings))
    for key in ("overall_score", "score", "rating"):
        v = _number(c.get(key))
        if v is not None:
            return v
    return None


def _uf_ratings(row: dict, system: str | None) -> tuple[_Msgs, _Msgs, _Msgs]:
    key = "instruction" if row.get("instruction") is not None else "prompt"
    prompt_text = _text(row, key)
    comps = row.get("completions")
    if not isinstance(comps, list):
        raise _Problem("completions", f"expected a list, got {_type(comps)}")
    rated = []
    for i, c in enumerate(comps):
        if not isinstance(c, dict):
            raise _Problem(f"completions[{i}]", f"expected an object, got {_type(c)}")
        tk = "response" if "response" in c else "text"
        text = c.get(tk)
        if text is not None and not isinstance(text, str):
            raise _Problem(f"completions[{i}].{tk}", f"expected a string, got {_type(text)}")
        rating = completion_rating(c)
        if text is not None and text.strip() and rating is not None:
            rated.append((rating, i, text, tk))
    if len({r[0] for r in rated}) < 2:
        raise _Drop("no two completions with different ratings")
    best = max(rated, key=lambda t: (t[0], -t[1]))
    worst = min(rated, key=lambda t: (t[0], t[1]))
    prompt, chosen, rejected = _Msgs(key), _Msgs("completions"), _Msgs("completions")
    sys_ = _system(row, system)
    if sys_:
        prompt.add(_msg("system", sys_[0]), sys_[1])
    prompt.add(_msg("user", prompt_text), key)
    for out, (_, i, text, tk) in ((chosen, best), (rejected, worst)):
        out.add(_msg("assistant", text), f"completions[{i}]", f"completions[{i}].{tk}", f"completions[{i}]")
    return prompt, chosen, rejected


def _uf_pairs(row: dict, system: str | None) -> tuple[_Msgs, _Msgs, _Msgs]:
    c, r = _plain_messages(row.get("chosen"), "chosen"), _plain_messages(row.get("rejected"), "rejected")
    if not c or not r:
        raise _Problem("chosen" if not c else "rejected", "is empty")
    prompt, chosen, rejected = _Msgs("prompt"), _Msgs("chosen"), _Msgs("rejected")
    sys_ = None
    if c[0][0] == "assistant" and r[0][0] == "assistant":  # answers only: the prompt is its own column
        p = row.get("prompt")
        if p is None:
            raise _Problem("prompt", "missing (chosen and rejected hold only the answers)")
        if isinstance(p, str):
            turns = [("user", p)]
            wheres = [("prompt", "prompt", "prompt")]
        else:
            turns = _plain_messages(p, "prompt")
            wheres = [(f"prompt[{i}]", f"prompt[{i}].content", f"prompt[{i}].role") for i in range(len(turns))]
        if not (turns and turns[0][0] == "system"):
            sys_ = _system(row, system)
        if c == r:
            raise _Drop("identical chosen and rejected")
        k = 0
    else:
        k = _split_shared(c, r, "messages")
        turns = c[:k]
        wheres = [(f"chosen[{i}]", f"chosen[{i}].content", f"chosen[{i}].role") for i in range(k)]
        prompt = _Msgs("chosen")
        if turns[0][0] != "system":
            sys_ = _system(row, system)
    sc, sr = _number(row.get("score_chosen")), _number(row.get("score_rejected"))
    if sc is not None and sr is not None and sc == sr:
        raise _Drop("tied ratings")
    if sys_:
        prompt.add(_msg("system", sys_[0]), sys_[1])
    for (role, text), (at, cf, rf) in zip(turns, wheres):
        prompt.add(_msg(role, text), at, cf, rf)
    for out, side, conv in ((chosen, "chosen", c), (rejected, "rejected", r)):
        for i, (role, text) in enumerate(conv[k:], start=k):
            out.add(_msg(role, text), f"{side}[{i}]", f"{side}[{i}].content", f"{side}[{i}].role")
    return prompt, chosen, rejected


def convert_row(layout: str, row: dict, to: str, system: str | None = None) -> tuple[dict, dict[str, str]]:
    """One input row in ``layout`` as an mlxpost row of kind ``to`` (``sft`` or ``preference``).

    Returns ``(row, origins)``; ``origins`` maps the converted row's fields
    (``messages[2].content``) to the input's (``conversations[1].value``).
    Raises ``_Problem`` for a bad field and ``_Drop`` for a row without a
    preference.
    """
    if layout in SFT_LAYOUTS:
        if to != "sft":
            raise MlxpostError(f"--to {to} needs a preference layout (hh-rlhf or ultrafeedback); "
                               f"{layout} rows have one answer per prompt")
        tools = None
        if layout == "alpaca":
            m = _alpaca(row, system)
        elif layout == "sharegpt":
            m = _sharegpt(row, system)
        else:
            m, tools = _openai(row, system)
        out: dict[str, Any] = {"messages": m.msgs}
        if tools is not None:
            out["tools"] = tools
        return out, m.origins("messages")
    if layout == "hh-rlhf":
        prompt, chosen, rejected = _hh(row, system)
    elif layout == "ultrafeedback":
        prompt, chosen, rejected = (_uf_ratings if row.get("completions") is not None else _uf_pairs)(row, system)
    else:
        raise MlxpostError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if to == "sft":
        m = prompt + chosen
        return {"messages": m.msgs}, m.origins("messages")
    origins = {**prompt.origins("prompt"), **chosen.origins("chosen"), **rejected.origins("rejected")}
    return {"prompt": prompt.msgs, "chosen": chosen.msgs, "rejected": rejected.msgs}, origins


def _translate(f: str, origins: dict[str, str]) -> str:
    """A converted row's field name as the input row's field name."""
    if not f or f in origins:
        return origins.get(f, f)
    best = max((k for k in origins if f.startswith((k + ".", k + "["))), key=len, default=None)
    return origins[best] + f[len(best):] if best else f
