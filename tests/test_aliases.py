"""The option names users know: mlx-lm's on the training commands, TRL's config names in recipes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import mlxpost_env

from mlxpost.cli.train import apply_aliases, config_values
from mlxpost.config import build_config
from mlxpost.errors import MlxpostError


def recipe(tmp_path, text: str):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_trl_names_in_a_recipe_map_to_our_keys(tmp_path):
    cfg = build_config(recipe(tmp_path, "method: dpo\nlearning_rate: 5.0e-6\nper_device_train_batch_size: 2\n"
                                        "gradient_accumulation_steps: 8\nnum_train_epochs: 2\nmax_length: 512\n"
                                        "beta: 0.3\nlr_scheduler_type: linear\nreport_to: [tensorboard]\n"),
                       method="dpo")
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.epochs) == (5e-6, 2, 8, 2.0)
    assert cfg.data.max_seq_len == 512 and cfg.dpo.beta == 0.3 and cfg.train.schedule == "linear"
    assert cfg.train.report_to == "tensorboard"

    g = build_config(recipe(tmp_path, "method: grpo\ngrpo:\n  rewards: [accuracy]\nnum_generations: 4\n"
                                      "max_completion_length: 64\nbeta: 0.04\n"
                                      "temperature: 0.7\nepsilon_high: 0.28\n"), method="grpo")
    assert (g.grpo.group_size, g.grpo.max_new_tokens, g.grpo.beta, g.grpo.temperature, g.grpo.epsilon_high) == \
        (4, 64, 0.04, 0.7, 0.28)
    o = build_config(recipe(tmp_path, "method: orpo\nbeta: 0.25\n"), method="orpo")
    assert o.orpo.lam == 0.25  # TRL's ORPO beta is the odds-ratio weight, lambda here


def test_trl_names_that_do_not_map_say_what_to_write(tmp_path):
    with pytest.raises(MlxpostError, match=r"r\.yaml:2: epsilon: .*grpo\.epsilon_low"):
        build_config(recipe(tmp_path, "method: grpo\nepsilon: 0.2\n"), method="grpo")
    with pytest.raises(MlxpostError, match=r"r\.yaml:1: beta: a TRL setting that sft has no counterpart for"):
        build_config(recipe(tmp_path, "beta: 0.1\n"), method="sft")
    with pytest.raises(MlxpostError, match=r"r\.yaml:1: bf16: .*model\.dtype"):
        build_config(recipe(tmp_path, "bf16: true\n"), method="sft")
    with pytest.raises(MlxpostError, match="one tracker"):
        build_config(recipe(tmp_path, "report_to: [wandb, tensorboard]\n"), method="sft")


def test_mlx_lm_option_names_become_our_keys():
    kw = {"train__steps": None, "train__lr": None, "output__dir": None, "output__name": None, "dora": None,
          "skip_bad_rows": None, "overwrite": None, "alias__iters": 12, "alias__learning_rate": 1e-5,
          "alias__adapter_path": "out/adapters", "alias__num_layers": 4, "alias__fine_tune_type": "dora",
          "alias__max_seq_length": 256, "alias__grad_accumulation_steps": 2}
    values = config_values(kw)
    assert values == {"train.steps": 12, "train.lr": 1e-5, "output.dir": "out", "output.name": "adapters",
                      "lora.num_layers": 4, "lora.type": "dora", "data.max_seq_len": 256, "train.grad_accum": 2}
    with pytest.raises(MlxpostError, match="--iters 3 and its mlxpost name"):
        apply_aliases({"train__steps": 5, "alias__iters": 3})
    apply_aliases({"train__steps": 3, "alias__iters": 3})  # the same value both ways is fine
    with pytest.raises(MlxpostError, match="full fine-tuning"):
        apply_aliases({"alias__fine_tune_type": "full"})


def test_mlx_lm_names_run_from_the_command_line(tmp_path, tiny_model, sft_data):
    out = subprocess.run([sys.executable, "-m", "mlxpost", "sft", "--model", str(tiny_model), "--data", str(sft_data),
                          "--iters", "2", "--learning-rate", "1e-3", "--adapter-path", str(tmp_path / "ad"),
                          "--num-layers", "1", "--max-seq-length", "128", "--grad-accumulation-steps", "2",
                          "--fine-tune-type", "lora"], capture_output=True, text=True, env=mlxpost_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = yaml.safe_load((tmp_path / "ad" / "config.yaml").read_text())
    assert cfg["train"]["steps"] == 2 and cfg["train"]["lr"] == 1e-3 and cfg["train"]["grad_accum"] == 2
    assert cfg["lora"]["num_layers"] == 1 and cfg["data"]["max_seq_len"] == 128
    assert (tmp_path / "ad" / "adapters.safetensors").exists()
    helptext = subprocess.run([sys.executable, "-m", "mlxpost", "sft", "--help"], capture_output=True, text=True,
                              env=mlxpost_env()).stdout
    assert "--iters" not in helptext and "--steps" in helptext  # hidden aliases
