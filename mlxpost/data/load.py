"""From data files to tokenized examples: file:line:field errors, truncation, validation splits.

:func:`tokenize_file` (SFT rows), :func:`tokenize_pairs_file` (preference
pairs) and :func:`load_prompts` (prompts for online RL) read a JSONL file,
validate every row (:mod:`mlxpost.data.load.rows`), render the valid ones
(:mod:`mlxpost.data.load.render`) and count what was truncated or dropped.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import DataError, MlxpostError, RowIssue
from .hub import PREFIX as HUB_PREFIX
from .hub import hub_data_files
from .render import Renderer, render_pair
from .rows import read_jsonl, validate_pair_row, validate_prompt_row, validate_sft_row


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


SPLIT_NAMES = {
    "train": ("train.jsonl",),
    "valid": ("valid.jsonl", "validation.jsonl", "val.jsonl", "dev.jsonl"),
    "test": ("test.jsonl",),
}


def resolve_data_files(data: str | Path, valid: str | Path | None = None) -> dict[str, Path]:
    """``data`` is a .jsonl file, a directory with train.jsonl (and valid.jsonl), or a Hub dataset
    ``hf:ORG/NAME[:CONFIG][@SPLIT]`` (:mod:`mlxpost.data.hub`: downloaded, converted, cached)."""
    if str(data).startswith(HUB_PREFIX):
        files = hub_data_files(str(data))
        if valid is not None:
            files["valid"] = resolve_data_files(files["train"], valid)["valid"]
        return files
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


@dataclass
class PromptRow:
    tokens: list  # the rendered prompt, generation prompt included
    text: str
    columns: dict  # every other column of the row (answer, numbers, ...)
    source: str  # file:line
    prompt: Any = None  # the row's prompt as given (a string or messages)
    index: int = -1  # position among the file's valid rows


def load_prompts(path: str | Path, renderer: Renderer, *, max_prompt_len: int, skip_bad_rows: bool = False,
                 limit: int | None = None) -> tuple[list[PromptRow], DataStats]:
    """Read a JSONL file of prompts (file:line:field errors for bad rows)."""
    path = Path(path)
    stats, issues, out = DataStats(), [], []
    for line, row, index in _rows_to_render(path, validate_prompt_row, stats, issues, None, limit):
        try:
            ids, text = renderer.prompt(row["prompt"])
        except Exception as e:  # noqa: BLE001 - a template error belongs to the row
            issues.append(RowIssue(str(path), line, "prompt", f"chat template failed: {type(e).__name__}: {e}"))
            continue
        if len(ids) > max_prompt_len:
            stats.dropped_too_long += 1
            continue
        cols = {k: v for k, v in row.items() if k != "prompt"}
        out.append(PromptRow(ids, text, cols, f"{path.name}:{line}", row["prompt"], index))
        stats.lengths.append(len(ids))
    _finish(issues, stats, renderer, skip_bad_rows)
    return out, stats
