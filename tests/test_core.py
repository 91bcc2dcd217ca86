"""The shared core on tiny real models: batching, packing isolation, log-probs, adapters."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import chat
from mlx.utils import tree_flatten

from mlxpost.core.batches import BatchSource, _stack, batch_from_arrays, pack_rows, selection
from mlxpost.core.logprobs import HeadSplit, logprobs
from mlxpost.data.load import Example
from mlxpost.data.render import Renderer
from mlxpost.model.adapters import attach_adapters, resolve_targets
from mlxpost.model.load import load_model
from mlxpost.model.lora import DoRALinear, LoRALinear, adapters_off


def make_examples(tokenizer, n: int, seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    r = Renderer(tokenizer)
    out = []
    for i in range(n):
        user = " ".join(["the cat"] * int(rng.integers(1, 12)))
        reply = " ".join(["dog sun"] * int(rng.integers(1, 12)))
        ids, mask, _ = r.render(chat(user, reply, system="be nice" if i % 3 == 0 else None))
        out.append(Example(np.array(ids, np.int32), np.array(mask), f"x:{i}"))
    return out


def randomize_adapters(model, scale=0.05):
    """Fresh adapters compute exactly the base model; give them weight so tests can see them."""
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = mx.random.normal(m.lora_b.shape) * scale
            if isinstance(m, DoRALinear):
                m.m = m.m * (1 + mx.random.normal(m.m.shape) * 0.01)


def adapted(path, keys: str):
    """A tiny model with random-weight adapters on ``keys`` (``resolve_targets`` names)."""
    lm = load_model(str(path))
    attach_adapters(lm.model, rank=4, scale=2.0, keys=resolve_targets(lm.model, keys))
    randomize_adapters(lm.model)
    return lm


def selected_batch(exs: list[Example], packed: bool, per_row: int):
    """``exs`` one per row, or packed ``per_row`` to a row, with the trained positions selected."""
    rows = [exs[i:i + per_row] for i in range(0, len(exs), per_row)] if packed else [[e] for e in exs]
    width = max(sum(len(e) - 1 for e in r) for r in rows)
    b = _stack(rows, width, 0, packed=packed)
    b.select = selection(np.array(b.weights), bucket=16)
    return b


def selected_sum(b, split):
    """The loss-shaped scalar of ``b``: summed log-probs of its selected positions, per segment."""
    return lambda m: logprobs(m, b, reduction="sum", split=split, select=b.select, num_segments=4).sum()


@pytest.fixture(scope="module")
def llama(tiny_model):
    return adapted(tiny_model, "all-linear")


def naive_token_logprobs(model, ex: Example) -> np.ndarray:
    """log p(token t | tokens < t) for one example, straight from the logits."""
    logits = model(mx.array(ex.tokens[None, :-1]))[0].astype(mx.float32)  # (T-1, V)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = np.array(logp)[np.arange(len(ex) - 1), ex.tokens[1:]]
    return picked * ex.mask[1:]


def test_logprobs_equal_a_naive_computation(llama):
    exs = make_examples(llama.tokenizer, 5)
    batch = _stack([[e] for e in exs], max(len(e) for e in exs) - 1, 0, packed=False)
    tok = np.array(logprobs(llama.model, batch, reduction="none"))
    for r, e in enumerate(exs):
        np.testing.assert_allclose(tok[r, : len(e) - 1], naive_token_logprobs(llama.model, e), atol=1e-5)
        assert np.all(tok[r, len(e) - 1:] == 0)  # padding contributes nothing
    sums = np.array(logprobs(llama.model, batch, reduction="sum"))
    means = np.array(logprobs(llama.model, batch, reduction="mean"))
    for r, e in enumerate(exs):
        ref = naive_token_logprobs(llama.model, e)
        assert sums[r] == pytest.approx(ref.sum(), abs=1e-4)
        assert means[r] == pytest.approx(ref.sum() / e.mask[1:].sum(), abs=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        logprobs(llama.model, batch, reduction="max")


@pytest.mark.parametrize("fixture", ["llama", "qwen"])
def test_packed_rows_equal_one_by_one(request, fixture, tiny_qwen):
    """No packed example attends to another: packed log-probs equal separate ones to 1e-5."""
    lm = adapted(tiny_qwen, "attention") if fixture == "qwen" else request.getfixturevalue("llama")
    exs = make_examples(lm.tokenizer, 9, seed=1)
    rows = [exs[:4], exs[4:7], exs[7:]]
    width = max(sum(len(e) - 1 for e in row) for row in rows) + 3
    packed = _stack(rows, width, 0, packed=True)
    got = np.array(logprobs(lm.model, packed))
    for r, row in enumerate(rows):
        pos = 0
        for e in row:
            n = len(e) - 1
            np.testing.assert_allclose(got[r, pos:pos + n], naive_token_logprobs(lm.model, e), atol=1e-5)
            pos += n
    # Per-sequence sums of a packed batch, one column per segment.
    sums = np.array(logprobs(lm.model, packed, reduction="sum", num_segments=4))
    assert sums[0, 3] == pytest.approx(naive_token_logprobs(lm.model, exs[3]).sum(), abs=1e-4)
    assert sums[2, 2] == 0 and sums[2, 3] == 0  # row 2 has two segments
    # Without the block-diagonal mask the answer is different: the test can fail.
    leaky = _stack(rows, width, 0, packed=False)
    leaky_lp = np.array(logprobs(lm.model, leaky))
    assert np.abs(leaky_lp - got).max() > 1e-2


def test_head_split_on_selected_positions_equals_full_logits(llama, tiny_qwen):
    for lm in (llama, load_model(str(tiny_qwen))):
        split = HeadSplit.find(lm.model)
        assert split is not None
        exs = make_examples(lm.tokenizer, 6, seed=2)
        for packed in (False, True):
            b = selected_batch(exs, packed, per_row=3)
            full = logprobs(lm.model, b)
            part = logprobs(lm.model, b, split=split, select=b.select)
            assert mx.abs(full - part).max().item() < 1e-5


def _weighted_loss(b, split, grad, weights):
    """A loss-shaped scalar with a different weight per position (as DPO and GRPO weight tokens)."""
    return lambda m: (logprobs(m, b, split=split, select=b.select, grad=grad) * weights).sum()


@pytest.mark.parametrize("compiled", [False, True])
def test_chunked_head_equals_full_logits_in_value_and_gradient(llama, tiny_qwen, monkeypatch, compiled):
    """The output layer in chunks of 7 rows (fused gradient, and plain chunks) equals the whole head."""
    from mlxpost.core import logprobs as lpmod
    for lm in (llama, adapted(tiny_qwen, "attention")):  # tied embedding head; qwen's own lm_head
        split = HeadSplit.find(lm.model)
        exs = make_examples(lm.tokenizer, 6, seed=3)
        b = selected_batch(exs, packed=True, per_row=3)
        weights = mx.random.normal(b.weights.shape)
        model = lm.model
        v0, g0 = nn.value_and_grad(model, _weighted_loss(b, split, False, weights))(model)
        lpmod.set_head_chunk_bytes(7 * 4 * model.args.vocab_size)  # 7 rows a chunk (conftest resets it)
        assert lpmod.head_chunk(model.args.vocab_size, 100) == 16  # never below 16 rows by default...
        monkeypatch.setattr(lpmod, "head_chunk", lambda vocab, rows, budget=None: min(rows, 7))  # ...so force 7
        for grad in (True, False):
            def loss(m, arrays, grad=grad):  # as the training loop runs its step: the batch as arrays
                bb = batch_from_arrays(arrays)
                return (logprobs(m, bb, split=split, select=bb.select, grad=grad) * arrays["w"]).sum()
            vg = nn.value_and_grad(model, loss)
            fn = (lambda arrays: vg(model, arrays))
            if compiled:
                fn = mx.compile(fn, inputs=[model.state], outputs=[model.state])
            v1, g1 = fn({**b.arrays(), "w": weights})
            assert abs(v1.item() - v0.item()) <= 1e-5 * max(1.0, abs(v0.item()))
            flat0, flat1 = dict(tree_flatten(g0)), dict(tree_flatten(g1))
            assert flat0.keys() == flat1.keys() and len(flat0) > 0
            for k in flat0:
                scale = max(1e-3, mx.abs(flat0[k]).max().item())
                assert mx.abs(flat0[k] - flat1[k]).max().item() <= 1e-4 * scale, k
        monkeypatch.undo()


def test_chunked_head_keeps_autodiff_for_a_trainable_head(llama):
    """A head with trainable weights gets its weights' gradient (which the fused path does not carry)."""
    from mlxpost.core.logprobs import head_logprobs
    head = nn.Linear(8, 40, bias=False)
    h, t = mx.random.normal((20, 8)), mx.random.randint(0, 40, (20,))

    def loss(params, fused_ok):
        head.update(params)
        return head_logprobs(head, h, t, grad=fused_ok, chunk=6).sum()

    g_plain = mx.grad(loss)(head.trainable_parameters(), False)
    g_fused = mx.grad(loss)(head.trainable_parameters(), True)
    assert mx.abs(g_plain["weight"]).max().item() > 0
    assert mx.allclose(g_plain["weight"], g_fused["weight"], atol=1e-6).item()
    head.freeze()
    frozen = mx.grad(lambda x: head_logprobs(head, x, t, grad=True, chunk=6).sum())(h)
    plain = mx.grad(lambda x: head_logprobs(head, x, t, grad=False).sum())(h)
    assert mx.allclose(frozen, plain, atol=1e-6).item()


def test_fused_head_never_holds_every_chunks_logits():
    """Peak memory of a value-and-gradient (fused) and of a plain pass: a few chunks' logits, not the whole (K, V)."""
    from mlxpost.core.logprobs import head_logprobs, target_logprobs
    V, D, K = 32_000, 64, 2048
    head = nn.Linear(D, V, bias=False)
    head.freeze()
    h, t = mx.random.normal((K, D)), mx.random.randint(0, V, (K,))
    mx.eval(head.parameters(), h, t)
    whole = K * V * 4  # one float32 copy of the full logits: 262 MB; a chunk of 64 rows: 8 MB

    def peak(fn):
        mx.eval(fn(h))  # once, so compiled pieces exist
        mx.synchronize()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        mx.eval(fn(h))
        return mx.get_peak_memory() - before

    full = peak(mx.grad(lambda x: target_logprobs(head(x), t).sum()))
    fused = peak(mx.grad(lambda x: head_logprobs(head, x, t, grad=True, chunk=64).sum()))
    assert full > 1.5 * whole  # autodiff keeps the logits and their softmax: the test can fail
    plain = peak(lambda x: head_logprobs(head, x, t, grad=False, chunk=64))
    assert fused < 0.35 * whole, (fused, whole)
    assert plain < 0.35 * whole, (plain, whole)


class Wrapped(nn.Module):
    """A model around an mlx-lm model (same body and blocks): subclasses change what a call computes."""

    def __init__(self, inner):
        super().__init__()
        self.model = inner.model
        self.inner = inner

    @property
    def layers(self):
        return self.inner.layers


def test_head_split_refuses_models_it_cannot_reproduce(llama):
    class Capped(Wrapped):  # a soft-capped head: head(body(x)) != model(x)
        def __call__(self, x, cache=None):
            return 5.0 * mx.tanh(self.inner(x, cache=cache) / 5.0)

    assert HeadSplit.find(Capped(llama.model)) is None


def test_adapters_off_is_exactly_the_base_model(tiny_model):
    base = load_model(str(tiny_model)).model
    x = mx.array([[1, 5, 9, 14, 3, 7]])
    ref = base(x)
    for dora in (False, True):
        lm = load_model(str(tiny_model))
        attach_adapters(lm.model, rank=4, scale=2.0, keys=resolve_targets(lm.model, "all-linear"), dora=dora)
        assert mx.abs(lm.model(x) - ref).max().item() < 1e-5  # fresh adapters start at the base
        randomize_adapters(lm.model)
        assert mx.abs(lm.model(x) - ref).max().item() > 1e-3
        with adapters_off(lm.model):
            assert mx.abs(lm.model(x) - ref).max().item() == 0.0
        assert mx.abs(lm.model(x) - ref).max().item() > 1e-3  # switched back on


def test_adapters_off_inside_a_compiled_function(llama):
    """The switch is read while tracing, so both paths live in one compiled graph."""
    x = mx.array([[1, 5, 9, 14, 3, 7]])

    def both(x):
        with adapters_off(llama.model):
            ref = llama.model(x)
        return ref, llama.model(x)

    ref, pol = mx.compile(both)(x)
    with adapters_off(llama.model):
        assert mx.abs(ref - llama.model(x)).max().item() < 1e-6
    assert mx.abs(pol - llama.model(x)).max().item() < 1e-6
    assert mx.abs(pol - ref).max().item() > 1e-3


def test_fused_adapter_equals_unfused(tiny_model):
    x = mx.array([[1, 5, 9, 14, 3, 7]])
    for dora in (False, True):
        lm = load_model(str(tiny_model))
        attach_adapters(lm.model, rank=4, scale=2.0, keys=resolve_targets(lm.model, "all-linear"), dora=dora)
        randomize_adapters(lm.model)
        before = lm.model(x)
        from mlxpost.model.adapters import fuse_adapters

        fuse_adapters(lm.model)
        assert not any(isinstance(m, LoRALinear) for _, m in lm.model.named_modules())
        assert mx.abs(lm.model(x) - before).max().item() < 1e-4


def test_pack_rows_best_fit():
    lengths = [7, 3, 5, 2, 8, 1, 4]
    rows = pack_rows(lengths, capacity=10)
    assert sorted(i for r in rows for i in r) == list(range(7))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == 3  # 30 positions in rows of 10: optimal here
    with pytest.raises(Exception, match="does not fit"):
        pack_rows([11], capacity=10)


def test_batch_source_is_deterministic_and_resumable(llama):
    exs = make_examples(llama.tokenizer, 30, seed=3)
    for mode in ("pack", "pad"):
        src = BatchSource(exs, mode=mode, batch_size=3, max_len=128, seed=7)
        it = iter(src)
        first = [next(it) for _ in range(5)]
        state = src.state()
        rest = [next(it) for _ in range(6)]
        src2 = BatchSource(exs, mode=mode, batch_size=3, max_len=128, seed=7)
        src2.load_state(state)
        it2 = iter(src2)
        again = [next(it2) for _ in range(6)]
        for a, b in zip(rest, again):
            assert mx.array_equal(a.inputs, b.inputs) and a.sources == b.sources
        # Every example appears exactly once per epoch.
        n = src.batches_per_epoch()
        src3 = BatchSource(exs, mode=mode, batch_size=3, max_len=128, seed=7)
        seen = [s for _, b in zip(range(n), src3) for s in b.sources]
        assert sorted(seen) == sorted(e.source for e in exs)
        assert first[0].inputs.shape[0] == 3
        if mode == "pack":
            assert all(b.inputs.shape == (3, 127) for b in first)
            assert first[0].segments is not None
        else:
            assert first[0].segments is None and first[0].inputs.shape[1] % 32 == 0


def test_selection_buckets():
    w = np.zeros((2, 50), np.float32)
    w[0, 3:9] = 1
    w[1, 40:45] = 1
    index, valid = selection(w, bucket=16)
    assert index.shape == (16,) and valid.sum().item() == 11
    assert sorted(np.array(index)[:11].tolist()) == list(range(3, 9)) + list(range(90, 95))


# ---------------------------------------------------------------------------
# Attention in query chunks
# ---------------------------------------------------------------------------


def test_chunk_bounds():
    from mlxpost.core.forward import chunk_bounds

    assert chunk_bounds(416, 96) == [0, 104, 208, 312, 416]
    assert chunk_bounds(416, None) == [0, 416] and chunk_bounds(416, 0) == [0, 416]
    assert chunk_bounds(150, 96) == [0, 150]  # shorter than two chunks: whole
    b = chunk_bounds(4096, 96)
    assert len(b) == 9 and b[0] == 0 and b[-1] == 4096  # at most 8 chunks
    assert all(y > x for x, y in zip(b, b[1:]))


@pytest.mark.parametrize("fixture", ["llama", "qwen"])
def test_chunked_attention_equals_whole_rows(request, fixture, tiny_qwen, monkeypatch):
    """Attention in query chunks (each chunk's queries against the keys up to its end) gives the log-probs
    and LoRA gradients of whole rows, padded or packed."""
    from mlxpost.backend import kernels
    from mlxpost.core.forward import chunk_bounds, set_attention_chunk

    cuts = []
    real = kernels._chunked
    monkeypatch.setattr(kernels, "_chunked", lambda *a, **k: cuts.append(1) or real(*a, **k))
    lm = adapted(tiny_qwen, "all-linear") if fixture == "qwen" else request.getfixturevalue("llama")
    model = lm.model
    split = HeadSplit.find(model)
    exs = make_examples(lm.tokenizer, 8, seed=3)
    for packed in (False, True):
        b = selected_batch(exs, packed, per_row=4)
        assert len(chunk_bounds(b.inputs.shape[1], 8)) > 3  # really chunked
        loss = selected_sum(b, split)

        results = []
        for chunk in (None, 8):
            set_attention_chunk(model, chunk)
            n = len(cuts)
            try:
                tok = logprobs(model, b, split=split, select=b.select)
                value, grads = nn.value_and_grad(model, loss)(model)
            finally:
                set_attention_chunk(model, None)
            assert len(cuts) - n == (2 * len(model.layers) if chunk else 0)  # every block's attention was cut
            results.append((np.array(tok), value.item(), dict(tree_flatten(grads))))
        (t0, v0, g0), (t1, v1, g1) = results
        np.testing.assert_allclose(t1, t0, atol=2e-5)
        assert v1 == pytest.approx(v0, rel=1e-5)
        assert g0.keys() == g1.keys()
        for k in g0:
            np.testing.assert_allclose(np.array(g1[k]), np.array(g0[k]), rtol=1e-3, atol=1e-5, err_msg=k)


def test_chunking_is_checked_on_the_model(llama):
    from mlxpost.backend import kernels
    from mlxpost.core.probes import chunking_is_exact, chunking_problem, resolve_attention_chunk

    real = kernels._chunked
    assert chunking_is_exact(llama.model)

    class SeesAhead(Wrapped):  # a mask that lets every position see later ones: cutting the keys loses them
        def __call__(self, x, cache=None):
            cache = [_AllVisible() for _ in self.layers]
            return self.inner(x, cache=cache)

    assert "differ from whole rows" in chunking_problem(SeesAhead(llama.model))
    assert resolve_attention_chunk(-1, SeesAhead(llama.model)) is None
    warnings = []
    assert resolve_attention_chunk(32, SeesAhead(llama.model), warn=warnings.append) is None
    assert len(warnings) == 1 and "train.attention_chunk=32" in warnings[0] and "whole rows" in warnings[0]
    assert resolve_attention_chunk(0, llama.model) is None
    assert resolve_attention_chunk(32, llama.model) == 32

    class OwnAttention(Wrapped):  # attention that never reaches mx.fast.scaled_dot_product_attention's dispatcher
        def __call__(self, x, cache=None):
            from mlxpost.backend import kernels

            with kernels.query_chunks(None):
                return self.inner(x, cache=cache)

    assert "does not go through mx.fast.scaled_dot_product_attention" in chunking_problem(OwnAttention(llama.model))

    class Fails(Wrapped):  # attention that raises once cut
        def __call__(self, x, cache=None):
            from mlxpost.backend import kernels

            if kernels._chunks.get():
                raise ValueError("no chunks here")
            return self.inner(x, cache=cache)

    assert "cannot run in query chunks (ValueError: no chunks here)" in chunking_problem(Fails(llama.model))
    assert kernels._chunked is real  # the probe's counter is gone after every outcome


class _AllVisible:
    """A block cache whose mask lets every position of the row see every other."""

    offset = 0

    def make_mask(self, N, **_):
        return mx.ones((N, N), dtype=mx.bool_)

    def update_and_fetch(self, keys, values):
        return keys, values


def test_checkpointed_blocks_recompute_attention_in_the_same_chunks(tiny_model, monkeypatch):
    """Gradient checkpointing with query chunks: the recomputed blocks cut attention as the forward pass
    did (the setting is replayed outside forward()'s context), and loss and gradients match."""
    from mlxpost.backend import kernels
    from mlxpost.core.forward import chunk_bounds, set_attention_chunk
    from mlxpost.training.loop import enable_grad_checkpoint

    lm = adapted(tiny_model, "all-linear")  # its own instance: checkpointing changes its blocks
    model = lm.model
    split = HeadSplit.find(model)
    b = selected_batch(make_examples(lm.tokenizer, 8, seed=4), True, per_row=4)
    assert len(chunk_bounds(b.inputs.shape[1], 8)) > 3
    loss = selected_sum(b, split)
    cuts = []
    real = kernels._chunked
    monkeypatch.setattr(kernels, "_chunked", lambda *a, **k: cuts.append(len(k["bounds"]) - 1) or real(*a, **k))
    set_attention_chunk(model, 8)
    try:
        value, grads = nn.value_and_grad(model, loss)(model)
        mx.eval(value, grads)
        plain = len(cuts)
        enable_grad_checkpoint(model)
        value_c, grads_c = nn.value_and_grad(model, loss)(model)
        mx.eval(value_c, grads_c)
    finally:
        set_attention_chunk(model, None)
    assert plain == len(model.layers) and len(set(cuts)) == 1 and cuts[0] > 2
    assert len(cuts) == 3 * plain  # checkpointed: the forward pass, then each block again in the backward pass
    assert value_c.item() == pytest.approx(value.item(), rel=1e-6)
    g, gc = dict(tree_flatten(grads)), dict(tree_flatten(grads_c))
    assert g.keys() == gc.keys() and g
    for k in g:
        np.testing.assert_allclose(np.array(gc[k]), np.array(g[k]), rtol=1e-4, atol=1e-6, err_msg=k)