"""The built-in demo: SFT, then DPO from it, then RLVR from that, compared (tiny model, few steps)."""

from __future__ import annotations

import json

from mlxpost.tools.demo import STAGES, run_demo


class _Rec:
    def __init__(self):
        self.grids, self.infos = [], []

    def __getattr__(self, name):
        return lambda *a, **k: None

    def status(self, *a, **k):
        import contextlib

        return contextlib.nullcontext()

    def grid(self, title, header, rows):
        self.grids.append((title, header, rows))

    def info(self, msg, *a, **k):
        self.infos.append(msg)


def test_demo_runs_the_three_stages_each_from_the_previous_and_compares_them(tiny_model, tmp_path):
    out = tmp_path / "demo"
    rep = _Rec()
    res = run_demo(out, model=str(tiny_model), reporter=rep,
                   extra_sets=["train.steps=2", "lora.num_layers=-1"])
    assert [s.name for s in STAGES] == ["sft", "dpo", "rlvr"]
    for name in ("sft", "dpo", "rlvr"):
        assert (out / name / "summary.json").exists()
        assert res["stages"][name]["steps"] == 2
    # Each stage starts from the one before: the adapters stack.
    dpo_meta = json.loads((out / "dpo" / "adapter_config.json").read_text())["mlxpost"]
    rlvr_meta = json.loads((out / "rlvr" / "adapter_config.json").read_text())["mlxpost"]
    assert dpo_meta["from_adapter"] == str((out / "sft").resolve())
    assert rlvr_meta["from_adapter"] == str((out / "dpo").resolve())
    title, header, rows = rep.grids[-1]
    assert [r[0] for r in rows] == ["sft", "dpo", "rlvr"]
    assert "health" in header and "quality_gate" in rows[2][-1]
    # Each stage reports what it measured before and after (the SFT score is a plain number).
    assert rows[0][4].startswith("JSON answers 0.") and "final acc 0." in rows[2][4]
    assert json.loads((out / "demo.json").read_text())["stages"]["rlvr"]["method"] == "rlvr"
    # A second call reuses the finished stages.
    rep2 = _Rec()
    run_demo(out, model=str(tiny_model), reporter=rep2, extra_sets=["train.steps=2", "lora.num_layers=-1"])
    assert sum("already done" in m for m in rep2.infos) == 3
