"""Convert public dataset layouts into the rows mlxpost trains on.

``mlxpost data convert IN --out DIR`` reads ``.jsonl``, ``.json`` (an array
of rows, or ``{"data": [...]}``) or ``.parquet`` files, or a directory of
them, turns each row into mlxpost's own format, checks it with the same
validators training uses (:func:`mlxpost.data.rows.validate_sft_row`,
:func:`mlxpost.data.rows.validate_pair_row`), removes exact duplicates and writes
``DIR/train.jsonl`` (and ``DIR/test.jsonl`` with ``--split``), plus
``DIR/conversion.json`` recording how (read by ``mlxpost data push`` for the
dataset card).

Input layouts (``--from``; ``auto`` looks at each file's first row):

* ``alpaca``: ``instruction``, optional ``input``, ``output`` (and an optional
  ``system``). The user turn is the instruction, then a blank line and the
  input when there is one; the output is the assistant turn.
* ``sharegpt``: ``conversations: [{"from": "human"|"gpt"|"system", "value": ...}]``
  (``user``/``assistant`` and ``role``/``content`` keys are accepted too) and
  an optional ``system`` column.
* ``openai``: ``messages: [{"role", "content"}]`` (OpenAI's chat fine-tuning
  format): ``developer`` becomes ``system``, a list of text parts is joined
  with newlines, ``tool_calls``/``tools`` are kept.
* ``hh-rlhf``: ``chosen``/``rejected`` as whole transcripts
  ``"\n\nHuman: ...\n\nAssistant: ..."``; the turns both share become the
  prompt (message lists), the turns after it the answers.
* ``ultrafeedback``: either ``prompt`` + ``chosen``/``rejected`` message lists
  (the binarized form: whole conversations sharing their first turns, or
  answers only; a pair whose ``score_chosen`` equals ``score_rejected`` is
  dropped as a tie), or ``instruction`` (or ``prompt``) + ``completions`` with
  ratings. Rule for the latter: a completion's rating is its
  ``fine-grained_score``, else the mean of its ``annotations.*.Rating``, else
  its ``overall_score`` (then ``score``, ``rating``); completions with no
  rating or an empty ``response`` are ignored. *chosen* is the highest-rated
  completion, *rejected* the lowest-rated one (the first in the list on
  ties); a row whose completions all have the same rating is dropped.

Output rows: ``--to sft`` writes ``{"messages": [...]}``; ``--to preference``
writes ``{"prompt": [...], "chosen": [...], "rejected": [...]}`` as message
lists. Preference layouts can also be written ``--to sft`` (the prompt plus
the chosen answer). ``--system TEXT`` puts a system message in front of rows
that have none.

Errors name the input file and its row (the line of a ``.jsonl`` file, the
row counted from 1 of a ``.json`` array or ``.parquet`` file) and the input's
own field (``conversations[3].value``), never the converted row's. Rows
without a preference (identical answers, tied ratings) and exact duplicates
are dropped and counted; every other bad row is an error unless
``skip_bad_rows`` (then dropped and counted per reason).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..errors import DataError, MlxpostError, RowIssue
from ..model.load import resolve_model_path
from .render import Renderer, render_pair
from .rows import read_jsonl, validate_pair_row, validate_sft_row

SFT_LAYOUTS = ("alpaca", "sharegpt", "openai")

PREFERENCE_LAYOUTS = ("hh-rlhf", "ultrafeedback")

LAYOUTS = SFT_LAYOUTS + PREFERENCE_LAYOUTS

INPUT_SUFFIXES = (".jsonl", ".json", ".parquet")

CONVERSION_FILE = "conversion.json"

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


def find_inputs(src: str | Path, exclude: str | Path | None = None) -> list[Path]:
    """The data files of ``src``: the file itself, or every .jsonl/.json/.parquet below a directory.

    Hidden files and folders, and anything below ``exclude`` (the output
    folder, when it lies inside the input), are left out.
    """
    src = Path(src)
    if not src.exists():
        raise MlxpostError(f"input not found: {src}")
    if src.is_file():
        if src.suffix.lower() not in INPUT_SUFFIXES:
            raise MlxpostError(f"{src}: expected a .jsonl, .json or .parquet file, or a directory of them")
        return [src]
    skip = Path(exclude).resolve() if exclude is not None else None
    files = []
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src).parts
        if not p.is_file() or p.suffix.lower() not in INPUT_SUFFIXES or any(s.startswith(".") for s in rel):
            continue
        if skip is not None and (p.resolve() == skip or skip in p.resolve().parents):
            continue
        files.append(p)
    if not files:
        raise MlxpostError(f"{src}: no .jsonl, .json or .parquet files in this directory")
    return files


def read_rows(path: str | Path) -> Iterator[tuple[int, Any, RowIssue | None]]:
    """Yield ``(row_number, row, issue)``: the line of a .jsonl file, the row (from 1) of a .json or .parquet file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet(path)
    elif suffix == ".json":
        yield from _read_json(path)
    else:
        yield from read_jsonl(path)


def _read_json(path: Path) -> Iterator[tuple[int, Any, RowIssue | None]]:
    raw = path.read_bytes()
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError as e:
        raise MlxpostError(f"{path}: not UTF-8 text (byte {e.start + 1})") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines in a file named .json
            yield from read_jsonl(path)
            return
        raise MlxpostError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        what = f"an object with keys {', '.join(sorted(obj))}" if isinstance(obj, dict) else type(obj).__name__
        raise MlxpostError(f"{path}: expected a JSON array of rows or an object with a 'data' array, got {what}")
    for i, row in enumerate(obj, start=1):
        if isinstance(row, dict):
            yield i, row, None
        else:
            yield i, None, RowIssue(str(path), i, "", f"expected a JSON object, got {type(row).__name__}")


def pyarrow_modules():
    """pyarrow and pyarrow.parquet, imported when Parquet is read or written (pyarrow is an optional extra)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MlxpostError("Parquet needs pyarrow: pip install pyarrow (or pip install 'mlxpost[hf]')") from None
    return pa, pq


def _short(e: Exception) -> str:
    text = " ".join(str(e).split())
    return (text[:200] + "...") if len(text) > 200 else text


def _read_parquet(path: Path) -> Iterator[tuple[int, Any, RowIssue | None]]:
    _, pq = pyarrow_modules()
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        raise MlxpostError(f"{path}: not a readable Parquet file ({_short(e)}); "
                           "is it truncated (an interrupted download)?") from None
    first = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        try:
            rows = pf.read_row_group(g).to_pylist()
        except Exception as e:  # noqa: BLE001
            raise MlxpostError(f"{path}: rows {first + 1}-{first + n} (row group {g + 1} of {pf.num_row_groups}) "
                               f"cannot be read ({_short(e)}); the file is corrupt") from None
        for i, row in enumerate(rows, start=first + 1):
            yield i, row, None
        first += n


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


@dataclass
class ConvertResult:
    out_dir: Path
    kind: str  # "sft" or "preference"
    sources: list[dict]  # {"file", "layout", "rows"}
    rows_in: int
    splits: dict[str, int]  # file name -> rows written
    dropped: Counter
    lengths: dict[str, int] | None = None  # p50 / p90 / p99 / max tokens, with --tokenizer
    tokenizer: str | None = None
    command: str = ""

    @property
    def rows_out(self) -> int:
        return sum(self.splits.values())

    def table_rows(self) -> list[tuple[str, Any]]:
        layouts = sorted({s["layout"] for s in self.sources if s["layout"]})
        rows: list[tuple[str, Any]] = [
            ("input files", len(self.sources)),
            ("layout", ", ".join(layouts) or "-"),
            ("output", f"{self.kind} rows in {self.out_dir}"),
            ("rows in", self.rows_in),
            ("rows out", self.rows_out),
        ]
        rows += [(f"  {name}", n) for name, n in self.splits.items()]
        by_count = sorted(self.dropped.items(), key=lambda kv: (-kv[1], kv[0]))
        rows += [(f"dropped: {reason}", n) for reason, n in by_count]
        if self.lengths:
            rows.append(("tokenizer", self.tokenizer))
            rows += [(f"tokens {k}", v) for k, v in self.lengths.items()]
        return rows


def split_rows(n: int, fraction: float, seed: int) -> set[int]:
    """Indices (of ``n`` rows) held out for the test split: ``floor(n * fraction)``, at least one."""
    if not 0 < fraction < 1:
        raise MlxpostError(f"--split must be between 0 and 1, got {fraction}")
    n_test = max(1, int(np.floor(n * fraction)))
    if n_test >= n:
        raise MlxpostError(f"only {n} rows: too few to hold out a test split of {fraction}")
    return set(np.random.default_rng(seed).permutation(n)[:n_test].tolist())


def length_percentiles(lengths: list[int]) -> dict[str, int]:
    a = np.asarray(lengths)
    out = {f"p{q}": int(np.percentile(a, q, method="higher")) for q in (50, 90, 99)}
    out["max"] = int(a.max())
    return out


def load_renderer(spec: str):
    """A :class:`mlxpost.data.render.Renderer` for the tokenizer of a model (repo id, directory or .gguf)."""
    from mlx_lm.utils import load_tokenizer  # here: importing mlx-lm loads transformers (over a second)

    path = resolve_model_path(spec)
    renderer = Renderer(load_tokenizer(path))
    if not renderer.has_template:
        raise MlxpostError(f"--tokenizer {spec}: this tokenizer has no chat template, so rows cannot be measured "
                           "as they would be trained")
    return renderer


def _token_length(renderer, row: dict, kind: str) -> int:
    if kind == "preference":
        (ci, _), (ri, _), _ = render_pair(renderer, row)
        return max(len(ci), len(ri))  # data.max_seq_len applies to each side
    ids, _, _ = renderer.render(row)
    return len(ids)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False))
            f.write("\n")
    os.replace(tmp, path)


def _command(src: Path, out: Path, to: str, layout: str, split: float, seed: int, tokenizer: str | None,
             system: str | None, skip_bad_rows: bool) -> str:
    # File names only: the command goes into a public dataset card.
    args = ["mlxpost", "data", "convert", src.name, "--to", to, "--from", layout, "--out", out.name]
    if split:
        args += ["--split", f"{split:g}", "--seed", str(seed)]
    if system:
        args += ["--system", system]
    if tokenizer:
        args += ["--tokenizer", Path(tokenizer).name if Path(tokenizer).exists() else tokenizer]
    if skip_bad_rows:
        args.append("--skip-bad-rows")
    return shlex.join(args)


def convert(src: str | Path, out: str | Path, *, to: str | None = None, layout: str = "auto",
            split: float = 0.0, seed: int = 0, tokenizer: str | None = None, system: str | None = None,
            skip_bad_rows: bool = False, overwrite: bool = False,
            log: Callable[[str], None] | None = None) -> ConvertResult:
    """Convert ``src`` (a file or a directory of them) and write ``out/train.jsonl`` [+ ``test.jsonl``].

    ``to``: ``"sft"`` or ``"preference"``; by default the kind of the
    detected layout. ``layout``: one of :data:`LAYOUTS` or ``"auto"`` (each
    file's first row decides; every other row must fit it). ``split``: the
    fraction held out as ``test.jsonl`` (rows chosen with ``seed``; both files
    keep the input order). ``tokenizer``: measure token lengths with that
    model's chat template. Raises :class:`DataError` listing every bad row.
    """
    src, out = Path(src), Path(out)
    log = log or (lambda msg: None)
    if layout != "auto" and layout not in LAYOUTS:
        raise MlxpostError(f"--from must be one of {', '.join(LAYOUTS)} or auto, got {layout!r}")
    if to not in (None, "sft", "preference"):
        raise MlxpostError(f"--to must be sft or preference, got {to!r}")
    if not 0 <= split < 1:
        raise MlxpostError(f"--split must be at least 0 and below 1, got {split}")
    if layout in SFT_LAYOUTS and to == "preference":
        raise MlxpostError(f"--to preference needs a preference layout (hh-rlhf or ultrafeedback); "
                           f"{layout} rows have one answer per prompt")
    if out.exists() and not out.is_dir():
        raise MlxpostError(f"--out {out}: exists and is not a directory")
    if (out / "train.jsonl").exists() and not overwrite:
        raise MlxpostError(f"{out / 'train.jsonl'} exists; pass --overwrite to replace it")
    files = find_inputs(src, exclude=out)

    target = to
    sources: list[dict] = []
    issues: list[RowIssue] = []
    structural: list[RowIssue] = []
    converted: list[tuple[dict, str, int]] = []
    dropped: Counter = Counter()
    rows_in = 0
    for path in files:
        file_layout = None if layout == "auto" else layout
        n = 0
        for line, row, issue in read_rows(path):
            rows_in += 1
            n += 1
            if issue is not None:
                issues.append(issue)
                continue
            if file_layout is None:
                file_layout = detect_layout(row, f"{path}:{line}")
                log(f"{path}: detected layout {file_layout} (columns: {', '.join(sorted(_columns(row)))})")
            if target is None:
                target = layout_kind(file_layout)
            elif layout_kind(file_layout) == "sft" and target == "preference":
                if to:
                    raise MlxpostError(f"--to preference needs a preference layout (hh-rlhf or ultrafeedback); "
                                       f"{path} holds {file_layout} rows (one answer per prompt)")
                raise MlxpostError(f"{path} holds {file_layout} rows (one answer per prompt) but earlier files hold "
                                   "preference pairs: convert them separately, or pass --to sft")
            bad = _layout_mismatch(file_layout, row, auto=layout == "auto")
            if bad:
                structural.append(RowIssue(str(path), line, "", bad))
                continue
            try:
                out_row, origins = convert_row(file_layout, row, target, system)
            except _Drop as d:
                dropped[d.reason] += 1
                continue
            except _Problem as p:
                issues.append(RowIssue(str(path), line, p.field, p.message))
                continue
            problems = (validate_pair_row if target == "preference" else validate_sft_row)(out_row)
            if problems:
                issues += [RowIssue(str(path), line, _translate(f, origins), msg) for f, msg in problems]
                continue
            converted.append((out_row, str(path), line))
        sources.append({"file": path.name, "layout": file_layout, "rows": n})
    if structural:
        raise DataError(structural, rows_in, hint="Each input file must hold one layout with its columns: split mixed "
                                                  "files, or check --from.")

    seen: set[str] = set()
    kept: list[tuple[dict, str, int]] = []
    for row, path, line in converted:
        key = json.dumps(row, sort_keys=True, ensure_ascii=False)
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        kept.append((row, path, line))

    lengths: list[int] = []
    if tokenizer and kept:
        renderer = load_renderer(tokenizer)
        measured = []
        for row, path, line in kept:
            try:
                lengths.append(_token_length(renderer, row, target))
            except Exception as e:  # noqa: BLE001 - a chat template that raises on this row
                issues.append(RowIssue(path, line, "", f"chat template of {tokenizer} failed: {type(e).__name__}: {e}"))
                continue
            measured.append((row, path, line))
        kept = measured

    if issues:
        if not skip_bad_rows:
            numbering = ("" if all(f.suffix.lower() == ".jsonl" for f in files) else
                         " (.json and .parquet rows are counted from 1)")
            raise DataError(issues, rows_in, hint=f"Fix these rows, or pass --skip-bad-rows to drop them (counted per "
                                                  f"reason){numbering}.")
        first: dict[tuple[str, int], str] = {}
        for i in issues:
            first.setdefault((i.path, i.line), i.message)
        for reason in first.values():
            dropped[f"invalid: {reason}"] += 1
    if not kept:
        raise MlxpostError(f"{src}: no rows left to write ({rows_in} read, all dropped: "
                           + ", ".join(f"{r} {n}" for r, n in dropped.items()) + ")")

    rows = [r for r, _, _ in kept]
    held = split_rows(len(rows), split, seed) if split else set()
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train.jsonl": [r for i, r in enumerate(rows) if i not in held]}
    if held:
        splits["test.jsonl"] = [r for i, r in enumerate(rows) if i in held]
    elif (out / "test.jsonl").exists():
        (out / "test.jsonl").unlink()  # --overwrite without --split: no stale test split
    for name, part in splits.items():
        _write_jsonl(out / name, part)

    result = ConvertResult(out_dir=out, kind=target or "sft", sources=sources, rows_in=rows_in,
                           splits={k: len(v) for k, v in splits.items()}, dropped=dropped,
                           lengths=length_percentiles(lengths) if lengths else None, tokenizer=tokenizer,
                           command=_command(src, out, target or "sft", layout, split, seed, tokenizer, system,
                                            skip_bad_rows))
    meta = {"format": "mlxpost", "kind": result.kind, "command": result.command, "sources": sources,
            "rows_in": rows_in, "splits": result.splits, "dropped": dict(sorted(dropped.items())),
            "split": split, "seed": seed, "system": system}
    if result.lengths:
        meta["tokens"] = {"tokenizer": Path(tokenizer).name if Path(tokenizer).exists() else tokenizer,
                          **result.lengths}
    tmp = out / (CONVERSION_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / CONVERSION_FILE)
    return result
