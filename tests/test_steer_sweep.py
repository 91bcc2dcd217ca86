"""Steering sweeps on tiny models: completion pooling, reward functions as the score, perplexity side effects,
λ relative to the residual norm."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import prompt_ids, write_jsonl

from mlxpost.data.render import Renderer
from mlxpost.errors import MlxpostError
from mlxpost.model.load import load_model
from mlxpost.steer.extract import read_rows
from mlxpost.steer.hooks import SteerSpec, recording, steered
from mlxpost.steer.sweep import Behaviour, greedy, greedy_replies, reply_perplexity, residual_norm, run_sweep
from mlxpost.steer.vectors import hidden_states

PROMPTS = ["The cat sat on the mat.", "A cat likes milk.", "My cat is asleep.", "Cats chase mice."]
NEUTRAL = ["The dog ran in the park.", "A dog likes bones.", "My dog is barking.", "Dogs chase balls."]


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_model(str(tiny_model))


def test_completion_pooling_reads_only_the_completion_tokens(tmp_path, lm):
    write_jsonl(tmp_path / "sft.jsonl", [{"prompt": p, "completion": " " + n} for p, n in zip(PROMPTS, NEUTRAL)] +
                [{"prompt": "only a prompt"}])
    rows = read_rows(tmp_path / "sft.jsonl", Renderer(lm.tokenizer))
    assert rows[-1][1] is None and all(0 < s < len(ids) for ids, s in rows[:-1])
    seqs, starts = [ids for ids, _ in rows[:-1]], [s for _, s in rows[:-1]]
    got = hidden_states(lm.model, seqs, [0, 1], position="completion", starts=starts, batch_size=3)
    for i, (s, b) in enumerate(zip(seqs, starts)):
        with recording(lm.model, [0, 1]) as sink:
            lm.model(mx.array([s]))
            for l in (0, 1):
                np.testing.assert_allclose(got[l][i], np.array(sink[l])[0, b:].mean(0), rtol=1e-4, atol=1e-4)
    with pytest.raises(MlxpostError, match="--position completion needs rows with a completion"):
        hidden_states(lm.model, [ids for ids, _ in rows], [0], position="completion", starts=[s for _, s in rows])


def test_reward_functions_score_the_sweep_with_the_prompt_columns(tmp_path, lm):
    (tmp_path / "rw.py").write_text(
        "def mentions(completions, word, **kw):\n"
        "    return [float(w in c) for c, w in zip(completions, word)]\n"
        "def words(completions, **kw):\n"
        "    return [len(c.split()) for c in completions]\n")
    ps = prompt_ids(lm, PROMPTS)
    plain = greedy_replies(lm.model, lm.tokenizer, ps, 6)
    word = [t.split()[0] if t.split() else "zz" for t in plain]
    word[0] = "never-said"
    b = Behaviour.rewards([f"{tmp_path}/rw.py:mentions", f"{tmp_path}/rw.py:words@0.5"], {"word": word},
                          PROMPTS, [f"q.jsonl:{i}" for i in range(1, 5)])
    assert b.name == "reward:mentions+words"
    want = np.mean([float(w in t) + 0.5 * len(t.split()) for t, w in zip(plain, word)])
    assert b.fn(plain) == pytest.approx(want)
    v = mx.random.normal((lm.model.args.hidden_size,), key=mx.random.key(5)) * 6
    res = run_sweep(lm.model, lm.tokenizer, SteerSpec(1, v, 1.0), [0, 4], ps, None, score=b, max_new_tokens=6)
    assert res["score_name"] == "reward:mentions+words"
    assert res["rows"][0]["score"] == pytest.approx(want)  # λ=0: the unsteered replies
    missing = Behaviour.rewards([f"{tmp_path}/rw.py:mentions"], {}, PROMPTS, [f"q.jsonl:{i}" for i in range(1, 5)])
    with pytest.raises(MlxpostError, match="word"):
        missing.fn(plain)


def test_perplexity_side_effect_is_zero_at_lambda_zero_and_grows_with_lambda(lm):
    ps, ns = prompt_ids(lm, PROMPTS), prompt_ids(lm, NEUTRAL)
    v = mx.random.normal((lm.model.args.hidden_size,), key=mx.random.key(3)) * 4
    res = run_sweep(lm.model, lm.tokenizer, SteerSpec(1, v, 1.0), [2, 0, 8], ps, ns, score="length",
                    max_new_tokens=6)
    rows = {r["lambda"]: r for r in res["rows"]}
    assert [r["lambda"] for r in res["rows"]] == [0.0, 2.0, 8.0]
    _, reply_ids = greedy(lm.model, lm.tokenizer, ns, 6)
    assert rows[0.0]["perplexity"] == pytest.approx(reply_perplexity(lm.model, ns, reply_ids), rel=1e-5)
    assert rows[0.0]["perplexity_change"] == 0.0
    assert 0 < rows[2.0]["perplexity_change"] < rows[8.0]["perplexity_change"]  # the λ=0 replies get less likely
    with steered(lm.model, [SteerSpec(1, v, 8.0)]):
        assert rows[8.0]["perplexity"] == pytest.approx(reply_perplexity(lm.model, ns, reply_ids), rel=1e-5)
    assert "perplexity change" in "\n".join(__import__("mlxpost.steer.sweep", fromlist=["table"]).table(res))


def test_relative_lambda_is_in_units_of_the_residual_norm(lm):
    ps = prompt_ids(lm, PROMPTS)
    with recording(lm.model, [1]) as sink:
        norms = []
        for s in ps:
            lm.model(mx.array([s]))
            norms += list(np.linalg.norm(np.array(sink[1])[0, 1:], axis=-1))
    r = residual_norm(lm.model, ps, 1)
    assert r == pytest.approx(float(np.mean(norms)), rel=1e-5)
    v = mx.random.normal((lm.model.args.hidden_size,), key=mx.random.key(4)) * 3
    res = run_sweep(lm.model, lm.tokenizer, [SteerSpec(1, v, 1.0)], [0.5], ps, None, score="length",
                    max_new_tokens=4, relative=True)
    row = next(x for x in res["rows"] if x["lambda"] == 0.5)
    assert res["residual_norm"][0] == pytest.approx(r, rel=1e-5)
    assert row["raw_lambda"] == pytest.approx(0.5 * r / float(np.linalg.norm(np.array(v))), rel=1e-5)
    with pytest.raises(MlxpostError, match="length 0"):
        run_sweep(lm.model, lm.tokenizer, [SteerSpec(1, mx.zeros_like(v), 1.0)], [1], ps, None, score="length",
                  max_new_tokens=2, relative=True)


def test_eval_steer_runs_every_task_steered_and_records_it(tmp_path, tiny_model, sft_data, monkeypatch):
    from mlxpost.eval.run import evaluate
    from mlxpost.steer.vectors import save_vectors

    monkeypatch.chdir(tmp_path)
    lm = load_model(str(tiny_model))
    d = lm.model.args.hidden_size
    v = np.array(mx.random.normal((d,), key=mx.random.key(7))) * 2
    save_vectors(tmp_path / "vec", {1: v}, {"best_layer": 1})
    task = f"ppl:{sft_data / 'valid.jsonl'}"
    ppl = lambda doc: doc["tasks"][task]["metrics"]["ppl"]["value"]  # noqa: E731
    plain = evaluate(str(tiny_model), [task])
    zero = evaluate(str(tiny_model), [task], steer=[f"{tmp_path / 'vec'}@0"])
    assert ppl(zero) == ppl(plain)  # λ=0 installs nothing
    steered_doc = evaluate(str(tiny_model), [task], steer=[f"{tmp_path / 'vec'}@3:1"], baseline=str(tiny_model))
    with steered(lm.model, [SteerSpec(1, mx.array(v), 3.0)]):
        by_hand = evaluate(lm, [task], out=tmp_path / "hand")
    assert ppl(steered_doc) == pytest.approx(ppl(by_hand), rel=1e-6) and ppl(steered_doc) != ppl(plain)
    rec = steered_doc["target"]["steer"][0]
    assert rec["layer"] == 1 and rec["lambda"] == 3.0 and len(rec["sha256"]) == 64
    assert "+steer-" in steered_doc["path"] and steered_doc["path"] != plain["path"]  # never overwrites the plain one
    row = next(r for r in steered_doc["baseline"]["rows"] if r["metric"] == "ppl")
    assert row["before"] == pytest.approx(ppl(plain)) and row["after"] == pytest.approx(ppl(steered_doc))


def test_a_run_steers_its_before_and_after_samples(tmp_path, tiny_model, sft_data):
    from mlxpost.config import build_config
    from mlxpost.errors import ConfigError
    from mlxpost.steer.vectors import save_vectors
    from mlxpost.training.pipeline import run as run_training
    from mlxpost.ui import NullReporter

    lm = load_model(str(tiny_model))
    v = np.array(mx.random.normal((lm.model.args.hidden_size,), key=mx.random.key(9))) * 8
    save_vectors(tmp_path / "vec", {1: v}, {"best_layer": 1})
    prompts = PROMPTS[:3]
    common = [f"model.path={tiny_model}", f"data.path={sft_data}", "train.steps=1", f"output.dir={tmp_path}",
              f"sample.prompts={prompts}", "sample.max_tokens=6", "sft.gate_max_val_ppl=1e9"]
    with pytest.raises(ConfigError, match="sample.steer: .*not a steering-vector directory"):
        build_config(None, common + [f"sample.steer=[{tmp_path}@1]"], method="sft")
    runs = {}
    for name, steer in (("plain", "[]"), ("zero", f"[{tmp_path / 'vec'}@0]"), ("on", f"[{tmp_path / 'vec'}@1:1]")):
        cfg = build_config(None, common + [f"output.name={name}", f"sample.steer={steer}"], method="sft")
        path, _ = run_training(cfg, reporter=NullReporter())
        runs[name] = __import__("json").loads((path / "samples_before.json").read_text())
    with steered(lm.model, [SteerSpec(1, mx.array(v), 1.0)]):
        by_hand = greedy_replies(lm.model, lm.tokenizer, prompt_ids(lm, prompts), 6)
    assert runs["zero"] == runs["plain"] and runs["on"] == by_hand and runs["on"] != runs["plain"]


def test_aqi_parts_match_scikit_learn_and_aqi_depends_on_geometry_only():
    from mlxpost.steer.aqi import aqi, calinski_harabasz, davies_bouldin

    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(60, 8)), np.repeat([0, 1], 30)
    x[y == 1] += 1.2
    assert calinski_harabasz(x, y) == pytest.approx(metrics.calinski_harabasz_score(x, y), rel=1e-10)
    assert davies_bouldin(x, y) == pytest.approx(metrics.davies_bouldin_score(x, y), rel=1e-10)
    base = aqi(x, y)["aqi"]
    assert aqi(np.vstack([x, x, x]), np.tile(y, 3))["aqi"] == pytest.approx(base, rel=1e-12)  # N-free
    assert aqi(0.01 * x + 5, y)["aqi"] == pytest.approx(base, rel=1e-12)  # scale- and shift-free


def test_cli_sweep_with_a_reward_relative_lambda_and_a_reference_set(tmp_path, tiny_model):
    import json

    from click.testing import CliRunner

    from mlxpost.cli.main import cli

    write_jsonl(tmp_path / "pos.jsonl", [{"prompt": p} for p in PROMPTS])
    write_jsonl(tmp_path / "neg.jsonl", [{"prompt": p} for p in NEUTRAL])
    write_jsonl(tmp_path / "q.jsonl", [{"prompt": p, "word": "cat"} for p in PROMPTS])
    write_jsonl(tmp_path / "ref.jsonl", [{"prompt": p, "completion": " A fine day."} for p in NEUTRAL])
    (tmp_path / "rw.py").write_text("def mentions(completions, word, **kw):\n"
                                    "    return [float(w in c) for c, w in zip(completions, word)]\n")
    runner = CliRunner()
    out = runner.invoke(cli, ["steer", "extract", "--model", str(tiny_model), "--positive", str(tmp_path / "pos.jsonl"),
                              "--negative", str(tmp_path / "neg.jsonl"), "--layers", "0,1", "--out", str(tmp_path / "v")])
    assert out.exit_code == 0, out.output
    args = ["steer", "sweep", "--vectors", str(tmp_path / "v"), "--model", str(tiny_model), "--layer", "0,1",
            "--relative", "--lambdas", "0,0.5", "--prompts", str(tmp_path / "q.jsonl"), "--neutral",
            str(tmp_path / "neg.jsonl"), "--reference", str(tmp_path / "ref.jsonl"), "--max-new-tokens", "4",
            "--out", str(tmp_path / "s")]
    out = runner.invoke(cli, args + ["--reward", f"{tmp_path / 'rw.py'}:mentions"])
    assert out.exit_code == 0, out.output
    res = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert res["score_name"] == "reward:mentions" and res["layers"] == [0, 1] and res["relative"]
    assert [r["lambda"] for r in res["rows"]] == [0.0, 0.5]
    assert res["rows"][0]["perplexity_change"] == 0.0 and res["rows"][1]["perplexity_change"] != 0.0
    assert all(0.0 <= r["score"] <= 1.0 for r in res["rows"])
    two = ["steer", "sweep", "--vectors", f"{tmp_path / 'v'}@1:all", "--vectors", f"{tmp_path / 'v'}@0.5:1",
           "--model", str(tiny_model), "--lambdas", "0,1", "--prompts", str(tmp_path / "q.jsonl"),
           "--max-new-tokens", "2", "--score", "length", "--out", str(tmp_path / "s2")]
    out = runner.invoke(cli, two)
    assert out.exit_code == 0, out.output
    res = json.loads((tmp_path / "s2" / "sweep.json").read_text())
    assert res["layers"] == [0, 1, 1]  # the increments of every block, then block 1 at weight 0.5
    write_jsonl(tmp_path / "q.jsonl", [{"prompt": p} for p in PROMPTS])  # the column the reward needs is gone
    out = runner.invoke(cli, args + ["--reward", f"{tmp_path / 'rw.py'}:mentions"])
    assert out.exit_code != 0 and "word" in str(out.exception) + out.output


def test_steered_kv_cached_decoding_steers_every_generated_position(lm):
    """The sampler's cached decode steps go through the wrapped blocks: equal to a full recompute per token."""
    v = mx.random.normal((lm.model.args.hidden_size,), key=mx.random.key(11)) * 3
    prompt = prompt_ids(lm, PROMPTS[:1])[0]
    with steered(lm.model, [SteerSpec(1, v, 1.0)]):
        _, got = greedy(lm.model, lm.tokenizer, [prompt], 8)
        seq = list(prompt)
        eos = set(getattr(lm.tokenizer, "eos_token_ids", None) or {lm.tokenizer.eos_token_id})
        for _ in range(8):
            nxt = int(mx.argmax(lm.model(mx.array([seq]))[0, -1]))
            if nxt in eos:
                break
            seq.append(nxt)
    assert got[0] == seq[len(prompt):] and len(got[0]) > 0
    _, plain = greedy(lm.model, lm.tokenizer, [prompt], 8)
    assert plain[0] != got[0]  # the steering changed the reply


def test_steer_all_adds_each_blocks_increment(tmp_path, lm):
    """``DIR@λ:all``: block l gets λ·(v_l − v_(l−1)), so the stream after the top block moves by λ·v_top."""
    from mlxpost.steer.vectors import save_vectors, steer_specs

    d = lm.model.args.hidden_size
    v0, v1 = (np.array(mx.random.normal((d,), key=mx.random.key(k))) for k in (1, 2))
    save_vectors(tmp_path / "v", {0: v0, 1: v1}, {"best_layer": 1})
    specs = steer_specs(lm.model, [f"{tmp_path / 'v'}@0.5:all"])
    assert [(s.layer, s.scale) for s in specs] == [(0, 0.5), (1, 0.5)]
    np.testing.assert_allclose(np.array(specs[1].vector), v1 - v0, rtol=1e-6)
    ids = mx.array([prompt_ids(lm, PROMPTS[:1])[0]])
    with steered(lm.model, specs), recording(lm.model, [0]) as sink:
        lm.model(ids)
        got = np.array(sink[0])
    with recording(lm.model, [0]) as sink:
        lm.model(ids)
        plain = np.array(sink[0])
    np.testing.assert_allclose(got, plain + 0.5 * v0, atol=1e-5)
    with pytest.raises(MlxpostError, match="integer or all"):
        steer_specs(lm.model, [f"{tmp_path / 'v'}@1:top"])


def test_an_rl_run_steers_its_validation_samples(tmp_path, tiny_model):
    import json

    from mlxpost.config import build_config
    from mlxpost.steer.vectors import save_vectors
    from mlxpost.training.pipeline import run as run_training
    from mlxpost.ui import NullReporter

    lm = load_model(str(tiny_model))
    v = np.array(mx.random.normal((lm.model.args.hidden_size,), key=mx.random.key(12))) * 8
    save_vectors(tmp_path / "vec", {1: v}, {"best_layer": 1})
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"word {i}"} for i in range(24)])  # 20+: a validation split
    (tmp_path / "r.py").write_text("def length(completions, **c):\n    return [len(x) / 10 for x in completions]\n")
    evs = {}
    for name, steer in (("plain", "[]"), ("zero", f"[{tmp_path / 'vec'}@0]"), ("on", f"[{tmp_path / 'vec'}@1:1]")):
        cfg = build_config(None, [f"model.path={tiny_model}", f"data.path={data}", "grpo.group_size=2",
                                  "grpo.prompts_per_step=2", "grpo.max_new_tokens=4", "grpo.eval_prompts=4", "data.valid_fraction=0.2",
                                  f"grpo.rewards=[{tmp_path / 'r.py'}:length]", "train.steps=1",
                                  f"output.dir={tmp_path / 'runs'}", f"output.name={name}",
                                  f"sample.steer={steer}"], method="grpo")
        path, _ = run_training(cfg, reporter=NullReporter())
        ev = json.loads((path / "rl_eval_before.json").read_text())
        evs[name] = ev["samples"] if "samples" in ev else {k: v for k, v in ev.items() if k != "seconds"}
    assert evs["zero"] == evs["plain"] and evs["on"] != evs["plain"]
