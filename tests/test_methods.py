"""The method registry and the package's layering.

A new method is one module in ``mlxpost/methods`` plus its registry entry:
its section, defaults, option and objective reach the configuration, the
command line and the pipeline with no other file changed. The test writes
such a method here (as a plugin would) and trains it from the command line.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import click
import mlx.core as mx
import pytest
import yaml
from click.testing import CliRunner

import mlxpost
from mlxpost import methods
from mlxpost.cli.main import cli
from mlxpost.config import build_config
from mlxpost.core.logprobs import logprobs
from mlxpost.errors import ConfigError
from mlxpost.methods.base import Method, check_positive
from mlxpost.training.loop import Objective


@dataclass
class SeqSFTConfig:
    scale: float = 1.0  # multiplies the loss


def seq_nll(seq_logprobs: mx.array, valid: mx.array, scale: float) -> tuple[mx.array, mx.array, dict]:
    """Summed per-sequence mean NLL and the number of sequences.

    >>> loss, n, _ = seq_nll(mx.array([-1.0, -3.0, 0.0]), mx.array([1.0, 1.0, 0.0]), 2.0)
    >>> loss.item(), n.item()  # 2 * (1 + 3), two real sequences
    (8.0, 2.0)
    """
    return -scale * (seq_logprobs * valid).sum(), valid.sum(), {}


class SeqSFT(Method):
    """Every example weighs the same, however long (SFT weighs every token the same)."""

    name = "seqsft"
    help = "SFT with one weight per example (a test's method)."
    data = "sft"
    sections = {"seqsft": SeqSFTConfig}
    defaults = {"data.batching": "pad", "train.lr": 1e-3}  # one sequence per row
    options = (click.option("--scale", "seqsft__scale", type=float, help="Loss scale."),)

    def validate(self, cfg) -> None:
        check_positive(cfg, "seqsft.scale")

    def objective(self, prep) -> Objective:
        scale = prep.cfg.seqsft.scale

        def loss(model, batch):
            lp = logprobs(model, batch, reduction="mean", split=prep.split, select=batch.select)  # (B,)
            return seq_nll(lp, (batch.weights.sum(axis=1) > 0).astype(mx.float32), scale)

        return Objective(loss=loss, unit="sequence", perplexity=False)


@pytest.fixture
def seqsft():
    methods.register(SeqSFT())
    yield
    methods.unregister("seqsft")


def test_a_new_method_is_one_class_and_its_registry_entry(seqsft, tmp_path, tiny_model, sft_data):
    """Registered, the method has a command with its option, a config section, defaults and checks, and
    trains through the shared pipeline: the loss falls and only the adapters change."""
    runner = CliRunner()
    r = runner.invoke(cli, ["--help"])
    assert "seqsft" in r.output
    r = runner.invoke(cli, ["seqsft", "--help"])
    assert r.exit_code == 0 and "--scale" in r.output and "--model" in r.output

    cfg = build_config(None, ["seqsft.scale=2"], method="seqsft")
    assert cfg.seqsft.scale == 2.0 and cfg.train.lr == 1e-3 and cfg.data.batching == "pad"
    assert "seqsft" in cfg.to_dict() and "dpo" not in cfg.to_dict()
    with pytest.raises(ConfigError, match="seqsft.scale: must be positive"):
        build_config(None, ["seqsft.scale=0"], method="seqsft")
    with pytest.raises(ConfigError, match="'seqsft.scale' is a setting of seqsft, not of sft"):
        build_config(None, ["seqsft.scale=2"], method="sft")

    r = runner.invoke(cli, ["seqsft", "--model", str(tiny_model), "--data", str(sft_data), "--out", str(tmp_path),
                            "--name", "s", "--steps", "8", "--scale", "2", "--plain", "--set", "train.eval_every=0",
                            "--set", "train.report_every=1", "--set", "train.batch_size=4"])
    assert r.exit_code == 0, r.output
    run = tmp_path / "s"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method"] == "seqsft" and saved["seqsft"] == {"scale": 2.0}
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("kind") == "train"]
    assert len(losses) == 8 and sum(losses[-3:]) < sum(losses[:3])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "seqsft" and summary["steps"] == 8
    r = runner.invoke(cli, ["seqsft", "--resume", str(run), "--set", "train.steps=9", "--plain"])
    assert r.exit_code == 0, r.output
    assert json.loads((run / "summary.json").read_text())["steps"] == 9


def test_unknown_methods_and_names_are_refused():
    with pytest.raises(ConfigError, match="unknown method 'nope' \\(known: sft, dpo"):
        methods.get("nope")
    with pytest.raises(ValueError, match="new name"):
        methods.register(methods.get("sft"))


# ---------------------------------------------------------------------------
# Layering (read from the source, nothing imported)
# ---------------------------------------------------------------------------

PACKAGE = Path(mlxpost.__file__).parent


def _imports() -> dict[str, set[str]]:
    """Module -> the mlxpost modules it imports (at any level, annotations-only imports left out)."""
    names = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in PACKAGE.rglob("*.py")}
    out = {}
    for mod, path in names.items():
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for b in tree.body if isinstance(b, ast.If) and "TYPE_CHECKING" in ast.unparse(b.test)
                       for n in ast.walk(b)}
        pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and id(node) not in typing_only and node.module != "__future__":
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else node.module
                for a in node.names:
                    full = f"{base}.{a.name}"
                    found.add(full if full in names else base)
            elif isinstance(node, ast.Import) and id(node) not in typing_only:
                found |= {a.name for a in node.names}
        out[mod] = {m for m in found if m in names and m != mod}
    return out


def test_the_import_graph_has_no_cycle():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in graph[m]:
            assert state.get(n) != 1, " -> ".join(path + [n])
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_the_layers_keep_their_rules():
    """The loop and the pipeline import no method (only the Method protocol); methods import no rl/ and
    no other method, only their family; the configuration's method sections come from the registry."""
    graph = _imports()
    families = {"mlxpost.methods.base", "mlxpost.methods.preference", "mlxpost.methods.preference_health",
                "mlxpost.methods.reference", "mlxpost.methods.online_rl"}
    method_modules = {m for m in graph if m.startswith("mlxpost.methods.")} - families
    for mod, deps in graph.items():
        if mod.startswith("mlxpost.training."):
            assert not deps & (method_modules | {"mlxpost.methods"} | families - {"mlxpost.methods.base"}), mod
        if mod.startswith("mlxpost.methods"):
            assert not any(d.startswith("mlxpost.rl") for d in deps), mod
        if mod in method_modules:
            assert not deps & method_modules, mod
