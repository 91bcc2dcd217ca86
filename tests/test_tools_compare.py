"""``compare`` on a terminal: the demo's runs at 100 columns, metrics first and never cut, settings that
matter; Markdown and JSON keep everything; the table layouts (shrink, turn, split)."""

from __future__ import annotations

import io
import json

import pytest
import yaml
from click.testing import CliRunner
from rich.console import Console

from mlxpost.cli.compare import compare_command, rich_block
from mlxpost.tools.compare import collect_runs, compare, metric_value, terminal_settings
from mlxpost.tools.table import Block, fit, split_columns, transpose


def cells_by_run(blocks: list[Block], runs: list[str]) -> dict[tuple[str, str], str]:
    """(run, column header) -> cell text over every block, whichever way up the block is."""
    out = {}
    for b in blocks:
        if b.header[0] == "run" and all(r[0] in runs for r in b.rows):  # a row per run
            for r in b.rows:
                out.update({(r[0], h): c for h, c in zip(b.header[1:], r[1:])})
        else:  # turned: a column per run
            for r in b.rows:
                out.update({(run, r[0]): c for run, c in zip(b.header[1:], r[1:])})
    return out


STAGES = ["sft", "dpo", "grpo", "rlvr"]


@pytest.fixture(scope="module")
def demo_comparison(demo_runs):
    """What the demo's last line suggests: mlxpost compare runs/demo/sft runs/demo/dpo runs/demo/grpo runs/demo/rlvr."""
    return compare(collect_runs([demo_runs / s for s in STAGES]))


def test_the_demos_runs_read_on_a_100_column_terminal(demo_comparison):
    comp = demo_comparison
    text = comp.to_text(100)
    assert max(len(line) for line in text.splitlines()) <= 100
    blocks = comp.text_blocks(100)
    titles = [b.title for b in blocks]
    assert titles[0] == "metrics" and "dpo metrics" in titles and titles[-1].startswith("settings that differ")
    assert "\n".join(blocks[0].lines()) in text  # metrics first
    # Every metric of every run is there, whole.
    shown = cells_by_run(blocks, STAGES)
    n = 0
    for row in comp.rows:
        for m in comp.metrics:
            if row.cells[m].mean is not None:
                assert shown[(row.name, comp_header(m))].rstrip(" *") == row.cells[m].text(), (row.name, m)
                n += 1
    assert n >= 20
    # Runs of different methods: a metric of one method's runs only in that method's table, not as a column of '-'.
    dpo = blocks[titles.index("dpo metrics")]
    assert dpo.header == ["run", "expl. first after", "val_rewards/margins", "val_rewards/accuracies"]
    assert [r[0] for r in dpo.rows] == ["dpo"]
    rlvr = blocks[titles.index("rlvr metrics")]
    assert [r[0] for r in rlvr.rows] == ["rlvr"] and "eval_after.step_acc" in rlvr.header
    # Settings: only those of at least two runs that differ between them (one row per setting: too wide).
    keys = terminal_settings(comp)
    assert "train.lr" in keys and "dpo.beta" not in keys and "grpo.group_size" not in keys and "method" not in keys
    settings = blocks[-1]
    assert settings.header == ["run", *STAGES] and [r[0] for r in settings.rows] == keys
    lr = dict(zip(settings.header, next(r for r in settings.rows if r[0] == "train.lr")))
    assert lr["sft"] != lr["dpo"]
    assert len(keys) < len(comp.diff_keys) - 20  # the old table had a column for each of these
    assert "more setting(s) differ" in text and "verdicts:" in text
    # Losses of different methods are not ranked against each other.
    assert comp.best == {}


def comp_header(m: str) -> str:
    from mlxpost.tools.compare import TEXT_HEADERS

    return TEXT_HEADERS.get(m, m)


def test_markdown_and_json_keep_every_setting(demo_comparison):
    comp = demo_comparison
    md = comp.to_markdown()
    assert "dpo.beta" in md.splitlines()[0] and "grpo.group_size" in md.splitlines()[0]
    js = comp.to_json()
    assert "dpo.beta" in js["diff_keys"] and js["runs"][1]["config"]["dpo.beta"] is not None
    assert js["runs"][1]["metrics"]["val_rewards/margins"] == metric_value(comp.runs[1], "val_rewards/margins")


def test_the_command_fits_its_width_and_the_rich_table_has_the_same_widths(demo_runs, demo_comparison):
    paths = [str(demo_runs / x) for x in STAGES]
    r = CliRunner().invoke(compare_command, paths + ["--width", "100", "--no-png"])
    assert r.exit_code == 0, r.output
    assert max(map(len, r.output.splitlines())) <= 100 and r.output.startswith("metrics\nrun ")
    wide = CliRunner().invoke(compare_command, paths + ["--width", "0", "--no-png"])
    assert max(map(len, wide.output.splitlines())) > 100  # no limit: as wide as it is
    for b in demo_comparison.text_blocks(100):
        buf = io.StringIO()
        Console(file=buf, width=100).print(rich_block(b))
        plain = [line for i, line in enumerate(b.lines()) if i != (2 if b.title else 1)]  # Rich draws no rule
        assert [line.rstrip() for line in buf.getvalue().splitlines()] == plain


def _sweep_run(d, rank, lr, loss, method="sft", **extra):
    d.mkdir(parents=True)
    cfg = {"method": method, "lora": {"rank": rank}, "train": {"lr": lr, "seed": 0}, **extra}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "summary.json").write_text(json.dumps({"stopped": "completed", "steps": 10, "final_train_loss": loss,
                                                "val_loss": loss + 0.1, "best_val_loss": loss + 0.05,
                                                "tokens_per_s": 100.0 * rank, "peak_memory_gb": 0.5,
                                                "wall_seconds": 60.0}))


def test_a_sweep_of_one_method_is_one_table_metrics_first_best_marked(tmp_path):
    for i, (rank, lr) in enumerate([(4, 1e-4), (8, 1e-4), (4, 3e-4)]):
        _sweep_run(tmp_path / f"p{i}", rank, lr, 1.0 - 0.1 * i)
    comp = compare(collect_runs(sorted(tmp_path.iterdir())))
    blocks = comp.text_blocks(100)
    assert len(blocks) == 1 and blocks[0].header[-2:] == ["lora.rank", "train.lr"]  # settings after the metrics
    assert blocks[0].header[:3] == ["run", "final loss", "val_loss"]
    row = blocks[0].rows[2]
    assert row[1] == "0.8000 *" and (2, 1) in blocks[0].marked
    narrow = comp.text_blocks(60)  # too wide for one table: metrics, then the settings
    assert all(b.width() <= 60 for b in narrow) and narrow[-1].title.startswith("settings")


def test_a_setting_of_one_method_shows_for_two_runs_of_it_and_n_a_for_the_others(tmp_path):
    _sweep_run(tmp_path / "sft", 8, 1e-4, 1.0)
    _sweep_run(tmp_path / "dpo-a", 8, 1e-4, 0.6, method="dpo", dpo={"beta": 0.1})
    _sweep_run(tmp_path / "dpo-b", 8, 1e-4, 0.5, method="dpo", dpo={"beta": 0.5})
    comp = compare(collect_runs([tmp_path / "sft", tmp_path / "dpo-a", tmp_path / "dpo-b"]))
    assert terminal_settings(comp) == ["dpo.beta"]
    shown = cells_by_run(comp.text_blocks(100), ["sft", "dpo-a", "dpo-b"])
    assert shown[("sft", "dpo.beta")] == "n/a" and shown[("dpo-b", "dpo.beta")] == "0.5"
    assert comp.best["loss"] == ["dpo-b"]  # among the DPO runs; the SFT run's loss is not comparable


def test_table_layouts_shrink_turn_and_split():
    paths = Block(["run", "from", "loss"], [["a", "/very/long/path/to/some/run/directory/sft", "0.123456"]],
                  ["l", "l", "r"], shrink={1})
    (cut,) = fit(paths, 30)
    assert cut.width() <= 30 and cut.rows[0][2] == "0.123456" and "…" in cut.rows[0][1]
    many = Block(["run"] + [f"metric{i}" for i in range(8)], [[f"run{j}"] + ["0.5000"] * 8 for j in range(12)],
                 ["l"] + ["r"] * 8, marked={(3, 2)})
    parts = fit(many, 40)
    assert len(parts) > 1 and all(p.width() <= 40 for p in parts)
    assert all(p.header[0] == "run" and [r[0] for r in p.rows] == [f"metric{i}" for i in range(8)] for p in parts)
    assert sum(len(p.header) - 1 for p in parts) == 12  # every run once
    assert (1, 4) in transpose(many).marked  # the best mark follows its cell
    assert split_columns(transpose(many), 10)[0].header == ["run", "run0"]  # at least one run each


def test_the_flop_column_is_mfu_when_a_peak_was_measured_else_model_flop_per_s(tmp_path):
    _sweep_run(tmp_path / "a", 4, 1e-4, 1.0)
    _sweep_run(tmp_path / "b", 8, 1e-4, 0.9)
    runs = collect_runs([tmp_path / "a", tmp_path / "b"])
    assert "mfu" not in compare(runs).metrics and "model_flops_per_s" not in compare(runs).metrics  # old runs
    for name, flops, mfu in (("a", 2.0e9, None), ("b", 3.0e9, None)):
        s = json.loads((tmp_path / name / "summary.json").read_text())
        (tmp_path / name / "summary.json").write_text(json.dumps({**s, "model_flops_per_s": flops, "mfu": mfu}))
    comp = compare(collect_runs([tmp_path / "a", tmp_path / "b"]))
    block = comp.text_blocks(120)[0]
    col = block.header.index("model FLOP/s")
    assert block.header[col - 1] == "tok/s" and [r[col] for r in block.rows] == ["2e+09", "3e+09 *"]
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    (tmp_path / "b" / "summary.json").write_text(json.dumps({**s, "mfu": 0.25}))
    block = compare(collect_runs([tmp_path / "a", tmp_path / "b"])).text_blocks(120)[0]
    col = block.header.index("MFU")
    assert "model FLOP/s" not in block.header and [r[col] for r in block.rows] == ["-", "0.2500"]
