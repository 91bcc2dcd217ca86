"""Vectorizing JIT flags (mlxpost.backend.jit) and the fused softmax / log-sum-exp / attention (mlxpost.backend.kernels)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_core import llama, make_examples, selected_batch, selected_sum  # noqa: F401 (llama: a fixture)

from mlxpost.backend import jit, kernels
from mlxpost.core.batches import _stack
from mlxpost.core.forward import set_attention_chunk
from mlxpost.core.logprobs import HeadSplit, logprobs

linux_gxx = pytest.mark.skipif(not sys.platform.startswith("linux") or not jit.shutil.which("g++"),
                               reason="the JIT shim is for Linux with g++")


# --------------------------------------------------------------------------- jit


def fake_compiler(dir_: Path, exit_code: int = 0) -> Path:
    """A ``g++`` on a PATH of its own that logs its arguments (and fails when asked to)."""
    dir_.mkdir(parents=True, exist_ok=True)
    gxx = dir_ / "g++"
    gxx.write_text(f'#!/bin/sh\necho "$@" >> "{dir_}/calls"\n'
                   'while [ $# -gt 0 ]; do [ "$1" = "-o" ] && touch "$2"; shift; done\n'
                   f'exit {exit_code}\n')
    gxx.chmod(0o755)
    return gxx


x86_linux = pytest.mark.skipif(not sys.platform.startswith("linux") or jit.platform.machine() != "x86_64",
                               reason="the JIT flags are for Linux on x86-64")


@x86_linux
def test_jit_env_writes_a_shim_and_a_cache_dir_of_its_own(tmp_path):
    gxx = fake_compiler(tmp_path / "bin")
    env = {"PATH": str(gxx.parent), "TMPDIR": str(tmp_path / "tmp")}
    changes = jit.jit_env(env)
    assert changes is not None
    shim_dir, rest = changes["PATH"].split(os.pathsep, 1)
    assert rest == str(gxx.parent)  # prepended, the user's PATH kept
    shim = Path(shim_dir) / "g++"
    text = shim.read_text()
    assert f'exec {gxx} "$@" ' + " ".join(jit.FLAGS) in text
    assert os.access(shim, os.X_OK)
    assert (Path(shim_dir).parent.stat().st_mode & 0o777) == 0o700  # it holds an executable: this user's only
    assert Path(changes["TMPDIR"]).parent == tmp_path / "tmp"  # MLX's kernel cache: $TMPDIR/mlx/...
    assert Path(changes["TMPDIR"]) == Path(shim_dir).parent
    assert changes[jit.ACTIVE_VAR] == " ".join(jit.FLAGS)
    calls = (gxx.parent / "calls").read_text().splitlines()
    assert len(calls) == 2 and all(f in c for c in calls for f in jit.FLAGS)  # the compiler, then the shim
    # Same machine, same compiler: the same directory, and the compiler is not asked again.
    (gxx.parent / "calls").unlink()
    assert jit.jit_env(env) == changes
    assert not (gxx.parent / "calls").exists()


@x86_linux
def test_jit_env_stays_out_of_the_way(tmp_path):
    gxx = fake_compiler(tmp_path / "bin")
    base = {"PATH": str(gxx.parent), "TMPDIR": str(tmp_path)}
    assert jit.jit_env({**base, "MLXPOST_JIT": "0"}) is None  # opted out
    assert jit.jit_env({**base, jit.ACTIVE_VAR: "-march=native"}) is None  # already applied (a child process)
    assert jit.jit_env({"PATH": str(tmp_path / "nothing"), "TMPDIR": str(tmp_path)}) is None  # no g++
    bad = fake_compiler(tmp_path / "bad", exit_code=1)
    assert jit.jit_env({"PATH": str(bad.parent), "TMPDIR": str(tmp_path)}) is None  # flags rejected
    changes = jit.jit_env(base)
    shared = Path(changes["TMPDIR"])
    shared.chmod(0o777)  # someone else could swap the shim: not used
    assert jit.jit_env(base) is None
    shared.chmod(0o700)
    assert jit.jit_env(base) == changes
    assert jit.jit_env({**base, "TMPDIR": str(tmp_path / "a:b")}) is None  # cannot go on PATH


def test_active_needs_the_marker_and_no_opt_out(monkeypatch):
    monkeypatch.setenv(jit.ACTIVE_VAR, " ".join(jit.FLAGS))
    monkeypatch.delenv(jit.OPT_OUT_VAR, raising=False)
    assert jit.active()
    monkeypatch.setenv(jit.OPT_OUT_VAR, "0")  # a child process told to stop
    assert not jit.active()


def test_jit_env_is_for_linux_on_x86_64_only(monkeypatch, tmp_path):
    gxx = fake_compiler(tmp_path / "bin")
    env = {"PATH": str(gxx.parent), "TMPDIR": str(tmp_path)}
    monkeypatch.setattr(jit.sys, "platform", "linux")
    monkeypatch.setattr(jit.platform, "machine", lambda: "x86_64")
    assert jit.jit_env(env) is not None
    monkeypatch.setattr(jit.platform, "machine", lambda: "aarch64")
    assert jit.jit_env(env) is None
    monkeypatch.setattr(jit.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(jit.sys, "platform", "darwin")
    assert jit.jit_env(env) is None


@x86_linux
def test_opting_out_in_a_child_undoes_the_changes(monkeypatch, tmp_path):
    gxx = fake_compiler(tmp_path / "bin")
    path = os.pathsep.join([str(gxx.parent), "/usr/bin", "/bin"])  # the fake compiler needs echo and touch
    monkeypatch.setenv("PATH", path)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv(jit.ACTIVE_VAR, raising=False)
    monkeypatch.delenv(jit.SAVED_TMPDIR_VAR, raising=False)
    monkeypatch.delenv(jit.OPT_OUT_VAR, raising=False)
    assert jit.apply()  # the parent
    assert os.environ["PATH"] != path and os.environ["TMPDIR"] != str(tmp_path)
    monkeypatch.setenv(jit.OPT_OUT_VAR, "0")  # a child told to stop
    assert not jit.apply()
    assert os.environ["PATH"] == path and os.environ["TMPDIR"] == str(tmp_path)
    assert jit.ACTIVE_VAR not in os.environ


@linux_gxx
@x86_linux
def test_shimmed_jit_builds_vectorized_kernels_with_the_same_results(tmp_path):
    """A compiled exp/sigmoid graph gives bit-identical results with and without the flags; MLX's
    builds went through the shim (the flags reached the compiler) into the shim's cache directory."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent("""
        import sys
        import mlx.core as mx
        import numpy as np
        x = mx.random.normal((4096,), key=mx.random.key(0)) * 30  # overflows exp: the inf branch too
        x = mx.concatenate([x, mx.array([float("nan"), float("inf"), -float("inf"), 88.5, -88.5])])
        f = mx.compile(lambda a: mx.exp(a - 3.0) * mx.sigmoid(a) + mx.tanh(a))
        np.save(sys.argv[1], np.array(f(x)))
    """))
    clean = {k: v for k, v in os.environ.items() if k not in (jit.ACTIVE_VAR, "TMPDIR")}
    clean["PATH"] = os.pathsep.join(p for p in clean.get("PATH", "").split(os.pathsep) if "mlxpost-jit-" not in p)
    plain_env = {**clean, "TMPDIR": str(tmp_path / "plain"), "MLXPOST_JIT": "0"}
    (tmp_path / "plain").mkdir()
    logger = tmp_path / "logbin" / "g++"  # the real compiler, logging how it is called
    logger.parent.mkdir()
    logger.write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path}/gxx.log"\nexec "{jit.shutil.which("g++")}" "$@"\n')
    logger.chmod(0o755)
    fast_env = {**clean, "TMPDIR": str(tmp_path / "fast"), "PATH": f"{logger.parent}{os.pathsep}{clean['PATH']}"}
    (tmp_path / "fast").mkdir()
    changes = jit.jit_env(fast_env)
    if changes is None:
        pytest.skip("this g++ does not take the flags")
    fast_env.update(changes)
    (tmp_path / "gxx.log").unlink()  # jit_env's own probes
    for name, env in (("plain", plain_env), ("fast", fast_env)):
        subprocess.run([sys.executable, str(script), str(tmp_path / f"{name}.npy")], env=env, check=True)
    plain, fast = np.load(tmp_path / "plain.npy"), np.load(tmp_path / "fast.npy")
    assert np.isinf(plain).any() and np.isnan(plain).any() and np.isfinite(plain).sum() > 4000
    np.testing.assert_array_equal(fast, plain)
    kernels_built = list(Path(fast_env["TMPDIR"]).glob("mlx/*/cpu/*.so"))
    assert kernels_built, "the shimmed run built no kernel in its own cache directory"
    builds = [ln for ln in (tmp_path / "gxx.log").read_text().splitlines() if "-shared" in ln]
    assert builds and all("-march=native" in ln and "-ffp-contract=off" in ln for ln in builds)


# --------------------------------------------------------------------------- kernels


def sdpa_inputs(B=2, H=6, Hkv=2, L=5, S=9, D=8):
    k = mx.random.key(7)
    k1, k2, k3, k4 = mx.random.split(k, 4)
    q = mx.random.normal((B, H, L, D), key=k1)
    keys = mx.random.normal((B, Hkv, S, D), key=k2)
    values = mx.random.normal((B, Hkv, S, D), key=k3)
    bool_mask = (mx.random.uniform(shape=(B, 1, L, S), key=k4) > 0.3) | (mx.arange(S) == S - 1)
    return q, keys, values, bool_mask


MLX_SDPA = kernels._MLX_SDPA  # MLX's own, even once the dispatcher is installed


@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool-4d", "bool-2d", "additive"])
def test_attention_equals_mlx_sdpa(mask_kind):
    q, k, v, bool_mask = sdpa_inputs()
    mask = {"none": None, "causal": "causal", "bool-4d": bool_mask, "bool-2d": bool_mask[0, 0],
            "additive": mx.random.normal((5, 9), key=mx.random.key(3))}[mask_kind]
    w = mx.random.normal((2, 6, 5, 8), key=mx.random.key(4))

    def f(fn):
        return lambda q, k, v: (fn(q, k, v, scale=0.3, mask=mask) * w).sum()

    ref = MLX_SDPA(q, k, v, scale=0.3, mask=mask)
    mine = kernels.attention(q, k, v, scale=0.3, mask=mask)
    np.testing.assert_allclose(np.array(mine), np.array(ref), atol=1e-6)
    g_ref = mx.grad(f(MLX_SDPA), argnums=(0, 1, 2))(q, k, v)
    g_mine = mx.grad(f(kernels.attention), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_mine, g_ref):
        assert np.abs(np.array(b)).max() > 0
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)


def test_attention_hands_what_it_does_not_cover_to_mlx(monkeypatch):
    q, k, v, _ = sdpa_inputs()
    seen = []
    monkeypatch.setattr(kernels, "_MLX_SDPA", lambda *a, **kw: seen.append(kw) or MLX_SDPA(*a, **kw))
    kernels.attention(q, k, v, scale=0.3, mask=mx.zeros((5, 9), mx.float16))  # a mask of another dtype
    kernels.attention(q, k, v, scale=0.3, mask=None, stream=mx.cpu)
    k4, v4 = mx.repeat(k[:, :1], 4, axis=1), mx.repeat(v[:, :1], 4, axis=1)
    with pytest.raises(ValueError):  # 6 query heads on 4 key heads: MLX's own error
        kernels.attention(q, k4, v4, scale=0.3)
    assert len(seen) == 3
    kernels.attention(q, k, v, scale=0.3, mask="causal")
    assert len(seen) == 3


@pytest.mark.parametrize("routed", [False, True])
def test_query_chunks_cut_attention_exactly_where_masks_allow(monkeypatch, routed):
    """Within query_chunks, a whole row's self-attention runs chunk by chunk with the same result and
    gradients for every mask form mlx-lm passes (causal string, bool and additive arrays of 2 or 4
    dimensions, a sliding window, packed segments); calls it cannot cut run whole."""
    L = 12
    q = mx.random.normal((2, 6, L, 8), key=mx.random.key(1))
    k, v = (mx.random.normal((2, 3, L, 8), key=mx.random.key(i)) for i in (2, 3))
    idx = mx.arange(L)
    causal = idx[:, None] >= idx[None]
    seg = mx.array([[0] * 5 + [1] * 7, [0] * 9 + [1] * 3])
    packed = (seg[:, None, :, None] == seg[:, None, None, :]) & causal
    masks = {"causal": "causal", "bool-2d": causal, "window": causal & ((idx[:, None] - idx[None]) < 4),
             "additive": mx.where(causal, 0.0, -1e9)[None, None], "packed": packed}
    cuts = []
    real = kernels._chunked
    monkeypatch.setattr(kernels, "_chunked", lambda *a, **k: cuts.append(1) or real(*a, **k))
    sdpa = kernels._dispatch
    w = mx.random.normal((2, 6, L, 8), key=mx.random.key(4))
    with kernels.routed(routed):
        for name, mask in masks.items():
            def f(q, k, v, mask=mask):
                return (sdpa(q, k, v, scale=0.3, mask=mask) * w).sum()

            whole, g_whole = f(q, k, v), mx.grad(f, argnums=(0, 1, 2))(q, k, v)
            n = len(cuts)
            with kernels.query_chunks([0, 4, 8, L]):
                cut, g_cut = sdpa(q, k, v, scale=0.3, mask=mask), mx.grad(f, argnums=(0, 1, 2))(q, k, v)
            assert len(cuts) == n + 2, name  # the call, and the one under grad
            np.testing.assert_allclose(np.array(cut), np.array(sdpa(q, k, v, scale=0.3, mask=mask)), atol=1e-6,
                                       err_msg=name)
            for a, b in zip(g_cut, g_whole):
                np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5, err_msg=name)
        # Not cut: no mask (bidirectional), a mask over keys only (lets a query see later keys), queries that
        # are not the whole row (generation). Cut: q, k, v given by MLX's own keyword names.
        keys_only = mx.array([[True] * 10 + [False] * 2, [True] * L])[:, None, None, :]
        with kernels.query_chunks([0, 4, 8, L]):
            n = len(cuts)
            for mask in (None, keys_only):
                np.testing.assert_allclose(np.array(sdpa(q, k, v, scale=0.3, mask=mask)),
                                           np.array(MLX_SDPA(q, k, v, scale=0.3, mask=mask)), atol=1e-6)
            sdpa(q[:, :, -1:], k, v, scale=0.3, mask="causal")
            assert len(cuts) == n
            np.testing.assert_allclose(np.array(sdpa(q=q, k=k, v=v, scale=0.3, mask="causal")),
                                       np.array(MLX_SDPA(q, k, v, scale=0.3, mask="causal")), atol=1e-6)
            assert len(cuts) == n + 1


def test_attention_row_with_nothing_to_attend_is_finite():
    q, k, v, _ = sdpa_inputs()
    mask = mx.zeros((5, 9), mx.bool_)
    out = kernels.attention(q, k, v, scale=0.3, mask=mask)
    expected = mx.broadcast_to(mx.repeat(v.mean(axis=2, keepdims=True), 3, axis=1), (2, 6, 5, 8))
    np.testing.assert_allclose(np.array(out), np.array(expected), atol=1e-5)


def test_softmax_and_logsumexp_equal_mlx():
    x = mx.random.normal((3, 7, 50), key=mx.random.key(0)) * 5
    w = mx.random.normal((3, 7, 50), key=mx.random.key(1))
    np.testing.assert_allclose(np.array(kernels.softmax(x)), np.array(mx.softmax(x, axis=-1)), atol=1e-7)
    np.testing.assert_allclose(np.array(kernels.logsumexp(x)), np.array(mx.logsumexp(x, axis=-1)), rtol=1e-6)
    for mine, ref in ((lambda a: (kernels.softmax(a) * w).sum(), lambda a: (mx.softmax(a, axis=-1) * w).sum()),
                      (lambda a: (kernels.logsumexp(a) * w[..., 0]).sum(),
                       lambda a: (mx.logsumexp(a, axis=-1) * w[..., 0]).sum())):
        g_mine, g_ref = mx.grad(mine)(x), mx.grad(ref)(x)
        np.testing.assert_allclose(np.array(g_mine), np.array(g_ref), atol=1e-6)
        np.testing.assert_allclose(np.array(mx.compile(mx.grad(mine))(x)), np.array(g_ref), atol=1e-6)


def test_no_grad_pass_uses_mlx_logsumexp(monkeypatch):
    """The reference pass (under stop-gradient) keeps MLX's one-pass log-sum-exp: no logits-sized temporary."""
    x = mx.random.normal((6, 40), key=mx.random.key(2))
    used = []
    real = kernels._logsumexp
    monkeypatch.setattr(kernels, "_logsumexp", lambda a: used.append(1) or real(a))
    with kernels.no_grad_pass():
        inside = kernels.logsumexp(x)
    assert not used
    outside = kernels.logsumexp(x)
    assert used
    np.testing.assert_allclose(np.array(inside), np.array(outside), rtol=1e-6)


def test_cpu_attention_routes_only_inside_the_block(monkeypatch):
    import threading

    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", MLX_SDPA)  # back to MLX's after the test
    q, k, v, _ = sdpa_inputs()
    calls = []
    real = kernels.attention
    monkeypatch.setattr(kernels, "attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    def sdpa():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=None)

    with kernels.cpu_attention(True):
        sdpa()
        assert kernels.routing()
        seen_elsewhere = []
        t = threading.Thread(target=lambda: seen_elsewhere.append(kernels.routing()))
        t.start()
        t.join()
        assert seen_elsewhere == [False]  # another thread keeps MLX's own
        with kernels.cpu_attention(False):  # a nested "off" leaves the outer setting
            sdpa()
    assert len(calls) == 2 and not kernels.routing()
    sdpa()
    with kernels.cpu_attention(False):
        sdpa()
    with pytest.raises(RuntimeError):
        with kernels.cpu_attention(True):
            raise RuntimeError("boom")
    sdpa()
    assert len(calls) == 2  # nothing outside a block, nor after an exception, went through mlxpost's


def test_recomputed_blocks_keep_the_fused_attention(llama, monkeypatch):
    """Gradient checkpointing recomputes a block in the backward pass, after forward() returned: the
    recomputation goes through mlxpost.backend.kernels too."""
    import copy

    from mlxpost.training.loop import enable_grad_checkpoint

    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", MLX_SDPA)
    model = copy.deepcopy(llama.model)
    enable_grad_checkpoint(model)
    calls = []
    real = kernels.attention
    monkeypatch.setattr(kernels, "attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    exs = make_examples(llama.tokenizer, 2, seed=1)
    b = _stack([[e] for e in exs], max(len(e) for e in exs) - 1, 0, packed=False)
    kernels.set_enabled(True)
    try:
        _, grads = nn.value_and_grad(model, lambda m: logprobs(m, b, reduction="sum").sum())(model)
        mx.eval(grads)
    finally:
        kernels.set_enabled(None)
    assert len(calls) == 2 * len(model.layers)  # each block's forward, and its recomputation


def test_enabled_follows_the_jit_flags(monkeypatch):
    monkeypatch.setenv(jit.ACTIVE_VAR, " ".join(jit.FLAGS))
    monkeypatch.delenv(jit.OPT_OUT_VAR, raising=False)
    assert kernels.enabled() == (mx.default_device() == mx.cpu)
    monkeypatch.delenv(jit.ACTIVE_VAR)
    assert not kernels.enabled()
    kernels.set_enabled(True)
    try:
        assert kernels.enabled()
    finally:
        kernels.set_enabled(None)


@pytest.mark.parametrize("chunk", [None, 8])
def test_training_log_probs_and_gradients_are_the_same_with_the_kernels(llama, chunk):
    """The whole training pass (padded and packed rows, whole or in query chunks, head split) gives
    the same log-probs and LoRA gradients through mlxpost.backend.kernels as through MLX's primitives."""
    model = llama.model
    split = HeadSplit.find(model)
    exs = make_examples(llama.tokenizer, 8, seed=5)
    for packed in (False, True):
        b = selected_batch(exs, packed, per_row=4)
        loss = selected_sum(b, split)

        results = []
        calls = []
        for on in (False, True):
            kernels.set_enabled(on)
            set_attention_chunk(model, chunk)
            spy, lse = kernels.attention, kernels.logsumexp
            try:
                def counting(*a, **k):
                    calls.append(("attention", on))
                    return spy(*a, **k)

                def counting_lse(*a, **k):
                    calls.append(("logsumexp", on))
                    return lse(*a, **k)

                kernels.attention, original = counting, kernels.attention
                kernels.logsumexp = counting_lse
                tok = logprobs(model, b, split=split, select=b.select)
                vg = nn.value_and_grad(model, loss)
                step = mx.compile(lambda x, vg=vg: vg(model), inputs=[model.state], outputs=[model.state])
                value, grads = step(mx.array(0))
            finally:
                kernels.attention, kernels.logsumexp = original, lse
                kernels.set_enabled(None)
                set_attention_chunk(model, None)
            results.append((np.array(tok), value.item(), dict(tree_flatten(grads))))
        assert {c[0] for c in calls} == {"attention", "logsumexp"}
        assert all(on for _, on in calls)  # only the "on" pass went through mlxpost.backend.kernels
        (t0, v0, g0), (t1, v1, g1) = results
        np.testing.assert_allclose(t1, t0, atol=1e-5)
        assert v1 == pytest.approx(v0, rel=1e-6)
        for k in g0:
            np.testing.assert_allclose(np.array(g1[k]), np.array(g0[k]), rtol=1e-4, atol=1e-6, err_msg=k)


def test_softmax_over_one_key_after_longer_rows_and_a_rollout_from_a_one_token_prompt(tiny_model):
    # A one-token prompt's prefill attends over one key. The compiled softmax, once traced at another
    # length, corrupted the heap on a last axis of length 1 (a segfault here); such calls run uncompiled.
    from mlxpost.model.load import load_model
    from mlxpost.rl.rollout import Sampling, sample_groups

    mx.eval(kernels.softmax(mx.random.normal((4, 2, 1, 65))))
    x = mx.random.normal((4, 2, 1, 1))
    assert np.allclose(np.array(kernels.softmax(x)), 1.0)
    g = mx.grad(lambda a: (kernels.softmax(a) * 3.0).sum())(x)
    assert np.allclose(np.array(g), 0.0)
    lm = load_model(str(tiny_model), dtype="float32")
    kernels.set_enabled(True)
    try:
        got = sample_groups(lm.model, lm.tokenizer, [[5]], 2, Sampling(temperature=0.0, max_new_tokens=4), eos_ids=set())
    finally:
        kernels.set_enabled(None)
    assert [len(c) for c in got.completions] == [4, 4] and got.completions[0] == got.completions[1]
