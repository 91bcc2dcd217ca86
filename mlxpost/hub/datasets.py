"""Uploads to the Hugging Face Hub: datasets (Parquet shards + a dataset card) and model folders.

``mlxpost data push DIR --repo user/name`` stages ``DIR/.hub/``: one config
(``default``) with a split per JSONL file of ``DIR`` (``train.jsonl`` ->
``train``, ``valid.jsonl`` -> ``validation``, ...) written as
``data/<split>-0000i-of-0000n.parquet`` shards, and a ``README.md`` dataset
card whose YAML header declares the configs, features and splits (the layout
``datasets.load_dataset`` reads). ``DIR`` itself is never modified apart from
``DIR/.hub/``, which is rebuilt on every push.

``mlxpost push RUN_DIR --repo user/name`` uploads a model export folder
(``README.md`` model card + weights) as a model repo.

Both go through :func:`upload_folder`: ``create_repo`` (an existing repo is fine), then
one ``create_commit`` with every file (files the Hub already has with the same
content are skipped by huggingface_hub, so re-running a push is safe and a
failed push can simply be run again), deleting stale remote files that match
``delete_patterns`` (old shards). The endpoint is ``HF_ENDPOINT`` (default
https://huggingface.co); the token is ``HF_TOKEN`` or the one saved by
``hf auth login`` (:func:`huggingface_hub.get_token`). The token is never
printed or logged; every failure becomes a one-line :class:`MlxpostError`.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import DatasetCardData

from ..data.convert import CONVERSION_FILE, pyarrow_modules
from ..data.rows import read_jsonl, validate_pair_row, validate_sft_row
from ..errors import DataError, MlxpostError, RowIssue

STAGING_DIR = ".hub"

MAX_SHARD_BYTES = 256 * 2**20  # of JSON text per Parquet shard

SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}


@dataclass
class StagedDataset:
    folder: Path
    kind: str  # "sft" or "preference"
    splits: dict[str, dict]  # split -> {"source", "rows", "files", "num_bytes"}
    features: list[dict]

    @property
    def files(self) -> list[str]:
        return ["README.md"] + [f for s in self.splits.values() for f in s["files"]]


def split_name(stem: str) -> str:
    name = SPLIT_ALIASES.get(stem.lower(), stem)
    if not re.fullmatch(r"\w+", name):
        raise MlxpostError(f"{stem}.jsonl: a split name must be letters, digits and underscores")
    return name


def _dataset_files(folder: Path) -> dict[str, Path]:
    files = sorted(p for p in folder.glob("*.jsonl") if p.is_file())
    if not files:
        raise MlxpostError(f"{folder}: no .jsonl files to push (run mlxpost data convert first)")
    splits: dict[str, Path] = {}
    for p in files:
        name = split_name(p.stem)
        if name in splits:
            raise MlxpostError(f"{folder}: {splits[name].name} and {p.name} would both be split {name!r}")
        splits[name] = p
    order = {"train": 0, "validation": 1, "test": 2}
    return dict(sorted(splits.items(), key=lambda kv: (order.get(kv[0], 3), kv[0])))


def _kind_of(value: Any) -> str:
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _check_column_types(rows: list[tuple[dict, str, int]]) -> None:
    """Parquet holds one type per column: name the first two rows that disagree."""
    first: dict[str, tuple[str, str, int]] = {}
    for row, path, line in rows:
        for k, v in row.items():
            if v is None:
                continue
            kind = _kind_of(v)
            if k not in first:
                first[k] = (kind, path, line)
            elif first[k][0] != kind:
                k0, p0, l0 = first[k]
                raise MlxpostError(f"{path}:{line}: {k}: {kind}, but {Path(p0).name}:{l0} has {k0}; a Parquet column "
                                   "holds one type (run mlxpost data convert to write every row the same way)")


def _dtype(t) -> str:
    pa, _ = pyarrow_modules()
    names = {pa.string(): "string", pa.large_string(): "large_string", pa.bool_(): "bool", pa.float64(): "float64",
             pa.float32(): "float32", pa.float16(): "float16", pa.null(): "null", pa.binary(): "binary"}
    for w in (8, 16, 32, 64):
        names[getattr(pa, f"int{w}")()] = f"int{w}"
        names[getattr(pa, f"uint{w}")()] = f"uint{w}"
    return names.get(t, str(t))


def _inner(t):
    """The value of a ``list:`` entry in a dataset card's features."""
    pa, _ = pyarrow_modules()
    if pa.types.is_struct(t):
        return [{"name": t.field(i).name, **_feature(t.field(i).type)} for i in range(t.num_fields)]
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return {"list": _inner(t.value_type)}
    return _dtype(t)


def _feature(t) -> dict:
    pa, _ = pyarrow_modules()
    if pa.types.is_struct(t):
        return {"struct": _inner(t)}
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return {"list": _inner(t.value_type)}
    return {"dtype": _dtype(t)}


def card_features(schema) -> list[dict]:
    """A Parquet schema as the ``dataset_info.features`` list of a dataset card (as ``datasets`` writes it)."""
    return [{"name": f.name, **_feature(f.type)} for f in schema]


def _shards(rows: list[dict], max_bytes: int) -> list[tuple[int, int]]:
    bounds, start, size = [], 0, 0
    for i, r in enumerate(rows):
        n = len(json.dumps(r, ensure_ascii=False).encode())
        if i > start and size + n > max_bytes:
            bounds.append((start, i))
            start, size = i, 0
        size += n
    bounds.append((start, len(rows)))
    return bounds


def _read_splits(sources: dict[str, Path]) -> tuple[dict[str, list], bool]:
    """Every split's valid rows (row, file, line), and whether they are preference pairs; bad rows stop it all."""
    rows_by_split: dict[str, list[tuple[dict, str, int]]] = {}
    issues: list[RowIssue] = []
    total = 0
    preference = None
    for split, path in sources.items():
        got = []
        for line, row, issue in read_jsonl(path):
            total += 1
            if issue is not None:
                issues.append(issue)
                continue
            if preference is None:
                preference = "chosen" in row or "rejected" in row
            problems = (validate_pair_row if preference else validate_sft_row)(row)
            issues += [RowIssue(str(path), line, f, msg) for f, msg in problems]
            if not problems:
                got.append((row, str(path), line))
        if got:
            rows_by_split[split] = got
    if issues:
        raise DataError(issues, total, hint="Fix these rows before pushing (mlxpost data convert writes valid rows).")
    return rows_by_split, bool(preference)


def stage_dataset(folder: str | Path, repo: str | None = None, *,
                  max_shard_bytes: int = MAX_SHARD_BYTES) -> StagedDataset:
    """Write ``folder/.hub/``: Parquet shards of every split and the dataset card. Returns what was written."""
    pa, pq = pyarrow_modules()
    folder = Path(folder)
    if not folder.is_dir():
        raise MlxpostError(f"{folder}: not a directory")
    sources = _dataset_files(folder)
    rows_by_split, preference = _read_splits(sources)
    if not rows_by_split:
        raise MlxpostError(f"{folder}: the .jsonl files hold no rows")
    every = [x for rows in rows_by_split.values() for x in rows]
    _check_column_types(every)
    try:
        schema = pa.Table.from_pylist([r for r, _, _ in every]).schema
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise MlxpostError(f"{folder}: these rows cannot be written as Parquet: {e}") from None

    staging = folder / STAGING_DIR
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "data").mkdir(parents=True)
    splits: dict[str, dict] = {}
    for split, got in rows_by_split.items():
        rows = [r for r, _, _ in got]
        bounds = _shards(rows, max_shard_bytes)
        files, nbytes = [], 0
        for i, (a, b) in enumerate(bounds):
            try:
                table = pa.Table.from_pylist(rows[a:b], schema=schema)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                raise MlxpostError(f"{sources[split]}: rows {a + 1}-{b} cannot be written as Parquet: {e}") from None
            name = f"data/{split}-{i:05d}-of-{len(bounds):05d}.parquet"
            pq.write_table(table, staging / name)
            files.append(name)
            nbytes += table.nbytes
        splits[split] = {"source": sources[split].name, "rows": len(rows), "files": files, "num_bytes": nbytes}
    staged = StagedDataset(staging, "preference" if preference else "sft", splits, card_features(schema))
    card = dataset_card(staged, repo, _read_conversion(folder))
    (staging / "README.md").write_text(card, encoding="utf-8")
    return staged


def _read_conversion(folder: Path) -> dict | None:
    p = folder / CONVERSION_FILE
    if not p.exists():
        return None
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def dataset_card(staged: StagedDataset, repo: str | None, conversion: dict | None) -> str:
    """The README.md of a pushed dataset: YAML header (configs, dataset_info) and how it was made."""
    data_files = [{"split": s, "path": f"data/{s}-*"} for s in staged.splits]
    download = sum((staged.folder / f).stat().st_size for s in staged.splits.values() for f in s["files"])
    header = {
        "configs": [{"config_name": "default", "data_files": data_files}],
        "dataset_info": {
            "features": staged.features,
            "splits": [{"name": s, "num_bytes": info["num_bytes"], "num_examples": info["rows"]}
                       for s, info in staged.splits.items()],
            "download_size": download,
            "dataset_size": sum(info["num_bytes"] for info in staged.splits.values()),
        },
        "task_categories": ["text-generation"],
        "tags": ["mlxpost", "sft" if staged.kind == "sft" else "dpo"],
    }
    title = repo or staged.folder.parent.name
    if staged.kind == "sft":
        what = ("Chat data for supervised fine-tuning: each row is a `messages` list of `{role, content}` turns; "
                "every assistant turn is a training target.")
    else:
        what = ("Preference pairs (DPO, ORPO, CPO, SimPO): each row has a `prompt` message list and the `chosen` "
                "and `rejected` answers as assistant message lists.")
    # DatasetCardData writes the header the Hub's card tooling expects (configs and dataset_info are its fields).
    lines = ["---", DatasetCardData(**header).to_yaml(), "---", "",
             f"# {title}", "", what, "", "| split | rows |", "|---|---|"]
    lines += [f"| {s} | {info['rows']} |" for s, info in staged.splits.items()]
    lines += ["", "## How it was made", ""]
    if conversion:
        for src in conversion.get("sources", []):
            lines.append(f"* source: `{src.get('file')}` (layout `{src.get('layout')}`, {src.get('rows')} rows)")
        if conversion.get("command"):
            lines.append(f"* converted with mlxpost: `{conversion['command']}`")
        out = sum(int(v) for v in conversion.get("splits", {}).values())
        lines.append(f"* {conversion.get('rows_in')} rows in, {out} out")
        for reason, n in (conversion.get("dropped") or {}).items():
            lines.append(f"* dropped ({reason}): {n}")
        if conversion.get("split"):
            lines.append(f"* test split: {conversion['split']:g} of the rows, chosen with seed "
                         f"{conversion.get('seed', 0)}")
        tokens = conversion.get("tokens")
        if tokens:
            lines.append(f"* tokens per row under `{tokens.get('tokenizer')}`'s chat template: "
                         f"p50 {tokens.get('p50')}, p90 {tokens.get('p90')}, p99 {tokens.get('p99')}, "
                         f"max {tokens.get('max')}")
    else:
        srcs = ", ".join(f"`{info['source']}`" for info in staged.splits.values())
        lines.append(f"* pushed with `mlxpost data push` from {srcs}")
    lines += ["* every row passed mlxpost's own row checks", "", "## Use", "", "```python",
              "from datasets import load_dataset", "", f'ds = load_dataset("{title}")', "```", "",
              "To train with mlxpost, write a split back to JSON Lines "
              "(`ds[\"train\"].to_json(\"train.jsonl\")`) and pass it with `--data`.", ""]
    return "\n".join(lines)
