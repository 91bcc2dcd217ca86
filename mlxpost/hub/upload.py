"""Uploads to the Hugging Face Hub: models (exports) and datasets, with errors a user can act on."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import huggingface_hub
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from ..errors import MlxpostError
from .datasets import MAX_SHARD_BYTES, stage_dataset
from .export import export

DEFAULT_ENDPOINT = "https://huggingface.co"

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".npz", ".pt", ".pth")

MODEL_DELETE_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.gguf", "*.bin")

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_NETWORK_ERRORS = {"ConnectError", "ConnectTimeout", "ConnectionError", "NetworkError", "TransportError",
                   "TimeoutException", "ReadTimeout", "Timeout", "RemoteProtocolError", "ProxyError", "SSLError"}


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


def hub_endpoint(endpoint: str | None = None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_token() -> str:
    """``HF_TOKEN``, else the token saved by ``hf auth login``; an error when there is none."""
    token = huggingface_hub.get_token()
    if not token:
        raise MlxpostError("no Hugging Face token: set HF_TOKEN to a token with write access "
                           "(https://huggingface.co/settings/tokens) or run `hf auth login`")
    return token


def check_repo_id(repo: str) -> None:
    if not _REPO_ID.match(repo or "") or ".." in repo or repo.endswith((".", "-")):
        raise MlxpostError(f"--repo {repo!r}: expected NAMESPACE/NAME (your user or organization, then the repo "
                           "name: letters, digits, '-', '_', '.')")


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
    there. Not ``create_repo(exist_ok=True)`` itself: in huggingface_hub
    2.4.0, its 401/402/403 branch returns ``RepoUrl(f"{self.endpoint}/...")``
    without ``endpoint=self.endpoint`` (the success path passes it), so the
    URL is parsed against ``constants.ENDPOINT`` (``HF_ENDPOINT`` as read at
    import) and raises ``HfUriError: ... Unrecognized host`` whenever the
    ``HfApi`` endpoint differs, e.g. ``HF_ENDPOINT`` set after import or a
    mirror. Checked by swapping this function for ``create_repo(...,
    exist_ok=True)``: tests/test_hub_upload.py::test_someone_elses_repo[False]
    and ::test_cli_push_error_is_one_line then fail with that error instead
    of the one-line "no write access" message. Use it once a release passes
    the endpoint in that branch (those two tests say when).
    """
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


def _unchanged(api, repo: str, repo_type: str, folder: Path, files: list[str]) -> list[str]:
    """The files whose content the repo already has (git blob id, or sha256 for LFS files), from the
    public tree listing; huggingface_hub skips uploading those itself."""
    try:
        remote = {f.path: f for f in api.list_repo_tree(repo, repo_type=repo_type, recursive=True)
                  if hasattr(f, "blob_id")}
    except HfHubHTTPError:
        return []
    same = []
    for rel in files:
        r = remote.get(rel)
        if r is None:
            continue
        data = (folder / rel).read_bytes()
        lfs = getattr(r, "lfs", None)
        if lfs is not None:
            if hashlib.sha256(data).hexdigest() == lfs.sha256:
                same.append(rel)
        elif hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == r.blob_id:
            same.append(rel)
    return same


def upload_folder(folder: str | Path, repo: str, *, repo_type: str, private: bool = False,
                  message: str | None = None, token: str | None = None, endpoint: str | None = None,
                  delete_patterns: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
                  report_folder: str | Path | None = None) -> PushResult:
    """Create ``repo`` if needed and commit every file of ``folder`` in one commit.

    Remote files matching ``delete_patterns`` that ``folder`` no longer has are
    deleted in the same commit. ``report_folder``: the folder named in error
    messages (the user's folder rather than the staging one).
    """
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
        unchanged = _unchanged(api, repo, repo_type, folder, files)
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
    run is exported now, with :func:`mlxpost.hub.export.export`, into a temporary
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
