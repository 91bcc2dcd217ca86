"""Hub datasets as ``--data hf:ORG/NAME[:CONFIG][@SPLIT]``.

The dataset repository's data files (``*.parquet``, ``*.jsonl``, ``*.json``)
are downloaded with huggingface_hub's ``snapshot_download`` into the usual
Hugging Face cache (``HF_HOME``, ``HF_ENDPOINT``, ``HF_TOKEN`` and offline
mode all apply; a second run downloads nothing). A split's files are those
whose path names it the way the Hub's own layouts do
(``data/train-00000-of-00002.parquet``, ``CONFIG/validation.jsonl``,
``train.jsonl``); ``CONFIG`` picks the files under that folder (or whose
name starts with it); without it, the files under ``data/`` and at the top
level (other folders being named configs).

The rows then go through ``data convert`` (:func:`mlxpost.data.convert.convert`):
alpaca, sharegpt, openai, hh-rlhf and ultrafeedback layouts become mlxpost
rows, every row is checked, and the result is cached under
``<cache>/hf-data/ORG--NAME/<commit>/<config>/<split>/train.jsonl`` (keyed by
the repository's commit, so a new revision is converted again). Errors name
the downloaded file and its row, like those of local files.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

from ..errors import MlxpostError
from ..files import cache_root
from .convert import convert

PREFIX = "hf:"

_SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "dev"), "test": ("test",)}
_DATA_SUFFIXES = (".parquet", ".jsonl", ".json")


@dataclass(frozen=True)
class HubData:
    repo_id: str
    config: str | None
    split: str | None  # None: train


def parse_spec(spec: str) -> HubData:
    """``hf:ORG/NAME[:CONFIG][@SPLIT]`` -> its parts.

    >>> parse_spec("hf:someone/chats:en@validation")
    HubData(repo_id='someone/chats', config='en', split='validation')
    >>> parse_spec("hf:someone/chats").split is None
    True
    """
    m = re.fullmatch(r"hf:([\w.-]+/[\w.-]+)(?::([\w.-]+))?(?:@([\w.-]+))?", spec.strip())
    if m is None:
        raise MlxpostError(f"--data {spec}: expected hf:ORG/NAME, hf:ORG/NAME:CONFIG or hf:ORG/NAME[:CONFIG]@SPLIT")
    return HubData(m.group(1), m.group(2), m.group(3))


def split_of(path: str) -> str | None:
    """The split a data file's repository path names (train / validation / test), else None.

    >>> [split_of(p) for p in ["data/train-00000-of-00002.parquet", "en/validation.jsonl", "dev.json", "x.json"]]
    ['train', 'validation', 'validation', None]
    """
    stem = Path(path).name.lower()
    parts = [p.lower() for p in Path(path).parts[:-1]]
    for split, names in _SPLIT_NAMES.items():
        for n in names:
            if re.match(rf"^{n}([-_.]|$)", stem) or n in parts:
                return split
    return None


def _snapshot(repo_id: str) -> tuple[Path, str]:
    try:
        local = Path(snapshot_download(repo_id, repo_type="dataset",
                                       allow_patterns=[f"*{s}" for s in _DATA_SUFFIXES]))
    except RepositoryNotFoundError:
        raise MlxpostError(f"hf:{repo_id}: no such dataset on the Hub (or it is private: set HF_TOKEN)") from None
    except LocalEntryNotFoundError as e:
        raise MlxpostError(f"hf:{repo_id}: not in the local Hugging Face cache and the Hub is unreachable "
                           f"or offline mode is on ({str(e).splitlines()[0]})") from None
    except HfHubHTTPError as e:
        raise MlxpostError(f"hf:{repo_id}: download failed ({str(e).splitlines()[0]})") from None
    return local, local.name  # snapshots/<commit>


def split_files(local: Path, spec: HubData) -> dict[str, list[Path]]:
    """The data files of each split in a downloaded dataset (``spec.config`` narrows them)."""
    files = [p for p in sorted(local.rglob("*")) if p.is_file() and p.suffix.lower() in _DATA_SUFFIXES
             and not any(s.startswith(".") for s in p.relative_to(local).parts)]
    if spec.config:
        rel = [p for p in files if p.relative_to(local).parts[0] == spec.config
               or p.name.startswith(spec.config + "_") or p.name.startswith(spec.config + "-")]
        if not rel:
            raise MlxpostError(f"hf:{spec.repo_id}: no data files for config {spec.config!r}")
        files = rel
    else:  # the default config: data/ and the top level (other folders are named configs)
        default = [p for p in files if len(p.relative_to(local).parts) == 1 or p.relative_to(local).parts[0] == "data"]
        files = default or files
    out: dict[str, list[Path]] = {}
    for p in files:
        split = split_of(str(p.relative_to(local)))
        if split is None and len(files) == 1:
            split = "train"  # one unnamed file: the training data
        if split is not None:
            out.setdefault(split, []).append(p)
    if not out:
        raise MlxpostError(f"hf:{spec.repo_id}: no file names a split (train, validation, test) among "
                           + ", ".join(str(p.relative_to(local)) for p in files[:5]))
    return out


def stage_split(spec_text: str, split: str | None = None) -> Path:
    """Download the dataset; return a folder of links to the files of ``split`` (default: the spec's, else train)."""
    spec = parse_spec(spec_text)
    local, commit = _snapshot(spec.repo_id)
    return _stage(spec, commit, split_files(local, spec), split or spec.split or "train")


def _stage(spec: HubData, commit: str, splits: dict[str, list[Path]], want: str) -> Path:
    if want not in splits:
        raise MlxpostError(f"hf:{spec.repo_id}: no split {want!r} (found: {', '.join(sorted(splits))})")
    stage = _cache_dir(spec, commit) / want / "files"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for i, p in enumerate(splits[want]):
        (stage / f"{i:05d}-{p.name}").symlink_to(p.resolve())
    return stage


def _cache_dir(spec: HubData, commit: str) -> Path:
    return cache_root() / "hf-data" / spec.repo_id.replace("/", "--") / commit / (spec.config or "default")


def hub_data_files(spec_text: str) -> dict[str, Path]:
    """``{"train": jsonl[, "valid": jsonl]}`` for ``--data hf:...``: the split (default train) converted to
    mlxpost rows, and the repository's validation split when it has one (and it is not the training split)."""
    spec = parse_spec(spec_text)
    local, commit = _snapshot(spec.repo_id)
    splits = split_files(local, spec)
    train_split = spec.split or "train"
    wanted = {"train": train_split}
    if "validation" in splits and train_split != "validation":
        wanted["valid"] = "validation"
    out: dict[str, Path] = {}
    for role, split in wanted.items():
        done = _cache_dir(spec, commit) / split / "rows"
        if not (done / "train.jsonl").exists():
            stage = _stage(spec, commit, splits, split)
            tmp = done.with_name("rows.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            convert(stage, tmp)
            shutil.rmtree(done, ignore_errors=True)
            tmp.rename(done)
        out[role] = done / "train.jsonl"
    return out
