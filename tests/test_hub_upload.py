"""mlxpost data push / mlxpost push: Parquet + dataset card staging (read back with the real `datasets`
library), and uploads to a local fake Hub (tests/fake_hub.py) speaking huggingface_hub's HTTP API."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import socket
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import write_jsonl
from fake_hub import FakeHub

from mlxpost.data.convert import convert
from mlxpost.errors import DataError, MlxpostError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
hfh = pytest.importorskip("huggingface_hub")
hf_constants = pytest.importorskip("huggingface_hub.constants")

from mlxpost.hub.datasets import card_features, stage_dataset
from mlxpost.hub.upload import push_dataset, push_model

TOKEN = "hf_aliceSECRETtoken0123456789"
BOB = "hf_bobSECRETtoken0123456789"
READONLY = "hf_readonlySECRETtoken0123456"


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file outside the staging folder: the user's folder must stay as it was."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and ".hub" not in p.relative_to(folder).parts}


@pytest.fixture
def sft_dir(tmp_path) -> Path:
    rows = [{"conversations": [{"from": "human", "value": f"What is {i} plus {i}?"},
                               {"from": "gpt", "value": f"{2 * i}."}]} for i in range(20)]
    src = write_jsonl(tmp_path / "chats.jsonl", rows)
    convert(src, tmp_path / "sft", split=0.2, seed=0)
    return tmp_path / "sft"


@pytest.fixture
def pref_dir(tmp_path) -> Path:
    rows = [{"chosen": f"\n\nHuman: Q{i}\n\nAssistant: Sure.\n\nHuman: And?\n\nAssistant: Right {i}.",
             "rejected": f"\n\nHuman: Q{i}\n\nAssistant: Sure.\n\nHuman: And?\n\nAssistant: Wrong {i}."}
            for i in range(6)]
    src = write_jsonl(tmp_path / "hh.jsonl", rows)
    convert(src, tmp_path / "pref")
    return tmp_path / "pref"


def staged_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------
# Staging: Parquet shards + card, read back with `datasets`
# ---------------------------------------------------------------------------


def card_header(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def test_stage_sft_dataset_round_trips_through_datasets(sft_dir, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    before = snapshot(sft_dir)
    staged = stage_dataset(sft_dir, "alice/chats")
    assert snapshot(sft_dir) == before
    assert staged.folder == sft_dir / ".hub"
    assert sorted(staged_files(staged.folder)) == ["README.md", "data/test-00000-of-00001.parquet",
                                                   "data/train-00000-of-00001.parquet"]
    train, test = read(sft_dir / "train.jsonl"), read(sft_dir / "test.jsonl")

    ds = datasets.load_dataset(str(staged.folder))
    assert set(ds) == {"train", "test"}
    assert ds["train"].to_list() == train and ds["test"].to_list() == test
    pq_ds = datasets.load_dataset("parquet", data_files={"train": str(staged.folder / "data/train-00000-of-00001.parquet")})
    assert pq_ds["train"].to_list() == train

    readme = (staged.folder / "README.md").read_text()
    header = card_header(readme)
    sizes = {s: sum((staged.folder / f).stat().st_size for f in info["files"]) for s, info in staged.splits.items()}
    nbytes = {s: pq.read_table(staged.folder / info["files"][0]).nbytes for s, info in staged.splits.items()}
    assert header == {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"},
                                                               {"split": "test", "path": "data/test-*"}]}],
        "dataset_info": {
            "features": [{"name": "messages", "list": [{"name": "role", "dtype": "string"},
                                                       {"name": "content", "dtype": "string"}]}],
            "splits": [{"name": "train", "num_bytes": nbytes["train"], "num_examples": 16},
                       {"name": "test", "num_bytes": nbytes["test"], "num_examples": 4}],
            "download_size": sizes["train"] + sizes["test"],
            "dataset_size": nbytes["train"] + nbytes["test"],
        },
        "task_categories": ["text-generation"],
        "tags": ["mlxpost", "sft"],
    }
    assert ds["train"].features == datasets.Features.from_arrow_schema(pq.read_schema(
        staged.folder / "data/train-00000-of-00001.parquet"))
    body = readme.split("---\n", 2)[2]
    for line in ["# alice/chats", "| train | 16 |", "| test | 4 |",
                 "* source: `chats.jsonl` (layout `sharegpt`, 20 rows)",
                 "* converted with mlxpost: `mlxpost data convert chats.jsonl --to sft --from auto --out sft "
                 "--split 0.2 --seed 0`",
                 "* 20 rows in, 20 out", "* test split: 0.2 of the rows, chosen with seed 0",
                 'ds = load_dataset("alice/chats")']:
        assert line in body.splitlines(), line

    # Staging again gives the same bytes (so a re-push uploads nothing).
    first = staged_files(staged.folder)
    stage_dataset(sft_dir, "alice/chats")
    assert staged_files(staged.folder) == first


def test_stage_preference_dataset_round_trips(pref_dir, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    from mlxpost.data.rows import validate_pair_row

    staged = stage_dataset(pref_dir, "alice/prefs")
    ds = datasets.load_dataset(str(staged.folder))
    rows = read(pref_dir / "train.jsonl")
    assert list(ds) == ["train"] and ds["train"].to_list() == rows
    assert rows[0] == {"prompt": [u("Q0"), a("Sure."), u("And?")], "chosen": [a("Right 0.")],
                       "rejected": [a("Wrong 0.")]}
    assert all(validate_pair_row(r) == [] for r in ds["train"].to_list())
    header = card_header((staged.folder / "README.md").read_text())
    assert [f["name"] for f in header["dataset_info"]["features"]] == ["prompt", "chosen", "rejected"]
    assert header["tags"] == ["mlxpost", "dpo"]


def test_card_features_match_the_datasets_library():
    datasets = pytest.importorskip("datasets")
    rows = [{"messages": [{"role": "assistant", "content": None,
                           "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]}],
             "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
             "score": 1.5, "n": 3, "ok": True, "tags": ["a"], "nested": [[1, 2]], "meta": {"x": 1, "y": "s"},
             "nothing": None}]
    schema = pa.Table.from_pylist(rows).schema
    assert card_features(schema) == datasets.Features.from_arrow_schema(schema)._to_yaml_list()


def test_shards_split_by_size_and_read_back_in_order(sft_dir, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    staged = stage_dataset(sft_dir, "alice/chats", max_shard_bytes=300)
    files = staged.splits["train"]["files"]
    assert len(files) > 2
    assert files == [f"data/train-{i:05d}-of-{len(files):05d}.parquet" for i in range(len(files))]
    assert sum(pq.read_metadata(staged.folder / f).num_rows for f in files) == 16
    ds = datasets.load_dataset(str(staged.folder))
    assert ds["train"].to_list() == read(sft_dir / "train.jsonl")


def test_stage_refuses_bad_rows_and_mixed_column_types(tmp_path):
    d = tmp_path / "d"
    write_jsonl(d / "train.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "B"},
                                    {"prompt": [u("Q")], "chosen": [a("A")], "rejected": [a("C")]}])
    with pytest.raises(MlxpostError) as e:
        stage_dataset(d)
    assert str(e.value) == (f"{d / 'train.jsonl'}:2: prompt: a list, but train.jsonl:1 has a string; a Parquet "
                            "column holds one type (run mlxpost data convert to write every row the same way)")
    write_jsonl(d / "train.jsonl", [{"messages": [u("Q"), a("A")]}, {"messages": [u("Q")]}])
    write_jsonl(d / "valid.jsonl", [{"messages": [u("Q"), a("")]}])
    with pytest.raises(DataError) as e:
        stage_dataset(d)
    assert [str(i) for i in e.value.issues] == [
        f"{d / 'train.jsonl'}:2: messages: has no assistant turn to train on",
        f"{d / 'valid.jsonl'}:1: messages[1].content: empty assistant turn"]
    with pytest.raises(MlxpostError, match="no .jsonl files to push"):
        stage_dataset(tmp_path / "d" / "..")


def test_hand_made_folder_gets_validation_split_and_a_plain_card(tmp_path, monkeypatch):
    d = tmp_path / "mine"
    write_jsonl(d / "train.jsonl", [{"messages": [u("Q"), a("A")]}])
    write_jsonl(d / "valid.jsonl", [{"messages": [u("Q2"), a("A2")]}])
    staged = stage_dataset(d, "alice/mine")
    assert list(staged.splits) == ["train", "validation"]
    readme = (staged.folder / "README.md").read_text()
    assert "* pushed with `mlxpost data push` from `train.jsonl`, `valid.jsonl`" in readme.splitlines()


# ---------------------------------------------------------------------------
# Uploads against the fake Hub
# ---------------------------------------------------------------------------


@pytest.fixture
def hub(monkeypatch):
    h = FakeHub(tokens={TOKEN: "alice", BOB: "bob", READONLY: "alice"}, read_only=(READONLY,))
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # CI may run the suite offline
    try:  # no best-effort telemetry lookups to the real Hub from build_hf_headers
        from huggingface_hub.utils import _detect_agent

        monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)
    except (ImportError, AttributeError):
        pass
    yield h
    assert h.unhandled == []
    h.close()


@pytest.fixture
def hub_logs(monkeypatch):
    """Everything huggingface_hub logs at DEBUG, with its curl-style request dumps on."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setLevel(logging.DEBUG)
    logger = logging.getLogger("huggingface_hub")
    old = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    monkeypatch.setattr(hf_constants, "HF_DEBUG", True)
    yield buf
    logger.removeHandler(handler)
    logger.setLevel(old)


def cli_group():
    from mlxpost.cli.data import data, push
    from mlxpost.cli.main import _Group

    return _Group(name="mlxpost", commands={"data": data, "push": push})


def test_data_push_uploads_the_staged_folder(hub, hub_logs, sft_dir, capsys):
    before = snapshot(sft_dir)
    out = CliRunner().invoke(cli_group(), ["data", "push", str(sft_dir), "--repo", "alice/chats", "--private",
                                           "-m", "First version", "--plain"])
    assert out.exit_code == 0, out.output
    repo = hub.repo("dataset", "alice/chats")
    staged = staged_files(sft_dir / ".hub")
    assert repo.private and repo.owner == "alice"
    assert repo.files == {".gitattributes": repo.files[".gitattributes"], **staged}
    assert repo.commits[-1]["summary"] == "First version"
    assert sorted(repo.commits[-1]["added"]) == sorted(staged)
    assert snapshot(sft_dir) == before  # the user's files are untouched

    lines = out.output.splitlines()
    assert lines[0] == f"staged 2 Parquet file(s) and README.md in {sft_dir / '.hub'} (train 16, test 4 rows)"
    assert lines[-1] == f"{hub.url}/datasets/alice/chats"
    assert "committed 3 file(s)" in out.output

    writes = [r for r in hub.requests if r.route in ("create", "preupload", "commit")]
    assert [r.route for r in writes] == ["create", "preupload", "commit"]
    assert all(r.authorization == f"Bearer {TOKEN}" for r in hub.requests)
    logs = hub_logs.getvalue()
    assert "authenticated: True" in logs and "<TOKEN>" in logs  # huggingface_hub did log the requests...
    everything = out.output + logs + "".join(capsys.readouterr())
    assert TOKEN not in everything  # ...but the token appears nowhere


def test_repush_skips_unchanged_files_and_removes_stale_shards(hub, sft_dir):
    first = push_dataset(sft_dir, "alice/chats", max_shard_bytes=300)
    repo = hub.repo("dataset", "alice/chats")
    n_commits = len(repo.commits)
    shards = [f for f in repo.files if f.startswith("data/")]
    assert len([f for f in shards if f.startswith("data/train-")]) > 2 and first.uploaded and not first.unchanged

    again = push_dataset(sft_dir, "alice/chats", max_shard_bytes=300)
    assert len(repo.commits) == n_commits  # nothing changed: no commit at all
    assert again.uploaded == [] and sorted(again.unchanged) == sorted(first.uploaded)

    # Fewer, bigger shards: the old shards are deleted in the same commit.
    result = push_dataset(sft_dir, "alice/chats")
    assert len(repo.commits) == n_commits + 1
    assert sorted(result.deleted) == sorted(shards)
    assert repo.files == {".gitattributes": repo.files[".gitattributes"], **staged_files(sft_dir / ".hub")}


def test_bad_token_gives_one_line_and_a_retry_works(hub, hub_logs, sft_dir, monkeypatch):
    before = snapshot(sft_dir)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_valid_token_123")
    with pytest.raises(MlxpostError) as e:
        push_dataset(sft_dir, "alice/chats")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"the Hub at {hub.url} rejected the token (401 Unauthorized")
    assert "HF_TOKEN" in msg and f"nothing in {sft_dir} was changed; run the same command again to retry" in msg
    assert "hf_not_a_valid_token_123" not in msg + hub_logs.getvalue()
    assert hub.repo("dataset", "alice/chats") is None and snapshot(sft_dir) == before

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push_dataset(sft_dir, "alice/chats")
    assert "README.md" in hub.repo("dataset", "alice/chats").files


@pytest.mark.parametrize("private", [False, True])
def test_someone_elses_repo(hub, sft_dir, private):
    bobs = hub.add_repo("dataset", "bob/chats", "bob", private=private, files={"README.md": b"bob's"})
    with pytest.raises(MlxpostError) as e:
        push_dataset(sft_dir, "bob/chats")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("no write access to dataset repo bob/chats (403 Forbidden: You don't have the rights")
    assert "belongs to another user or organization, or the token is read-only" in msg
    assert bobs.files == {"README.md": b"bob's"} and len(bobs.commits) == 1


def test_read_only_token(hub, sft_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", READONLY)
    with pytest.raises(MlxpostError, match=r"^no write access to dataset repo alice/chats \(403 Forbidden"):
        push_dataset(sft_dir, "alice/chats")


def test_failed_commit_leaves_nothing_and_a_retry_works(hub, sft_dir):
    before = snapshot(sft_dir)
    hub.fail_next("commit", 500, "Internal Error")
    with pytest.raises(MlxpostError) as e:
        push_dataset(sft_dir, "alice/chats")
    assert str(e.value) == (f"the Hub refused the upload to dataset repo alice/chats (500: Internal Error) "
                            f"(nothing in {sft_dir} was changed; run the same command again to retry)")
    repo = hub.repo("dataset", "alice/chats")
    assert sorted(repo.files) == [".gitattributes"]  # created, but nothing committed
    assert snapshot(sft_dir) == before

    result = push_dataset(sft_dir, "alice/chats")
    assert sorted(result.uploaded) == sorted(staged_files(sft_dir / ".hub"))
    assert repo.files == {".gitattributes": repo.files[".gitattributes"], **staged_files(sft_dir / ".hub")}


def test_no_network(hub, sft_dir, monkeypatch):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()
    monkeypatch.setenv("HF_ENDPOINT", closed)
    before = snapshot(sft_dir)
    with pytest.raises(MlxpostError) as e:
        push_dataset(sft_dir, "alice/chats")
    msg = str(e.value)
    assert "\n" not in msg and TOKEN not in msg
    assert msg.startswith(f"cannot reach the Hub at {closed} (ConnectError: ")
    assert msg.endswith(f"nothing in {sft_dir} was changed; run the same command again to retry")
    assert snapshot(sft_dir) == before

    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # back online: the same call works
    push_dataset(sft_dir, "alice/chats")
    assert "README.md" in hub.repo("dataset", "alice/chats").files


def test_no_token_and_offline_mode(hub, sft_dir, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(hfh, "get_token", lambda: None)
    with pytest.raises(MlxpostError, match=r"^no Hugging Face token: set HF_TOKEN .* or run `hf auth login`$"):
        push_dataset(sft_dir, "alice/chats")
    assert not (sft_dir / ".hub").exists()  # checked before any work

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(hfh, "get_token", lambda: TOKEN)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MlxpostError, match=r"^HF_HUB_OFFLINE is set, so nothing can be uploaded"):
        push_dataset(sft_dir, "alice/chats")
    assert hub.requests == []


def test_repo_id_is_checked(sft_dir):
    for bad in ("chats", "a/b/c", "/chats", "alice/"):
        with pytest.raises(MlxpostError, match="expected NAMESPACE/NAME"):
            push_dataset(sft_dir, bad)


# ---------------------------------------------------------------------------
# mlxpost push RUN_DIR (a model export folder)
# ---------------------------------------------------------------------------


def export_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "README.md").write_text("---\nbase_model: tiny\nlibrary_name: peft\n---\n\n# tiny adapter\n")
    (path / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (path / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(64)))
    return path


def test_push_model_export(hub, tmp_path):
    run = tmp_path / "runs/sft-1"
    run.mkdir(parents=True)
    (run / "adapters.safetensors").write_bytes(b"mlx adapter")
    (run / "checkpoints/step-1").mkdir(parents=True)
    (run / "checkpoints/step-1/optimizer.safetensors").write_bytes(b"state")
    with pytest.raises(MlxpostError, match=r"has no export to push .*: pass --format peft\|fused\|mlx to export it "
                                           r"now, or run `mlxpost export .*sft-1 --format peft --out DIR` and push DIR"):
        push_model(run, "alice/tiny")
    assert hub.requests == []

    export = export_folder(run / "export")
    out = CliRunner().invoke(cli_group(), ["push", str(run), "--repo", "alice/tiny", "--plain"])
    assert out.exit_code == 0, out.output
    repo = hub.repo("model", "alice/tiny")
    assert {k: v for k, v in repo.files.items() if k != ".gitattributes"} == staged_files(export)
    assert out.output.splitlines()[-1] == f"{hub.url}/alice/tiny"
    assert TOKEN not in out.output

    # The export folder itself works too; a re-push is a no-op.
    result = push_model(export, "alice/tiny")
    assert result.uploaded == [] and len(result.unchanged) == 3


def test_cli_push_error_is_one_line(hub, sft_dir):
    hub.add_repo("dataset", "bob/chats", "bob")
    out = CliRunner().invoke(cli_group(), ["data", "push", str(sft_dir), "--repo", "bob/chats", "--plain"])
    assert out.exit_code == 2
    errors = [line for line in out.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: no write access to dataset repo bob/chats (403")
    assert TOKEN not in out.output


def test_push_model_exports_a_run_to_a_temporary_folder(hub, tmp_path, monkeypatch):
    import mlxpost.hub.upload as upload_mod
    run = tmp_path / "runs/dpo-1"
    run.mkdir(parents=True)
    calls = []

    def fake_export(run_dir, fmt, out, *, best=False, **kw):
        calls.append((Path(run_dir), fmt, best))
        export_folder(Path(out))
        return {"out": Path(out)}

    monkeypatch.setattr(upload_mod, "export", fake_export)
    out = CliRunner().invoke(cli_group(), ["push", str(run), "--repo", "alice/dpo", "--format", "fused", "--best",
                                           "--plain"])
    assert out.exit_code == 0, out.output
    assert calls == [(run, "fused", True)]
    assert out.output.splitlines()[0] == f"exporting {run} (best/) as fused to a temporary folder ..."
    repo = hub.repo("model", "alice/dpo")
    assert sorted(repo.files) == [".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert list(run.iterdir()) == []  # nothing written into the run directory
