"""Nothing a user, a file or a crash can do loses a run or shows a traceback (issue 22).

One test per case of the issue, each on the tiny model with the damage made
in the test: files cut short or emptied, rows nested 10,000 deep, a model
directory without its tokenizer, a run directory held by a live process,
and kills at exact points of a run's end (``MLXPOST_FAULT``, see
:mod:`mlxpost.training.faults`). Each asserts the exit code, the message,
and that nothing was lost: a resumed run ends with the weights, summary and
samples of a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import mlxpost_env, preference_rows, write_jsonl

from mlxpost.config import build_config
from mlxpost.errors import ConfigError, MlxpostError
from mlxpost.methods import get as get_method
from mlxpost.training.loop import NonFiniteError, Objective
from mlxpost.training.pipeline import run
from mlxpost.training.resume import resume_config
from mlxpost.training.rundir import RunLocked, acquire_lock, new_run_dir, verify_checkpoint
from mlxpost.ui import NullReporter

pytestmark = pytest.mark.slow

STEPS = 8
TIMING = ("train_seconds", "wall_seconds", "tokens_per_s", "trained_tokens_per_s", "peak_memory_gb", "run_dir",
          "model_flops_per_s", "hardware_flops_per_s", "mfu", "rollout_seconds", "rollout_model_flops_per_s")


def mlxpost(*args, cwd=None, fault: str | None = None, timeout=300) -> subprocess.CompletedProcess:
    env = mlxpost_env()
    if fault:
        env["MLXPOST_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "mlxpost", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=cwd)


def ok(out: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def refused(out: subprocess.CompletedProcess, *messages: str) -> None:
    """Exit 2 with every message in stderr, and no traceback."""
    assert out.returncode == 2, f"exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
    for m in messages:
        assert m in out.stderr, (m, out.stderr)


def common(model, data, out) -> list:
    return ["--model", model, "--data", data, "--steps", STEPS, "--out", out, "--batch-size", 2, "--lr", 3e-3,
            "--plain", "--set", "train.save_every=2", "--set", "train.eval_every=4", "--set", "train.report_every=1",
            "--set", "sample.prompts=[What is 2 plus 2]", "--set", "sample.max_tokens=4"]


def weights(run: Path, name: str = "adapters.safetensors") -> dict:
    return {k: np.array(v) for k, v in mx.load(str(run / name)).items()}


def same_end(a: Path, b: Path) -> None:
    """``b`` ended exactly as ``a``: final adapter (bit for bit), summary (timings aside), samples."""
    assert (a / "adapters.safetensors").read_bytes() == (b / "adapters.safetensors").read_bytes()
    assert json.loads((a / "adapter_config.json").read_text()) == json.loads((b / "adapter_config.json").read_text())
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert {k: v for k, v in sa.items() if k not in TIMING} == {k: v for k, v in sb.items() if k not in TIMING}
    assert json.loads((a / "samples.json").read_text()) == json.loads((b / "samples.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, sft_data):
    """An uninterrupted run, and one killed right after its last checkpoint (training done, its end not)."""
    root = tmp_path_factory.mktemp("runs")
    ok(mlxpost("sft", *common(tiny_model, sft_data, root), "--name", "straight"))
    killed = mlxpost("sft", *common(tiny_model, sft_data, root), "--name", "killed", fault="after_training")
    assert killed.returncode == -signal.SIGKILL
    return root


def copy_run(runs: Path, tmp_path: Path, name: str = "killed") -> Path:
    dst = tmp_path / name
    shutil.copytree(runs / name, dst)
    return dst


# ---------------------------------------------------------------------------
# Bad input: one message, exit 2, no run directory left behind
# ---------------------------------------------------------------------------


def _deep_sft(tmp, model, sft_data, pref_data):
    data = tmp / "deep"
    shutil.copytree(sft_data, data)
    lines = (data / "train.jsonl").read_text().splitlines()
    lines[2] = '{"messages": ' + "[" * 10_000 + "]" * 10_000 + "}"
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    return "sft", model, data, f"{data / 'train.jsonl'}:3: nested deeper than 100 levels"


def _deep_dpo(tmp, model, sft_data, pref_data):
    data = write_jsonl(tmp / "prefs.jsonl", preference_rows(20))
    with open(data, "a") as f:
        f.write('{"prompt": "x", "chosen": ' + "[" * 10_000 + "]" * 10_000 + ', "rejected": "y"}\n')
    return "dpo", model, data, f"{data}:21: nested deeper than 100 levels"


def _broken_model(change):
    def build(tmp, model, sft_data, pref_data):
        broken = tmp / "model"
        shutil.copytree(model, broken)
        return "sft", broken, sft_data, change(broken)
    return build


def _no_tokenizer(d):
    (d / "tokenizer.json").unlink()
    return f"{d}: no tokenizer (expected tokenizer.json"


def _half_weights(d):
    f = d / "model.safetensors"
    size = f.stat().st_size
    os.truncate(f, size // 2)
    return f"{d}: model.safetensors is cut short: {size // 2:,} of {size:,} bytes"


def _empty_weights(d):
    os.truncate(d / "model.safetensors", 0)
    return f"{d}: model.safetensors is empty"


@pytest.mark.parametrize("case", [_deep_sft, _deep_dpo, _broken_model(_no_tokenizer), _broken_model(_half_weights),
                                  _broken_model(_empty_weights)],
                         ids=["deep-sft-row", "deep-dpo-row", "no-tokenizer", "weights-cut-in-half", "weights-empty"])
def test_bad_input_is_one_message_and_leaves_no_run_directory(tmp_path, tiny_model, sft_data, pref_data, case):
    method, model, data, message = case(tmp_path, tiny_model, sft_data, pref_data)
    out_dir = tmp_path / "runs"
    cmd = [method, "--model", model, "--data", data, "--steps", 2, "--out", out_dir, "--plain"]
    refused(mlxpost(*cmd), message)
    assert not out_dir.exists() or not any(out_dir.iterdir())
    if case is _deep_sft:  # the same command with a name: the same message again, never "exists"
        refused(mlxpost(*cmd, "--name", "r1"), message)
        refused(mlxpost(*cmd, "--name", "r1"), message)
        assert not (out_dir / "r1").exists()


# ---------------------------------------------------------------------------
# Damaged checkpoints: the newest intact one, said, never a damaged one
# ---------------------------------------------------------------------------


def _cut(f: Path) -> None:
    os.truncate(f, f.stat().st_size // 2)


DAMAGE = {
    "adapter-cut": ("adapters.safetensors", _cut, "adapters.safetensors has"),
    "optimizer-cut": ("optimizer.safetensors", _cut, "optimizer.safetensors has"),
    "state-cut": ("trainer_state.json", _cut, "trainer_state.json is not valid JSON"),
    "optimizer-empty": ("optimizer.safetensors", lambda f: os.truncate(f, 0), "optimizer.safetensors has 0 bytes"),
    "adapter-flipped": ("adapters.safetensors",
                        lambda f: f.write_bytes(f.read_bytes()[:-4] + b"\0\0\0\1"), "does not match its checksum"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_skips_a_damaged_checkpoint_for_the_newest_intact_one(runs, tmp_path, damage):
    run_dir = copy_run(runs, tmp_path)
    name, spoil, problem = DAMAGE[damage]
    spoil(run_dir / "checkpoints" / f"step-{STEPS:07d}" / name)
    out = ok(mlxpost("sft", "--resume", run_dir, "--plain"))
    said = out.stdout + out.stderr  # warnings go to stdout with --plain
    assert f"warning: checkpoint step-{STEPS:07d} is damaged: " in said and problem in said
    assert f"resuming from step-{STEPS - 2:07d}, the newest intact checkpoint" in said
    assert f"resumed from step-{STEPS - 2:07d}" in out.stdout
    assert (run_dir / "checkpoints" / "damaged" / f"step-{STEPS:07d}").is_dir()  # kept aside, never used
    same_end(runs / "straight", run_dir)  # steps 7 and 8 trained again: the same end


def test_no_intact_checkpoint_is_an_error(runs, tmp_path):
    run_dir = copy_run(runs, tmp_path)
    for ckpt in (run_dir / "checkpoints").glob("step-*"):
        _cut(ckpt / "optimizer.safetensors")
    refused(mlxpost("sft", "--resume", run_dir), "no intact checkpoint in", "--overwrite")


def test_checkpoints_record_what_they_hold(runs):
    ckpt = runs / "straight" / "checkpoints" / f"step-{STEPS:07d}"
    state, problem = verify_checkpoint(ckpt)
    assert problem is None and state["step"] == STEPS and state["stopped"] == "completed"
    for name in ("adapters.safetensors", "adapter_config.json", "optimizer.safetensors"):
        assert state["files"][name]["size"] == (ckpt / name).stat().st_size
    assert state["last_loss"] is not None and state["val"]["val_loss"] > 0


# ---------------------------------------------------------------------------
# The end of a run: a kill after the last checkpoint is completed by --resume
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["final_save", "after_training", "summary"])
def test_a_kill_after_the_last_checkpoint_is_completed_by_resume(runs, tmp_path, tiny_model, sft_data, fault):
    killed = mlxpost("sft", *common(tiny_model, sft_data, tmp_path), "--name", "r", fault=fault)
    assert killed.returncode == -signal.SIGKILL
    run_dir = tmp_path / "r"
    assert not (run_dir / "summary.json").exists()
    if fault == "final_save":  # the weights were written, their adapter_config.json not
        assert not (run_dir / "adapter_config.json").exists()
    out = ok(mlxpost("sft", "--resume", run_dir, "--plain"))
    assert f"resumed from step-{STEPS:07d} (training had finished; completing the run)" in out.stdout
    assert not [x for x in out.stdout.splitlines() if x.startswith(("training:", f"step {STEPS}/"))]  # none trained again
    sampled = "prompts after training" in out.stdout  # the status line "answering N prompts after training"
    assert sampled == (fault != "summary")  # the samples were written before that kill: not redone
    same_end(runs / "straight", run_dir)
    refused(mlxpost("sft", "--resume", run_dir), f"already finished {STEPS} of {STEPS} steps")


# ---------------------------------------------------------------------------
# One process per run directory
# ---------------------------------------------------------------------------


def test_a_live_run_directory_is_refused_to_overwrite_and_to_a_second_resume(tmp_path, tiny_model, sft_data):
    args = ["sft", "--model", tiny_model, "--data", sft_data, "--steps", 5000, "--batch-size", 1, "--out", tmp_path,
            "--name", "live", "--plain", "--set", "train.save_every=5", "--set", "train.eval_every=0"]
    proc = subprocess.Popen([sys.executable, "-m", "mlxpost", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=mlxpost_env())
    run_dir = tmp_path / "live"
    try:
        deadline = time.time() + 120
        while not list((run_dir / "checkpoints").glob("step-*")) and time.time() < deadline:
            assert proc.poll() is None, "the live run ended early"
            time.sleep(0.05)
        pid = str(proc.pid)
        refused(mlxpost(*args, "--overwrite"), "--overwrite refused", f"process {pid} is training in it")
        refused(mlxpost("sft", "--resume", run_dir), f"process {pid} is training in it")
        assert proc.poll() is None  # still training, in its own directory, alone
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["kind"] for r in records].count("setup") == 1
    finally:
        proc.kill()  # SIGKILL: the OS drops its lock
        proc.wait()
    last = max(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step-*"))
    out = ok(mlxpost("sft", "--resume", run_dir, "--set", f"train.steps={last + 1}", "--plain"))
    assert f"resumed from step-{last:07d}" in out.stdout


def test_the_lock_and_unique_names(tmp_path, monkeypatch):
    d = tmp_path / "r"
    d.mkdir()
    (d / "config.yaml").write_text("method: sft\n")
    held = acquire_lock(d)
    with pytest.raises(RunLocked, match=f"process {os.getpid()} is training in it"):
        acquire_lock(d)
    with pytest.raises(RunLocked, match="--overwrite refused"):
        new_run_dir(tmp_path, "r", "sft", overwrite=True)
    held.close()
    assert new_run_dir(tmp_path, "r", "sft", overwrite=True) == d and not any(d.iterdir())
    # Runs started in the same second (the clock stopped here) get different names.
    monkeypatch.setattr(time, "strftime", lambda fmt: "20261204-120000")
    names = [new_run_dir(tmp_path, None, "sft", overwrite=False).name for _ in range(3)]
    assert names == ["sft-20261204-120000", "sft-20261204-120000-2", "sft-20261204-120000-3"]


# ---------------------------------------------------------------------------
# What --resume reads: the method, a complete config.yaml, paths from anywhere
# ---------------------------------------------------------------------------


def test_resume_checks_the_method_and_a_complete_config(runs, tmp_path):
    run_dir = copy_run(runs, tmp_path)
    refused(mlxpost("dpo", "--resume", run_dir), f"{run_dir} is a sft run, not a dpo run",
            f"mlxpost sft --resume {run_dir}")
    text = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text("")
    refused(mlxpost("sft", "--resume", run_dir), "config.yaml: empty or not a mapping")
    assert (run_dir / "config.yaml").read_text() == ""  # never replaced by defaults
    cut = text[: text.index("\ntrain:")]  # cut short after the data section
    (run_dir / "config.yaml").write_text(cut)
    refused(mlxpost("sft", "--resume", run_dir), "config.yaml: the section train is missing")
    assert (run_dir / "config.yaml").read_text() == cut
    # A setting that identifies the run is never filled; one added since the run started takes its default.
    (run_dir / "config.yaml").write_text(text.replace("  seed: 0\n", ""))
    refused(mlxpost("sft", "--resume", run_dir), "config.yaml: train.seed is missing")
    (run_dir / "config.yaml").write_text(text.replace("  stuck_steps: 10\n", ""))
    r = mlxpost("sft", "--resume", run_dir, "--set", "train.steps=2")
    assert "has no train.stuck_steps" in r.stderr + r.stdout and "using the defaults" in r.stderr + r.stdout


def test_relative_paths_are_stored_absolute_and_resume_from_anywhere(tmp_path, tiny_model, sft_data):
    work = tmp_path / "work"
    shutil.copytree(sft_data, work / "data")
    killed = mlxpost("sft", "--model", tiny_model, "--data", "data", "--steps", 4, "--out", "runs", "--name", "r",
                     "--plain", "--set", "train.save_every=2", cwd=work, fault="after_training")
    assert killed.returncode == -signal.SIGKILL
    cfg = (work / "runs" / "r" / "config.yaml").read_text()
    assert f"path: {work / 'data'}\n" in cfg and f"dir: {work / 'runs'}\n" in cfg
    out = ok(mlxpost("sft", "--resume", work / "runs" / "r", "--plain", cwd=tmp_path))
    assert "completing the run" in out.stdout and (work / "runs" / "r" / "summary.json").exists()


# ---------------------------------------------------------------------------
# A non-finite stop: resume with a lower learning rate; failure.json is strict JSON
# ---------------------------------------------------------------------------


def diverging_above(lr_limit: float):
    """The method's objective, whose loss turns NaN from its 5th call on while train.lr is above ``lr_limit``
    (eager mode, so the Python counter runs every call): a divergence that a lower rate cures."""
    calls = {"n": 0}

    def objective_for(prep) -> Objective:
        objective = get_method(prep.cfg.method).objective(prep)
        real, lr = objective.loss, prep.cfg.train.lr

        def loss(model, batch):
            s, c, m = real(model, batch)
            calls["n"] += 1
            return (s * float("nan") if calls["n"] >= 5 and lr > lr_limit else s), c, m

        objective.loss = loss
        return objective

    return objective_for


def test_after_a_non_finite_stop_resume_takes_a_lower_learning_rate(tmp_path, tiny_model, sft_data):
    cfg = build_config(None, [f"model.path={tiny_model}", f"data.path={sft_data}", "train.steps=8",
                              "train.save_every=2", "train.eval_every=0", "train.eval_at_start=false",
                              "train.compile=false", "train.lr=1e-3", f"output.dir={tmp_path}", "output.name=r"])
    objective_for = diverging_above(5e-4)
    with pytest.raises(NonFiniteError) as e:
        run(cfg, objective_for, reporter=NullReporter())
    assert "non-finite loss at step 5" in str(e.value) and "--set train.lr=0.0001" in str(e.value)
    run_dir = tmp_path / "r"

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))

    failure = strict((run_dir / "failure.json").read_text())
    assert failure["loss"] == "NaN" and failure["step"] == 5
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        strict(line)

    with pytest.raises(ConfigError, match="train.lr=fast: train.lr: expected a number"):
        resume_config(run_dir, ["train.lr=fast"])
    resumed = resume_config(run_dir, ["train.lr=1e-4"])
    path, result = run(resumed, objective_for, reporter=NullReporter(), resume=run_dir)
    assert result.steps == 8 and result.stopped == "completed"
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    change = next(r for r in records if r["kind"] == "config_change")
    assert change["changes"] == {"train.lr": [0.001, 0.0001]}
    assert next(r for r in records if r["kind"] == "resume")["step"] == 4
    assert "lr: 0.0001" in (run_dir / "config.yaml").read_text()
    # A run that did not stop on a non-finite loss keeps its learning rate.
    with pytest.raises(ConfigError, match="only after a non-finite stop"):
        resume_config(run_dir, ["train.lr=1e-5"])


# ---------------------------------------------------------------------------
# A stuck run is said, live and in the summary; a healthy one is not
# ---------------------------------------------------------------------------


def test_a_flat_loss_is_warned_live_and_in_the_summary(runs, tmp_path, tiny_model, sft_data):
    out = ok(mlxpost("sft", "--model", tiny_model, "--data", sft_data, "--steps", 14, "--batch-size", 2, "--lr", 1e6,
                     "--out", tmp_path, "--name", "flat", "--plain", "--set", "train.eval_every=0"))
    said = out.stdout + out.stderr
    assert "warning: stuck at step" in said and "weights are no longer learning" in said
    health = json.loads((tmp_path / "flat" / "summary.json").read_text())["health"]
    assert health["stuck"]["verdict"] == "warn" and health["stuck"]["findings"][0]["step"] <= 12
    healthy = json.loads((runs / "straight" / "summary.json").read_text())["health"]
    assert healthy["stuck"] == {"verdict": "ok", "findings": []}


def test_a_bom_at_the_start_of_a_file_is_read_as_utf8(tmp_path, tiny_model, sft_data):
    from mlx_lm.utils import load_tokenizer

    from mlxpost.data.load import tokenize_file
    from mlxpost.data.render import Renderer

    plain = sft_data / "train.jsonl"
    bom = tmp_path / "train.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    r = Renderer(load_tokenizer(tiny_model))
    a, _ = tokenize_file(plain, r, max_seq_len=256)
    b, _ = tokenize_file(bom, r, max_seq_len=256)
    assert len(a) == len(b) and all(np.array_equal(x.tokens, y.tokens) for x, y in zip(a, b))


def test_errors_name_the_run_directory_problem_without_a_traceback(tmp_path):
    with pytest.raises(MlxpostError, match="no config.yaml"):
        resume_config(tmp_path, [])


def test_an_rl_run_killed_before_its_evaluation_is_completed_by_resume(tmp_path, tiny_model):
    """Online RL's end is its greedy evaluation of the validation prompts: a kill before it (what the run
    directory holds then is made here by removing what came after) is completed exactly by --resume."""
    from mlxpost.assets import ARITH_TASKS_DIR

    cfg = build_config(None, [f"model.path={tiny_model}", f"data.path={ARITH_TASKS_DIR}", "grpo.group_size=4",
                              "grpo.prompts_per_step=2", "grpo.max_new_tokens=6", "train.lr=1e-2",
                              f"output.dir={tmp_path}", "output.name=r", "train.report_every=1",
                              "grpo.eval_prompts=4", "train.steps=2", "train.save_every=1"], method="rlvr")
    run_dir, _ = run(cfg, reporter=NullReporter())
    first = {f: json.loads((run_dir / f).read_text()) for f in ("summary.json", "rl_eval_after.json")}
    for f in first:
        (run_dir / f).unlink()
    run(resume_config(run_dir, []), reporter=NullReporter(), resume=run_dir)
    again = {f: json.loads((run_dir / f).read_text()) for f in first}

    def strip(d):  # timings differ between processes
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k not in TIMING + ("seconds",)}

    assert strip(again["rl_eval_after.json"]) == strip(first["rl_eval_after.json"])
    assert strip(again["summary.json"]) == strip(first["summary.json"])
    assert again["summary.json"]["health"]["quality_gate"]["verdict"] in ("pass", "fail")
