"""Preference methods on the shared core: losses by hand, the step-0 property, learning, the reference."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from conftest import preference_rows, write_jsonl
from mlx.utils import tree_flatten

from mlxpost.config import build_config
from mlxpost.core.forward import DEFAULT_ATTENTION_CHUNK, attention_chunk
from mlxpost.core.logprobs import logprobs
from mlxpost.errors import ConfigError, MlxpostError
from mlxpost.methods import cpo, dpo, get, orpo, reference, simpo
from mlxpost.methods.preference import PairLogps, pair_logps, reference_token_logprobs
from mlxpost.methods.preference_health import PreferenceHealth, Thresholds
from mlxpost.methods.reference import precompute_reference
from mlxpost.model.adapters import load_adapter_stack, load_adapters
from mlxpost.model.load import load_model
from mlxpost.training.loop import Trainer
from mlxpost.training.pipeline import prepare, resolve_from_run, run, total_steps
from mlxpost.training.rundir import RunDir
from mlxpost.ui import NullReporter

LOG2 = math.log(2.0)


def pref_cfg(model, data, method="dpo", *sets):
    return build_config(None, [f"model.path={model}", f"data.path={data}", "train.report_every=1",
                               "train.eval_every=0", "train.save_every=0", "train.eval_at_start=false", *sets],
                        method=method)


def a(*x):
    return mx.array(list(x), mx.float32)


# ---------------------------------------------------------------------------
# Losses against values derived by hand
# ---------------------------------------------------------------------------


def hand_pair() -> PairLogps:
    """One pair. Sums: policy -10 / -12, reference -11 / -11. Means: policy -2 / -3, reference -2.2 / -2.75."""
    return PairLogps(chosen=a(-10.0), rejected=a(-12.0), chosen_mean=a(-2.0), rejected_mean=a(-3.0), valid=a(1.0),
                     ref_chosen=a(-11.0), ref_rejected=a(-11.0), ref_chosen_mean=a(-2.2),
                     ref_rejected_mean=a(-2.75))


@pytest.mark.parametrize("loss,beta,eps,expected,rewards", [
    # h = (-10 + 11) - (-12 + 11) = 2; beta h = 1; -log sigmoid(1) = log(1 + e^-1)
    ("sigmoid", 0.5, 0.0, math.log1p(math.exp(-1)), (0.5, -0.5)),
    # conservative DPO: 0.9 log(1 + e^-1) + 0.1 log(1 + e^1)
    ("sigmoid", 0.5, 0.1, 0.9 * math.log1p(math.exp(-1)) + 0.1 * math.log1p(math.e), (0.5, -0.5)),
    # IPO on means: h = (-2 + 2.2) - (-3 + 2.75) = 0.45; (0.45 - 1 / (2 * 0.5))^2 = 0.3025
    ("ipo", 0.5, 0.0, 0.3025, (0.1, -0.125)),
    # hinge: max(0, 1 - 0.25 * 2) = 0.5
    ("hinge", 0.25, 0.0, 0.5, (0.25, -0.25)),
    # robust: (0.9 log(1 + e^-1) - 0.1 log(1 + e^1)) / 0.8
    ("robust", 0.5, 0.1, (0.9 * math.log1p(math.exp(-1)) - 0.1 * math.log1p(math.e)) / 0.8, (0.5, -0.5)),
])
def test_dpo_losses_by_hand(loss, beta, eps, expected, rewards):
    out = dpo.dpo_score(hand_pair(), loss=loss, beta=beta, label_smoothing=eps)
    assert out.losses.item() == pytest.approx(expected, abs=1e-6)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx(rewards, abs=1e-6)


def test_reference_free_losses_by_hand():
    # ORPO with mean log-probs log 0.5 and log 0.2: odds 1 and 1/4, log odds ratio log 4;
    # loss = NLL + lam * log(1 + e^-log 4) = log 2 + 0.1 * log 1.25.
    lp = PairLogps(chosen=a(-10.0), rejected=a(-12.0), chosen_mean=a(math.log(0.5)),
                   rejected_mean=a(math.log(0.2)), valid=a(1.0))
    out = orpo.orpo_score(lp, lam=0.1)
    assert out.metrics["log_odds"].item() == pytest.approx(math.log(4), abs=1e-5)
    assert out.losses.item() == pytest.approx(LOG2 + 0.1 * math.log(1.25), abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.1 * math.log(0.5), abs=1e-6)

    p = hand_pair()
    # CPO: z = 0.1 (-10 + 12) = 0.2; log(1 + e^-0.2) + 1.0 * 2 (NLL per token of chosen)
    out = cpo.cpo_score(p, beta=0.1, alpha=1.0)
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-0.2)) + 2.0, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(-1.0, abs=1e-6)
    # SimPO: z = 2 (-2 + 3) - 0.5 = 1.5; log(1 + e^-1.5) + 0.5 * 2
    out = simpo.simpo_score(p, beta=2.0, gamma=0.5, alpha=0.5)
    assert out.logits.item() == pytest.approx(1.5, abs=1e-6)
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-1.5)) + 1.0, abs=1e-6)


def test_orpo_gradient_is_finite_when_the_chosen_mean_log_prob_is_zero():
    # A model sure of every chosen token: the mean log-prob rounds to 0 in float32 (or a hair above).
    rejected = a(math.log(0.2))
    for m in (0.0, 1e-7, -1e-8):
        grad = mx.grad(lambda c: orpo.orpo_loss(c, rejected, 0.1)[0].sum())(a(m))
        # d/dm of -m is -1; the odds term is held at the clamp m = -1e-6 (its gradient is 0 there).
        assert grad.item() == -1.0
        assert orpo.log1m_exp(a(m)).item() == pytest.approx(math.log(1e-6), abs=1e-4)
    assert math.isfinite(mx.grad(lambda m: orpo.log1m_exp(m).sum())(a(0.0)).item())
    # Below the clamp nothing changes: d/dm log(1 - e^m) = -e^m / (1 - e^m).
    g = mx.grad(lambda m: orpo.log1m_exp(m).sum())(a(-1e-3)).item()
    assert g == pytest.approx(-math.exp(-1e-3) / -math.expm1(-1e-3), rel=1e-4)
    loss, nll, log_odds = orpo.orpo_loss(a(0.0), rejected, 0.1)
    # log odds = (0 - log 0.2) - (log 1e-6 - log 0.8)
    assert log_odds.item() == pytest.approx(-math.log(0.2) - math.log(1e-6) + math.log(0.8), rel=1e-4)
    assert math.isfinite(loss.item()) and nll.item() == 0.0


def test_pair_scores_mask_padding_pairs_and_estimate_kl():
    # Two pairs in rows (c0, c1, r0, r1); pair 1 is a padding pair (no trained tokens).
    w = mx.array([[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]], mx.float32)
    tok = mx.array([[-1.0, -2.0, 0], [0, 0, 0], [-4.0, 0, 0], [0, 0, 0]])
    ref = mx.array([[-1.5, -2.0, 0], [0, 0, 0], [-1.0, 0, 0], [0, 0, 0]])
    lp = pair_logps(tok, w, ref)
    assert lp.valid.tolist() == [1.0, 0.0]
    assert lp.chosen.tolist()[0] == -3.0 and lp.chosen_mean.tolist()[0] == -1.5
    assert lp.rejected.tolist()[0] == -4.0
    # k3 per token on the chosen answer only: r = ref - pi = -0.5 on one of its two tokens
    # (the rejected token, pushed down by 3 nats, does not count).
    assert lp.kl.tolist()[0] == pytest.approx((math.exp(-0.5) - 0.5) / 2, abs=1e-6)
    # The padding pair gets finite stand-ins, so ORPO's log(1 - e^m) stays finite there.
    out = orpo.orpo_score(lp, lam=0.1)
    assert all(math.isfinite(x) for x in out.losses.tolist())


# ---------------------------------------------------------------------------
# The step-0 property on a tiny real model
# ---------------------------------------------------------------------------


def test_step_zero_policy_equals_reference_and_dpo_loss_is_log2(tiny_model, pref_data):
    cfg = pref_cfg(tiny_model, pref_data, "dpo", "train.batch_size=4")
    prep = prepare(cfg, NullReporter())
    model, split = prep.loaded.model, prep.split
    batch = next(iter(prep.train))
    pol = logprobs(model, batch, split=split, select=batch.select)
    ref = reference_token_logprobs(model, batch, split)
    assert np.array_equal(np.array(pol), np.array(ref))  # fresh adapter: B = 0 exactly
    assert float(mx.abs(pol).sum()) > 0

    objective = get("dpo").objective(prep)

    def mean_loss(model, arrays):
        from mlxpost.core.batches import batch_from_arrays

        loss, count, _ = objective.loss(model, batch_from_arrays(arrays))
        return loss / count

    vg = nn.value_and_grad(model, mean_loss)
    loss, grads = vg(model, batch.arrays())
    assert loss.item() == pytest.approx(LOG2, abs=1e-6)
    g = dict(tree_flatten(grads))
    lora_b = [k for k in g if k.endswith("lora_b")]
    assert lora_b and all(float(mx.abs(g[k]).max()) > 0 for k in lora_b), "every adapter gets a gradient"
    # With B = 0 the gradient of A is exactly zero at step 0 (dL/dA = x^T (dL/dz) B^T) ...
    assert all(float(mx.abs(g[k]).max()) == 0 for k in g if k.endswith("lora_a"))
    # ... and non-zero for every A once B has moved.
    optim.SGD(learning_rate=1e-2).update(model, grads)
    _, grads = vg(model, batch.arrays())
    g = dict(tree_flatten(grads))
    assert all(float(mx.abs(g[k]).max()) > 0 for k in g if k.endswith(("lora_a", "lora_b")))


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_packed_pairs_score_exactly_as_padded_pairs(tmp_path, tiny_model, method):
    """Packing the chosen and rejected sequences into fewer rows changes nothing but the cost:
    the same loss, metrics and gradients as one padded row per sequence."""
    from mlxpost.core.batches import batch_from_arrays

    rows = preference_rows(16, seed=4)
    for i, r in enumerate(rows):  # replies of very different lengths, as in real preference data
        if isinstance(r["rejected"], str):
            r["rejected"] += " Let me explain why." * (i % 5) * 3
        else:
            r["chosen"][0]["content"] += " It is simple." * (i % 3) * 4
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    out, refs = {}, {}
    for mode in ("pad", "pack"):
        cfg = pref_cfg(tiny_model, data, method, "train.batch_size=4", f"data.batching={mode}",
                       "preference.share_prompt=off")  # sequences packed as they are (sharing: tested below)
        prep = prepare(cfg, NullReporter())
        assert prep.batching == mode
        model = prep.loaded.model
        mx.random.seed(5)  # the same adapters in both runs, away from the reference
        for _, m in model.named_modules():
            if hasattr(m, "lora_b"):
                m.lora_b = mx.random.normal(m.lora_b.shape) * 0.05
        objective = get(method).objective(prep)
        batches = [next(it) for it in [iter(prep.train)] for _ in range(2)]

        def loss_fn(model, arrays):
            return objective.loss(model, batch_from_arrays(arrays))[0]

        vg = nn.value_and_grad(model, loss_fn)
        rows = []
        for b in batches:
            loss, grads = vg(model, b.arrays())
            _, count, metrics = objective.loss(model, b)
            rows.append((loss.item(), count.item(), {k: v.item() for k, v in metrics.items()},
                         {k: np.array(v) for k, v in tree_flatten(grads)}, np.array(b.inputs).size))
            if mode == "pack":  # rows really hold several sequences
                assert any(len(set(r.tolist()) - {-1}) > 1 for r in np.array(b.extra["seq"]))
        out[mode] = rows
        refs[mode] = reference.compute(model, prep.train, prep.split)  # read back from packed rows too
    for (c1, r1), (c2, r2) in zip(refs["pad"], refs["pack"]):
        np.testing.assert_allclose(c2, c1, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(r2, r1, rtol=1e-4, atol=1e-5)
    for (l1, c1, m1, g1, n1), (l2, c2, m2, g2, n2) in zip(out["pad"], out["pack"]):
        assert n2 < n1  # fewer positions through the model
        assert c1 == c2 and l2 == pytest.approx(l1, rel=1e-4, abs=1e-4)
        for k in m1:
            assert m2[k] == pytest.approx(m1[k], rel=1e-3, abs=1e-4), k
        for k in g1:
            np.testing.assert_allclose(g2[k], g1[k], rtol=1e-3, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("fixture,method,sets", [
    ("tiny_model", "dpo", ()),
    ("tiny_model", "dpo", ("lora.num_layers=1", "train.attention_chunk=8")),  # shared shared_blocks, query chunks
    ("tiny_model", "orpo", ("train.attention_chunk=8",)),
    ("tiny_qwen", "dpo", ()),
])
def test_pairs_sharing_their_prompt_score_exactly_as_separate_sequences(request, tmp_path, fixture, method, sets):
    """Each prompt once, both replies after it: the same loss, metrics, gradients and reference log-probs
    as the chosen and rejected sequences each with their own copy of the prompt, with fewer positions."""
    from mlxpost.core.batches import batch_from_arrays

    model_path = request.getfixturevalue(fixture)
    rows = preference_rows(12, seed=6)
    for i, r in enumerate(rows):  # long prompts, replies of different lengths
        if isinstance(r["prompt"], str):
            r["prompt"] += " Think about it." * (i % 4 + 1)
        if isinstance(r["rejected"], str):
            r["rejected"] += " Let me explain why." * (i % 3)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    out = {}
    for share in ("off", "on"):
        cfg = pref_cfg(model_path, data, method, "train.batch_size=4", "data.batching=pack",
                       f"preference.share_prompt={share}", *sets)
        prep = prepare(cfg, NullReporter())
        assert prep.train.share_prompt == (share == "on")
        model = prep.loaded.model
        mx.random.seed(5)
        for _, m in model.named_modules():
            if hasattr(m, "lora_b"):
                m.lora_b = mx.random.normal(m.lora_b.shape) * 0.05
        objective = get(method).objective(prep)
        batches = [next(it) for it in [iter(prep.train)] for _ in range(3)]
        vg = nn.value_and_grad(model, lambda m, a: objective.loss(m, batch_from_arrays(a))[0])
        res = []
        for b in batches:
            loss, grads = vg(model, b.arrays())
            _, count, metrics = objective.loss(model, b)
            res.append((loss.item(), count.item(), {k: v.item() for k, v in metrics.items()},
                        {k: np.array(v) for k, v in tree_flatten(grads)}, b.n_tokens, b.n_targets))
        out[share] = (res, reference.compute(model, prep.train, prep.split) if method == "dpo" else None)
    (off, ref_off), (on, ref_on) = out["off"], out["on"]
    for (l1, c1, m1, g1, n1, t1), (l2, c2, m2, g2, n2, t2) in zip(off, on):
        assert n2 <= n1 and t2 == t1  # fewer positions (where sharing is the cheaper layout), the same targets
        assert c1 == c2 and l2 == pytest.approx(l1, rel=1e-4, abs=1e-4)
        for k in m1:
            assert m2[k] == pytest.approx(m1[k], rel=1e-3, abs=1e-4), k
        for k in g1:
            np.testing.assert_allclose(g2[k], g1[k], rtol=1e-3, atol=1e-5, err_msg=k)
    assert any(n2 < n1 for (*_, n1, _t1), (*_, n2, _t2) in zip(off, on))
    if ref_off is not None:
        for (c1, r1), (c2, r2) in zip(ref_off, ref_on):
            np.testing.assert_allclose(c2, c1, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(r2, r1, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def windowed_model(tiny_model, tmp_path_factory):
    """The tiny llama with a sliding window of 6 positions in its first block."""
    import shutil

    path = tmp_path_factory.mktemp("windowed") / "model"
    shutil.copytree(tiny_model, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(sliding_window=6, layer_types=["sliding_attention"] + ["full_attention"] * (cfg["num_hidden_layers"] - 1))
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("fixture,dtype,chunk", [("tiny_model", "float32", 0), ("tiny_model", "float32", 8),
                                                 ("tiny_qwen", "float32", 8), ("windowed_model", "float32", 8),
                                                 ("tiny_model", "bfloat16", 0)])
def test_shared_prompt_hidden_states_equal_separate_sequences(request, tmp_path, monkeypatch, fixture, dtype, chunk):
    """What scores each trained token, the hidden state before the head, is the one of separate sequences
    (to float rounding; the comparison sees a misplaced position, unlike a random model's log-probs):
    whole rows and query chunks, a sliding window counted in positions, bfloat16 (checked by the probe)."""
    import mlxpost.core.forward as batching
    from mlxpost.core.forward import set_attention_chunk
    from mlxpost.core.probes import scored_states

    rows = preference_rows(8, seed=3)
    for i, r in enumerate(rows):
        if isinstance(r["prompt"], str):
            r["prompt"] += " Think about it." * (i % 3 + 2)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    prep = prepare(pref_cfg(request.getfixturevalue(fixture), data, "dpo", "train.batch_size=4",
                            f"model.dtype={dtype}", "train.attention_chunk=0"), NullReporter())
    assert prep.train.share_prompt, dict(prep.rows)["prompt"]
    model = prep.loaded.model
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape).astype(m.lora_b.dtype) * 0.05
    set_attention_chunk(model, chunk or None)
    tol = 1e-5 if dtype == "float32" else 2e-2
    from mlxpost.backend import kernels

    cuts = []
    real = kernels._chunked
    monkeypatch.setattr(kernels, "_chunked", lambda *a, **k: cuts.append(1) or real(*a, **k))

    def err(a, b):
        a, b = a.astype(mx.float32), b.astype(mx.float32)
        return (mx.linalg.norm(a - b) / mx.linalg.norm(a)).item()

    for plan in prep.train._plan_for_epoch():
        idx = [r[0] for r in plan]
        b0, b1 = prep.train.build_pairs(idx, shared=False), prep.train.build_pairs(idx, shared=True)
        assert b1.entries and b1.n_tokens < b0.n_tokens
        want = scored_states(model, prep.split, b0)
        n = len(cuts)
        assert err(want, scored_states(model, prep.split, b1)) < tol
        assert (len(cuts) > n) == bool(chunk)  # the tree mask is cut in chunks where asked
        if dtype != "float32":
            continue
        # Controls: the rejected reply at its slot in the row instead of its position in its sequence;
        # for the windowed model, a window counted in row slots.
        slots = mx.broadcast_to(mx.arange(b1.inputs.shape[1], dtype=mx.int32), b1.inputs.shape)
        b1.positions, good = slots, b1.positions
        assert err(want, scored_states(model, prep.split, b1)) > 1e-3
        b1.positions = good
        if fixture == "windowed_model":
            with monkeypatch.context() as mp:
                init = batching.MaskCache.__init__
                mp.setattr(batching.MaskCache, "__init__", lambda self, mask, positions=None: init(self, mask))
                assert err(want, scored_states(model, prep.split, b1)) > 1e-3


def test_prompt_sharing_is_checked_on_the_model(tiny_model, pref_data, monkeypatch):
    """A model whose blocks do not rotate by the positions given keeps separate sequences (auto) or
    is refused (on); padded batches never share."""
    import mlxpost.core.forward as batching
    from mlxpost.core.probes import prompt_sharing_problem

    prep = prepare(pref_cfg(tiny_model, pref_data, "dpo"), NullReporter())
    assert prep.train.share_prompt and dict(prep.rows)["prompt"].startswith("once per pair")
    n, total = prep.train.shared_batches()
    assert 0 < n <= total and f"in {n} of {total} batches" in dict(prep.rows)["prompt"]
    model, split = prep.loaded.model, prep.split
    assert prompt_sharing_problem(model, split) is None
    assert "head split" in prompt_sharing_problem(model, None)

    class Ignores(batching._PositionedRope):  # a RoPE that takes no per-position offsets
        def __call__(self, x, offset=0, **kwargs):
            return self.rope(x, offset=0)

    class WrongGradient(batching._PositionedRope):  # right forward, backward as at the row's slots
        def __call__(self, x, offset=0, **kwargs):
            right, slots = super().__call__(x, offset, **kwargs), self.rope(x, offset=offset)
            return mx.stop_gradient(right) + (slots - mx.stop_gradient(slots))

    monkeypatch.setattr(batching, "_PositionedRope", WrongGradient)
    assert "its gradients with a shared prompt differ" in prompt_sharing_problem(model, split)
    monkeypatch.setattr(batching, "_PositionedRope", Ignores)
    assert "hidden states with a shared prompt differ" in prompt_sharing_problem(model, split)
    prep = prepare(pref_cfg(tiny_model, pref_data, "dpo"), NullReporter())
    assert not prep.train.share_prompt and "differ from separate sequences" in dict(prep.rows)["prompt"]
    with pytest.raises(MlxpostError, match="preference.share_prompt=on: its hidden states with a shared prompt"):
        prepare(pref_cfg(tiny_model, pref_data, "dpo", "preference.share_prompt=on"), NullReporter())
    monkeypatch.undo()
    prep = prepare(pref_cfg(tiny_model, pref_data, "dpo", "data.batching=pad"), NullReporter())
    assert not prep.train.share_prompt and "padded" in dict(prep.rows)["prompt"]


def test_reference_pass_reuses_the_policys_unadapted_lower_blocks(tiny_model, pref_data):
    """With adapters on the top block only, the reference pass starts from the policy pass's hidden state
    at that block: the same loss, metrics and gradients as a full adapters-off pass."""
    from mlxpost.core.batches import batch_from_arrays
    from mlxpost.core.shared_blocks import SharedBlocks

    cfg = pref_cfg(tiny_model, pref_data, "dpo", "train.batch_size=4", "lora.num_layers=1")
    prep = prepare(cfg, NullReporter())
    model = prep.loaded.model
    assert prep.state.get("shared_blocks") is not None and prep.state.get("shared_blocks").k == len(model.layers) - 1
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.05
    batch = next(iter(prep.train))
    results = []
    for shared_blocks in (prep.state.get("shared_blocks"), None):
        objective = dpo.objective(prep.split, loss="sigmoid", beta=0.1, label_smoothing=0.0, shared_blocks=shared_blocks)

        def loss_fn(model, arrays):
            return objective.loss(model, batch_from_arrays(arrays))[0]

        loss, grads = nn.value_and_grad(model, loss_fn)(model, batch.arrays())
        metrics = {k: v.item() for k, v in objective.loss(model, batch)[2].items()}
        results.append((loss.item(), metrics, {k: np.array(v) for k, v in tree_flatten(grads)}))
        assert len(model.layers) == 2 and all(type(b).__name__ == "TransformerBlock" for b in model.layers)
    (l1, m1, g1), (l2, m2, g2) = results
    assert l1 == pytest.approx(l2, abs=1e-5) and m1["kl"] > 0
    for k in m2:
        assert m1[k] == pytest.approx(m2[k], rel=1e-4, abs=1e-5), k
    for k in g2:
        np.testing.assert_allclose(g1[k], g2[k], rtol=1e-4, atol=1e-6, err_msg=k)
    # Nothing to share when the lowest block is adapted, or when the reference is precomputed.
    assert SharedBlocks.find(prepare(pref_cfg(tiny_model, pref_data, "dpo"), NullReporter()).loaded.model) is None
    pre = prepare(pref_cfg(tiny_model, pref_data, "dpo", "lora.num_layers=1", "preference.precompute_ref=true",
                           f"preference.ref_cache_dir={pref_data}/.cache-shared_blocks"), NullReporter())
    assert pre.state.get("shared_blocks") is None


def test_shared_lower_blocks_with_query_chunks(tiny_model, pref_data):
    """With attention in query chunks, the reference pass that starts from the shared_blocks's recorded output gives
    the loss and gradients of whole rows with a full reference pass."""
    from mlxpost.core.batches import batch_from_arrays
    from mlxpost.core.forward import chunk_bounds, set_attention_chunk

    prep = prepare(pref_cfg(tiny_model, pref_data, "dpo", "train.batch_size=4", "lora.num_layers=1",
                            "train.attention_chunk=8"), NullReporter())
    model = prep.loaded.model
    assert prep.state.get("shared_blocks") is not None
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.05
    batch = next(iter(prep.train))
    assert len(chunk_bounds(batch.inputs.shape[1], 8)) > 3
    results = []
    for shared_blocks, chunk in ((prep.state.get("shared_blocks"), 8), (None, None)):
        set_attention_chunk(model, chunk)
        objective = dpo.objective(prep.split, loss="sigmoid", beta=0.1, label_smoothing=0.0, shared_blocks=shared_blocks)
        loss, grads = nn.value_and_grad(model, lambda m, a: objective.loss(m, batch_from_arrays(a))[0])(
            model, batch.arrays())
        results.append((loss.item(), {k: np.array(v) for k, v in tree_flatten(grads)}))
    (l1, g1), (l2, g2) = results
    assert l1 == pytest.approx(l2, abs=1e-5) and l1 != pytest.approx(LOG2, abs=1e-3)
    for k in g2:
        np.testing.assert_allclose(g1[k], g2[k], rtol=1e-3, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("method,sets", [
    ("dpo", ("data.batching=pad",)),
    ("dpo", ("data.batching=pack", "preference.share_prompt=off", "train.grad_checkpoint=true")),
    ("dpo", ("data.batching=pack", "preference.share_prompt=on", "lora.num_layers=1")),  # per-entry log-probs
    ("orpo", ("data.batching=pad", "train.compile=false")),
])
def test_one_backward_pass_per_row_gives_the_same_training(tmp_path, tiny_model, method, sets):
    """``train.split_rows``: each row's backward pass on its own, weighted by the loss's gradient with respect
    to its log-probs, trains exactly as the whole micro-batch at once: the same losses, metrics and weights."""
    rows = preference_rows(12, seed=6)
    for i, r in enumerate(rows):  # replies of different lengths
        if isinstance(r["rejected"], str):
            r["rejected"] += " Let me explain why." * (i % 3)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    out = {}
    for split in ("false", "true"):
        cfg = pref_cfg(tiny_model, data, method, "train.steps=3", "train.batch_size=4", "train.optimizer=sgd",
                       "train.lr=0.5", "train.max_grad_norm=null", f"train.split_rows={split}", *sets)
        prep = prepare(cfg, NullReporter())
        model = prep.loaded.model
        mx.random.seed(5)  # the same adapters in both runs, away from the reference
        for _, m in model.named_modules():
            if hasattr(m, "lora_b"):
                m.lora_b = mx.random.normal(m.lora_b.shape) * 0.05
        tr = Trainer(model, get(method).objective(prep), cfg.train, total_steps=3, run=RunDir(tmp_path / split),
                     reporter=NullReporter(), adapter_cfg=prep.adapter_cfg)
        calls = []
        if split == "true":
            rows_of = tr._row_grads
            tr._row_grads = lambda *a: calls.append(a[0]["inputs"].shape[0]) or rows_of(*a)
        result = tr.fit(prep.train, None)
        out[split] = ([h for h in result.history if h["kind"] == "train"],
                      {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())})
        if split == "true":
            assert calls and set(calls) == {1}  # one row per backward pass
    (h1, w1), (h2, w2) = out["false"], out["true"]
    for a1, a2 in zip(h1, h2):
        for k in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm"):
            if k in a1:
                assert a2[k] == pytest.approx(a1[k], rel=1e-4, abs=1e-5), k
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_split_rows_configuration_errors(tmp_path, tiny_model, sft_data, pref_data):
    with pytest.raises(ConfigError, match="train.split_rows cannot be combined with lora.dropout"):
        build_config(None, ["train.split_rows=true", "lora.dropout=0.1"], method="dpo")
    with pytest.raises(ConfigError, match="train.split_rows: sft's loss is not a function of per-row"):
        build_config(None, ["train.split_rows=true"])
    with pytest.raises(ConfigError, match="train.split_rows: grpo's loss"):
        build_config(None, ["train.split_rows=true"], method="grpo")
    # An objective without per-row log-probs given to the loop is refused there too.
    cfg = build_config(None, [f"model.path={tiny_model}", f"data.path={sft_data}"])
    prep = prepare(cfg, NullReporter())
    cfg.train.split_rows = True
    with pytest.raises(ConfigError, match="train.split_rows: this method's loss"):
        Trainer(prep.loaded.model, get("sft").objective(prep), cfg.train, total_steps=1, run=RunDir(tmp_path / "r"),
                reporter=NullReporter(), adapter_cfg=prep.adapter_cfg)


def test_a_compiled_dpo_run_with_shared_lower_blocks_learns(tmp_path, tiny_model, pref_data):
    cfg = pref_cfg(tiny_model, pref_data, "dpo", "train.steps=8", "train.lr=5e-3", "train.batch_size=4",
                   "lora.num_layers=1", f"output.dir={tmp_path}", "output.name=t")
    path, result = run(cfg, reporter=NullReporter())
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("kind") == "train"]
    assert rows[0]["kind"] == "setup" and rows[0]["reference_shares_blocks"] == 1
    assert train[0]["loss"] == pytest.approx(LOG2, abs=1e-5)  # step 0: policy == reference, shared_blocks or not
    assert train[-1]["rewards/margins"] > train[0]["rewards/margins"]


# ---------------------------------------------------------------------------
# Every method learns: the chosen reward rises relative to the rejected
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method,sets", [
    ("dpo", ["dpo.loss=sigmoid"]), ("dpo", ["dpo.loss=ipo", "dpo.beta=0.5"]), ("dpo", ["dpo.loss=hinge"]),
    ("dpo", ["dpo.loss=robust", "dpo.label_smoothing=0.1"]), ("dpo", ["dpo.label_smoothing=0.1"]),
    ("orpo", []), ("cpo", []), ("simpo", []),
])
def test_each_method_raises_the_margin(tmp_path, tiny_model, pref_data, method, sets):
    cfg = pref_cfg(tiny_model, pref_data, method, "train.steps=10", "train.lr=5e-3", "train.batch_size=4", *sets)
    prep = prepare(cfg, NullReporter())
    tr = Trainer(prep.loaded.model, get(method).objective(prep), cfg.train, total_steps=10,
                 run=RunDir(tmp_path / "r"), reporter=NullReporter(), adapter_cfg=prep.adapter_cfg)
    before = tr.evaluate(prep.valid)
    result = tr.fit(prep.train, prep.valid)
    after = result.val_metrics
    assert after["val_rewards/margins"] > before["val_rewards/margins"] + 0.01
    assert after["val_rewards/accuracies"] >= 0.75
    assert after["val_loss"] < before["val_loss"]
    if method == "dpo":
        assert before["val_rewards/margins"] == 0.0 and before["val_kl"] == 0.0
        assert after["val_kl"] > 0


# ---------------------------------------------------------------------------
# Precomputed reference log-probs
# ---------------------------------------------------------------------------


def test_precomputed_reference_equals_adapters_off_and_is_cached(tmp_path, tiny_model, pref_data):
    cache = tmp_path / "cache"
    cfg = pref_cfg(tiny_model, pref_data, "dpo", "train.batch_size=4", "preference.precompute_ref=true",
                   f"preference.ref_cache_dir={cache}")
    prep = prepare(cfg, NullReporter())
    files = sorted(cache.glob("ref-*.npz"))
    assert len(files) == 2  # train and valid
    model = prep.loaded.model
    # Move the policy away from the reference first.
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.05
    objective = get("dpo").objective(prep)
    pre = next(iter(prep.train))
    assert "ref_logps" in pre.extra
    live = pre.__class__(**{**pre.__dict__, "extra": {k: v for k, v in pre.extra.items() if k != "ref_logps"}})
    lp_pre, n_pre, m_pre = objective.loss(model, pre)
    lp_live, n_live, m_live = objective.loss(model, live)
    assert lp_pre.item() == pytest.approx(lp_live.item(), abs=1e-5)
    assert lp_pre.item() != pytest.approx(LOG2 * n_pre.item(), abs=1e-3)
    for k in m_live:
        assert m_pre[k].item() == pytest.approx(m_live[k].item(), abs=1e-4), k

    # A second run finds the cache (same model, same data): nothing is recomputed.
    mtimes = [f.stat().st_mtime_ns for f in files]
    seen = []

    class Rec(NullReporter):
        def info(self, msg):
            seen.append(msg)

    prep2 = prepare(cfg, Rec())
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert sum("from the cache" in s for s in seen) == 2
    np.testing.assert_array_equal(prep2.train.ref[0][0], prep.train.ref[0][0])

    # The key changes with the data and with the model weights.
    pairs = prep.train.examples
    key = reference.fingerprint(model, pairs)
    changed = [pairs[1], pairs[0]] + pairs[2:]
    assert reference.fingerprint(model, changed) != key
    layer = model.layers[0].self_attn.q_proj.linear
    layer.weight = layer.weight + 1e-3
    assert reference.fingerprint(model, pairs) != key
    # A cache file that does not fit the pairs is not used.
    assert reference.load(files[0], pairs[:-1]) is None


# ---------------------------------------------------------------------------
# SFT, then DPO --from the SFT run
# ---------------------------------------------------------------------------


def test_dpo_from_an_sft_run(tmp_path, tiny_model, sft_data, pref_data):
    sft_cfg = build_config(None, [f"model.path={tiny_model}", f"data.path={sft_data}", "train.steps=4",
                                  "train.lr=1e-2", "train.eval_every=0", "train.save_every=0",
                                  "train.eval_at_start=false", f"output.dir={tmp_path}", "output.name=sft"])
    sft_dir, _ = run(sft_cfg, reporter=NullReporter())

    cfg = build_config(None, [f"data.path={pref_data}", f"preference.from_run={sft_dir}", "train.steps=4",
                              "train.lr=5e-3", "train.eval_every=0", "train.save_every=0",
                              "train.eval_at_start=false", "train.batch_size=4"], method="dpo")
    resolve_from_run(cfg, get("dpo"))
    assert cfg.model.path == str(tiny_model.resolve())  # the SFT run's base, found from its adapter
    prep = prepare(cfg, NullReporter())
    model = prep.loaded.model
    x = mx.array([[1, 5, 9, 13, 17, 21, 25]])

    sft_model = load_model(str(tiny_model)).model
    load_adapters(sft_model, sft_dir)
    from mlxpost.model.lora import adapters_off

    with adapters_off(model):
        merged = model(x)
    np.testing.assert_allclose(np.array(merged), np.array(sft_model(x)), atol=1e-4)
    assert float(mx.abs(sft_model(x) - load_model(str(tiny_model)).model(x)).max()) > 1e-3  # SFT changed it

    # Step 0 from the SFT policy: DPO's loss is log 2 again.
    batch = next(iter(prep.train))
    loss, count, _ = get("dpo").objective(prep).loss(model, batch)
    assert (loss / count).item() == pytest.approx(LOG2, abs=1e-6)

    tr = Trainer(model, get("dpo").objective(prep), cfg.train, total_steps=4, run=RunDir(tmp_path / "dpo"),
                 reporter=NullReporter(), adapter_cfg=prep.adapter_cfg)
    tr.fit(prep.train)
    assert prep.adapter_cfg["mlxpost"]["from_adapter"] == str(sft_dir.resolve())
    # Loading the DPO adapter rebuilds the stack: base + merged SFT adapter + DPO adapter.
    fresh = load_model(str(tiny_model)).model
    load_adapter_stack(fresh, tmp_path / "dpo")
    np.testing.assert_allclose(np.array(fresh(x)), np.array(model(x)), atol=1e-4)

    other = build_config(None, [f"model.path={tmp_path}", f"preference.from_run={sft_dir}"], method="dpo")
    with pytest.raises(MlxpostError, match="was trained on"):
        resolve_from_run(other, get("dpo"))


def test_a_run_from_another_starts_from_its_replies_after_training(tmp_path, tiny_model, sft_data, pref_data,
                                                                   monkeypatch):
    """The --from run's replies after training are this run's before (the same model, prompts and sampling), not
    sampled again; other sampling settings, or an adapter written after those replies, sample again."""
    import os

    from mlxpost.training import sources

    common = ["train.steps=2", "train.eval_every=0", "train.save_every=0", "train.eval_at_start=false",
              "sample.prompts=[\"Say hi\", \"What is 2 + 2?\"]", "sample.max_tokens=6", f"output.dir={tmp_path}"]
    sft_dir, _ = run(build_config(None, [f"model.path={tiny_model}", f"data.path={sft_data}", "train.lr=1e-2",
                                         "output.name=sft", *common]), reporter=NullReporter())
    after = [r["after"] for r in json.loads((sft_dir / "samples.json").read_text())]
    sampled = []
    real = sources.run_samples
    monkeypatch.setattr(sources, "run_samples", lambda *a: sampled.append(a[2]) or real(*a))

    class Said(NullReporter):
        def __init__(self):
            self.said = []

        def info(self, msg):
            self.said.append(msg)

    def dpo(name, *sets):
        rep = Said()
        cfg = build_config(None, [f"data.path={pref_data}", f"preference.from_run={sft_dir}", "train.batch_size=4",
                                  *common, f"output.name={name}", *sets], method="dpo")
        path, _ = run(cfg, reporter=rep)
        return json.loads((path / "samples_before.json").read_text()), rep.said

    before, said = dpo("carried")
    assert before == after and len(sampled) == 1  # only the replies after training were sampled
    assert any("replies before training: those of" in m and "sft" in m for m in said)
    sampled.clear()
    dpo("other", "sample.max_tokens=5")
    assert len(sampled) == 2  # other sampling settings: sampled before and after
    sampled.clear()
    weights = sft_dir / "adapters.safetensors"
    os.utime(weights, (weights.stat().st_atime, weights.stat().st_mtime + 10))  # the adapter written since
    dpo("rewritten")
    assert len(sampled) == 2


# ---------------------------------------------------------------------------
# Resume, configuration, health checks
# ---------------------------------------------------------------------------


class StopAt(NullReporter):
    def __init__(self, step):
        self.stop = step

    def advance(self, step):
        if step == self.stop:
            raise KeyboardInterrupt


def test_an_interrupted_dpo_run_resumes_to_the_same_result(tmp_path, tiny_model, pref_data):
    sets = ["train.steps=8", "train.lr=5e-3", "train.batch_size=4", "train.save_every=3", f"output.dir={tmp_path}"]
    path_a, res_a = run(pref_cfg(tiny_model, pref_data, "dpo", *sets, "output.name=a"), reporter=NullReporter())
    with pytest.raises(KeyboardInterrupt):
        run(pref_cfg(tiny_model, pref_data, "dpo", *sets, "output.name=b"), reporter=StopAt(5))
    from mlxpost.training.resume import resume_config

    path_b, res_b = run(resume_config(tmp_path / "b", []), reporter=NullReporter(), resume=tmp_path / "b")
    wa, wb = mx.load(str(path_a / "adapters.safetensors")), mx.load(str(path_b / "adapters.safetensors"))
    for k in wa:
        np.testing.assert_allclose(np.array(wa[k]), np.array(wb[k]), atol=1e-6, err_msg=k)
    assert res_b.val_metrics["val_rewards/margins"] == pytest.approx(res_a.val_metrics["val_rewards/margins"],
                                                                      abs=1e-5)
    summary = json.loads((path_b / "summary.json").read_text())
    assert summary["health"]["quality_gate"]["verdict"] in ("pass", "fail")
    assert "rewards/accuracies" in summary["final_metrics"]


def test_preference_configuration_errors(tiny_model, pref_data):
    with pytest.raises(ConfigError, match="dpo.beta.*setting of dpo, not of sft"):
        build_config(None, ["dpo.beta=0.2"])
    with pytest.raises(ConfigError, match="did you mean 'dpo.beta'"):
        build_config(None, ["dpo.bta=0.2"], method="dpo")
    with pytest.raises(ConfigError, match="not of orpo"):
        build_config(None, ["dpo.beta=0.2"], method="orpo")
    with pytest.raises(ConfigError, match="dpo.loss: expected one of"):
        build_config(None, ["dpo.loss=kto"], method="dpo")
    with pytest.raises(ConfigError, match="label_smoothing applies"):
        build_config(None, ["dpo.loss=ipo", "dpo.label_smoothing=0.1"], method="dpo")
    with pytest.raises(ConfigError, match="dpo.label_smoothing: must be in"):
        build_config(None, ["dpo.label_smoothing=0.5"], method="dpo")
    assert build_config(None, ["data.batching=pack"], method="dpo").data.batching == "pack"  # pairs pack too
    with pytest.raises(ConfigError, match="train.attention_chunk: must be -1"):
        build_config(None, ["train.attention_chunk=-2"], method="dpo")
    assert build_config(None, ["train.attention_chunk=64", "train.grad_checkpoint=true"], method="dpo")
    with pytest.raises(ConfigError, match="share_prompt=on cannot be combined with train.grad_checkpoint"):
        build_config(None, ["preference.share_prompt=on", "train.grad_checkpoint=true"], method="dpo")
    with pytest.raises(ConfigError, match="share_prompt=on needs packed pair batches"):
        build_config(None, ["preference.share_prompt=on", "data.batching=pad"], method="dpo")
    with pytest.raises(ConfigError, match="preference.share_prompt: expected one of"):
        build_config(None, ["preference.share_prompt=yes"], method="dpo")
    prep = prepare(pref_cfg(tiny_model, pref_data, "dpo", "train.grad_checkpoint=true"), NullReporter())
    auto = DEFAULT_ATTENTION_CHUNK if mx.default_device() == mx.cpu else None
    assert attention_chunk(prep.loaded.model) == auto  # recomputed blocks replay the chunks
    assert not prep.train.share_prompt and "gradient checkpointing" in dict(prep.rows)["prompt"]
    cfg = build_config(None, [], method="dpo")
    assert cfg.train.lr == 5e-5 and "dpo" in cfg.to_dict() and "orpo" not in cfg.to_dict()
    assert "dpo" not in build_config(None, []).to_dict()


def test_health_checks_raise_findings_once_with_advice():
    h = PreferenceHealth(100, Thresholds())
    base = {"rewards/accuracies": 0.5, "pref_loss": 0.69, "kl": 0.0, "logratio/chosen": 0.0,
            "logratio/rejected": 0.0}
    assert h.observe(1, base) == []
    # Early collapse: loss near 0 with accuracy 1.0 within the first 5% of steps.
    found = h.observe(2, {**base, "rewards/accuracies": 1.0, "pref_loss": 0.01})
    assert [f.check for f in found] == ["collapse"] and "too easy" in found[0].message
    assert h.observe(3, {**base, "rewards/accuracies": 1.0, "pref_loss": 0.01}) == []  # reported once
    # Late, the same numbers are no collapse (training is expected to get there).
    late = PreferenceHealth(100, Thresholds())
    late.observe(1, base)
    assert late.observe(50, {**base, "rewards/accuracies": 1.0, "pref_loss": 0.01}) == []
    # KL drift, smoothed: one spike does not trigger it, a sustained level does.
    k = PreferenceHealth(100, Thresholds(kl_max=0.1))
    k.observe(1, base)
    assert k.observe(2, {**base, "kl": 0.3}) == []
    found = [f for s in range(3, 10) for f in k.observe(s, {**base, "kl": 0.3})]
    assert [f.check for f in found] == ["drift"] and "KL" in found[0].message
    # Chosen falling with rejected: drift; rejected falling without bound: collapse.
    d = PreferenceHealth(100, Thresholds())
    found = [f for s in range(1, 30) for f in d.observe(s, {**base, "logratio/chosen": -0.02 * s,
                                                              "logratio/rejected": -0.2 * s})]
    checks = {f.check: f for f in found}
    assert "unlearning the chosen" in checks["drift"].message
    assert "without bound" in checks["collapse"].message and checks["collapse"].advice
    # Reference-free methods compare with the first steps' average instead.
    r = PreferenceHealth(100, Thresholds())
    stream = [{"rewards/accuracies": 0.5, "logps/chosen_mean": -1.0 - 0.05 * s,
               "logps/rejected_mean": -1.0 - 0.1 * s} for s in range(20)]
    found = [f for s, m in enumerate(stream, 1) for f in r.observe(s, m)]
    assert any(f.check == "drift" for f in found)
    # The gate.
    g = PreferenceHealth(10, Thresholds(gate_min_margin=0.1, gate_min_accuracy=0.7))
    assert g.gate({"val_rewards/margins": 0.2, "val_rewards/accuracies": 0.8})["verdict"] == "pass"
    assert g.gate({"val_rewards/margins": 0.2, "val_rewards/accuracies": 0.6})["verdict"] == "fail"
    assert g.gate(None)["verdict"] == "skipped"
    summary = d.summary(None)
    assert summary["drift"]["verdict"] == "warn" and summary["non_finite"]["verdict"] == "ok"


def test_precompute_needs_pairs_of_this_data(tmp_path, tiny_model):
    d = tmp_path / "d"
    write_jsonl(d / "train.jsonl", preference_rows(24))
    cfg = pref_cfg(tiny_model, d, "dpo", "train.batch_size=4", "data.valid_fraction=0")
    prep = prepare(cfg, NullReporter())
    precompute_reference(prep, NullReporter())  # default: a cache folder beside the data
    assert len(list((d / ".mlxpost-cache").glob("ref-*.npz"))) == 1
    assert total_steps(cfg, prep.train) == 6
    with pytest.raises(MlxpostError, match="reference log-probs for 3 pairs"):
        prep.train.set_reference(prep.train.ref[:3])
