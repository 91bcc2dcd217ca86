"""train.max_memory_gb: the estimate, the plan, and what a run does with it."""

from __future__ import annotations

import pytest
from mlx.utils import tree_flatten

from mlxpost.config import ConfigError, build_config
from mlxpost.training import memory
from mlxpost.training.pipeline import prepare, setup_rows, total_steps
from mlxpost.training.sources import data_kind
from mlxpost.ui import NullReporter

QWEN05 = memory.ModelShape(blocks=24, hidden=896, intermediate=4864, heads=14, vocab=151_936,
                           weight_bytes=1_976_000_000, trainable=4_399_104)


class Warnings(NullReporter):
    def __init__(self):
        self.warnings = []

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)


def test_estimate_grows_with_positions_and_shrinks_with_checkpointing():
    e = {(rows, ck): memory.estimate(QWEN05, rows, 1024, checkpoint=ck, query_chunk=96).total
         for rows in (1, 2, 4) for ck in (False, True)}
    assert e[1, False] < e[2, False] < e[4, False]
    assert e[2, True] < e[2, False] / 3  # checkpointing keeps one block's activations, not 24
    whole = memory.estimate(QWEN05, 2, 1024, checkpoint=False, query_chunk=None).activations
    chunked = memory.estimate(QWEN05, 2, 1024, checkpoint=False, query_chunk=96).activations
    assert chunked < whole  # causal query chunks keep about half the attention scores


def test_plan_keeps_what_fits_and_rows_per_step():
    kept = memory.plan(QWEN05, 64e9, batch_size=2, grad_accum=3, length=1024, query_chunk=96)
    assert (kept.checkpoint, kept.batch_size, kept.grad_accum, kept.fits, kept.changed) == (False, 2, 3, True, False)
    p = memory.plan(QWEN05, 4.5e9, batch_size=6, grad_accum=1, length=1024, query_chunk=96)
    assert p.fits and p.checkpoint and p.batch_size * p.grad_accum == 6 and p.batch_size < 6
    assert p.estimate.total <= 4.5e9
    pairs = memory.plan(QWEN05, 4.5e9, batch_size=6, grad_accum=1, length=1024, query_chunk=96, rows_per_item=2)
    assert pairs.batch_size < p.batch_size  # a pair puts two rows through the model
    rl = memory.plan(QWEN05, 4.5e9, batch_size=6, grad_accum=1, length=1024, query_chunk=96, can_split=False)
    assert rl.batch_size == 6 and rl.checkpoint and not rl.fits
    assert "chosen to fit" in p.describe() and "budget 4.5 GB" in p.describe()
    # Past the smallest micro-batch: smaller chunks of output-layer logits (measured 3.02 -> 2.59 GB, 64 -> 16 MB).
    tight = memory.plan(QWEN05, 2.8e9, batch_size=2, grad_accum=1, length=1024, query_chunk=96)
    assert (tight.checkpoint, tight.batch_size, tight.grad_accum, tight.head_chunk_bytes, tight.fits) == (
        True, 1, 2, 16 << 20, True)
    assert "chunks of 16 MB" in tight.describe()


def test_default_budget_leaves_the_system_room():
    total = memory.machine_memory()
    assert total > 0
    assert 0 < memory.default_budget() <= 2 * total / 3 + 1


def _prepare(tiny_model, sft_data, *sets, rep=None):
    cfg = build_config(None, [f"model.path={tiny_model}", f"data.path={sft_data}", "train.batch_size=4", *sets])
    rep = rep or NullReporter()
    prep = prepare(cfg, rep)
    return cfg, prep, dict(setup_rows(prep, data_kind(prep.method.data), total_steps(cfg, prep.train), 1))


def test_a_run_under_budget_checkpoints_and_splits_its_micro_batch(tiny_model, sft_data):
    cfg, prep, rows = _prepare(tiny_model, sft_data, "train.max_memory_gb=0")
    assert prep.memory is None and "memory" not in rows
    shape = memory.ModelShape.of(prep.loaded.model)
    length = cfg.data.pack_len or cfg.data.max_seq_len
    chunk = prep.chunk
    # A budget between "checkpointing, 2 rows" and "checkpointing, 4 rows": 2 x 2 accumulated.
    two = memory.estimate(shape, 2, length, checkpoint=True, query_chunk=chunk).total
    four = memory.estimate(shape, 4, length, checkpoint=True, query_chunk=chunk).total
    budget_gb = (two + four) / 2 / 1e9
    cfg, prep, rows = _prepare(tiny_model, sft_data, f"train.max_memory_gb={budget_gb}")
    assert (cfg.train.grad_checkpoint, cfg.train.batch_size, cfg.train.grad_accum) == (True, 2, 2)
    assert prep.train.batch_size == 2  # the batches are built with the chosen size
    assert "gradient checkpointing, micro-batch 2 x 2 accumulated" in rows["memory"]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_pair_that_fits_only_rows_apart_is_trained_one_row_per_backward_pass(tiny_model, pref_data, dropout):
    def prep_with(*sets):
        cfg = build_config(None, [f"model.path={tiny_model}", f"data.path={pref_data}", "train.batch_size=1",
                                  f"lora.dropout={dropout}", *sets], method="dpo")
        prep = prepare(cfg, NullReporter())
        return cfg, prep, dict(setup_rows(prep, data_kind("pairs"), total_steps(cfg, prep.train), 1))

    cfg, prep, _ = prep_with("train.max_memory_gb=0")
    shape = memory.ModelShape.of(prep.loaded.model)
    length = cfg.data.pack_len or cfg.data.max_seq_len
    one, two = (memory.estimate(shape, n, length, checkpoint=True, query_chunk=prep.chunk).total for n in (1, 2))
    cfg, prep, rows = prep_with(f"train.max_memory_gb={(one + two) / 2 / 1e9}")
    assert cfg.train.grad_checkpoint and cfg.train.batch_size == 1
    assert cfg.train.split_rows == (dropout == 0)  # dropout would draw other masks in the row passes
    assert ("one backward pass per row" in rows["memory"]) == (dropout == 0)


def test_a_budget_that_cannot_be_met_is_a_warning_before_training(tiny_model, sft_data):
    rep = Warnings()
    cfg, prep, rows = _prepare(tiny_model, sft_data, "train.max_memory_gb=0.000001", rep=rep)
    assert cfg.train.grad_checkpoint and cfg.train.batch_size == 1 and cfg.train.grad_accum == 4
    assert any("max_memory_gb" in w and "over the budget" in w for w in rep.warnings)


def test_max_memory_is_checked():
    with pytest.raises(ConfigError, match="max_memory_gb"):
        build_config(None, ["train.max_memory_gb=-2"])


def test_model_shape_reads_an_mlx_lm_model(tiny_model):
    from mlxpost.model.load import load_model
    lm = load_model(str(tiny_model))
    s = memory.ModelShape.of(lm.model)
    a = lm.model.args
    assert (s.blocks, s.hidden, s.intermediate, s.vocab) == (a.num_hidden_layers, a.hidden_size,
                                                             a.intermediate_size, a.vocab_size)
    assert s.weight_bytes == sum(v.nbytes for _, v in tree_flatten(lm.model.parameters()))


def test_sampling_merges_the_adapters_only_while_the_copies_fit_the_budget():
    s = memory.ModelShape(**{**QWEN05.__dict__, "merged": 1_431_000_000})
    assert memory.plan(s, 16e9, batch_size=2, grad_accum=1, length=1024, query_chunk=96).merge
    tight = memory.plan(s, 2.8e9, batch_size=2, grad_accum=1, length=1024, query_chunk=96)
    assert not tight.merge and tight.fits and "adapters not merged while sampling" in tight.describe()
    assert tight.peak == max(tight.estimate.total, memory.sampling_peak(s, False))
    # Without merged copies to make (no adapters), sampling never breaks the budget.
    assert memory.sampling_peak(QWEN05, True) == memory.sampling_peak(QWEN05, False)


def test_unmerged_sampling_keeps_the_layers_and_gives_the_same_tokens(tiny_model):
    import mlx.core as mx

    from mlxpost.core.sampling import Sampling
    from mlxpost.model.adapters import attach_adapters, resolve_targets
    from mlxpost.model.load import load_model
    from mlxpost.model.lora import adapter_modules, adapters_merged, merged_bytes, set_merge_for_sampling
    from mlxpost.rl.rollout import sample_groups

    lm = load_model(str(tiny_model), dtype="float32")
    model = lm.model
    attach_adapters(model, rank=4, scale=2.0, keys=resolve_targets(model, "all-linear"))
    for _, m in adapter_modules(model):  # away from zero, so that merging changes the layers
        m.lora_b = mx.random.normal(m.lora_b.shape) * 0.05
    adapted = [m.linear for _, m in adapter_modules(model)]
    assert merged_bytes(model) == sum(w.weight.nbytes for w in adapted) > 0
    greedy = Sampling(temperature=0.0, max_new_tokens=6)
    merged = sample_groups(model, lm.tokenizer, [[1, 2, 3], [4, 5]], 1, greedy).completions
    set_merge_for_sampling(model, False)
    with adapters_merged(model):
        assert all(m.linear is w and m.adapter_enabled for (_, m), w in zip(adapter_modules(model), adapted))
    assert sample_groups(model, lm.tokenizer, [[1, 2, 3], [4, 5]], 1, greedy).completions == merged


def test_an_rl_run_under_budget_splits_its_completions_and_samples_unmerged(tiny_model, tmp_path):
    from mlxpost.assets import ARITH_TASKS_DIR
    from mlxpost.model.lora import merges_for_sampling

    def grpo(*sets, rep=None):
        cfg = build_config(None, [f"model.path={tiny_model}", f"data.path={ARITH_TASKS_DIR}", "grpo.group_size=4",
                                  "grpo.prompts_per_step=2", "grpo.max_new_tokens=4", "grpo.max_prompt_len=256",
                                  "grpo.rewards=[format]", "grpo.eval_prompts=0", "model.dtype=float32", *sets],
                           method="grpo")
        prep = prepare(cfg, rep or NullReporter())
        return cfg, prep, dict(setup_rows(prep, data_kind(prep.method.data), total_steps(cfg, prep.train), 1))

    cfg, prep, rows = grpo("train.max_memory_gb=0")
    model = prep.loaded.model
    assert merges_for_sampling(model) and cfg.grpo.micro_batch is None  # 8 completions in one pass
    shape = memory.ModelShape.of(model)
    # Sized by the longest training prompt (not grpo.max_prompt_len=256) and the 4 new tokens.
    length = max(len(r.tokens) for r in prep.train.examples) + 4
    assert length < 256
    eight, four = (memory.estimate(shape, n, length, checkpoint=True, query_chunk=prep.chunk).total
                   for n in (8, 4))
    cfg, prep, rows = grpo(f"train.max_memory_gb={(four + eight) / 2 / 1e9}")
    assert cfg.train.grad_checkpoint and cfg.grpo.micro_batch == 4
    assert cfg.train.grad_accum == 2  # the RL source accumulates the two passes into one step
    assert merges_for_sampling(prep.loaded.model) and "micro-batch 4" in rows["memory"]
    # A budget below the merged copies: sampling leaves the adapters unmerged (the tiny model's training
    # needs more than that too, so this budget is also a warning).
    rep = Warnings()
    between = (memory.sampling_peak(shape, False) + memory.sampling_peak(shape, True)) / 2
    cfg, prep, rows = grpo(f"train.max_memory_gb={between / 1e9}", rep=rep)
    assert not merges_for_sampling(prep.loaded.model) and "not merged" in rows["memory"]
    assert cfg.grpo.micro_batch == 1 and any("over the budget" in w for w in rep.warnings)
