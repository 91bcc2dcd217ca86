"""Getting files from the Hugging Face Hub: is it reachable, and a model's snapshot."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import huggingface_hub.constants as hf_constants
from huggingface_hub import snapshot_download

from ..errors import MlxpostError


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers within ``timeout`` seconds.

    Offline mode (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``, as
    huggingface_hub reads them) counts as unreachable. Any HTTP answer counts
    as reachable (the endpoint is up; errors for the repo show up later).
    huggingface_hub reads its environment once, at import; the variables are
    read again here so that a change after import (tests, notebooks) counts too.
    """
    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().lower()
    if hf_constants.HF_HUB_OFFLINE or env in ("1", "true", "yes", "on"):
        return False
    endpoint = (os.environ.get("HF_ENDPOINT") or hf_constants.ENDPOINT).rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
        return True
    except urllib.error.HTTPError as e:
        return e.code < 500
    except (OSError, ValueError):  # URLError, timeouts, refused, bad endpoint
        return False


def download_model(repo: str, revision: str | None = None) -> Path:
    patterns = ["*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as e:  # offline, no such repo, gated, ...
        try:  # already in the local Hugging Face cache?
            return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, local_files_only=True))
        except Exception:
            pass
        raise MlxpostError(
            f"could not get model {repo!r} from the Hugging Face Hub ({type(e).__name__}: {str(e)[:200]}).\n"
            "Pass a local Hugging Face model directory or a .gguf file instead, or check the name / your network."
        ) from None
