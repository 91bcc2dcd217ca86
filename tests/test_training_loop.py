"""Smoke training on tiny models: what changes, what does not, and the loop's guarantees."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxpost.config import build_config
from mlxpost.methods import sft
from mlxpost.training.loop import NonFiniteError, Trainer, build_schedule
from mlxpost.training.pipeline import prepare, total_steps
from mlxpost.training.rundir import RunDir
from mlxpost.ui import NullReporter


def make_cfg(model, data, *sets):
    return build_config(None, [f"model.path={model}", f"data.path={data}", "train.report_every=1",
                               "train.eval_every=0", "train.save_every=0", *sets])


def trainer_for(cfg, tmp_path, name="run"):
    prep = prepare(cfg, NullReporter())
    steps = total_steps(cfg, prep.train)
    run = RunDir(tmp_path / name)
    tr = Trainer(prep.loaded.model, sft.objective(prep.split), cfg.train, total_steps=steps, run=run,
                 reporter=NullReporter(), adapter_cfg=prep.adapter_cfg)
    return prep, tr


def params(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


@pytest.mark.parametrize("batching", ["pad", "pack"])
def test_a_few_steps_change_only_lora_parameters_and_lower_the_loss(tmp_path, tiny_model, sft_data, batching):
    cfg = make_cfg(tiny_model, sft_data, "train.steps=12", "train.lr=3e-3", f"data.batching={batching}",
                   "train.batch_size=4")
    prep, tr = trainer_for(cfg, tmp_path)
    before = params(prep.loaded.model)
    val_before = tr.evaluate(prep.valid)["val_loss"]
    result = tr.fit(prep.train, prep.valid)
    after = params(prep.loaded.model)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    lora_b = {k for k in before if k.endswith("lora_b")}
    assert changed and changed <= {k for k in before if k.endswith(("lora_a", "lora_b"))}
    assert lora_b <= changed  # every adapter learned something
    losses = [h["loss"] for h in result.history if h["kind"] == "train"]
    assert losses[-1] < losses[0] - 0.05
    assert result.val_loss < val_before
    assert result.stopped == "completed" and result.steps == 12
    assert (tmp_path / "run" / "adapters.safetensors").exists()


def test_gradient_accumulation_equals_a_bigger_batch(tmp_path, tiny_model, sft_data):
    """Two micro-batches of 2 give exactly the update of one batch of 4 (token-weighted mean)."""
    results, losses = [], []
    for bs, accum in ((4, 1), (2, 2)):
        # Plain SGD without clipping: the update is proportional to the gradient,
        # so any error in the normalisation shows (Adam's first step would hide it).
        cfg = make_cfg(tiny_model, sft_data, "train.steps=2", f"train.batch_size={bs}", f"train.grad_accum={accum}",
                       "data.batching=pad", "train.lr=0.5", "train.optimizer=sgd", "train.max_grad_norm=null",
                       "train.schedule=constant")
        prep, tr = trainer_for(cfg, tmp_path, name=f"r{bs}")
        # Same examples in the same order for both: feed the 4-row plan's rows two at a time.
        ex = prep.train.examples[:8]
        from mlxpost.core.batches import _stack

        batches4 = [_stack([[e] for e in ex[i:i + 4]], 64, 0, packed=False) for i in (0, 4)]
        batches2 = [_stack([[e] for e in ex[i:i + 2]], 64, 0, packed=False) for i in (0, 2, 4, 6)]

        class Fixed:
            def __init__(self, bs):
                self.bs, self.epoch_progress = bs, 0.0

            def __iter__(self):
                return iter(self.bs)

            def state(self):
                return {"epoch": 0, "index": 0}

        result = tr.fit(Fixed(batches4 if bs == 4 else batches2), None)
        results.append(params(prep.loaded.model))
        losses.append([h["loss"] for h in result.history if h["kind"] == "train"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)  # the logged mean loss is the same too
    a, b = results
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=2e-6, err_msg=k)


def test_same_seed_same_run(tmp_path, tiny_model, sft_data):
    finals = []
    for i in range(2):
        cfg = make_cfg(tiny_model, sft_data, "train.steps=5", "lora.dropout=0.1", "train.seed=3")
        prep, tr = trainer_for(cfg, tmp_path, name=f"s{i}")
        tr.fit(prep.train, None)
        finals.append(params(prep.loaded.model))
    for k in finals[0]:
        assert np.array_equal(finals[0][k], finals[1][k]), k


def test_non_finite_loss_stops_with_a_diagnosis_and_keeps_the_last_checkpoint(tmp_path, tiny_model, sft_data):
    cfg = make_cfg(tiny_model, sft_data, "train.steps=10", "train.save_every=2", "train.lr=1e-3")
    prep, tr = trainer_for(cfg, tmp_path)
    objective = tr.objective
    real = objective.loss
    calls = {"n": 0}

    def poisoned(model, batch):  # the 5th micro-batch gives a NaN loss
        loss, count, metrics = real(model, batch)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] >= 5 else loss), count, metrics

    objective.loss = poisoned
    tr.cfg.compile = False  # count calls, not traces
    tr._build_functions()
    with pytest.raises(NonFiniteError) as e:
        tr.fit(prep.train, None)
    msg = str(e.value)
    assert "non-finite loss at step 5" in msg and "step-0000004" in msg and "--resume" in msg
    failure = json.loads((tmp_path / "run" / "failure.json").read_text())
    assert failure["step"] == 5 and failure["examples"] and ":" in failure["examples"][0]
    assert RunDir(tmp_path / "run").latest_checkpoint().name == "step-0000004"
    # The checkpoint holds finite weights.
    w = mx.load(str(tmp_path / "run" / "checkpoints" / "step-0000004" / "adapters.safetensors"))
    assert all(mx.isfinite(v).all().item() for v in w.values())


def test_early_stopping_keeps_the_best(tmp_path, tiny_model, sft_data):
    # Validation loss flattens out quickly on this tiny model: improvements
    # smaller than min_delta count against patience.
    cfg = make_cfg(tiny_model, sft_data, "train.steps=60", "train.lr=0.5", "train.eval_every=2",
                   "train.early_stopping_patience=2", "train.early_stopping_min_delta=0.01",
                   "train.schedule=constant", "train.max_grad_norm=null")
    prep, tr = trainer_for(cfg, tmp_path)
    result = tr.fit(prep.train, prep.valid)
    assert result.stopped == "early_stopping"
    assert result.steps < 60
    evals = [h for h in result.history if h["kind"] == "eval"]
    losses = [h["val_loss"] for h in evals]
    # The last two evaluations did not beat the reference by min_delta ...
    ref = min(losses[:-2])
    assert all(v > ref - 0.01 for v in losses[-2:])
    # ... and best/ holds the lowest validation loss seen, whatever min_delta says.
    best = min(evals, key=lambda h: h["val_loss"])
    assert result.best_step == best["step"] and result.best_val_loss == pytest.approx(best["val_loss"])
    info = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    assert info["step"] == best["step"]
    best_w = mx.load(str(tmp_path / "run" / "best" / "adapters.safetensors"))
    final_w = mx.load(str(tmp_path / "run" / "adapters.safetensors"))
    same = all(mx.array_equal(best_w[k], final_w[k]) for k in best_w)
    assert same == (best["step"] == result.steps)


def test_schedules():
    cfg = build_config(None, ["train.lr=1.0", "train.warmup_steps=4", "train.min_lr_ratio=0.1"]).train
    f = build_schedule(cfg, total_steps=14)  # updates 0..13
    lrs = [f(mx.array(s)).item() for s in range(14)]
    assert lrs[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])  # warmup reaches the peak
    assert lrs[13] == pytest.approx(0.1)  # cosine reaches min_lr at the last update
    assert all(a >= b - 1e-7 for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[4 + 3] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 9)), abs=1e-6)
    cfg.schedule = "linear"
    g = build_schedule(cfg, 14)
    assert g(mx.array(7)).item() == pytest.approx(1.0 - 0.9 * 3 / 9)
    assert g(mx.array(13)).item() == pytest.approx(0.1)
    cfg.schedule = "constant"
    assert build_schedule(cfg, 14)(mx.array(10)).item() == pytest.approx(1.0)
    cfg.warmup_steps, cfg.warmup_ratio = 0, 0.5  # warmup as a fraction of the run
    assert build_schedule(cfg, 14)(mx.array(0)).item() == pytest.approx(1 / 7)


def test_optimizer_bias_correction_is_explicit(tmp_path, tiny_model, sft_data):
    cfg = make_cfg(tiny_model, sft_data, "train.steps=1")
    _, tr = trainer_for(cfg, tmp_path)
    assert tr.optimizer.bias_correction is True
    cfg = make_cfg(tiny_model, sft_data, "train.steps=1", "train.bias_correction=false")
    _, tr = trainer_for(cfg, tmp_path, name="b")
    assert tr.optimizer.bias_correction is False


@pytest.mark.parametrize("batching", ["pad", "pack"])
def test_grad_checkpoint_gives_the_same_gradients(tmp_path, tiny_model, sft_data, batching):
    out = []
    for gc in ("false", "true"):
        cfg = make_cfg(tiny_model, sft_data, "train.steps=2", f"train.grad_checkpoint={gc}",
                       f"data.batching={batching}", "train.optimizer=sgd", "train.lr=0.5", "train.max_grad_norm=null")
        prep, tr = trainer_for(cfg, tmp_path, name=f"g{gc}{batching}")
        tr.fit(prep.train, None)
        out.append(params(prep.loaded.model))
    for k in out[0]:
        np.testing.assert_allclose(out[0][k], out[1][k], atol=1e-6)
