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

import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .data import read_jsonl, validate_pair_row, validate_sft_row
from .errors import DataError, MlxpostError, RowIssue

STAGING_DIR = ".hub"
MAX_SHARD_BYTES = 256 * 2**20  # of JSON text per Parquet shard
DEFAULT_ENDPOINT = "https://huggingface.co"
SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".npz", ".pt", ".pth")
MODEL_DELETE_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.gguf", "*.bin")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class PushResult:
    repo: str
    repo_type: str
    url: str
    commit_url: str | None
    uploaded: list[str] = field(default_factory=list)  # files sent in the commit
    unchanged: list[str] = field(default_factory=list)  # files the Hub already had
    deleted: list[str] = field(default_factory=list)  # stale remote files removed
    staged: Path | None = None


# ---------------------------------------------------------------------------
# Staging a dataset: Parquet shards + dataset card
# ---------------------------------------------------------------------------


@dataclass
class StagedDataset:
    folder: Path
    kind: str  # "sft" or "preference"
    splits: dict[str, dict]  # split -> {"source", "rows", "files", "num_bytes"}
    features: list[dict]

    @property
    def files(self) -> list[str]:
        return ["README.md"] + [f for s in self.splits.values() for f in s["files"]]


def _pyarrow():
    from .datasets import _pyarrow as load

    return load()


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
    pa, _ = _pyarrow()
    names = {pa.string(): "string", pa.large_string(): "large_string", pa.bool_(): "bool", pa.float64(): "float64",
             pa.float32(): "float32", pa.float16(): "float16", pa.null(): "null", pa.binary(): "binary"}
    for w in (8, 16, 32, 64):
        names[getattr(pa, f"int{w}")()] = f"int{w}"
        names[getattr(pa, f"uint{w}")()] = f"uint{w}"
    return names.get(t, str(t))


def _inner(t):
    """The value of a ``list:`` entry in a dataset card's features."""
    pa, _ = _pyarrow()
    if pa.types.is_struct(t):
        return [{"name": t.field(i).name, **_feature(t.field(i).type)} for i in range(t.num_fields)]
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return {"list": _inner(t.value_type)}
    return _dtype(t)


def _feature(t) -> dict:
    pa, _ = _pyarrow()
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


def stage_dataset(folder: str | Path, repo: str | None = None, *,
                  max_shard_bytes: int = MAX_SHARD_BYTES) -> StagedDataset:
    """Write ``folder/.hub/``: Parquet shards of every split and the dataset card. Returns what was written."""
    pa, pq = _pyarrow()
    folder = Path(folder)
    if not folder.is_dir():
        raise MlxpostError(f"{folder}: not a directory")
    sources = _dataset_files(folder)

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
        import shutil

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
    from .datasets import CONVERSION_FILE

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
    lines = ["---", yaml.safe_dump(header, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
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


# ---------------------------------------------------------------------------
# Uploading
# ---------------------------------------------------------------------------


def hub_endpoint(endpoint: str | None = None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_token() -> str:
    """``HF_TOKEN``, else the token saved by ``hf auth login``; an error when there is none."""
    import huggingface_hub

    token = huggingface_hub.get_token()
    if not token:
        raise MlxpostError("no Hugging Face token: set HF_TOKEN to a token with write access "
                           "(https://huggingface.co/settings/tokens) or run `hf auth login`")
    return token


def check_repo_id(repo: str) -> None:
    if not _REPO_ID.match(repo or "") or ".." in repo or repo.endswith((".", "-")):
        raise MlxpostError(f"--repo {repo!r}: expected NAMESPACE/NAME (your user or organization, then the repo "
                           "name: letters, digits, '-', '_', '.')")


_NETWORK_ERRORS = {"ConnectError", "ConnectTimeout", "ConnectionError", "NetworkError", "TransportError",
                   "TimeoutException", "ReadTimeout", "Timeout", "RemoteProtocolError", "ProxyError", "SSLError"}


def _network_error(e: BaseException) -> BaseException | None:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError)) or {c.__name__ for c in type(e).__mro__} & _NETWORK_ERRORS:
            return e
        e = e.__cause__ or e.__context__
    return None


def _one_line(text: Any, limit: int = 200) -> str:
    s = " ".join(str(text).split())
    return s[:limit] + "..." if len(s) > limit else s


def explain_upload_error(e: BaseException, *, repo: str, repo_type: str, endpoint: str, folder: Path,
                         token: str | None = None) -> MlxpostError | None:
    """A one-line message for a failed upload, or None when ``e`` is not an upload failure."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    tail = f"nothing in {folder} was changed; run the same command again to retry"
    where = f"{repo_type} repo {repo}"
    if isinstance(e, OfflineModeIsEnabled):
        msg = f"HF_HUB_OFFLINE is set, so nothing can be uploaded: unset it, then run the same command again ({tail})"
    elif isinstance(e, HfHubHTTPError) and getattr(e, "response", None) is not None:
        status = e.response.status_code
        server = _one_line(getattr(e, "server_message", None) or "", 160)
        said = f": {server}" if server else ""
        if status == 401:
            msg = (f"the Hub at {endpoint} rejected the token (401 Unauthorized{said}): it is invalid or expired; "
                   f"set HF_TOKEN to a token with write access or run `hf auth login` ({tail})")
        elif status == 403:
            msg = (f"no write access to {where} (403 Forbidden{said}): it belongs to another user or organization, "
                   f"or the token is read-only; push to a repo under your own namespace or use a token with "
                   f"write access ({tail})")
        elif status == 404:
            msg = f"{where} not found (404{said}): check the name and the token's permissions ({tail})"
        else:
            msg = f"the Hub refused the upload to {where} ({status}{said}) ({tail})"
    elif (net := _network_error(e)) is not None:
        msg = f"cannot reach the Hub at {endpoint} ({type(net).__name__}: {_one_line(net, 120)}); {tail}"
    elif isinstance(e, ValueError) and "metadata" in str(e).lower():
        msg = f"the Hub refused README.md's metadata: {_one_line(e)} ({tail})"
    else:
        return None
    if token:
        msg = msg.replace(token, "***")
    return MlxpostError(msg)


def local_files(folder: Path, exclude: tuple[str, ...] = ()) -> list[str]:
    """Files to upload, as POSIX paths relative to ``folder``: hidden files and ``exclude`` folders left out."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(s.startswith(".") for s in rel.parts) and rel.parts[0] not in exclude:
            out.append(rel.as_posix())
    return out


def _ensure_repo(api, repo: str, repo_type: str, private: bool, endpoint: str) -> str:
    """Create ``repo`` unless it exists; its URL.

    Like ``create_repo(exist_ok=True)``, written out: when creating is refused
    (401/403: no right to create in that namespace) but the repo exists and
    can be read, go on: the commit then says whether the token may write
    there. (huggingface_hub's own fallback builds a URL that a custom
    HF_ENDPOINT set after import cannot parse.)
    """
    from huggingface_hub.errors import HfHubHTTPError

    prefix = "" if repo_type == "model" else f"{repo_type}s/"
    try:
        return str(api.create_repo(repo, repo_type=repo_type, private=True if private else None))
    except HfHubHTTPError as e:
        status = e.response.status_code if getattr(e, "response", None) is not None else None
        if status == 409:  # already there
            return f"{endpoint}/{prefix}{repo}"
        if status not in (401, 402, 403):
            raise
        try:
            api.repo_info(repo, repo_type=repo_type)
        except HfHubHTTPError:
            raise e from None
        return f"{endpoint}/{prefix}{repo}"


def upload_folder(folder: str | Path, repo: str, *, repo_type: str, private: bool = False,
                  message: str | None = None, token: str | None = None, endpoint: str | None = None,
                  delete_patterns: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
                  report_folder: str | Path | None = None) -> PushResult:
    """Create ``repo`` if needed and commit every file of ``folder`` in one commit.

    Remote files matching ``delete_patterns`` that ``folder`` no longer has are
    deleted in the same commit. ``report_folder``: the folder named in error
    messages (the user's folder rather than the staging one).
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    folder = Path(folder)
    check_repo_id(repo)
    token = token or hub_token()
    endpoint = hub_endpoint(endpoint)
    files = local_files(folder, exclude)
    if not files:
        raise MlxpostError(f"{folder}: nothing to upload")
    api = HfApi(endpoint=endpoint, token=token)
    adds = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
    try:
        url = _ensure_repo(api, repo, repo_type, private, endpoint)
        stale = []
        if delete_patterns:
            remote = api.list_repo_files(repo, repo_type=repo_type)
            keep = set(files)
            stale = [p for p in remote if p not in keep and any(fnmatch.fnmatch(p, pat) for pat in delete_patterns)]
        ops = adds + [CommitOperationDelete(path_in_repo=p) for p in stale]
        info = api.create_commit(repo, ops, commit_message=message or "Upload with mlxpost", repo_type=repo_type)
    except Exception as e:  # noqa: BLE001 - mapped to one line below, or re-raised as is
        err = explain_upload_error(e, repo=repo, repo_type=repo_type, endpoint=endpoint,
                                   folder=Path(report_folder or folder), token=token)
        if err is None:
            raise
        raise err from None

    def same(op) -> bool:
        try:
            return op._remote_oid is not None and op._remote_oid == op._local_oid
        except Exception:  # noqa: BLE001 - internals of another huggingface_hub version
            return False

    unchanged = [op.path_in_repo for op in adds if same(op)]
    return PushResult(repo=repo, repo_type=repo_type, url=str(url), commit_url=getattr(info, "commit_url", None),
                      uploaded=[f for f in files if f not in set(unchanged)], unchanged=unchanged, deleted=stale)


def push_dataset(folder: str | Path, repo: str, *, private: bool = False, message: str | None = None,
                 token: str | None = None, endpoint: str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES,
                 log: Callable[[str], None] | None = None) -> PushResult:
    """Stage ``folder`` (Parquet shards + card in ``folder/.hub``) and upload it as a dataset repo."""
    log = log or (lambda msg: None)
    folder = Path(folder)
    check_repo_id(repo)
    token = token or hub_token()
    staged = stage_dataset(folder, repo, max_shard_bytes=max_shard_bytes)
    rows = ", ".join(f"{s} {info['rows']}" for s, info in staged.splits.items())
    log(f"staged {len(staged.files) - 1} Parquet file(s) and README.md in {staged.folder} ({rows} rows)")
    log(f"uploading to {hub_endpoint(endpoint)}/datasets/{repo} ...")
    result = upload_folder(staged.folder, repo, repo_type="dataset", private=private,
                           message=message or f"Upload {staged.kind} dataset with mlxpost ({rows} rows)",
                           token=token, endpoint=endpoint, delete_patterns=("data/*",), report_folder=folder)
    result.staged = staged.folder
    return result


def find_export(run_dir: str | Path) -> Path | None:
    """The model export folder of ``run_dir``: itself, or its one subfolder with a README.md and weights."""
    run_dir = Path(run_dir)

    def is_export(d: Path) -> bool:
        return (d / "README.md").is_file() and any(p.suffix in WEIGHT_SUFFIXES for p in d.iterdir() if p.is_file())

    if is_export(run_dir):
        return run_dir
    found = [d for d in sorted(run_dir.iterdir()) if d.is_dir() and not d.name.startswith(".")
             and d.name not in ("checkpoints", "best") and is_export(d)]
    if len(found) > 1:
        raise MlxpostError(f"{run_dir} holds several exports ({', '.join(d.name for d in found)}); "
                           "pass the one to push")
    return found[0] if found else None


def push_model(run_dir: str | Path, repo: str, *, fmt: str | None = None, best: bool = False,
               private: bool = False, message: str | None = None, token: str | None = None,
               endpoint: str | None = None, log: Callable[[str], None] | None = None) -> PushResult:
    """Upload a model export as a model repo.

    ``run_dir`` is an export folder (README.md model card + weights), or a run
    directory holding one. With ``fmt`` (``peft``, ``fused`` or ``mlx``) the
    run is exported now, with :func:`mlxpost.export.export`, into a temporary
    folder that is pushed and then removed.
    """
    log = log or (lambda msg: None)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MlxpostError(f"{run_dir}: not a directory")
    check_repo_id(repo)
    token = token or hub_token()
    kwargs = dict(repo_type="model", private=private, message=message or "Upload model with mlxpost", token=token,
                  endpoint=endpoint, delete_patterns=MODEL_DELETE_PATTERNS, exclude=("checkpoints",),
                  report_folder=run_dir)
    if fmt is not None:
        try:
            from .export import export
        except ImportError:
            raise MlxpostError("this mlxpost cannot export (no mlxpost.export); push an export folder instead") from None
        import tempfile

        with tempfile.TemporaryDirectory(prefix="mlxpost-push-") as tmp:
            out = Path(tmp) / "export"
            log(f"exporting {run_dir}{' (best/)' if best else ''} as {fmt} to a temporary folder ...")
            export(run_dir, fmt, out, best=best)
            log(f"uploading the {fmt} export to {hub_endpoint(endpoint)}/{repo} ...")
            return upload_folder(out, repo, **kwargs)
    found = find_export(run_dir)
    if found is None:
        raise MlxpostError(f"{run_dir} has no export to push (a folder with a README.md model card and weights): "
                           f"pass --format peft|fused|mlx to export it now, or run `mlxpost export {run_dir} "
                           "--format peft --out DIR` and push DIR")
    log(f"uploading {found} to {hub_endpoint(endpoint)}/{repo} ...")
    return upload_folder(found, repo, **kwargs)
