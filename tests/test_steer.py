"""Steering vectors on tiny models: exact hooks, extraction against naive loops, adapters on/off, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import mlxpost_env, prompt_ids, write_jsonl

from mlxpost.data.render import Renderer
from mlxpost.errors import MlxpostError
from mlxpost.model.adapters import adapter_weights, attach_adapters, resolve_targets
from mlxpost.model.load import load_model
from mlxpost.model.lora import LoRALinear
from mlxpost.steer.extract import from_adapters_off, read_sequences
from mlxpost.steer.hooks import SteerSpec, model_blocks, recording, steered
from mlxpost.steer.vectors import hidden_states, load_vectors, mean_difference, parse_steer

POS = ["The cat sat on the mat.", "A cat likes milk.", "My cat is asleep.", "Cats chase mice.",
       "The cat purrs softly.", "Look at that cat."]
NEG = ["The dog ran in the park.", "A dog likes bones.", "My dog is barking.", "Dogs chase balls.",
       "The dog wags its tail.", "Look at that dog."]


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_model(str(tiny_model))


def test_lambda_zero_is_bit_identical_and_removal_restores(lm):
    ids = mx.array([prompt_ids(lm, POS[:1])[0]])
    base = lm.model(ids)
    blocks = list(model_blocks(lm.model))
    v = mx.random.normal((lm.model.args.hidden_size,))
    with steered(lm.model, [SteerSpec(1, v, 0.0)]):
        assert mx.array_equal(lm.model(ids), base)
    with steered(lm.model, [SteerSpec(1, v, 2.0)]):
        assert not mx.allclose(lm.model(ids), base)
    assert all(a is b for a, b in zip(model_blocks(lm.model), blocks))
    assert mx.array_equal(lm.model(ids), base)


def test_steering_adds_exactly_lambda_v_and_vectors_compose(lm):
    ids = mx.array([prompt_ids(lm, POS[:1])[0]])
    d = lm.model.args.hidden_size
    v, w = mx.random.normal((d,)), mx.random.normal((d,))
    with recording(lm.model, [0, 1]) as sink:
        lm.model(ids)
        h0 = np.array(sink[0])
    with steered(lm.model, [SteerSpec(0, v, 1.5), SteerSpec(0, w, -0.5)]):
        with recording(lm.model, [0]) as sink:
            lm.model(ids)
            h0s = np.array(sink[0])
    want = h0 + 1.5 * np.array(v) - 0.5 * np.array(w)
    np.testing.assert_allclose(h0s, want, rtol=0, atol=1e-6)


def test_prompt_only_steering_shifts_the_prefill_and_leaves_the_decode_steps(lm):
    """``:prompt``: the prompt's pass is steered exactly as with every position; a decode step (one
    position, KV cache) equals the unsteered step on the steered prompt's cache."""
    from mlx_lm.models.cache import make_prompt_cache

    ids = mx.array([prompt_ids(lm, POS[:1])[0]])
    nxt = mx.array([[5]])
    v = mx.random.normal((lm.model.args.hidden_size,)) * 2.0
    every, prompt = SteerSpec(1, v, 1.5), SteerSpec(1, v, 1.5, prompt_only=True)

    def run(prefill_spec, decode_spec):
        cache = make_prompt_cache(lm.model)
        with steered(lm.model, [prefill_spec] if prefill_spec else []):
            first = lm.model(ids, cache=cache)
        with steered(lm.model, [decode_spec] if decode_spec else []):
            second = lm.model(nxt, cache=cache)
        return np.array(first), np.array(second)

    p_first, p_second = run(prompt, prompt)
    e_first, e_second = run(every, every)
    m_first, m_second = run(every, None)  # by hand: steered prefill, plain decode step
    np.testing.assert_array_equal(p_first, e_first)
    np.testing.assert_array_equal(p_second, m_second)
    assert np.abs(p_second - e_second).max() > 1e-3  # the decode step is not steered
    assert np.abs(p_first - run(None, None)[0]).max() > 1e-3  # the prompt is
    # Scoring a reply after its prompt (the sweep's perplexity): the prompt is steered, the reply is not.
    from mlxpost.steer.sweep import reply_perplexity
    prompt_ids_, reply = [int(x) for x in np.array(ids[0])], [5, 6, 7]
    plain = reply_perplexity(lm.model, [prompt_ids_], [reply])
    with steered(lm.model, [prompt]):
        p_ppl = reply_perplexity(lm.model, [prompt_ids_], [reply])
    with steered(lm.model, [every]):
        e_ppl = reply_perplexity(lm.model, [prompt_ids_], [reply])
    cache = make_prompt_cache(lm.model)
    with steered(lm.model, [every]):
        first = lm.model(ids, cache=cache)[:, -1:]
    rest = lm.model(mx.array([reply[:-1]]), cache=cache)
    lg = mx.concatenate([first, rest], axis=1)[0]
    by_hand = float(np.exp(float(mx.mean(-mx.take_along_axis(lg - mx.logsumexp(lg, axis=-1, keepdims=True),
                                                             mx.array(reply)[:, None], axis=-1)))))
    assert p_ppl == pytest.approx(by_hand, rel=1e-5) and len({round(x, 4) for x in (plain, p_ppl, e_ppl)}) == 3
    with pytest.raises(MlxpostError, match="VEC_DIR"):
        parse_steer("nowhere:prompt")
    assert parse_steer("v@2:1:prompt") == ("v", 2.0, 1)


@pytest.mark.parametrize("position", ["last", "mean"])
def test_batched_extraction_equals_a_naive_per_prompt_loop(lm, position):
    seqs = prompt_ids(lm, POS + NEG)
    layers = [0, 1]
    got = hidden_states(lm.model, seqs, layers, position=position, batch_size=4, pad_id=0)
    again = hidden_states(lm.model, seqs, layers, position=position, batch_size=4, pad_id=0)
    for l in layers:
        np.testing.assert_array_equal(got[l], again[l])  # reproducible
    for i, s in enumerate(seqs):
        with recording(lm.model, layers) as sink:
            lm.model(mx.array([s]))
            for l in layers:
                h = np.array(sink[l])[0]
                want = h[-1] if position == "last" else h.mean(0)
                np.testing.assert_allclose(got[l][i], want, rtol=1e-4, atol=1e-4)


def test_adapters_off_extraction_equals_two_separately_loaded_models(tiny_model):
    on = load_model(str(tiny_model))
    attach_adapters(on.model, rank=4, scale=2.0, keys=resolve_targets(on.model, "all-linear"))
    for _, m in on.model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.05
    seqs = prompt_ids(on, POS)
    pos, neg = from_adapters_off(on.model, seqs, [0, 1], position="mean", batch_size=3, pad_id=0)
    base = load_model(str(tiny_model))
    ref_neg = hidden_states(base.model, seqs, [0, 1], position="mean", batch_size=3, pad_id=0)
    twin = load_model(str(tiny_model))
    attach_adapters(twin.model, rank=4, scale=2.0, keys=resolve_targets(twin.model, "all-linear"))
    twin.model.load_weights(list(adapter_weights(on.model).items()), strict=False)
    ref_pos = hidden_states(twin.model, seqs, [0, 1], position="mean", batch_size=3, pad_id=0)
    for l in (0, 1):
        np.testing.assert_allclose(neg[l], ref_neg[l], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(pos[l], ref_pos[l], rtol=1e-5, atol=1e-5)
        assert np.abs(pos[l] - neg[l]).max() > 1e-3  # the adapters do change the states
    with pytest.raises(MlxpostError, match="needs --adapter"):
        from_adapters_off(base.model, seqs, [0], position="last")


def test_a_vector_from_two_prompt_sets_moves_a_score_monotonically(lm):
    """Score: the mean projection of the last block's output onto the vector, on held-out prompts."""
    layer, last = 0, len(model_blocks(lm.model)) - 1
    pos = hidden_states(lm.model, prompt_ids(lm, POS[:4]), [layer, last], position="mean")
    neg = hidden_states(lm.model, prompt_ids(lm, NEG[:4]), [layer, last], position="mean")
    vectors, report = mean_difference(pos, neg)
    assert report[layer]["gap_over_spread"] > 0
    u = vectors[last] / np.linalg.norm(vectors[last])
    held = prompt_ids(lm, POS[4:] + NEG[4:])
    scores = []
    for lam in (-2.0, -1.0, 0.0, 1.0, 2.0):
        with steered(lm.model, [SteerSpec(layer, mx.array(vectors[layer]), lam)]):
            h = hidden_states(lm.model, held, [last], position="mean")[last]
        scores.append(float((h @ u).mean()))
    assert all(b > a for a, b in zip(scores, scores[1:])), scores


def test_bad_rows_and_specs_are_clear_errors(tmp_path, lm):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    with pytest.raises(MlxpostError, match="bad.jsonl:2: prompt"):
        read_sequences(bad, Renderer(lm.tokenizer))
    two_users = tmp_path / "two.jsonl"
    two_users.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                                   {"role": "assistant", "content": "c"}]}) + "\n")
    with pytest.raises(MlxpostError, match=r"two.jsonl:1: messages\[1\].role"):
        read_sequences(two_users, Renderer(lm.tokenizer))
    with pytest.raises(MlxpostError, match="VEC_DIR@LAMBDA"):
        parse_steer("just-a-dir")
    with pytest.raises(MlxpostError, match="not a steering-vector directory"):
        load_vectors(tmp_path)


@pytest.mark.slow
def test_cli_extract_then_generate_steered_and_aqi(tmp_path, tiny_model):
    write_jsonl(tmp_path / "pos.jsonl", [{"prompt": p} for p in POS])
    write_jsonl(tmp_path / "neg.jsonl", [{"prompt": p} for p in NEG])

    def run(*args):
        out = subprocess.run([sys.executable, "-m", "mlxpost", *map(str, args)], capture_output=True, text=True,
                             env=mlxpost_env(), timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    vec = tmp_path / "vec"
    run("steer", "extract", "--model", tiny_model, "--positive", tmp_path / "pos.jsonl", "--negative",
        tmp_path / "neg.jsonl", "--layers", "0,1", "--out", vec)
    meta = json.loads((vec / "steer.json").read_text())
    assert meta["layers"] == [0, 1] and meta["counts"] == {"positive": 6, "negative": 6}
    vectors, _ = load_vectors(vec)
    assert sorted(vectors) == [0, 1]
    plain = run("generate", "--model", tiny_model, "-p", "hello", "--max-tokens", 8)
    zero = run("generate", "--model", tiny_model, "-p", "hello", "--max-tokens", 8, "--steer", f"{vec}@0")
    assert zero == plain
    bad = subprocess.run([sys.executable, "-m", "mlxpost", "generate", "--model", str(tiny_model), "-p", "hi",
                          "--steer", f"{vec}@1:9"], capture_output=True, text=True, env=mlxpost_env(), timeout=300)
    assert bad.returncode == 2 and "not 9" in bad.stderr
    write_jsonl(tmp_path / "lab.jsonl", [{"prompt": p, "label": "aligned"} for p in POS] +
                [{"prompt": p, "label": "misaligned"} for p in NEG])
    assert "AQI " in run("aqi", "--model", tiny_model, "--data", tmp_path / "lab.jsonl", "--layers", "0,1")


def test_sweep_scores_side_effects_and_verdicts(tmp_path, lm):
    from mlxpost.steer.sweep import run_sweep, write_outputs

    v = mx.random.normal((lm.model.args.hidden_size,), key=mx.random.key(3)) * 4
    ps, ns = prompt_ids(lm, POS[:4]), prompt_ids(lm, NEG[:4])
    labelled = (ps + ns, np.repeat([1, 0], 4), [0, 1], 0)
    res = run_sweep(lm.model, lm.tokenizer, SteerSpec(1, v, 1.0), [-8, 0, 8], ps, ns, score="length",
                    max_new_tokens=6, labelled=labelled)
    rows = {r["lambda"]: r for r in res["rows"]}
    assert sorted(rows) == [-8.0, 0.0, 8.0]
    assert rows[0.0]["side_effects"] == 0.0  # λ=0 is the reference
    assert rows[8.0]["side_effects"] > 0  # a vector this long changes the greedy replies
    with steered(lm.model, []):
        from mlxpost.steer.sweep import greedy_replies
        plain = greedy_replies(lm.model, lm.tokenizer, ps, 6)
    from mlxpost.steer.scores import mean_length
    assert rows[0.0]["score"] == pytest.approx(mean_length(plain))
    assert 0.0 in res["verdicts"]["within_budget"]
    assert all(0 < r["aqi"] < 1 and r["aqi_interval"][0] <= r["aqi_interval"][1] for r in res["rows"])
    assert "aqi_increases" in res["verdicts"]
    written = write_outputs(res, tmp_path)
    assert (tmp_path / "sweep.json").is_file() and "| λ |" in (tmp_path / "sweep.md").read_text()
    assert len(written) >= 2


def test_aqi_rises_as_synthetic_clusters_move_apart():
    from mlxpost.steer.aqi import aqi, bootstrap_interval

    rng = np.random.default_rng(1)
    base, y = rng.normal(size=(60, 16)), np.repeat([0, 1], 30)
    direction = rng.normal(size=16)
    direction /= np.linalg.norm(direction)
    for k in (0, 1):  # both clusters centred on 0: the separation is exactly d
        base[y == k] -= base[y == k].mean(0)
    res = [aqi(base + d * y[:, None] * direction, y) for d in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)]
    vals = [r["aqi"] for r in res]
    assert all(b > a for a, b in zip(vals, vals[1:])), vals
    assert all(b["calinski_harabasz"] > a["calinski_harabasz"] for a, b in zip(res, res[1:]))
    assert all(b["xie_beni"] < a["xie_beni"] for a, b in zip(res, res[1:]))
    assert res[-1]["davies_bouldin"] < res[1]["davies_bouldin"] and res[-1]["dunn"] > res[1]["dunn"]
    lo, hi = bootstrap_interval(base + 8.0 * y[:, None] * direction, y, n=50)
    lo0, hi0 = bootstrap_interval(base + 0.5 * y[:, None] * direction, y, n=50)
    assert lo > hi0  # far apart: the intervals do not overlap
    with pytest.raises(MlxpostError, match="both labels"):
        aqi(base, np.zeros(60))


def test_abliteration_leaves_no_component_along_r_and_the_fused_model_loads(tmp_path, tiny_model):
    from mlxpost.steer.abliterate import direction, orthogonalize, write_fused, writer_weights

    lm = load_model(str(tiny_model))
    harmful = hidden_states(lm.model, prompt_ids(lm, POS), [1], position="last")[1]
    harmless = hidden_states(lm.model, prompt_ids(lm, NEG), [1], position="last")[1]
    r = direction(harmful, harmless)
    before = {n: np.array(m.weight) for n, m in writer_weights(lm.model).items()}
    left = orthogonalize(lm.model, r)
    assert len(left) == 1 + 2 * len(model_blocks(lm.model))
    for name, m in writer_weights(lm.model).items():
        w = np.array(m.weight, dtype=np.float64)
        proj = w @ r if name == "embed_tokens" else r @ w
        assert np.abs(proj).max() < 1e-5, name
        assert np.abs(w - before[name]).max() > 0  # it was edited
    out = write_fused(lm, tmp_path / "abl")
    again = load_model(str(out))
    for name, m in writer_weights(again.model).items():
        np.testing.assert_allclose(np.array(m.weight), np.array(writer_weights(lm.model)[name].weight), atol=1e-6)
