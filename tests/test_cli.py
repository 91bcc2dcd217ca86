"""The command line end to end on a tiny local model, as a user types it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import chat, mlxpost_env, write_jsonl

pytestmark = pytest.mark.slow


def mlxpost(*args, check=True, timeout=300, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "mlxpost", *map(str, args)], capture_output=True, text=True,
                         env=mlxpost_env(), timeout=timeout, **kw)
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}\nstdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-3000:]}")
    return out


def test_sft_writes_a_complete_run_directory(tmp_path, tiny_model, sft_data):
    out = mlxpost("sft", "--model", tiny_model, "--data", sft_data, "--steps", 6, "--out", tmp_path, "--name", "r1",
                  "--set", "train.eval_every=3", "--set", "train.save_every=3", "--batch-size", 4, "--lr", 3e-3)
    run = tmp_path / "r1"
    for f in ("config.yaml", "metrics.jsonl", "adapter_config.json", "adapters.safetensors", "summary.json",
              "data_stats.json", "best/adapters.safetensors", "checkpoints/latest"):
        assert (run / f).exists(), f
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-0000003", "step-0000006"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "setup" and kinds.count("eval") == 3  # at start, step 3, end
    train = [r for r in records if r["kind"] == "train"]
    for key in ("loss", "lr", "tokens_per_s", "peak_memory_gb", "grad_norm"):
        assert all(key in r for r in train)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["stopped"] == "completed"
    assert "summary" in out.stdout and "step 6/6" in out.stdout  # plain logs when not a terminal
    cfg = (run / "config.yaml").read_text()
    assert "lr: 0.003" in cfg and "steps: 6" in cfg
    acfg = json.loads((run / "adapter_config.json").read_text())
    assert acfg["fine_tune_type"] == "lora" and acfg["mlxpost"]["base_model"] == str(tiny_model)

    gen = mlxpost("generate", "--adapter", run, "--prompt", "What is 2 plus 2?", "--max-tokens", 5)
    assert gen.returncode == 0 and (gen.stdout.strip() or "empty reply" in gen.stderr)
    gen_best = mlxpost("generate", "--adapter", run, "--best", "--prompt", "hi", "--max-tokens", 3)
    assert gen_best.returncode == 0


def test_recipe_and_set_on_the_command_line(tmp_path, tiny_model, sft_data):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"# mlxpost sft --config r.yaml\nmethod: sft\nmodel:\n  path: {tiny_model}\n"
                      f"data:\n  path: {sft_data}\ntrain:\n  steps: 3\n  lr: 1.0e-3\n  eval_every: 0\n"
                      "  eval_at_start: false\nlora:\n  type: dora\n  targets: [q_proj, v_proj]\n")
    mlxpost("sft", "--config", recipe, "--set", "train.steps=2", "--out", tmp_path, "--name", "r")
    cfg = (tmp_path / "r" / "config.yaml").read_text()
    assert "steps: 2" in cfg and "type: dora" in cfg
    acfg = json.loads((tmp_path / "r" / "adapter_config.json").read_text())
    assert acfg["fine_tune_type"] == "dora"
    assert acfg["lora_parameters"]["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]


def test_clear_errors_without_tracebacks(tmp_path, tiny_model, sft_data):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  lr: 1e-4\n  stpes: 10\n")
    out = mlxpost("sft", "--config", recipe, check=False)
    assert out.returncode == 2
    assert f"{recipe}:3: unknown key 'train.stpes' (did you mean 'train.steps'?)" in out.stderr
    assert "Traceback" not in out.stderr

    data = write_jsonl(tmp_path / "data.jsonl", [chat("a", "b"), {"messages": [{"role": "user", "content": "x"}]}])
    out = mlxpost("sft", "--model", tiny_model, "--data", data, "--out", tmp_path, check=False)
    assert out.returncode == 2
    assert f"{data}:2: messages: has no assistant turn to train on" in out.stderr

    out = mlxpost("sft", "--model", tmp_path / "nope", "--data", data, "--out", tmp_path, "--name", "x",
                  check=False)
    assert out.returncode == 2 and "model not found" in out.stderr

    mlxpost("sft", "--model", tiny_model, "--data", sft_data, "--steps", 1, "--out", tmp_path, "--name", "dup",
            "--set", "train.eval_at_start=false")
    out = mlxpost("sft", "--model", tiny_model, "--data", sft_data, "--steps", 1, "--out", tmp_path, "--name", "dup",
                  check=False)
    assert out.returncode == 2 and "exists; resume it with --resume" in out.stderr


def test_skip_bad_rows_counts_them(tmp_path, tiny_model, sft_data):
    rows = [json.loads(line) for line in (sft_data / "train.jsonl").read_text().splitlines()]
    data = write_jsonl(tmp_path / "d.jsonl", rows[:30] + ["{broken", {"text": ""}])
    out = mlxpost("sft", "--model", tiny_model, "--data", data, "--steps", 1, "--out", tmp_path, "--name", "s",
                  "--skip-bad-rows", "--set", "data.valid_fraction=0")
    assert "skipped 2 bad rows" in out.stdout


def test_doctor_reports_backend_and_blas():
    out = mlxpost("doctor", "--no-measure")
    text = out.stdout
    for item in ("mlx", "device", "blas", "memory"):
        assert item in text


def _final_weights(run: Path) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(run / "adapters.safetensors")).items()}


def test_killed_run_resumes_to_the_same_result(tmp_path, tiny_model, sft_data):
    """Kill a real run (SIGKILL) after a checkpoint; --resume ends where an uninterrupted run ends."""
    common = ["--model", tiny_model, "--data", sft_data, "--steps", 40, "--out", tmp_path, "--batch-size", 2,
              "--lr", 3e-3, "--set", "train.save_every=4", "--set", "train.eval_every=10", "--set",
              "lora.dropout=0.1", "--set", "train.report_every=1"]
    mlxpost("sft", *common, "--name", "straight")

    proc = subprocess.Popen([sys.executable, "-m", "mlxpost", "sft", *map(str, common), "--name", "killed"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=mlxpost_env())
    run = tmp_path / "killed"
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline:
        if latest.exists() and latest.read_text().strip() >= "step-0000008":
            break
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists(), "the run finished before it could be killed"
    killed_at = latest.read_text().strip()

    out = mlxpost("sft", "--resume", run, "--plain")
    assert f"resumed from {killed_at}" in out.stdout
    a, b = _final_weights(tmp_path / "straight"), _final_weights(run)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)
    sa = json.loads((tmp_path / "straight" / "summary.json").read_text())
    sb = json.loads((run / "summary.json").read_text())
    assert sb["final_train_loss"] == pytest.approx(sa["final_train_loss"], abs=1e-6)
    assert sb["val_loss"] == pytest.approx(sa["val_loss"], abs=1e-6)
    assert sb["steps"] == 40

    # A finished run says so instead of training again.
    out = mlxpost("sft", "--resume", run, check=False)
    assert out.returncode == 2 and "already finished" in out.stderr
    out = mlxpost("sft", "--resume", run, "--set", "lora.rank=4", check=False)
    assert out.returncode == 2 and "cannot change when resuming" in out.stderr


def test_data_parallel_on_two_local_processes(tmp_path, tiny_model, sft_data):
    """`mlx.launch` starts two ranks on loopback; rank 0 alone writes the run directory.

    39 rows, no validation file: the held-out split is decided on the global
    row count, so both ranks evaluate (39 rows on 2 ranks is 20 + 19: deciding
    per rank would leave one of them out of the evaluation and hang the other).
    """
    launch = Path(sys.executable).parent / "mlx.launch"
    if not launch.exists():
        pytest.skip("mlx.launch is not installed beside this Python")
    rows = [json.loads(line) for line in (sft_data / "train.jsonl").read_text().splitlines()][:39]
    data = write_jsonl(tmp_path / "odd.jsonl", rows)
    cmd = [str(launch), "-n", "2", "--backend", "ring", "--", sys.executable, "-m", "mlxpost", "sft",
           "--model", str(tiny_model), "--data", str(data), "--steps", "4", "--out", str(tmp_path),
           "--name", "dp", "--batch-size", "2", "--plain", "--set", "train.eval_every=2",
           "--set", "data.valid_fraction=0.1"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=mlxpost_env(), timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    run = tmp_path / "dp"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    setup = [r for r in records if r["kind"] == "setup"]
    assert len(setup) == 1 and setup[0]["world_size"] == 2  # one writer
    assert setup[0]["data"]["train_examples"] + setup[0]["data"]["valid_examples"] == 20  # rank 0's share
    assert out.stdout.count("== summary") == 1  # only rank 0 prints
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4
    train = [r for r in records if r["kind"] == "train"]
    assert train[-1]["tokens"] > 0 and summary["tokens"] == train[-1]["tokens"]

    # An error that only rank 0 sees (its run directory exists) stops both ranks
    # with the message instead of leaving rank 1 waiting forever.
    cmd[cmd.index("--name") + 1] = "dp"
    out = subprocess.run(cmd, capture_output=True, text=True, env=mlxpost_env(), timeout=120)
    both = out.stdout + out.stderr
    # (mlx.launch itself exits 0; it reports the exit codes, and stops the other
    # rank once one has exited, so which rank reports code 2 first varies.)
    assert "exited with code 2" in both
    assert "exists; resume it with --resume" in both
    assert "failed on another process" in both


def test_distributed_gradients_are_exact(tmp_path, tiny_model, sft_data):
    """Two ranks with two examples each take exactly the step one process takes with all four."""
    launch = Path(sys.executable).parent / "mlx.launch"
    if not launch.exists():
        pytest.skip("mlx.launch is not installed beside this Python")
    worker = Path(__file__).parent / "dist_worker.py"
    args = [str(tiny_model), str(sft_data), str(tmp_path)]
    one = subprocess.run([sys.executable, str(worker), *args, "1"], capture_output=True, text=True,
                         env=mlxpost_env(), timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([str(launch), "-n", "2", "--backend", "ring", "--", sys.executable, str(worker), *args, "2"],
                         capture_output=True, text=True, env=mlxpost_env(), timeout=300)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    a, b = np.load(tmp_path / "weights1.npz"), np.load(tmp_path / "weights2.npz")
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)
    assert any(np.abs(a[k]).max() > 0 for k in a.files if k.endswith("lora_b"))  # training happened
    la = [float(x) for x in (tmp_path / "loss1.txt").read_text().split()]
    lb = [float(x) for x in (tmp_path / "loss2.txt").read_text().split()]
    assert la == pytest.approx(lb, abs=1e-5)  # the logged loss is the mean over both ranks


def test_dpo_and_orpo_from_the_command_line(tmp_path, tiny_model, sft_data, pref_data):
    mlxpost("sft", "--model", tiny_model, "--data", sft_data, "--steps", 3, "--out", tmp_path, "--name", "sft",
            "--lr", 3e-3)
    out = mlxpost("dpo", "--from", tmp_path / "sft", "--data", pref_data, "--steps", 6, "--out", tmp_path,
                  "--name", "dpo", "--batch-size", 4, "--lr", 5e-3, "--precompute-ref", "--beta", 0.2,
                  "--set", "train.eval_every=3", "--set", "preference.ref_cache_dir=" + str(tmp_path / "cache"),
                  "--plain")
    assert "reference         precomputed (cached)" in out.stdout
    assert "merged the adapter of" in out.stdout
    assert "quality_gate" in out.stdout and "rewards/margins" in out.stdout
    run = tmp_path / "dpo"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "dpo" and summary["steps"] == 6
    assert set(summary["health"]) == {"stuck", "collapse", "drift", "non_finite", "quality_gate"}
    assert summary["val_metrics"]["val_rewards/margins"] > 0
    cfg = (run / "config.yaml").read_text()
    assert "beta: 0.2" in cfg and "precompute_ref: true" in cfg and "orpo:" not in cfg
    # generate rebuilds base + SFT adapter + DPO adapter (the logits are checked in test_methods_preference.py)
    mlxpost("generate", "--adapter", run, "--prompt", "What is 2 plus 3?", "--max-tokens", 4)

    out = mlxpost("orpo", "--model", tiny_model, "--data", pref_data, "--steps", 3, "--out", tmp_path,
                  "--name", "orpo", "--lam", 0.2, "--plain")
    assert "none (reference-free)" in out.stdout and "nll" in out.stdout

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "same", "rejected": "same"},
                                               {"prompt": "b", "chosen": "x"}])
    out = mlxpost("dpo", "--model", tiny_model, "--data", bad, "--out", tmp_path, check=False)
    assert out.returncode == 2
    assert "bad.jsonl:1: rejected: identical to chosen" in out.stderr
    assert "bad.jsonl:2: rejected: missing" in out.stderr
    out = mlxpost("dpo", "--model", tiny_model, "--data", pref_data, "--set", "orpo.lam=1", check=False)
    assert out.returncode == 2 and "setting of orpo, not of dpo" in out.stderr
