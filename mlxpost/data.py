"""Row formats, validation with file:line errors, and rendering with loss masks.

Supported JSONL rows (one JSON object per line):

* ``{"messages": [{"role": ..., "content": ...}, ...], "tools": [...]}`` —
  multi-turn chat. Optional leading ``system`` message, optional ``tools``
  (passed to the chat template) and ``tool`` turns after an assistant turn
  with ``tool_calls``. Every assistant turn is trained on.
* ``{"prompt": ..., "completion": ...}`` — strings (rendered as one user turn
  and one assistant turn when the tokenizer has a chat template, otherwise as
  plain text) or message lists. Only the completion is trained on.
* ``{"text": ...}`` — plain text; every token is trained on.

Rendering produces an :class:`Example`: ``tokens`` (T,) and ``mask`` (T,),
where ``mask[t]`` is True when token ``t`` is a training target (the model is
scored on predicting it from the tokens before it).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import DataError, MlxpostError, RowIssue

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Example:
    tokens: np.ndarray  # (T,) int32
    mask: np.ndarray  # (T,) bool: token t is a training target
    source: str = ""  # "file:line", for messages about this example
    index: int = -1  # position among the file's valid rows (the same on every rank)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_targets(self) -> int:
        # Token 0 is never predicted (nothing comes before it).
        return int(self.mask[1:].sum())


@dataclass
class DataStats:
    rows: int = 0
    bad_rows: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_targets: int = 0
    dropped_identical: int = 0  # pairs whose sides became identical when truncated
    prefix_fallback: int = 0
    valid_rows: int = 0  # rows that passed validation (all ranks, not only this shard)
    formats: Counter = field(default_factory=Counter)
    lengths: list[int] = field(default_factory=list)
    targets: int = 0

    @property
    def examples(self) -> int:
        return len(self.lengths)

    def summary(self) -> dict[str, Any]:
        lens = np.array(self.lengths or [0])
        return {
            "rows": self.rows,
            "examples": self.examples,
            "bad_rows_skipped": self.bad_rows,
            "truncated": self.truncated,
            "dropped_too_long": self.dropped_too_long,
            "dropped_no_targets": self.dropped_no_targets,
            "dropped_identical": self.dropped_identical,
            "formats": dict(self.formats),
            "tokens": int(lens.sum()),
            "target_tokens": self.targets,
            "length_p50": int(np.percentile(lens, 50)),
            "length_p95": int(np.percentile(lens, 95)),
            "length_max": int(lens.max()),
        }


# ---------------------------------------------------------------------------
# Reading and validation
# ---------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any, RowIssue | None]]:
    """Yield ``(line_number, row, issue)`` for each non-blank line (1-based)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
        if head.startswith(b"["):
            raise MlxpostError(f"{path}: this is one JSON array, not JSON Lines; write one object per line "
                               "(e.g. python -c \"import json,sys; [print(json.dumps(r)) for r in "
                               "json.load(open(sys.argv[1]))]\" FILE > FILE.jsonl)")
        f.seek(0)
        for i, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield i, None, RowIssue(str(path), i, "", f"not UTF-8 text (byte {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield i, None, RowIssue(str(path), i, "", f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(row, dict):
                yield i, None, RowIssue(str(path), i, "", f"expected a JSON object, got {type(row).__name__}")
                continue
            yield i, row, None


def row_format(row: dict) -> str | None:
    if "messages" in row:
        return "messages"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    return None


def _is_blank(s: Any) -> bool:
    return s is None or (isinstance(s, str) and not s.strip())


def validate_messages(messages: Any, prefix: str = "messages", *, require_assistant: bool = True,
                      allow_leading_assistant: bool = False) -> list[tuple[str, str]]:
    """Check a message list; return ``[(field, problem), ...]`` (empty when valid).

    Order rules: an optional system message first; then a user turn; a user
    turn is answered by an assistant turn; an assistant turn that calls tools
    is followed by one or more ``tool`` turns and then an assistant turn.
    """
    if not isinstance(messages, list):
        return [(prefix, f"expected a list of messages, got {type(messages).__name__}")]
    if not messages:
        return [(prefix, "is empty")]
    problems: list[tuple[str, str]] = []
    prev = None  # role of the previous message
    prev_calls = False
    for i, m in enumerate(messages):
        f = f"{prefix}[{i}]"
        if not isinstance(m, dict):
            problems.append((f, f"expected an object with 'role' and 'content', got {type(m).__name__}"))
            return problems
        role = m.get("role")
        if role is None:
            problems.append((f"{f}.role", "missing"))
            return problems
        if role not in ROLES:
            problems.append((f"{f}.role", f"expected one of {', '.join(ROLES)}, got {role!r}"))
            return problems
        content = m.get("content")
        calls = m.get("tool_calls")
        if calls is not None and (role != "assistant" or not isinstance(calls, list)):
            problems.append((f"{f}.tool_calls", "only assistant messages may have tool_calls, as a list"))
        if content is not None and not isinstance(content, str):
            problems.append((f"{f}.content", f"expected a string, got {type(content).__name__}"))
        elif role == "assistant" and _is_blank(content) and not calls:
            problems.append((f"{f}.content", "empty assistant turn"))
        elif role in ("user", "system") and content is None:
            problems.append((f"{f}.content", "missing"))

        # Role order.
        if role == "system" and i != 0:
            problems.append((f"{f}.role", "a system message may only come first"))
        elif role == "user" and prev == "user":
            problems.append((f"{f}.role", "two user turns in a row (expected an assistant turn between them)"))
        elif role == "assistant" and prev in (None, "system") and not allow_leading_assistant:
            problems.append((f"{f}.role", "the conversation must start with a user turn (after an optional system message)"))
        elif role == "assistant" and prev == "assistant":
            problems.append((f"{f}.role", "an assistant turn with tool_calls must be followed by tool turns"
                             if prev_calls else "two assistant turns in a row"))
        elif role == "tool" and not (prev == "tool" or (prev == "assistant" and prev_calls)):
            problems.append((f"{f}.role", "a tool turn must follow an assistant turn with tool_calls"))
        elif role == "user" and prev == "assistant" and prev_calls:
            problems.append((f"{f}.role", "an assistant turn with tool_calls must be followed by tool turns"))
        elif role == "user" and prev == "tool":
            problems.append((f"{f}.role", "tool results must be answered by an assistant turn"))
        prev, prev_calls = role, bool(calls) if role == "assistant" else False

    if require_assistant:
        if not any(m.get("role") == "assistant" for m in messages if isinstance(m, dict)):
            problems.append((prefix, "has no assistant turn to train on"))
        elif messages[-1].get("role") != "assistant":
            problems.append((f"{prefix}[{len(messages) - 1}].role",
                             "the conversation must end with an assistant turn"))
    return problems


def validate_sft_row(row: dict) -> list[tuple[str, str]]:
    fmt = row_format(row)
    if fmt is None:
        keys = ", ".join(sorted(row)) or "none"
        return [("", f"unknown row format (keys: {keys}); expected 'messages', 'prompt'/'completion' or 'text'")]
    if fmt == "messages":
        problems = validate_messages(row["messages"])
        tools = row.get("tools")
        if tools is not None and not isinstance(tools, list):
            problems.append(("tools", f"expected a list, got {type(tools).__name__}"))
        return problems
    if fmt == "text":
        t = row["text"]
        if not isinstance(t, str):
            return [("text", f"expected a string, got {type(t).__name__}")]
        if not t.strip():
            return [("text", "is empty")]
        return []
    # prompt / completion
    problems = []
    tools = row.get("tools")
    if tools is not None and not isinstance(tools, list):
        problems.append(("tools", f"expected a list, got {type(tools).__name__}"))
    for key in ("prompt", "completion"):
        if key not in row:
            problems.append((key, "missing"))
    if any(f in ("prompt", "completion") for f, _ in problems):
        return problems
    p, c = row["prompt"], row["completion"]
    if isinstance(p, str) and isinstance(c, str):
        if _is_blank(c):
            problems.append(("completion", "empty completion"))
        return problems
    if isinstance(p, list) and isinstance(c, list):
        problems += validate_messages(p, "prompt", require_assistant=False)
        if p and isinstance(p[-1], dict) and p[-1].get("role") == "assistant":
            problems.append(("prompt", "the prompt must not end with an assistant turn"))
        problems += validate_messages(c, "completion", allow_leading_assistant=True)
        if c and isinstance(c[0], dict) and c[0].get("role") != "assistant":
            problems.append(("completion[0].role", "the completion must start with an assistant turn"))
        return problems
    return [("completion", f"prompt and completion must both be strings or both be message lists "
                           f"(got {type(p).__name__} and {type(c).__name__})")]


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


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


def _normalize_message(m: dict) -> dict:
    out = dict(m)
    if out.get("content") is None:
        out["content"] = ""
    return out


# ---------------------------------------------------------------------------
# Loading a dataset
# ---------------------------------------------------------------------------

SPLIT_NAMES = {
    "train": ("train.jsonl",),
    "valid": ("valid.jsonl", "validation.jsonl", "val.jsonl", "dev.jsonl"),
    "test": ("test.jsonl",),
}


def resolve_data_files(data: str | Path, valid: str | Path | None = None) -> dict[str, Path]:
    """``data`` is a .jsonl file or a directory with train.jsonl (and valid.jsonl)."""
    p = Path(data)
    if not p.exists():
        raise MlxpostError(f"data not found: {p}")
    files: dict[str, Path] = {}
    if p.is_dir():
        for split, names in SPLIT_NAMES.items():
            for n in names:
                if (p / n).exists():
                    files[split] = p / n
                    break
        if "train" not in files:
            raise MlxpostError(f"{p}: no train.jsonl in this directory")
    else:
        if p.suffix not in (".jsonl", ".json"):
            raise MlxpostError(f"{p}: expected a .jsonl file or a directory")
        files["train"] = p
    if valid is not None:
        v = Path(valid)
        if not v.exists():
            raise MlxpostError(f"validation data not found: {v}")
        files["valid"] = v
    return files


def _rows_to_render(path: Path, validate, stats: DataStats, issues: list[RowIssue],
                    shard: tuple[int, int] | None, limit: int | None) -> Iterator[tuple[int, dict, int]]:
    """Read and validate ``path``; yield ``(line, row, row_index)`` for the rows this shard renders.

    Every row is validated on every rank (so errors are the same everywhere);
    ``row_index`` counts valid rows and is the same on every rank. Problems
    are appended to ``issues``; ``stats.rows`` and ``stats.valid_rows`` are kept.
    """
    n_valid = 0
    for line, row, issue in read_jsonl(path):
        stats.rows += 1
        if issue is None:
            problems = validate(row)
            if problems:
                issue = [RowIssue(str(path), line, f, msg) for f, msg in problems]
        if issue is not None:
            issues.extend(issue if isinstance(issue, list) else [issue])
            continue
        n_valid += 1
        if limit is not None and n_valid > limit:
            n_valid -= 1
            break
        if shard is not None and (n_valid - 1) % shard[1] != shard[0]:
            continue
        yield line, row, n_valid - 1
    stats.valid_rows = n_valid


def _render_issue(path: Path, line: int, e: Exception) -> RowIssue:
    if isinstance(e, MlxpostError):
        return RowIssue(str(path), line, "", str(e))
    return RowIssue(str(path), line, "", f"chat template failed: {type(e).__name__}: {e}")


def _finish(issues: list[RowIssue], stats: DataStats, renderer: Renderer, skip_bad_rows: bool) -> None:
    if issues:
        bad = len({i.line for i in issues})
        if not skip_bad_rows:
            raise DataError(issues, stats.rows,
                            hint="Fix these rows, or pass --skip-bad-rows (data.skip_bad_rows=true) to skip them.")
        stats.bad_rows += bad
    stats.prefix_fallback = renderer.prefix_fallbacks


def _fit(ids: list[int], mask: list[bool], max_seq_len: int, overflow: str, stats: DataStats):
    """Apply ``data.max_seq_len``: the tokens and mask to keep, or None when the example is dropped."""
    if len(ids) <= max_seq_len:
        return ids, mask
    if overflow == "drop":
        stats.dropped_too_long += 1
        return None
    stats.truncated += 1
    return ids[:max_seq_len], mask[:max_seq_len]


def tokenize_file(path: str | Path, renderer: Renderer, *, max_seq_len: int, overflow: str = "truncate",
                  skip_bad_rows: bool = False, shard: tuple[int, int] | None = None,
                  limit: int | None = None) -> tuple[list[Example], DataStats]:
    """Read, validate and render one JSONL file.

    ``overflow``: ``"truncate"`` keeps the first ``max_seq_len`` tokens (and
    counts it), ``"drop"`` drops the example. Bad rows raise :class:`DataError`
    listing every problem, unless ``skip_bad_rows`` is set (then counted).
    ``shard = (rank, world)``: every row is validated, but only rows number
    ``rank, rank + world, ...`` are rendered and returned. ``limit``: stop
    after that many valid rows.
    """
    if overflow not in ("truncate", "drop"):
        raise MlxpostError(f"data.overflow must be 'truncate' or 'drop', got {overflow!r}")
    stats = DataStats()
    issues: list[RowIssue] = []
    examples: list[Example] = []
    path = Path(path)
    for line, row, index in _rows_to_render(path, validate_sft_row, stats, issues, shard, limit):
        try:
            ids, mask, fmt = renderer.render(row)
        except Exception as e:  # noqa: BLE001 - a chat template that raises on this row
            issues.append(_render_issue(path, line, e))
            continue
        stats.formats[fmt] += 1
        kept = _fit(ids, mask, max_seq_len, overflow, stats)
        if kept is None:
            continue
        ex = Example(np.asarray(kept[0], np.int32), np.asarray(kept[1], bool), f"{path}:{line}", index)
        if ex.n_targets == 0:
            stats.dropped_no_targets += 1
            continue
        stats.lengths.append(len(ex))
        stats.targets += ex.n_targets
        examples.append(ex)
    _finish(issues, stats, renderer, skip_bad_rows)
    return examples, stats


# ---------------------------------------------------------------------------
# Preference pairs
# ---------------------------------------------------------------------------


@dataclass
class PairExample:
    """A prompt with a chosen and a rejected completion, rendered separately.

    Both sides start with the same prompt tokens; their masks mark only the
    completion tokens.
    """

    chosen: Example
    rejected: Example
    source: str = ""
    index: int = -1

    def __len__(self) -> int:
        return max(len(self.chosen), len(self.rejected))


def _as_messages(value: Any, role: str) -> Any:
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def normalize_pair_row(row: dict) -> tuple[dict | None, list[tuple[str, str]]]:
    """Bring a preference row to ``{"prompt", "chosen", "rejected"[, "tools"]}``.

    Accepted forms:

    * ``prompt``, ``chosen``, ``rejected`` as strings;
    * the same as message lists (``prompt`` may start with a system message;
      ``chosen``/``rejected`` are the assistant turns), or a string prompt
      with message-list completions and vice versa (a string becomes a user
      turn or an assistant turn);
    * an optional ``system`` string, put in front of the prompt;
    * no ``prompt`` (implicit prompt): ``chosen`` and ``rejected`` are whole
      conversations; their longest common run of leading messages is the
      prompt.

    Returns ``(normalized row, [])`` or ``(None, [(field, problem), ...])``.

    >>> row = {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    ...        "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]}
    >>> norm, problems = normalize_pair_row(row)
    >>> norm["prompt"], norm["chosen"][0]["content"], problems
    ([{'role': 'user', 'content': 'Hi'}], 'Hello!', [])
    """
    missing = [(k, "missing") for k in ("chosen", "rejected") if k not in row]
    if missing:
        keys = ", ".join(sorted(row)) or "none"
        if "messages" in row or "completion" in row:
            return None, [("", f"this looks like an SFT row (keys: {keys}); preference rows need "
                               "'prompt', 'chosen' and 'rejected'")]
        return None, missing
    chosen, rejected = row["chosen"], row["rejected"]
    for k, v in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(v, (str, list)):
            return None, [(k, f"expected a string or a list of messages, got {type(v).__name__}")]
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        return None, [("system", f"expected a string, got {type(system).__name__}")]
    if "prompt" not in row:
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            return None, [("prompt", "missing (without a prompt, chosen and rejected must be whole "
                                     "conversations, as message lists, that share their first turns)")]
        if chosen == rejected:
            return None, [("rejected", "identical to chosen (a pair must differ)")]
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        if k == 0:
            return None, [("chosen", "chosen and rejected share no leading turns, so the prompt cannot be "
                                     "found; give a 'prompt' field")]
        for side, conv in (("chosen", chosen), ("rejected", rejected)):
            if k == len(conv):
                return None, [(side, f"has no turns after the {k} it shares with the other side")]
        for side, conv in (("chosen", chosen), ("rejected", rejected)):
            if not (isinstance(conv[k], dict) and conv[k].get("role") == "assistant"):
                return None, [(f"{side}[{k}]", "chosen and rejected first differ here, at a turn that is not "
                                               "the assistant's: a pair must share everything before its answers")]
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    else:
        prompt = row["prompt"]
        if not isinstance(prompt, (str, list)):
            return None, [("prompt", f"expected a string or a list of messages, got {type(prompt).__name__}")]
    if system is not None:
        prompt = _as_messages(prompt, "user")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict) and prompt[0].get("role") == "system":
            return None, [("system", "given twice: as the 'system' field and as the prompt's first message")]
        prompt = [{"role": "system", "content": system}] + list(prompt)
    if any(isinstance(x, list) for x in (prompt, chosen, rejected)):
        prompt, chosen, rejected = (_as_messages(prompt, "user"), _as_messages(chosen, "assistant"),
                                    _as_messages(rejected, "assistant"))
    out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if "tools" in row:
        out["tools"] = row["tools"]
    return out, []


def validate_pair_row(row: dict) -> list[tuple[str, str]]:
    """Problems with a preference row (empty when valid); see :func:`normalize_pair_row`."""
    norm, problems = normalize_pair_row(row)
    if problems:
        return problems
    seen = set()
    for side in ("chosen", "rejected"):
        sub = {"prompt": norm["prompt"], "completion": norm[side]}
        if "tools" in norm:
            sub["tools"] = norm["tools"]
        for f, msg in validate_sft_row(sub):
            f = f.replace("completion", side, 1) if f.startswith("completion") else f
            msg = msg.replace("the completion", f"the {side} answer").replace("empty completion", f"empty {side}")
            if (f, msg) not in seen:
                seen.add((f, msg))
                problems.append((f, msg))
    if not problems and norm["chosen"] == norm["rejected"]:
        problems.append(("rejected", "identical to chosen (a pair must differ)"))
    return problems


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


def tokenize_pairs_file(path: str | Path, renderer: Renderer, *, max_seq_len: int, overflow: str = "truncate",
                        skip_bad_rows: bool = False, shard: tuple[int, int] | None = None,
                        limit: int | None = None) -> tuple[list[PairExample], DataStats]:
    """Read, validate and render a JSONL file of preference pairs.

    Same contract as :func:`tokenize_file`. ``max_seq_len`` applies to each
    side (prompt + completion); a truncated side keeps its prompt and the
    start of its completion, and a pair is dropped when either side has no
    completion tokens left. ``stats.lengths`` holds both sides' lengths.
    """
    if overflow not in ("truncate", "drop"):
        raise MlxpostError(f"data.overflow must be 'truncate' or 'drop', got {overflow!r}")
    stats = DataStats()
    issues: list[RowIssue] = []
    pairs: list[PairExample] = []
    path = Path(path)
    for line, row, index in _rows_to_render(path, validate_pair_row, stats, issues, shard, limit):
        try:
            (ci, cm), (ri, rm), fmt = render_pair(renderer, row)
        except Exception as e:  # noqa: BLE001
            issues.append(_render_issue(path, line, e))
            continue
        if ci == ri and cm == rm:
            issues.append(RowIssue(str(path), line, "rejected", "renders to the same tokens as chosen"))
            continue
        stats.formats[fmt] += 1
        too_long = len(ci) > max_seq_len or len(ri) > max_seq_len
        if too_long and overflow == "drop":
            stats.dropped_too_long += 1
            continue
        if too_long:
            stats.truncated += 1
        ci, cm, ri, rm = ci[:max_seq_len], cm[:max_seq_len], ri[:max_seq_len], rm[:max_seq_len]
        src = f"{path}:{line}"
        c = Example(np.asarray(ci, np.int32), np.asarray(cm, bool), src, index)
        r = Example(np.asarray(ri, np.int32), np.asarray(rm, bool), src, index)
        if c.n_targets == 0 or r.n_targets == 0:
            stats.dropped_no_targets += 1
            continue
        if ci == ri:  # the answers differed only beyond data.max_seq_len
            stats.dropped_identical += 1
            continue
        stats.lengths += [len(c), len(r)]
        stats.targets += c.n_targets + r.n_targets
        pairs.append(PairExample(c, r, src, index))
    _finish(issues, stats, renderer, skip_bad_rows)
    return pairs, stats


def split_examples(examples: list[Example], fraction: float, seed: int,
                   total: int | None = None) -> tuple[list[Example], list[Example]]:
    """Hold out ``fraction`` of the rows (at least one) for validation.

    The held-out rows are chosen by row index among ``total`` valid rows, so
    ranks that each hold a shard of the examples agree on the split.
    """
    if not 0 < fraction < 1:
        raise MlxpostError(f"data.valid_fraction must be between 0 and 1, got {fraction}")
    total = len(examples) if total is None else total
    n_valid = max(1, int(math.floor(total * fraction)))
    if n_valid >= total:
        raise MlxpostError(f"only {total} examples: too few to hold out a validation split")
    held = set(np.random.default_rng(seed).permutation(total)[:n_valid].tolist())
    keys = [e.index if e.index >= 0 else i for i, e in enumerate(examples)]
    valid = [e for e, k in zip(examples, keys) if k in held]
    train = [e for e, k in zip(examples, keys) if k not in held]
    return train, valid
