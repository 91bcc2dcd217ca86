"""``mlxpost runs``: the demo's runs with their chain, newest first; every status a run can be in; what gives way on a
narrow terminal."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from mlxpost.cli.runs import runs_command
from mlxpost.files import shown_path
from mlxpost.tools.runs import RunEntry, list_runs, listing
from mlxpost.training.rundir import acquire_lock, is_locked


def test_the_demos_runs_newest_first_with_their_chain(demo_runs):
    entries = list_runs(demo_runs)
    assert [e.name for e in entries] == ["rlvr", "grpo", "dpo", "sft"]  # started last first
    assert [e.chain for e in entries] == [["grpo", "dpo", "sft"], ["dpo", "sft"], ["sft"], []]
    assert all(e.status == "finished" and e.step == e.total == 2 for e in entries)
    rlvr, _, dpo, sft = entries
    assert [e.method for e in entries] == ["rlvr", "grpo", "dpo", "sft"]
    summary = json.loads((demo_runs / "dpo" / "summary.json").read_text())
    assert dpo.metrics["val_loss"] == summary["val_loss"]
    assert dpo.metrics["margin"] == summary["val_metrics"]["val_rewards/margins"]
    assert dpo.gate == summary["health"]["quality_gate"]["verdict"] and rlvr.gate in ("pass", "fail")
    assert "final_acc" in rlvr.metrics and sft.gate in ("pass", "fail")  # SFT's validation-perplexity gate
    assert sft.wall_seconds == summary_of(demo_runs / "sft")["wall_seconds"]
    assert dpo.parent == str((demo_runs / "sft").resolve())


def summary_of(run):
    return json.loads((run / "summary.json").read_text())


def test_the_command_prints_one_line_per_run_in_100_columns_and_json(demo_runs):
    r = CliRunner().invoke(runs_command, [str(demo_runs), "--width", "100"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert max(map(len, lines)) <= 100
    assert lines[0].split() == ["run", "method", "status", "final", "metrics", "gate", "wall", "from"]
    assert lines[2].startswith("rlvr") and lines[2].rstrip().endswith("grpo ← dpo ← sft")
    assert lines[4].startswith("dpo") and "finished 2/2" in lines[4] and "margin" in lines[4]
    assert lines[5].startswith("sft") and lines[5].rstrip().endswith("-")
    assert lines[6].startswith("base model of every run: ")  # said once, not on every line
    js = json.loads(CliRunner().invoke(runs_command, [str(demo_runs), "--json"]).output)
    assert [(x["name"], x["progress"], x["chain"]) for x in js] == [
        ("rlvr", "finished 2/2", ["grpo", "dpo", "sft"]), ("grpo", "finished 2/2", ["dpo", "sft"]),
        ("dpo", "finished 2/2", ["sft"]), ("sft", "finished 2/2", [])]


def test_stopped_failed_running_and_not_started_runs(demo_runs, tmp_path):
    root = tmp_path / "runs"
    for name in ("stopped", "failed", "running", "fresh"):
        shutil.copytree(demo_runs / "sft", root / name)
    # stopped: killed after step 1 (no summary; metrics.jsonl up to step 1)
    (root / "stopped" / "summary.json").unlink()
    records = [json.loads(x) for x in (root / "stopped" / "metrics.jsonl").read_text().splitlines()]
    kept = [r for r in records if r.get("step", 0) <= 1 or r["kind"] == "setup"]
    (root / "stopped" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"kind": "tr')
    shutil.rmtree(root / "stopped" / "checkpoints")
    # failed: a non-finite loss at step 2
    (root / "failed" / "failure.json").write_text(json.dumps({"step": 2, "reason": "non-finite loss"}))
    # not started: config.yaml only
    for f in (root / "fresh").iterdir():
        if f.name != "config.yaml":
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    held = acquire_lock(root / "running")  # this process trains in it
    try:
        assert is_locked(root / "running") and not is_locked(root / "failed")
        by_name = {e.name: e for e in list_runs(root)}
    finally:
        held.close()
    assert not is_locked(root / "running")

    assert by_name["stopped"].progress() == "stopped at 1/2"
    assert by_name["failed"].progress() == "failed at 2/2 (non-finite loss)"
    assert by_name["running"].progress() == "running 2/2"
    assert by_name["fresh"].status == "not started"
    block, _ = listing(list(by_name.values()), 100)
    assert block.width() <= 100


def test_runs_of_a_sweep_and_nested_directories_are_found(demo_runs, tmp_path):
    (tmp_path / "sweeps" / "s1").mkdir(parents=True)
    shutil.copytree(demo_runs / "sft", tmp_path / "sweeps" / "s1" / "p1")
    shutil.copytree(demo_runs / "dpo", tmp_path / "solo")
    names = sorted(e.name for e in list_runs(tmp_path))
    assert names == ["solo", "sweeps/s1/p1"]  # nothing found inside a run (own/, best/, checkpoints/)
    (solo,) = [e for e in list_runs(tmp_path) if e.name == "solo"]
    assert solo.chain == [shown_path(str((demo_runs / "sft").resolve()))]  # a parent outside DIR: its path
    r = CliRunner().invoke(runs_command, [str(tmp_path / "nope")])
    assert r.exit_code != 0 and "no such directory" in str(r.exception)


def entry(name, method, metrics, chain, gate=None, warnings=()):
    return RunEntry(path=None, name=name, method=method, status="finished", step=12, total=12, started=None,
                    wall_seconds=165.4, base="default", parent=None, metrics=metrics, gate=gate,
                    warnings=list(warnings), chain=chain)


def test_a_narrow_terminal_shows_fewer_metrics_before_it_cuts_the_chain():
    # The real demo's runs (SmolLM2, 20/24/10/12 steps): three metrics and the chain do not fit in 100 columns.
    entries = [entry("rlvr", "rlvr", {"final_acc": 0.5, "step_acc": 0.5, "reward": 0.5}, ["grpo", "dpo", "sft"],
                     "fail"),
               entry("dpo", "dpo", {"val_loss": 0.86, "margin": 2.4919, "pref_acc": 1.0}, ["sft"], "pass",
                     ["drift"]),
               entry("sft", "sft", {"val_loss": 0.7709, "correct": 0.0833, "json": 0.8167}, [])]
    wide, note = listing(entries, 160)
    assert note == "base model of every run: default" and "base" not in wide.header
    assert wide.rows[0][3] == "final_acc 0.5  step_acc 0.5  reward 0.5" and wide.rows[1][4] == "pass, 1 warn"
    narrow, _ = listing(entries, 100)
    assert narrow.width() <= 100 < wide.width()
    assert [r[-1] for r in narrow.rows] == ["grpo ← dpo ← sft", "sft", "-"]  # whole
    assert [r[3] for r in narrow.rows] == ["final_acc 0.5  step_acc 0.5", "val_loss 0.86  margin 2.49",
                                           "val_loss 0.771  correct 0.0833"]  # two metrics each, numbers whole
    tight, _ = listing(entries, 80)  # one metric is not enough: only then is the chain cut, in the middle
    assert tight.width() <= 80 and [r[3] for r in tight.rows] == ["final_acc 0.5", "val_loss 0.86", "val_loss 0.771"]
    assert tight.rows[0][-1].startswith("grpo ←") and tight.rows[0][-1].endswith("← sft") and "…" in tight.rows[0][-1]
