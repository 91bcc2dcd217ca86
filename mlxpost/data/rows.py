"""Row formats and their validation: every problem named by its field.

Supported JSONL rows (one JSON object per line):

* ``{"messages": [{"role": ..., "content": ...}, ...], "tools": [...]}`` —
  multi-turn chat. Optional leading ``system`` message, optional ``tools``
  (passed to the chat template) and ``tool`` turns after an assistant turn
  with ``tool_calls``. Every assistant turn is trained on.
* ``{"prompt": ..., "completion": ...}`` — strings (rendered as one user turn
  and one assistant turn when the tokenizer has a chat template, otherwise as
  plain text) or message lists. Only the completion is trained on.
* ``{"text": ...}`` — plain text; every token is trained on.
* preference pairs ``{"prompt", "chosen", "rejected"}`` (:func:`normalize_pair_row`);
* prompts for online RL ``{"prompt", ...other columns}`` (:func:`validate_prompt_row`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

from ..errors import MlxpostError, RowIssue

ROLES = ("system", "user", "assistant", "tool")


# Limits on one row. Data files are untrusted input: a row nested thousands of
# levels deep would overflow the parser's (and every later walker's) recursion,
# and one enormous line would be read into memory whole.
MAX_JSON_DEPTH = 100  # real rows (chats with tool calls) nest fewer than 10 levels
MAX_LINE_BYTES = 16 << 20  # 16 MiB: far beyond any training example's length

BOM = b"\xef\xbb\xbf"


def json_depth(obj: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of lists and dicts in ``obj`` (a scalar is 0), counted without recursion up to ``limit + 1``.

    >>> json_depth({"messages": [{"role": "user", "content": "hi"}]})
    3
    >>> json_depth("text"), json_depth([[[[]]]], limit=2)
    (0, 3)
    """
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        if not isinstance(node, (list, dict)):
            continue
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        stack.extend((v, d + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def value_problem(value: Any, text: str | None = None, limit: int = MAX_JSON_DEPTH) -> str | None:
    r"""Why a parsed JSON value cannot be a row: nested deeper than ``limit``, or a string with a lone surrogate.

    JSON may spell half of a UTF-16 surrogate pair (``"\ud800"``); Python
    keeps it, and the tokenizer or any UTF-8 writer fails on it later with a
    message that names no row. ``text``: the JSON text, to skip the walk
    when it has no surrogate escape at all (the usual case).

    >>> value_problem({"text": "\ud800 half an emoji"})
    'a string holds a lone surrogate (\\ud800), which is not valid Unicode'
    >>> value_problem(json.loads('{"text": "\\ud83d\\ude00"}')) is None  # a whole pair: JSON reads one character
    True
    """
    if json_depth(value, limit) > limit:
        return f"nested deeper than {limit} levels"
    if text is not None and not _SURROGATE_ESCAPE.search(text):
        return None
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError as e:
                bad = node[e.start:e.end]
                return f"a string holds a lone surrogate ({bad.encode('unicode_escape').decode()}), which is not valid Unicode"
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


def parse_json_row(text: str | bytes, limit: int = MAX_JSON_DEPTH) -> tuple[Any, str | None]:
    """``(value, None)``, or ``(None, problem)`` when ``text`` is not JSON or not a possible row
    (:func:`value_problem`).

    >>> parse_json_row('{"text": "hi"}')
    ({'text': 'hi'}, None)
    >>> parse_json_row("[" * 5 + "]" * 5, limit=3)
    (None, 'nested deeper than 3 levels')
    >>> parse_json_row('{"text": ')[1]
    'not valid JSON (Expecting value at column 10)'
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg} at column {e.colno})"
    except RecursionError:  # deeper than the parser's own limit (~1000 levels)
        return None, f"nested deeper than {limit} levels"
    problem = value_problem(value, text if isinstance(text, str) else text.decode("utf-8", "replace"), limit)
    return (None, problem) if problem else (value, None)


def _lines(f, limit: int) -> Iterator[tuple[int, bytes | None]]:
    """``(line number, raw line)``; ``None`` for a line longer than ``limit`` bytes (whose rest is skipped unread)."""
    i = 0
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            return
        i += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            yield i, None
        else:
            yield i, raw


def _check_start(path: Path, head: bytes) -> None:
    """File-level problems that would otherwise show as one error per line."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise MlxpostError(f"{path}: this file is UTF-16 text; save it as UTF-8")
    if head.removeprefix(BOM).lstrip().startswith(b"["):
        raise MlxpostError(f"{path}: this is one JSON array, not JSON Lines; write one object per line "
                           "(e.g. python -c \"import json,sys; [print(json.dumps(r)) for r in "
                           "json.load(open(sys.argv[1]))]\" FILE > FILE.jsonl)")


def read_jsonl(path: str | Path, *, max_line_bytes: int = MAX_LINE_BYTES,
               max_depth: int = MAX_JSON_DEPTH) -> Iterator[tuple[int, Any, RowIssue | None]]:
    """Yield ``(line_number, row, issue)`` for each non-blank line (1-based).

    A UTF-8 byte-order mark at the start of the file (some editors write one)
    is skipped. A line that is not UTF-8, not JSON, not an object, longer
    than ``max_line_bytes`` or nested deeper than ``max_depth`` gives an issue
    for that line instead of a row; nothing else is raised for a line's content.
    """
    path = Path(path)
    with open(path, "rb") as f:
        _check_start(path, f.read(64))
        f.seek(0)
        for i, raw in _lines(f, max_line_bytes):
            if raw is None:
                yield i, None, RowIssue(str(path), i, "", f"line longer than {max_line_bytes:,} bytes")
                continue
            if i == 1:
                raw = raw.removeprefix(BOM)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield i, None, RowIssue(str(path), i, "", f"not UTF-8 text (byte {e.start + 1})")
                continue
            if not line.strip():
                continue
            row, problem = parse_json_row(line, max_depth)
            if problem is not None:
                yield i, None, RowIssue(str(path), i, "", problem)
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
    (One loop over the turns holds every rule, so that the first broken rule
    of a turn is the one reported.)
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
    (Long on purpose: every accepted form and every way a row can be wrong
    are read in one place, in the order a row is checked.)

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


def validate_prompt_row(row: dict) -> list[tuple[str, str]]:
    if "prompt" not in row:
        return [("prompt", "missing: each row needs a 'prompt' (a string or a list of messages)")]
    p = row["prompt"]
    if isinstance(p, str):
        return [("prompt", "empty")] if not p.strip() else []
    if isinstance(p, list):
        problems = validate_messages(p, "prompt", require_assistant=False)
        if not problems and p and p[-1].get("role") == "assistant":
            problems.append((f"prompt[{len(p) - 1}].role", "the prompt must not end with an assistant turn "
                                                             "(the model writes that)"))
        return problems
    return [("prompt", f"expected a string or a list of messages, got {type(p).__name__}")]
