"""Sweeps (``mlxpost ablate``) and comparisons (``mlxpost compare``) on the tiny model."""

from __future__ import annotations

import io
import json

import mlx.core as mx
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from mlxpost.config import build_config
from mlxpost.errors import ConfigError, MlxpostError
from mlxpost.tools.compare import collect_runs, compare, direction, plot_curves, run_verdict
from mlxpost.tools.run_cache import ModelSnapshot, RunCache
from mlxpost.tools.sweep import PlainView, Sweep
from mlxpost.tools.sweep_plan import expand, parse_grid, plan_sweep, point_names, split_values
from mlxpost.ui import NullReporter

FAST = ["train.eval_every=0", "train.save_every=0", "train.report_every=1", "train.batch_size=4",
        "data.batching=pad", "train.eval_batches=1"]

# The random tiny model's validation perplexity (~500) is far above SFT's default gate (20); the SFT sweeps
# below test the sweep's mechanics, so their gate is raised and passes.
OPEN_GATE = "sft.gate_max_val_ppl=1e9"


def base_sets(model, data, *more):
    return [f"model.path={model}", f"data.path={data}", *FAST, *more]


def quiet(_point):
    return NullReporter()


def run_quiet(sweep, **kw):
    return sweep.run(view=PlainView(io.StringIO()), inner_reporter=kw.pop("inner_reporter", quiet), **kw)


def cli():
    from mlxpost.cli.compare import compare_command
    from mlxpost.cli.main import cli as group
    from mlxpost.cli.sweep import ablate

    for c in (ablate, compare_command):
        if c.name not in group.commands:  # until mlxpost.cli.main registers them
            group.add_command(c)
    return group


# ---------------------------------------------------------------------------
# The grid, its points and their names (no training)
# ---------------------------------------------------------------------------


def test_grid_values_are_parsed_like_set_values():
    assert split_values("4,[q_proj, v_proj],'a,b', x") == ["4", "[q_proj, v_proj]", "'a,b'", "x"]
    a = parse_grid("lora.targets=all-linear,[q_proj,v_proj]")
    assert a.key == "lora.targets" and a.values == ["all-linear", ["q_proj", "v_proj"]]
    b = parse_grid("train.lr=1e-4,3e-4,0.001")
    assert b.values == ["1e-4", "3e-4", 0.001] and b.raws == ["1e-4", "3e-4", "0.001"]  # as --set reads them
    assert parse_grid("train.grad_checkpoint=true,false").values == [True, False]
    for bad, msg in (("lora.rank", "expected KEY=V1,V2"), ("lora.rank=4,,8", "empty value"),
                     ("lora.rank=4,8,4", "listed twice"), ("output.name=a,b", "cannot vary"),
                     ("method=sft,dpo", "cannot vary")):
        with pytest.raises(ConfigError, match=msg):
            parse_grid(bad)


def test_expansion_order_seeds_and_names():
    axes = [parse_grid("lora.rank=4,8,16"), parse_grid("dpo.beta=0.05,0.1")]
    pts = expand(axes, seeds=2, base_seed=0)
    assert len(pts) == 12
    assert [(p[0][1], p[1][1], p[2][1]) for p in pts[:4]] == [(4, 0.05, 0), (4, 0.05, 1), (4, 0.1, 0), (4, 0.1, 1)]
    names = point_names(pts)
    assert names[:3] == ["r04-b0.05-s0", "r04-b0.05-s1", "r04-b0.1-s0"] and names[-1] == "r16-b0.1-s1"
    assert len(set(names)) == 12
    # Keys with the same initial (scale, seed) get longer abbreviations; a base seed of 5 makes seeds 5, 6.
    pts = expand([parse_grid("lora.rank=4,8"), parse_grid("lora.scale=1,2.5"), parse_grid("train.lr=1e-4,2e-4")],
                 seeds=2, base_seed=5)
    n = point_names(pts)
    assert n[:2] == ["ra4-sc1-lr1e-4-se5", "ra4-sc1-lr1e-4-se6"] and n[2] == "ra4-sc1-lr2e-4-se5", n[:3]
    # Too long (or colliding) names fall back to numbers.
    long = expand([parse_grid("lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj],[down_proj]")])
    assert point_names(long) == ["p000", "p001"]


def test_random_sampling_is_deterministic_without_replacement():
    axes = [parse_grid("lora.rank=1,2,4,8,16"), parse_grid("train.lr=1e-4,2e-4,3e-4,4e-4")]
    a = expand(axes, random_n=7, random_seed=3)
    b = expand(axes, random_n=7, random_seed=3)
    c = expand(axes, random_n=7, random_seed=4)
    key = lambda pts: [tuple(v for _, v, _ in p) for p in pts]  # noqa: E731
    assert key(a) == key(b) and key(a) != key(c)
    assert len(set(key(a))) == 7
    full = key(expand(axes))
    assert set(key(a)) <= set(full) and key(a) == sorted(key(a), key=full.index)  # in grid order
    assert len(expand(axes, random_n=50)) == 20  # more than the grid: all of it
    assert len(expand(axes, random_n=3, seeds=2)) == 6


def test_every_point_is_checked_before_anything_runs(tmp_path, tiny_model, sft_data):
    sets = base_sets(tiny_model, sft_data)
    with pytest.raises(ConfigError, match=r"--grid lora.rnk=4,8: unknown key 'lora.rnk' \(did you mean 'lora.rank'"):
        plan_sweep(sets=sets, grid=["lora.rnk=4,8"])
    with pytest.raises(ConfigError, match=r"--grid lora.rank=4,x: lora.rank: expected an integer, got 'x'"):
        plan_sweep(sets=sets, grid=["lora.rank=4,x"])
    with pytest.raises(ConfigError, match=r"--grid lora.rank=4,0: value '0': lora.rank: must be positive"):
        plan_sweep(sets=sets, grid=["lora.rank=4,0"])
    with pytest.raises(ConfigError, match=r"--grid dpo.beta=0.1,0.2: 'dpo.beta' is a setting of dpo, not of sft"):
        plan_sweep(sets=sets, grid=["dpo.beta=0.1,0.2"])
    with pytest.raises(ConfigError, match="also fixed by --set train.seed=1"):
        plan_sweep(sets=sets + ["train.seed=1"], grid=["train.seed=0,1"])
    with pytest.raises(ConfigError, match="nothing to sweep"):
        plan_sweep(sets=sets)
    # A combination that no single value has: named by its point.
    with pytest.raises(ConfigError, match=r"sweep point lipo-ls0.1 \(dpo.loss=ipo dpo.label_smoothing=0.1\): "
                                          r"dpo.label_smoothing applies to the sigmoid"):
        plan_sweep(method="dpo", sets=sets, grid=["dpo.loss=sigmoid,ipo", "dpo.label_smoothing=0,0.1"])
    plan = plan_sweep(sets=sets, grid=["lora.rank=2,4"], seeds=2)
    assert [p.name for p in plan.points] == ["r2-s0", "r2-s1", "r4-s0", "r4-s1"]
    assert plan.points[3].overrides == {"lora.rank": 4, "train.seed": 1}
    assert plan.points[3].config["lora"]["rank"] == 4 and plan.points[3].config["train"]["seed"] == 1


def test_the_method_comes_from_the_recipe(tmp_path, tiny_model, pref_data):
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(yaml.safe_dump({"method": "dpo", "model": {"path": str(tiny_model)},
                                      "data": {"path": str(pref_data)}}))
    plan = plan_sweep(recipe=recipe, grid=["dpo.beta=0.05,0.5"])
    assert plan.method == "dpo" and plan.points[1].config["dpo"]["beta"] == 0.5
    with pytest.raises(ConfigError, match="this recipe is for 'dpo', not 'orpo'"):
        plan_sweep(method="orpo", recipe=recipe, grid=["lora.rank=2,4"])


# ---------------------------------------------------------------------------
# Reuse across the runs of one process
# ---------------------------------------------------------------------------


def test_restoring_the_snapshot_gives_back_a_clean_base_model(tiny_model):
    from mlx.utils import tree_flatten

    from mlxpost.model.adapters import attach_adapters, fuse_adapters, resolve_targets
    from mlxpost.model.load import load_model
    from mlxpost.model.lora import adapter_modules
    from mlxpost.training.loop import enable_grad_checkpoint

    lm = load_model(str(tiny_model), dtype="float32")
    model = lm.model
    before = dict(tree_flatten(model.parameters()))
    classes = [type(m) for _, m in model.named_modules()]
    snap = ModelSnapshot(model)
    # What runs do to a model: adapters (twice, the first merged as --from does), freezing, modes, checkpointing.
    keys = resolve_targets(model, "all-linear")
    attach_adapters(model, rank=4, scale=2.0, keys=keys)
    fuse_adapters(model)
    attach_adapters(model, rank=2, scale=2.0, keys=keys, dora=True)
    enable_grad_checkpoint(model)
    model.train()
    snap.restore()
    after = dict(tree_flatten(model.parameters()))
    assert not adapter_modules(model)
    assert [type(m) for _, m in model.named_modules()] == classes
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert len(tree_flatten(model.trainable_parameters())) == len(before)  # nothing left frozen
    assert not model.training
    out = model(mx.array([[1, 2, 3, 4]]))
    fresh = load_model(str(tiny_model), dtype="float32").model
    assert mx.array_equal(out, fresh(mx.array([[1, 2, 3, 4]]))).item()


def _adapter(run_dir):
    return {k: np.array(v) for k, v in mx.load(str(run_dir / "adapters.safetensors")).items()}


def test_a_sweep_point_equals_the_same_run_alone(tmp_path, tiny_model, sft_data):
    from mlxpost.training.pipeline import run

    more = ["train.steps=3", "lora.dropout=0.1", "train.lr=1e-3", "train.eval_every=2"]
    alone_cfg = build_config(None, base_sets(tiny_model, sft_data, *more, "lora.rank=4", "output.dir=" + str(tmp_path),
                                             "output.name=alone"))
    alone_dir, alone = run(alone_cfg, reporter=NullReporter())

    plan = plan_sweep(sets=base_sets(tiny_model, sft_data, *more), grid=["lora.rank=2,4"])
    sweep = Sweep.create(plan, out=tmp_path, name="sw")
    cache = RunCache()
    assert run_quiet(sweep, cache=cache) == 0
    assert cache.stats == {"model_hits": 1, "model_loads": 1, "data_hits": 1, "data_reads": 1}
    second = sweep.run_dir(sweep.points[1])
    s = json.loads((second / "summary.json").read_text())
    assert s["final_train_loss"] == alone.final_loss and s["val_loss"] == alone.val_loss
    a, b = _adapter(alone_dir), _adapter(second)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------
# Sweeps on the tiny model
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_point_sweep(tmp_path_factory, tiny_model, sft_data):
    out = tmp_path_factory.mktemp("sweeps")
    plan = plan_sweep(sets=base_sets(tiny_model, sft_data, "train.steps=2", "train.eval_every=1", OPEN_GATE),
                      grid=["lora.rank=2,4"])
    sweep = Sweep.create(plan, out=out, name="two")
    code = run_quiet(sweep)
    return sweep, code


def test_a_two_point_sweep_writes_two_runs_and_its_sweep_file(two_point_sweep):
    sweep, code = two_point_sweep
    assert code == 0
    data = json.loads((sweep.path / "sweep.json").read_text())
    assert data["status"] == "done" and data["grid"] == {"lora.rank": [2, 4]} and data["method"] == "sft"
    assert [(p["name"], p["status"], p["verdict"], p["exit_code"]) for p in data["points"]] == [
        ("r2", "done", "ok (gate pass)", 0), ("r4", "done", "ok (gate pass)", 0)]
    for p in data["points"]:
        d = sweep.path / p["name"]
        assert (d / "adapters.safetensors").exists() and (d / "summary.json").exists()
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        assert cfg["lora"]["rank"] == p["overrides"]["lora.rank"] and cfg["output"]["name"] == p["name"]
        assert p["step"] == p["total"] == 2 and p["best_val"] is not None
    comp = compare(collect_runs([sweep.path]))
    assert comp.diff_keys == ["lora.rank"] and not comp.grouped
    text = comp.to_text()
    assert "lora.rank" in text and "r2" in text and "r4" in text and "verdicts:" in text
    assert comp.metrics[:3] == ["loss", "val_loss", "best_val_loss"]
    assert all(len(v) >= 1 for v in comp.best.values()) and "val_loss" in comp.best


def test_compare_markdown_and_json(two_point_sweep, tmp_path):
    sweep, _ = two_point_sweep
    runs = collect_runs([sweep.path])
    comp = compare(runs, ["val_loss", "loss"])
    md = comp.to_markdown()
    lines = md.splitlines()
    r4 = json.loads((sweep.path / "r4" / "summary.json").read_text())
    flop = "MFU" if r4["mfu"] is not None else "model FLOP/s"  # MFU where mlxpost doctor cached a matmul peak
    assert lines[0] == f"| run | lora.rank | val_loss | final loss | tok/s | {flop} | peak mem GB | wall s |"
    assert lines[1] == "|---|---|---:|---:|---:|---:|---:|---:|"
    assert lines[2].startswith("| r2 | 2 |") and lines[3].startswith("| r4 | 4 |")
    best_val = comp.best["val_loss"][0]
    assert f"**{comp.rows[[r.name for r in comp.rows].index(best_val)].cells['val_loss'].text()}**" in md
    assert "- `r2`: ok" in md and "- `r4`: ok" in md
    js = json.loads(json.dumps(comp.to_json()))
    assert [r["name"] for r in js["runs"]] == ["r2", "r4"]
    assert js["runs"][1]["config"] == {"lora.rank": 4} and js["directions"]["val_loss"] == "min"
    summary = json.loads((sweep.path / "r4" / "summary.json").read_text())
    assert js["runs"][1]["metrics"]["val_loss"] == summary["val_loss"]
    assert js["runs"][1]["metrics"]["loss"] == summary["final_train_loss"]
    assert js["best"]["val_loss"] == [best_val]


def test_the_figure_has_one_curve_per_run_and_metric(two_point_sweep, tmp_path):
    pytest.importorskip("matplotlib")
    sweep, _ = two_point_sweep
    runs = collect_runs([sweep.path])
    png = tmp_path / "curves.png"
    fig = plot_curves(runs, ["loss", "val_loss", "rewards/margins"], png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["loss", "val_loss", "rewards/margins"]
    assert [len(ax.get_lines()) for ax in axes] == [2, 2, 0]  # no run logged margins
    val = axes[1].get_lines()[0]
    assert list(val.get_xdata()) == [0, 1, 2]  # eval at start, then every step


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_model, sft_data):
    # The tiny model has 2 blocks: adapting 99 fails when the run attaches its adapters.
    plan = plan_sweep(sets=base_sets(tiny_model, sft_data, "train.steps=1", OPEN_GATE), grid=["lora.num_layers=99,1"])
    sweep = Sweep.create(plan, out=tmp_path, name="sw")
    calls = []

    def run_fn(cfg, **kw):
        from mlxpost.training.pipeline import run

        calls.append(cfg.output.name)
        return run(cfg, **kw)

    assert run_quiet(sweep, run_fn=run_fn) == 1
    data = json.loads((sweep.path / "sweep.json").read_text())
    bad, good = data["points"]
    assert bad["status"] == "failed" and bad["exit_code"] == 2 and bad["error_type"] == "MlxpostError"
    assert "lora.num_layers is 99 but the model has 2 blocks" in bad["reason"]
    assert bad["verdict"].startswith("failed: lora.num_layers is 99")
    assert good["status"] == "done" and good["verdict"] == "ok (gate pass)" and data["status"] == "failed"
    # Resuming retries only the failed point (its run directory has no checkpoint: it starts over).
    sweep2 = Sweep.load(sweep.path)
    calls.clear()
    assert run_quiet(sweep2, run_fn=run_fn) == 1
    assert calls == [bad["name"]]
    assert sweep2.points[0].attempts == 2 and sweep2.points[0].status == "failed"
    # An unexpected exception is recorded with its type and traceback.
    plan = plan_sweep(sets=base_sets(tiny_model, sft_data, "train.steps=1"), grid=["lora.rank=2,4"])
    sweep3 = Sweep.create(plan, out=tmp_path, name="sw3")

    def broken(cfg, **kw):
        if cfg.lora.rank == 2:
            raise RuntimeError("something broke")
        from mlxpost.training.pipeline import run

        return run(cfg, **kw)

    assert run_quiet(sweep3, run_fn=broken) == 1
    p0, p1 = sweep3.points
    assert p0.status == "failed" and p0.reason == "RuntimeError: something broke" and p0.exit_code == 1
    assert "Traceback" in p0.traceback and p1.status == "done"


class _InterruptAt(NullReporter):
    def __init__(self, step):
        self.at = step

    def advance(self, step):
        if step == self.at:
            raise KeyboardInterrupt


def test_an_interrupted_sweep_resumes_only_what_is_missing(tmp_path, tiny_model, sft_data):
    plan = plan_sweep(sets=base_sets(tiny_model, sft_data, "train.steps=4", "train.save_every=2"),
                      grid=["lora.rank=2,4,8"])
    sweep = Sweep.create(plan, out=tmp_path, name="sw")
    code = run_quiet(sweep, inner_reporter=lambda p: _InterruptAt(3) if p.index == 1 else NullReporter())
    assert code == 130
    data = json.loads((sweep.path / "sweep.json").read_text())
    assert [p["status"] for p in data["points"]] == ["done", "interrupted", "pending"]
    assert data["status"] == "interrupted" and data["points"][1]["reason"] == "interrupted (Ctrl-C) at step 3 of 4"
    first_summary = (sweep.path / "r2" / "summary.json").stat().st_mtime_ns

    seen = []

    def run_fn(cfg, *, reporter, resume=None, cache=None):
        from mlxpost.training.pipeline import run

        seen.append((cfg.output.name, resume))
        return run(cfg, reporter=reporter, resume=resume, cache=cache)

    resumed = Sweep.load(sweep.path)
    assert run_quiet(resumed, run_fn=run_fn) == 0
    assert seen == [("r4", sweep.path / "r4"), ("r8", None)]
    assert (sweep.path / "r2" / "summary.json").stat().st_mtime_ns == first_summary
    records = [json.loads(line) for line in (sweep.path / "r4" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "resume" and r["step"] == 2 for r in records)
    s = json.loads((sweep.path / "r4" / "summary.json").read_text())
    assert s["steps"] == 4 and s["stopped"] == "completed"
    data = json.loads((sweep.path / "sweep.json").read_text())
    assert [p["status"] for p in data["points"]] == ["done"] * 3 and data["status"] == "done"
    assert data["points"][1]["attempts"] == 2


# ---------------------------------------------------------------------------
# Comparisons of hand-written runs: seed groups, best marks, verdicts
# ---------------------------------------------------------------------------


def _fake_run(d, rank, seed, loss, val, margins=None, health=None, stopped="completed"):
    d.mkdir(parents=True)
    cfg = {"method": "dpo", "lora": {"rank": rank, "dropout": 0.0}, "train": {"seed": seed, "lr": 5e-5},
           "output": {"dir": str(d.parent), "name": d.name}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    summary = {"stopped": stopped, "steps": 10, "final_train_loss": loss, "val_loss": val, "best_val_loss": val,
               "tokens_per_s": 1000.0 + rank, "peak_memory_gb": 0.1 * rank, "wall_seconds": 5.0}
    if margins is not None:
        summary["val_metrics"] = {"val_loss": val, "val_rewards/margins": margins, "val_rewards/accuracies": 0.5}
    if health:
        summary["health"] = health
    (d / "summary.json").write_text(json.dumps(summary))
    with open(d / "metrics.jsonl", "w") as f:
        for step in (1, 2, 3):
            f.write(json.dumps({"kind": "train", "step": step, "loss": loss + 1 / step}) + "\n")


def test_runs_differing_only_in_seed_are_grouped(tmp_path):
    gate_fail = {"drift": {"verdict": "warn", "findings": []},
                 "quality_gate": {"verdict": "fail", "margin": -0.1, "accuracy": 0.5, "min_margin": 0.0,
                                  "min_accuracy": 0.6}}
    _fake_run(tmp_path / "r4-s0", 4, 0, 0.50, 0.60, margins=0.2)
    _fake_run(tmp_path / "r4-s1", 4, 1, 0.70, 0.80, margins=0.4)
    _fake_run(tmp_path / "r8-s0", 8, 0, 0.30, 0.90, margins=-0.1, health=gate_fail)
    _fake_run(tmp_path / "r8-s1", 8, 1, 0.40, 1.00, margins=0.1)
    runs = collect_runs(sorted(tmp_path.iterdir()))
    comp = compare(runs)
    assert comp.grouped and comp.diff_keys == ["lora.rank"]
    assert [r.name for r in comp.rows] == ["r4", "r8"]
    cell = comp.rows[0].cells["val_loss"]
    assert cell.mean == pytest.approx(0.70) and cell.std == pytest.approx(np.std([0.6, 0.8], ddof=1)) and cell.n == 2
    assert comp.best["val_loss"] == ["r4"] and comp.best["loss"] == ["r8"]
    assert comp.best["val_rewards/margins"] == ["r4"] and comp.best["tokens_per_s"] == ["r8"]
    assert comp.best["peak_memory_gb"] == ["r4"] and "wall_seconds" not in comp.best  # all equal: not marked
    assert comp.metrics == ["loss", "val_loss", "best_val_loss", "val_rewards/margins", "val_rewards/accuracies",
                            "tokens_per_s", "peak_memory_gb", "wall_seconds"]
    text = comp.to_text()
    assert "0.7000 ± 0.1414 *" in text and "0, 1" in text
    verdicts = dict(v.split(": ", 1) for v in comp.verdict_lines())
    assert verdicts["r4-s0"] == "ok"
    assert verdicts["r8-s0"].startswith("gate fail: val margin -0.100 (> 0.0 needed), accuracy 0.500")
    assert "warnings: drift" in verdicts["r8-s0"]
    per_run = compare(runs, group_seeds=False)
    assert not per_run.grouped and per_run.diff_keys == ["lora.rank", "train.seed"] and len(per_run.rows) == 4
    js = comp.to_json()
    assert js["groups"][0]["runs"] == ["r4-s0", "r4-s1"] and js["groups"][0]["metrics"]["val_loss"]["n"] == 2


def test_directions_and_verdicts():
    assert [direction(m) for m in ("loss", "val_loss", "best_val_loss", "val_rewards/accuracies",
                                   "rewards/margins", "tokens_per_s", "peak_memory_gb", "wall_seconds",
                                   "rewards/chosen", "logps/rejected", "eval_after.final_acc", "reward", "kl",
                                   "grad_norm")] == [
        "min", "min", "min", "max", "max", "max", "min", "min", None, None, "max", "max", "min", None]
    assert run_verdict(None, status="failed", reason="boom") == "failed: boom"
    assert run_verdict(None, status="pending") == "not run yet"
    assert run_verdict({"stopped": "early_stopping", "steps": 7}) == "ok (early stopping at step 7)"
    assert run_verdict({"stopped": "completed", "health": {"quality_gate": {"verdict": "pass"}}}) == "ok (gate pass)"
    assert run_verdict({"stopped": "non_finite", "steps": 3}).startswith("failed: non-finite loss at step 3")


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


def test_ablate_and_compare_refuse_bad_arguments(tmp_path, tiny_model, sft_data):
    runner = CliRunner()
    base = ["ablate", "--model", str(tiny_model), "--data", str(sft_data), "--out", str(tmp_path), "--plain"]
    r = runner.invoke(cli(), base + ["--grid", "lora.rnk=4,8"])
    assert r.exit_code == 2 and "--grid lora.rnk=4,8: unknown key 'lora.rnk'" in r.output
    r = runner.invoke(cli(), base + ["--grid", "lora.rank=4,0"])
    assert r.exit_code == 2 and "must be positive" in r.output
    r = runner.invoke(cli(), base)
    assert r.exit_code == 2 and "nothing to sweep" in r.output
    r = runner.invoke(cli(), base + ["--grid", "lora.rank=2,4", "--seeds", "2", "--set", "train.seed=3",
                                     "--grid", "train.seed=1,2"])
    assert r.exit_code == 2 and "--seeds and --grid train.seed" in r.output
    assert not any(tmp_path.iterdir())  # nothing was created
    r = runner.invoke(cli(), ["ablate", "--resume", str(tmp_path), "--grid", "lora.rank=2,4"])
    assert r.exit_code == 2 and "drop --grid" in r.output
    r = runner.invoke(cli(), ["ablate", "--resume", str(tmp_path)])
    assert r.exit_code == 2 and "no sweep.json" in r.output
    r = runner.invoke(cli(), ["compare", str(tmp_path)])
    assert r.exit_code == 2 and "neither a run directory" in r.output
    r = runner.invoke(cli(), ["compare"])
    assert r.exit_code == 2 and "Missing argument" in r.output


def test_ablate_runs_a_sweep_from_the_command_line(tmp_path, tiny_model, sft_data, monkeypatch):
    monkeypatch.setattr("mlxpost.cli.compare.plot_available", lambda: False)  # no matplotlib: the tables still come
    runner = CliRunner()
    args = ["ablate", "--model", str(tiny_model), "--data", str(sft_data), "--out", str(tmp_path), "--name", "cli",
            "--steps", "1", "--plain", "--grid", "lora.num_layers=1,99"] + [a for s in FAST for a in ("--set", s)]
    r = runner.invoke(cli(), args)
    assert r.exit_code == 1, r.output
    out = r.output
    assert "[1/2] nl01: started (lora.num_layers=1)" in out and "[nl01] training: 1 steps" in out
    assert "[2/2] nl99: failed" in out and "nl99: failed: lora.num_layers is 99" in out
    assert "lora.num_layers" in out.split("verdicts:")[0]
    assert "matplotlib is not installed" in out and "mlxpost ablate --resume" in out
    r = runner.invoke(cli(), ["compare", str(tmp_path / "cli"), "--format", "json", "--no-png",
                              "--out", str(tmp_path / "c.json")])
    assert r.exit_code == 0, r.output
    js = json.loads((tmp_path / "c.json").read_text())
    assert [(x["name"], x["status"]) for x in js["runs"]] == [("nl01", "done"), ("nl99", "failed")]
    # The failed point failed before its first step: it left no run directory, sweep.json has its record.
    assert not (tmp_path / "cli" / "nl99").exists()
    r = runner.invoke(cli(), ["compare", str(tmp_path / "cli"), "--format", "markdown", "--no-png"])
    assert r.exit_code == 0 and r.output.startswith("| run | lora.num_layers |")


def test_compare_needs_existing_paths(tmp_path):
    with pytest.raises(MlxpostError, match="no such directory"):
        collect_runs([tmp_path / "nope"])
