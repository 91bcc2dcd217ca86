"""--data hf:ORG/NAME[:CONFIG][@SPLIT] against the local fake Hub (tests/fake_hub.py)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import huggingface_hub.constants as hf_constants
import pytest
from conftest import arithmetic_rows, mlxpost_env
from fake_hub import FakeHub

from mlxpost.data.hub import parse_spec
from mlxpost.data.load import resolve_data_files
from mlxpost.errors import MlxpostError


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def alpaca(n: int, seed: int) -> list[dict]:
    return [{"instruction": r["messages"][0]["content"], "input": "", "output": r["messages"][1]["content"]}
            for r in arithmetic_rows(n, seed)]


def parquet(rows) -> bytes:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    h = FakeHub(tokens={"tok": "alice"})
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    monkeypatch.setattr(hf_constants, "ENDPOINT", h.url)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", h.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("MLXPOST_CACHE", str(tmp_path / "mlxpost-cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    h.add_repo("dataset", "alice/chats", "alice", files={
        "README.md": b"# chats\n",
        "data/train-00000-of-00001.jsonl": jsonl(alpaca(20, 0)),
        "data/validation-00000-of-00001.jsonl": jsonl(alpaca(6, 1)),
        "en/train.parquet": parquet([r for r in arithmetic_rows(8, 2)]),
        "bad/train.jsonl": jsonl([{"messages": [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "ok"}]},
                                  {"messages": [{"role": "user", "content": "no reply"}]}]),
    })
    yield h
    h.close()


def test_spec_errors():
    with pytest.raises(MlxpostError, match="expected hf:ORG/NAME"):
        parse_spec("hf:justaname")


def test_hub_dataset_downloads_converts_and_caches(hub):
    files = resolve_data_files("hf:alice/chats")
    assert set(files) == {"train", "valid"}
    rows = [json.loads(line) for line in files["train"].read_text().splitlines()]
    assert len(rows) == 20 and rows[0]["messages"][0]["role"] == "user"  # alpaca became chat rows
    assert len(files["valid"].read_text().splitlines()) == 6
    downloads = [r for r in hub.requests if r.route == "resolve" and r.method == "GET"]
    assert downloads and all("/datasets/alice/chats/" in r.path for r in downloads)
    assert not any(r.path.endswith("README.md") for r in downloads)  # only data files

    n = len(hub.requests)
    assert resolve_data_files("hf:alice/chats") == files  # cached: no file downloaded again
    assert not [r for r in hub.requests[n:] if r.route == "resolve" and r.method == "GET"]

    en = resolve_data_files("hf:alice/chats:en")  # a config: its folder, parquet
    assert set(en) == {"train"} and len(en["train"].read_text().splitlines()) == 8
    val = resolve_data_files("hf:alice/chats@validation")
    assert set(val) == {"train"} and len(val["train"].read_text().splitlines()) == 6


def test_hub_dataset_errors_name_file_row_and_field(hub):
    with pytest.raises(MlxpostError, match=r"train\.jsonl:2.*messages"):
        resolve_data_files("hf:alice/chats:bad")
    with pytest.raises(MlxpostError, match="no split 'test'"):
        resolve_data_files("hf:alice/chats@test")
    with pytest.raises(MlxpostError, match="no data files for config 'fr'"):
        resolve_data_files("hf:alice/chats:fr")
    with pytest.raises(MlxpostError, match="no such dataset"):
        resolve_data_files("hf:alice/nothing")


def test_sft_and_data_convert_take_hf_data(hub, tmp_path, tiny_model):
    env = {**mlxpost_env(), "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
           "MLXPOST_CACHE": str(tmp_path / "mlxpost-cache"), "HF_HUB_OFFLINE": "0"}
    env.pop("HF_TOKEN", None)
    conv = subprocess.run([sys.executable, "-m", "mlxpost", "data", "convert", "hf:alice/chats@validation",
                           "--out", str(tmp_path / "conv"), "--plain"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert conv.returncode == 0, conv.stderr[-2000:]
    assert len((tmp_path / "conv" / "train.jsonl").read_text().splitlines()) == 6
    run = subprocess.run([sys.executable, "-m", "mlxpost", "sft", "--model", str(tiny_model), "--data",
                          "hf:alice/chats", "--steps", "2", "--out", str(tmp_path), "--name", "r"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    stats = json.loads((tmp_path / "r" / "data_stats.json").read_text())
    assert stats["train_examples"] == 20 and stats["valid_examples"] == 6  # the repo's validation split
    assert "path: hf:alice/chats" in (tmp_path / "r" / "config.yaml").read_text()  # not made a local path
