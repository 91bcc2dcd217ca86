"""Recipes and overrides: precedence, unknown keys, wrong types, with file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlxpost.config import build_config, known_keys, load_recipe, parse_set
from mlxpost.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_precedence_cli_over_recipe_over_defaults(tmp_path):
    r = write(tmp_path, "method: sft\ntrain:\n  lr: 2e-4\n  steps: 50\nlora:\n  rank: 16\n")
    cfg = build_config(r, ["lora.rank=4"], cli={"train.steps": 7, "data.path": "d.jsonl", "train.lr": None})
    assert cfg.train.lr == 2e-4  # recipe (the CLI gave None: not typed)
    assert cfg.train.steps == 7  # command-line option beats the recipe
    assert cfg.lora.rank == 4  # --set beats everything
    assert cfg.data.path == "d.jsonl"
    assert cfg.train.batch_size == 4  # default


@pytest.mark.parametrize("text,line,message", [
    ("train:\n  lrr: 1\n", 2, "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    ("trian:\n  lr: 0.1\n", 2, "unknown key 'trian.lr' (did you mean 'train.lr'?)"),
    ("train:\n  lr: fast\n", 2, "train.lr: expected a number, got 'fast'"),
    ("model:\n  path: x\ntrain:\n  steps: 1.5\n", 4, "train.steps: expected an integer or null, got 1.5"),
    ("lora:\n  targets: 5\n", None, "lora.targets"),
    ("data:\n  batching: zip\n", None, "data.batching: expected one of auto, pack, pad"),
    ("train:\n  lr: [\n", 3, "not valid YAML"),
    ("- a\n- b\n", None, "must be a mapping"),
    ("train: 5\n", 1, "'train' is a section"),
    ("lora:\n  alpha: 16\n  scale: 2\n", None, "give alpha or scale, not both"),
    ("method: dpo\n", None, "this recipe is for 'dpo'"),
])
def test_bad_recipes_name_the_key_and_line(tmp_path, text, line, message):
    r = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        build_config(r)
    msg = str(e.value)
    assert message in msg
    if line is not None:
        assert f"{r}:{line}:" in msg


def test_set_overrides_are_checked():
    with pytest.raises(ConfigError, match=r"--set lora.rnk=8: unknown key 'lora.rnk' \(did you mean 'lora.rank'\?\)"):
        build_config(None, ["lora.rnk=8"])
    with pytest.raises(ConfigError, match="train.batch_size: expected an integer"):
        build_config(None, ["train.batch_size=four"])
    with pytest.raises(ConfigError, match="expected key=value"):
        build_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="must be positive"):
        build_config(None, ["train.lr=0"])
    assert parse_set("lora.targets=[q_proj, v_proj]") == ("lora.targets", ["q_proj", "v_proj"])
    assert build_config(None, ["train.max_grad_norm=null"]).train.max_grad_norm is None
    assert build_config(None, ["model.quantize=4"]).model.quantize == 4


def test_lora_scale_from_alpha():
    assert build_config(None, ["lora.rank=8"]).lora.resolved_scale() == 2.0  # alpha defaults to 2 * rank
    assert build_config(None, ["lora.rank=8", "lora.alpha=32"]).lora.resolved_scale() == 4.0
    assert build_config(None, ["lora.scale=20"]).lora.resolved_scale() == 20.0


def test_shipped_recipes_are_valid():
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert len(recipes) >= 3
    for r in recipes:
        first = r.read_text().splitlines()[0]
        assert first.startswith("# mlxpost "), f"{r.name} must start with the command that runs it"
        cfg = load_recipe(r)
        command = first.split()[2]
        assert cfg.method == command, f"{r.name}: the recipe's method must match its command"
    assert "train.lr" in known_keys()
    # The shipped SmolLM2 recipe is the built-in default run.
    import yaml

    from mlxpost.assets import DEFAULT_SFT_RECIPE

    shipped = yaml.safe_load((ROOT / "recipes" / "smollm2-135m-sft.yaml").read_text())
    assert shipped == yaml.safe_load(DEFAULT_SFT_RECIPE.read_text())
    # The recipes the package runs itself (the demo) are copied in recipes/ unchanged.
    from mlxpost.assets import RECIPES_DIR

    packaged = sorted(RECIPES_DIR.glob("*.yaml"))
    assert len(packaged) >= 3
    for r in packaged:
        assert (ROOT / "recipes" / r.name).read_text() == r.read_text(), r.name
