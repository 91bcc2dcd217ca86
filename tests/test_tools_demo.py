"""The built-in demo: SFT, then DPO from it, then RLVR from that, compared (tiny model, few steps)."""

from __future__ import annotations

import json

from mlxpost.tools.demo import RETENTION_TASK, STAGES, run_demo
from mlxpost.ui import NullReporter


class _Rec(NullReporter):
    """Keeps the tables and messages; everything else as the null reporter (progress bars included)."""

    def __init__(self):
        super().__init__()
        self.grids, self.infos = [], []

    def grid(self, title, header, rows):
        self.grids.append((title, header, rows))

    def info(self, msg, *a, **k):
        self.infos.append(msg)


def test_demo_runs_the_four_stages_each_from_the_previous_and_measures_them(tiny_model, tmp_path):
    out = tmp_path / "demo"
    rep = _Rec()
    res = run_demo(out, model=str(tiny_model), reporter=rep,
                   extra_sets=["train.steps=2", "lora.num_layers=-1", "grpo.eval_prompts=6", "sample.max_tokens=8",
                               "grpo.max_new_tokens=8"])
    names = ["sft", "dpo", "grpo", "rlvr"]
    assert [s.name for s in STAGES] == names
    for name in names:
        assert (out / name / "summary.json").exists()
        assert res["stages"][name]["steps"] == 2
    # Each stage starts from the one before: the adapters stack. Each run keeps its own adapter in own/ and
    # the whole stack, as one adapter for mlx-lm, at its top.
    for name, before in zip(names[1:], names):
        meta = json.loads((out / name / "own" / "adapter_config.json").read_text())["mlxpost"]
        assert meta["from_adapter"] == str((out / before).resolve())
    assert not (out / "sft" / "own").exists()
    rlvr_top = json.loads((out / "rlvr" / "adapter_config.json").read_text())["mlxpost"]
    assert "from_adapter" not in rlvr_top
    assert rlvr_top["stacked_from"] == [str(out / "sft")] + [str(out / n / "own") for n in names[1:]]
    # Each stage measures on held-out prompts, before and after, with the change's interval.
    s = res["stages"]
    assert s["sft"]["behaviour"]["json"]["n"] == 60 and len(s["sft"]["behaviour"]["json"]["ci95"]) == 2
    assert "explanation_first" in s["dpo"]["behaviour"]
    assert s["grpo"]["eval_change"]["reward"]["n"] == 6 and "final_acc" in s["rlvr"]["eval_change"]
    title, header, rows = rep.grids[-1]
    assert [r[0] for r in rows if r[0]] == names
    measured = [r for r in rows if not r[3].startswith("general text")]
    assert "95% CI" in header[4] and all("95% CI" in r[4] for r in measured)
    # ... and what it cost: the general text's perplexity before and after each stage (train.eval_tasks).
    kept = [r for r in rows if r[3].startswith("general text")]
    assert len(kept) == 4 and all("kept" in r[4] and r[5].startswith("kept") for r in kept)
    for name in names:
        ev = s[name]["eval_tasks"]
        assert ev["min_retention"] == 0.9 and set(ev["before"]) == set(ev["after"]) == {RETENTION_TASK}
        assert ev["before"][RETENTION_TASK]["ppl"] > 1 and (out / name / "baseline_metrics.json").exists()
    # The stage after SFT starts where SFT ended: SFT's evaluation after training is DPO's baseline, copied.
    for name, before in zip(names[1:], names):
        assert s[name]["eval_tasks"]["before"] == s[before]["eval_tasks"]["after"]
        base = json.loads((out / name / "baseline_metrics.json").read_text())
        assert base["target"]["copied_from"] == str(out / before / "eval") and base["target"]["when"] == "before"
    assert "copied_from" not in json.loads((out / "sft" / "baseline_metrics.json").read_text())["target"]
    assert json.loads((out / "demo.json").read_text())["stages"]["rlvr"]["method"] == "rlvr"
    # A second call reuses the finished stages.
    rep2 = _Rec()
    run_demo(out, model=str(tiny_model), reporter=rep2, extra_sets=["train.steps=2", "lora.num_layers=-1"])
    assert sum("already done" in m for m in rep2.infos) == 4
