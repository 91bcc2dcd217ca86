"""Online RL: batched rollouts, GRPO losses, step-level credit assignment, and learning."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from mlxpost.config import build_config
from mlxpost.core.logprobs import k3
from mlxpost.errors import ConfigError, MlxpostError
from mlxpost.methods import online_rl as G
from mlxpost.model.load import load_model
from mlxpost.rl.rollout import Sampling, sample_groups
from mlxpost.rl.source import step_token_advantages, token_char_ends
from mlxpost.rl.verdict import Step


@pytest.fixture(scope="module")
def llama(tiny_model):
    return load_model(str(tiny_model), dtype="float32")


@pytest.fixture(scope="module")
def qwen(tiny_qwen):
    return load_model(str(tiny_qwen), dtype="float32")


def _naive_greedy(model, prompt, n, eos):
    seq = list(prompt)
    for _ in range(n):
        t = int(mx.argmax(model(mx.array([seq]))[0, -1]).item())
        seq.append(t)
        if t in eos:
            break
    return seq[len(prompt):]


# ---------------------------------------------------------------------------
# Rollouts
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["llama", "qwen"])
@pytest.mark.parametrize("fused", [True, False])
def test_batched_greedy_rollouts_equal_one_by_one_decoding(which, fused, request, monkeypatch):
    from mlxpost.backend import kernels

    lm = request.getfixturevalue(which)
    model, tok = lm.model, lm.tokenizer
    prompts = [tok.encode("hello world and more words"), tok.encode("a b"), tok.encode("the quick brown fox")]
    # Stop on tokens the model actually produces, so rows finish at different
    # steps and the finished ones are filtered out of the batch.
    free = [_naive_greedy(model, p, 12, set()) for p in prompts]
    eos = {free[0][3], free[1][7]}
    # Where the fused kernels are on (the CPU with the JIT flags), the rollout's attention (left-padding
    # masks in the prefill, the cache in the decode steps) goes through kernels.attention; elsewhere MLX's own.
    calls = []
    monkeypatch.setattr(kernels, "attention", lambda *a, _real=kernels.attention, **k: calls.append(1) or _real(*a, **k))
    kernels.set_enabled(fused)
    try:
        got = sample_groups(model, tok, prompts, 3, Sampling(temperature=0.0, max_new_tokens=12), eos_ids=eos)
    finally:
        kernels.set_enabled(None)
    assert bool(calls) == fused
    for i, p in enumerate(prompts):
        want = _naive_greedy(model, p, 12, eos)
        for g in range(3):
            assert got.completions[i * 3 + g] == want
            assert got.truncated[i * 3 + g] == (want[-1] not in eos)
    # One prefill of each prompt; all 9 rows decode together, then fewer.
    assert got.prefill_tokens == sum(len(p) for p in prompts)
    assert got.row_steps[0] == 9
    assert min(got.row_steps) < 9
    assert got.sampled_tokens == sum(len(c) for c in got.completions)


@pytest.mark.parametrize("which", ["llama", "qwen"])
def test_a_prefix_every_prompt_shares_is_prefilled_once(which, request, monkeypatch):
    """Prompts opening with the same tokens (a system message): the prefix goes through the model once, and the
    greedy completions are those of one-by-one decoding, also for a row padded by more than the prefix."""
    from mlxpost.rl import rollout

    lm = request.getfixturevalue(which)
    model, tok = lm.model, lm.tokenizer
    head = tok.encode("system: be brief and kind, answer in a line. user:")
    tails = [tok.encode(" hi"), tok.encode(" what is the sum of two and three, and why? tell me more about it, please."),
             tok.encode(" what is the sum of two and three, and why?"), tok.encode(" ok then")]
    pads = [max(map(len, tails)) - len(t) for t in tails]
    # Rows padded by more than the prefix (all padding in the shared columns), by less (padding, then part of
    # the prefix: the gather), and not at all.
    assert len(head) >= rollout.MIN_SHARED_PREFIX and max(pads) > len(head) and 0 in pads
    assert any(0 < n < len(head) for n in pads)
    prompts = [head + t for t in tails]
    free = [_naive_greedy(model, p, 10, set()) for p in prompts]
    eos = {free[0][4]}
    passes = []
    monkeypatch.setattr(rollout, "_prefix_cache", lambda *a, _real=rollout._prefix_cache: passes.append(a[1]) or _real(*a))
    got = sample_groups(model, tok, prompts, 2, Sampling(temperature=0.0, max_new_tokens=10), eos_ids=eos)
    assert passes == [head[:got.shared_prefix]] and got.shared_prefix >= len(head)
    assert any(0 < n < got.shared_prefix for n in pads)
    for i, p in enumerate(prompts):
        want = _naive_greedy(model, p, 10, eos)
        assert got.completions[2 * i] == want and got.completions[2 * i + 1] == want
    # The logits after the prefill, and after a decode step on each cache, are the plain batch pass's.
    k = got.shared_prefix
    left = [max(map(len, prompts)) - len(p) for p in prompts]
    x = mx.array([[0] * n + p for n, p in zip(left, prompts)], mx.int32)
    plain = rollout._batch_cache(model, left)
    a = model(x, cache=plain)[:, -1, :]
    shared = rollout._prefix_cache(model, head[:k], left)
    b = model(x[:, k:], cache=shared)[:, -1, :]
    np.testing.assert_allclose(np.array(b), np.array(a), atol=1e-4)
    y = mx.argmax(a, axis=-1)[:, None]
    np.testing.assert_allclose(np.array(model(y, cache=shared)), np.array(model(y, cache=plain)), atol=1e-4)
    # Too short a common prefix, or one prompt: the plain batch pass.
    assert rollout._shared_prefix([head[:8] + [1, 2], head[:8] + [3]]) == 0
    assert rollout._shared_prefix([head + [1]]) == 0
    assert rollout._shared_prefix([head + [1, 2], head + [1, 2]]) == len(head)  # two positions left to the batch
    assert rollout._shared_prefix([head + [1, 2, 3], head + [1, 9, 9]]) == len(head) + 1


def test_run_samples_batched_equal_generating_one_prompt_at_a_time(tiny_model):
    # The before/after samples of every run decode all prompts in one batch;
    # greedy, they are what mlx-lm's generate gives for each prompt alone.
    from mlx.utils import tree_map

    from mlxpost.core.generate import generate_text
    from mlxpost.training.samples import run_samples

    lm = load_model(str(tiny_model), dtype="float32")
    # Noisy weights, so that greedy decoding says something other than newlines.
    mx.random.seed(3)
    lm.model.update(tree_map(lambda p: p + 0.2 * mx.random.normal(p.shape), lm.model.parameters()))
    cfg = build_config(None, ["sample.max_tokens=10"], method="sft")
    prompts = ["What is 2 + 3?", "Name a colour.", "Reverse the word 'garden' for me, please."]
    got = run_samples(lm.model, lm.tokenizer, prompts, cfg)
    want = [generate_text(lm.model, lm.tokenizer, p, max_tokens=10) for p in prompts]
    assert got == want
    assert all(len(g) > 3 for g in got) and len(set(got)) == 3
    assert run_samples(lm.model, lm.tokenizer, [], cfg) == []


def test_sampling_is_seeded_and_top_p_restricts_to_the_nucleus(llama):
    model, tok = llama.model, llama.tokenizer
    prompts = [tok.encode("one two three")]
    s = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=6)
    mx.random.seed(3)
    a = sample_groups(model, tok, prompts, 8, s)
    mx.random.seed(3)
    b = sample_groups(model, tok, prompts, 8, s)
    assert a.completions == b.completions
    assert len({tuple(c) for c in a.completions}) > 1  # the group is diverse
    # A tiny nucleus is the top token: same as greedy.
    mx.random.seed(4)
    tight = sample_groups(model, tok, prompts, 4, Sampling(temperature=1.0, top_p=1e-6, max_new_tokens=6))
    greedy = sample_groups(model, tok, prompts, 1, Sampling(temperature=0.0, max_new_tokens=6))
    assert all(c == greedy.completions[0] for c in tight.completions)


def test_stop_strings_cut_the_completion(llama):
    model, tok = llama.model, llama.tokenizer
    prompts = [tok.encode("alpha beta")]
    free = sample_groups(model, tok, prompts, 1, Sampling(temperature=0.0, max_new_tokens=10))
    text = free.texts[0]
    assert len(text) > 4
    stop = text[2:4]
    cut = sample_groups(model, tok, prompts, 2, Sampling(temperature=0.0, max_new_tokens=10, stop=(stop,)))
    for c, t in zip(cut.completions, cut.texts):
        assert t.endswith(stop) and stop not in t[:-len(stop)]
        assert len(c) < len(free.completions[0])
        assert not cut.truncated.any()


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------


def test_group_advantages_by_hand():
    r = np.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    a = G.group_advantages(r, 4, "group")
    # group 1: mean 0.5, std 0.5 -> +-1 (eps 1e-4); group 2: all equal -> 0
    np.testing.assert_allclose(a[:4], [1, -1, -1, 1], atol=1e-3)
    np.testing.assert_allclose(a[4:], 0, atol=1e-9)
    np.testing.assert_allclose(G.group_advantages(r, 4, "none"), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    s = r.std()
    np.testing.assert_allclose(G.group_advantages(r, 4, "batch"), np.array([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) /
                               (s + 1e-4), rtol=1e-6)


def test_group_advantages_use_the_population_std_as_documented():
    # G = 2, rewards (1, 0): population std 0.5 -> +-1; the sample std (ddof=1) would give +-0.707.
    np.testing.assert_allclose(G.group_advantages(np.array([1.0, 0.0]), 2), [1, -1], atol=1e-3)
    a = G.group_advantages(np.array([3.0, 1.0, 0.0, 0.0, 2.0, 5.0, 1.0, 4.0]), 8)
    assert abs(a.mean()) < 1e-6 and a.std() == pytest.approx(1.0, abs=1e-3)


def test_clipped_objective_equals_hand_computed_values():
    logp = mx.array([[math.log(0.5), math.log(0.9), math.log(0.2)]])
    old = mx.array([[math.log(0.4), math.log(0.5), math.log(0.4)]])
    adv = mx.array([[1.0, 2.0, -1.0]])
    loss, ratio, low, high = G.clipped_token_loss(logp, old, adv, 0.2, 0.28)
    # ratios 1.25, 1.8, 0.5
    np.testing.assert_allclose(np.array(ratio), [[1.25, 1.8, 0.5]], rtol=1e-6)
    # t0: min(1.25*1, 1.25*1) = 1.25 (inside [0.8, 1.28]); t1: min(3.6, 1.28*2) = 2.56; t2: min(-0.5, -0.8) = -0.8
    np.testing.assert_allclose(np.array(loss), [[-1.25, -2.56, 0.8]], rtol=1e-6)
    np.testing.assert_array_equal(np.array(high), [[0, 1, 0]])
    np.testing.assert_array_equal(np.array(low), [[0, 0, 1]])
    # k3 is 0 at equal log-probs and positive otherwise.
    assert float(k3(logp, logp).sum()) == 0.0
    np.testing.assert_allclose(np.array(k3(logp, old)), np.exp(np.array(old) - np.array(logp)) -
                               (np.array(old) - np.array(logp)) - 1, rtol=1e-6)


def test_loss_normalizations():
    tok = mx.array([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    w = mx.array([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    s, c = G.normalize(tok, w, "grpo", 8)
    assert (float(s), float(c)) == (2.0 + 4.0, 2.0)  # per-sequence means 2 and 4, over 2 sequences
    s, c = G.normalize(tok, w, "dapo", 8)
    assert (float(s), float(c)) == (10.0, 4.0)
    s, c = G.normalize(tok, w, "dr_grpo", 8)
    assert (float(s), float(c)) == (10.0 / 8, 2.0)


# ---------------------------------------------------------------------------
# Step-level credit assignment
# ---------------------------------------------------------------------------


def test_a_wrong_step_gets_negative_advantage_on_exactly_its_tokens(llama):
    tok = llama.tokenizer
    text = "3 + 4 = 7\n7 * 2 = 15\n15 - 5 = 10\nAnswer: 10"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    ends = token_char_ends(tok, ids)
    lines = text.split("\n")
    spans, pos = [], 0
    for ln in lines[:3]:
        spans.append((pos, pos + len(ln)))
        pos += len(ln) + 1
    steps = [Step(spans[0][0], spans[0][1], 1.0, "ok"), Step(spans[1][0], spans[1][1], 0.0, "7 * 2 is 14"),
             Step(spans[2][0], spans[2][1], 0.0, "uses 15, the wrong result of step 2")]
    for outcome in (1.0, -1.0, 0.0):  # right final answer, wrong, or an all-equal group
        a = step_token_advantages(ends, steps, outcome, lam=1.0)
        starts = [0] + ends[:-1]
        for t, (s0, s1) in enumerate(zip(starts, ends)):
            in_step = [k for k, (a0, a1) in enumerate(spans) if s0 < a1 and s1 > a0]
            if in_step and in_step[0] in (1, 2) or (in_step and min(steps[k].score for k in in_step) < 1):
                assert a[t] < 0, (t, tok.decode(ids[t:t + 1]), a[t])
                assert a[t] == pytest.approx(min(outcome, 0.0) - 1.0)
            elif in_step:
                assert a[t] == pytest.approx(max(outcome, 0.0))
            else:  # newlines and the final answer keep the outcome advantage
                assert a[t] == pytest.approx(outcome)


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (character -> byte), to read a token's bytes independently of rl.py."""
    table = {b: chr(b) for b in [*range(33, 127), *range(161, 173), *range(174, 256)]}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return {c: b for b, c in table.items()}


def _chars_held(token_strings: list[str], text: str) -> list[set[int]]:
    """For each byte-level token, the characters of ``text`` it holds bytes of."""
    dec = _byte_level_decoder()
    starts = np.cumsum([0] + [len(ch.encode()) for ch in text])  # byte offset of each character
    held, pos = [], 0
    for piece in token_strings:
        lo, pos = pos, pos + len(bytes(dec[c] for c in piece))
        held.append({c for c in range(len(text)) if starts[c] < pos and starts[c + 1] > lo})
    return held


def _chars_spanned(ends: list[float]) -> list[set[int]]:
    starts = [0] + ends[:-1]
    return [{c for c in range(math.floor(s0), math.ceil(s1)) if s0 < c + 1 and s1 > c} for s0, s1 in zip(starts, ends)]


# Multi-byte characters in and out of steps: × (2 bytes), − and CJK (3), 🙂 (4).
MULTIBYTE = "计算：3 × 4 = 13 🙂\n3 × 4 = 12\n12 − 5 = 8\n答案：7\nAnswer: 7"


def test_token_char_ends_gives_each_token_of_a_multibyte_character_a_share_of_it():
    from mlxpost.model.tiny import default_corpus, train_tokenizer
    from mlxpost.rl.arithmetic import arithmetic
    tok = train_tokenizer(300, ["<|endoftext|>"], default_corpus(300))  # byte-level BPE, merges of ASCII only
    ids = tok.encode(MULTIBYTE).ids
    assert tok.decode(ids) == MULTIBYTE
    held = _chars_held([tok.id_to_token(i) for i in ids], MULTIBYTE)
    # Decoding prefixes gave a token that only completes a character an empty span.
    old = [len(tok.decode(ids[:k + 1])) for k in range(len(ids))]
    assert sum(1 for k, h in enumerate(held) if h and old[k] == (old[k - 1] if k else 0)) >= 6
    ends = token_char_ends(tok, ids)
    assert all(a <= b for a, b in zip(ends, ends[1:])) and ends[-1] == len(MULTIBYTE)
    assert _chars_spanned(ends) == held  # every token spans exactly the characters it holds bytes of
    times = MULTIBYTE.index("×")
    k = next(k for k, h in enumerate(held) if times in h)
    assert ends[k - 1:k + 2] == [times, times + 0.5, times + 1]  # × is two byte tokens: half each
    smile = MULTIBYTE.index("🙂")
    k = next(k for k, h in enumerate(held) if smile in h)
    assert ends[k - 1:k + 4] == [smile, smile + 0.25, smile + 0.5, smile + 0.75, smile + 1]

    v = arithmetic(MULTIBYTE, answer="7", numbers=[3, 4, 5])
    assert [(s.score, s.reason) for s in v.steps] == [(0.0, "3 × 4 is 12, not 13"), (1.0, "ok"),
                                                      (0.0, "12 − 5 is 7, not 8")]
    for outcome in (1.0, -1.0):
        a = step_token_advantages(ends, v.steps, outcome, lam=1.0)
        for t, h in enumerate(held):
            in_steps = [s for s in v.steps if any(s.start <= c < s.end for c in h)]
            if any(s.score < 1 for s in in_steps):  # every byte of 计, 算, ×, 🙂, − in a wrong step
                assert a[t] == min(outcome, 0.0) - 1.0, (t, tok.id_to_token(ids[t]))
            elif in_steps:
                assert a[t] == max(outcome, 0.0)
            else:
                assert a[t] == outcome  # newlines, 答案：7 (no step) and the answer


class _LeadingSpaceBytes:
    """Decodes byte tokens like SentencePiece: a leading space is dropped, so pieces do not decode on their own."""

    pieces = (b" 3", b" \xc3", b"\x97", b" 4", b" =", b" 1", b"2", b" \xe2\x88", b"\x92")

    def decode(self, ids):
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace").removeprefix(" ")


def test_token_char_ends_decodes_prefixes_when_pieces_do_not_decode_alone():
    tok = _LeadingSpaceBytes()
    ids = list(range(9))
    assert tok.decode(ids) == "3 × 4 = 12 −"
    # " \xc3" holds the space and half of ×; "\x97" the other half; " \xe2\x88" a space and 2/3 of −.
    assert token_char_ends(tok, ids) == [1, 2.5, 3, 5, 7, 9, 10, 11.5, 12]
    assert token_char_ends(tok, ids[:2]) == [1, 3]  # cut in the middle of ×: the text ends in U+FFFD


def test_rlvr_batches_penalize_every_token_of_a_multibyte_character_in_a_wrong_step(llama):
    from mlxpost.data.load import PromptRow
    from mlxpost.methods.online_rl import RLSettings
    from mlxpost.rl.rollout import Rollouts
    from mlxpost.rl.verifiers import StepVerifier
    tok = llama.tokenizer
    prompt = tok.encode("Compute 3 * 4 - 5.", add_special_tokens=False)
    row = PromptRow(prompt, "Compute 3 * 4 - 5.", {"answer": "7", "numbers": [3, 4, 5]}, "tasks.jsonl:1")
    right = MULTIBYTE.replace("13", "12").replace("= 8", "= 7")
    texts = [MULTIBYTE, right]  # right final answer in both, wrong steps in the first
    ids = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in texts]
    assert all(tok.decode(i[:-1]) == t for i, t in zip(ids, texts))
    src = _source(llama, [row], RLSettings(group_size=2, prompts_per_step=1, micro_batch=2),
                  verifier=StepVerifier("arithmetic"))
    (batch,) = src.build([row], Rollouts(group_size=2, completions=ids, texts=texts, truncated=np.zeros(2, bool)))
    outcome = src.last_rollout["advantages"]
    assert outcome == [0.0, 0.0]  # both answers right: only the steps tell them apart
    adv = np.array(batch.extra["adv"])
    lo = len(prompt) - 1
    verdict = StepVerifier("arithmetic").verify(MULTIBYTE, {"answer": "7", "numbers": [3, 4, 5]})
    held = _chars_held(tok.convert_ids_to_tokens(ids[0][:-1]), MULTIBYTE)
    wrong = [t for t, h in enumerate(held) if any(s.score < 1 and s.start <= c < s.end for s in verdict.steps for c in h)]
    completing = [t for t in wrong if t and held[t] and held[t] <= held[t - 1]]  # tokens that only finish a character
    assert len(completing) >= 6
    a = adv[0, lo:lo + len(ids[0])]
    np.testing.assert_array_equal(a[wrong], -1.0)
    assert (np.delete(a, wrong) == 0.0).all()
    assert (adv[1, lo:lo + len(ids[1])] == 0.0).all()


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def test_rl_config_validation():
    cfg = build_config(None, ["grpo.rewards=[accuracy]"], method="grpo")
    assert cfg.grpo.group_size == 8 and cfg.train.lr == 2e-5
    assert "dpo" not in cfg.to_dict() and "grpo" in cfg.to_dict() and "rlvr" not in cfg.to_dict()
    assert "rlvr" in build_config(None, [], method="rlvr").to_dict()
    with pytest.raises(ConfigError, match="at least one reward"):
        build_config(None, [], method="grpo")
    with pytest.raises(ConfigError, match="group_size"):
        build_config(None, ["grpo.group_size=1"], method="rlvr")
    with pytest.raises(ConfigError, match="micro_batch"):
        build_config(None, ["grpo.micro_batch=3"], method="rlvr")
    with pytest.raises(ConfigError, match="grad_accum"):
        build_config(None, ["train.grad_accum=2"], method="rlvr")
    with pytest.raises(ConfigError, match="loss_norm"):
        build_config(None, ["grpo.loss_norm=sum"], method="rlvr")
    with pytest.raises(ConfigError, match="grpo"):
        build_config(None, ["grpo.beta=0.1"], method="dpo")
    with pytest.raises(ConfigError, match="grpo.min_p: must be below 1"):
        build_config(None, ["grpo.min_p=1"], method="rlvr")
    with pytest.raises(ConfigError, match="grpo.top_k: must be 0 or more"):
        build_config(None, ["grpo.top_k=-1"], method="rlvr")


# ---------------------------------------------------------------------------
# Learning, end to end through the runner
# ---------------------------------------------------------------------------


class _Quiet:
    """A reporter that records what a run shows."""

    def __init__(self):
        self.reports, self.warnings = [], []

    def __getattr__(self, name):
        return lambda *a, **k: None

    def status(self, *a, **k):
        import contextlib

        return contextlib.nullcontext()

    def report(self, step, metrics):
        self.reports.append(dict(metrics, step=step))

    def warn(self, msg, *a, **k):
        self.warnings.append(msg)


def _first_token_logprob(model, tok, prompt_ids, target):
    model.eval()
    lp = model(mx.array([prompt_ids]))[0, -1].astype(mx.float32)
    return float((lp - mx.logsumexp(lp))[target].item())


def test_grpo_raises_the_probability_of_the_rewarded_first_token(tmp_path):
    from mlxpost.data.render import Renderer
    from mlxpost.model.adapters import load_adapters
    from mlxpost.model.tiny import build_tiny_model
    from mlxpost.training.pipeline import run

    # An untied output head with a larger scale: the test models' default heads
    # are so small (and tied) that no adapter can make one token likely.
    path = build_tiny_model(tmp_path / "model", model_type="qwen2", tie_word_embeddings=False, embed_std=0.2)
    lm = load_model(str(path), dtype="float32")
    prompts = [f"item {i}" for i in range(16)]
    ids = Renderer(lm.tokenizer).prompt(prompts[0])[0]
    # The rewarded token: the second most likely first token (p ~ 0.06), not the top one.
    target = int(mx.argsort(-lm.model(mx.array([ids]))[0, -1])[1].item())
    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "train.jsonl", "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}) + "\n")
    (tmp_path / "reward.py").write_text(
        f"TOKEN = {target}\n"
        "def first_token(completions, completion_ids, **cols):\n"
        "    return [float(t[:1] == [TOKEN]) for t in completion_ids]\n")
    before = _first_token_logprob(lm.model, lm.tokenizer, ids, target)
    cfg = build_config(None, [f"model.path={path}", f"data.path={tmp_path / 'data'}",
                              f"grpo.rewards=[{tmp_path / 'reward.py'}:first_token]", "grpo.group_size=8",
                              "grpo.prompts_per_step=2", "grpo.max_new_tokens=2", "train.steps=20",
                              "train.lr=3e-3", "train.schedule=constant", f"output.dir={tmp_path / 'runs'}",
                              "output.name=g", "model.dtype=float32", "train.save_every=0",
                              "train.report_every=1"], method="grpo")
    rep = _Quiet()
    run_dir, result = run(cfg, reporter=rep)
    lm2 = load_model(str(path), dtype="float32")
    load_adapters(lm2.model, run_dir)
    after = _first_token_logprob(lm2.model, lm2.tokenizer, ids, target)
    assert before < math.log(0.1) and after > math.log(0.5), (before, after)
    rewards = [r["reward"] for r in rep.reports]
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.4
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_metrics"]["reward"] == rewards[-1]
    assert summary["final_metrics"]["reward/first_token"] == rewards[-1]


# ---------------------------------------------------------------------------
# Step-verified RLVR through the batch source
# ---------------------------------------------------------------------------


def _source(lm, rows, settings, **kw):
    from mlxpost.rl.source import RolloutSource

    return RolloutSource(lm.model, lm.tokenizer, rows, settings, pad_id=0, **kw)


def test_rlvr_batches_penalize_exactly_the_tokens_of_the_wrong_step(llama):
    from mlxpost.data.load import PromptRow
    from mlxpost.methods.online_rl import RLSettings
    from mlxpost.rl.rollout import Rollouts
    from mlxpost.rl.verifiers import StepVerifier
    tok = llama.tokenizer
    prompt = tok.encode("Compute (3 + 4) * 2 - 5.", add_special_tokens=False)
    row = PromptRow(prompt, "Compute (3 + 4) * 2 - 5.", {"answer": "9", "numbers": [3, 4, 2, 5]}, "tasks.jsonl:1")
    texts = ["3 + 4 = 7\n7 * 2 = 14\n14 - 5 = 9\nAnswer: 9",   # all right
             "3 + 4 = 7\n7 * 2 = 15\n14 - 5 = 9\nAnswer: 9",   # right answer, wrong middle step (and 14 is
             #                                                   then neither given nor computed: wrong too)
             "3 + 4 = 7\n7 * 2 = 14\n14 - 5 = 8\nAnswer: 8",   # wrong last step and answer
             "3 + 4 = 8\n8 * 2 = 16\n16 - 5 = 11\nAnswer: 11"]  # wrong first step, later steps build on it
    ids = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in texts]
    assert all(tok.decode(i[:-1]) == t for i, t in zip(ids, texts))
    settings = RLSettings(group_size=4, prompts_per_step=1, micro_batch=4)
    src = _source(llama, [row], settings, verifier=StepVerifier("arithmetic"))
    ro = Rollouts(group_size=4, completions=ids, texts=texts, truncated=np.zeros(4, bool))
    (batch,) = src.build([row], ro)
    m = src.last_metrics
    assert m["final_acc"] == 0.5 and m["step_acc"] == pytest.approx(6 / 12)
    adv = np.array(batch.extra["adv"])
    w = np.array(batch.weights)
    lo = len(prompt) - 1
    outcome = np.array(src.last_rollout["advantages"])
    assert outcome[0] > 0 and outcome[1] > 0 and outcome[2] < 0 and outcome[3] < 0
    for i, text in enumerate(texts):
        n = len(ids[i])
        assert w[i, lo:lo + n].sum() == n and w[i].sum() == n  # loss on the completion (EOS included) only
        a = adv[i, lo:lo + n]
        lines = text.split("\n")
        line_of = []  # the line each token belongs to (-1: a newline)
        ends = [len(tok.decode(ids[i][:k + 1])) for k in range(n - 1)]
        starts = [0] + ends[:-1]
        bounds = np.cumsum([len(x) + 1 for x in lines])
        for s0, s1 in zip(starts, ends):
            inside = [k for k in range(len(lines)) if s0 < bounds[k] - 1 and s1 > bounds[k] - 1 - len(lines[k])]
            line_of.append(inside[0] if inside else -1)
        wrong = {1: {1, 2}, 2: {2}, 3: {0, 1, 2}}.get(i, set())
        for t, ln in enumerate(line_of):
            if ln in wrong:
                assert a[t] == pytest.approx(min(outcome[i], 0) - 1.0), (i, t, ln)
            elif ln in (0, 1, 2):
                assert a[t] == pytest.approx(max(outcome[i], 0)), (i, t, ln)
            else:  # newlines, the answer line, EOS
                assert a[t] == pytest.approx(outcome[i]), (i, t, ln)
        assert a[-1] == pytest.approx(outcome[i])  # EOS
    # The right answer reached through a wrong step is not rewarded as a whole.
    assert (adv[1, lo:lo + len(ids[1])] < 0).any()


def test_a_failing_reward_or_verifier_names_itself_and_the_row(llama, tmp_path):
    from mlxpost.data.load import PromptRow
    from mlxpost.methods.online_rl import RLSettings
    from mlxpost.rl.rewards import RewardSet
    from mlxpost.rl.rollout import Rollouts
    from mlxpost.rl.verifiers import StepVerifier
    tok = llama.tokenizer
    row = PromptRow(tok.encode("hi"), "hi", {"answer": "1"}, "p.jsonl:7")
    (tmp_path / "bad.py").write_text("def boom(completions, **c):\n    return [1 / 0 for _ in completions]\n"
                                     "def verify(completion, answer):\n    return {'steps': [], 'final_score': 2}\n")
    ro = Rollouts(group_size=2, completions=[[5], [6]], texts=["a", "b"], truncated=np.zeros(2, bool))
    src = _source(llama, [row], RLSettings(group_size=2, prompts_per_step=1, micro_batch=2),
                  rewards=RewardSet([(f"{tmp_path / 'bad.py'}:boom", 1.0)]))
    with pytest.raises(MlxpostError, match=r"boom.*(row 0|p\.jsonl:7).*ZeroDivisionError"):
        src.build([row], ro)
    src = _source(llama, [row], RLSettings(group_size=2, prompts_per_step=1, micro_batch=2),
                  verifier=StepVerifier(f"{tmp_path / 'bad.py'}:verify"))
    with pytest.raises(MlxpostError, match=r"verify.*p\.jsonl:7.*final_score"):
        src.build([row], ro)


# ---------------------------------------------------------------------------
# Several optimizer steps per rollout; resume; rlvr end to end
# ---------------------------------------------------------------------------


def _rl_config(path, data, out, method="grpo", extra=()):
    sets = [f"model.path={path}", f"data.path={data}", "grpo.group_size=4", "grpo.prompts_per_step=2",
            "grpo.max_new_tokens=6", "train.lr=1e-2", "train.schedule=constant", f"output.dir={out}",
            "model.dtype=float32", "train.report_every=1", "grpo.eval_prompts=4"] + list(extra)
    return build_config(None, sets, method=method)


def test_num_iterations_reuses_rollouts_and_clipping_engages(tiny_qwen, tmp_path):
    from mlxpost.training.pipeline import run

    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"word {i}"}) + "\n" for i in range(8)))
    (tmp_path / "r.py").write_text("def length(completions, **c):\n    return [len(x) / 10 for x in completions]\n")
    cfg = _rl_config(tiny_qwen, data, tmp_path / "runs", extra=[
        f"grpo.rewards=[{tmp_path / 'r.py'}:length]", "grpo.num_iterations=4", "train.steps=8",
        "grpo.epsilon_low=0.02", "grpo.epsilon_high=0.02", "output.name=it", "train.save_every=0"])
    rep = _Quiet()
    run(cfg, reporter=rep)
    steps = rep.reports
    assert [r["iteration"] for r in steps] == [1, 2, 3, 4, 1, 2, 3, 4]
    # The first pass over a rollout is on-policy: the ratio is exactly 1, nothing is clipped.
    assert all(r["ratio"] == pytest.approx(1.0, abs=1e-6) and r["clip_high"] == 0 and r["clip_low"] == 0
               for r in steps if r["iteration"] == 1)
    later = [r for r in steps if r["iteration"] > 1]
    assert any(abs(r["ratio"] - 1) > 1e-3 for r in later)
    assert any(r["clip_high"] > 0 or r["clip_low"] > 0 for r in later)
    # A rollout is sampled once per 4 steps: its reward repeats within the 4.
    assert steps[0]["reward"] == steps[3]["reward"] and steps[4]["reward"] == steps[7]["reward"]


def test_rlvr_on_the_bundled_tasks_reports_step_and_final_accuracy_and_resumes(tiny_model, tmp_path):
    from mlxpost.assets import ARITH_TASKS_DIR
    from mlxpost.training.pipeline import run
    from mlxpost.training.resume import resume_config

    cfg = _rl_config(tiny_model, ARITH_TASKS_DIR, tmp_path / "runs", method="rlvr",
                     extra=["train.steps=2", "train.save_every=1", "output.name=r", "grpo.rewards=[format@0.2]",
                            "train.measure_every=1"])
    rep = _Quiet()
    run_dir, result = run(cfg, reporter=rep)
    s = json.loads((run_dir / "summary.json").read_text())
    for k in ("reward", "all_equal_groups", "completion_len", "truncated", "step_acc", "final_acc",
              "reward/format"):
        assert k in s["final_metrics"], k
    assert s["eval_before"]["n"] == 4 and "final_acc" in s["eval_after"]
    gate = s["health"]["quality_gate"]
    assert gate["verdict"] == "fail" and gate["min_step_acc"] == 0.8 and gate["min_final_acc"] == 0.9
    assert (run_dir / "rl_eval_after.json").exists()
    # train.measure_every: held-out figures in the middle of training (not at the last step: eval_after has it).
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    held = [r for r in records if r["kind"] == "heldout"]
    assert [r["step"] for r in held] == [1] and 0 <= held[0]["final_acc"] <= 1 and "reward" in held[0]
    # Resume: two more steps from the last checkpoint.
    cfg2 = resume_config(run_dir, ["train.steps=4"])
    rep2 = _Quiet()
    _, result2 = run(cfg2, reporter=rep2, resume=run_dir)
    assert result2.steps == 4 and [r["step"] for r in rep2.reports] == [3, 4]
    ckpt = json.loads(sorted((run_dir / "checkpoints").glob("step-*/trainer_state.json"))[-1].read_text())
    assert {k: v for k, v in ckpt["data"].items() if k != "generated"} == {"epoch": 0, "index": 4, "iteration": 0}
    assert ckpt["data"]["generated"]["prompts"] == 8  # 4 steps of 2 prompts, for the rollout FLOP count


def test_sampling_draws_from_the_tempered_softmax():
    """sample_next (inverse-CDF draws at top_p=1, nucleus otherwise) matches softmax(logits / T) in distribution."""
    from mlxpost.rl.rollout import sample_next

    logits = mx.array([[2.0, 0.5, -1.0, 1.0, -3.0, 0.0]])
    rows = mx.repeat(logits, 40000, axis=0)
    for t, top_p in ((1.0, 1.0), (0.5, 1.0), (1.0, 0.9)):
        mx.random.seed(3)
        got = np.bincount(np.array(sample_next(rows, t, top_p)), minlength=6) / rows.shape[0]
        want = np.array(mx.softmax(logits[0] / t))
        if top_p < 1:  # the smallest prefix (by probability) whose mass reaches top_p, renormalized
            order = np.argsort(-want)
            keep = order[: int(np.searchsorted(np.cumsum(want[order]), top_p)) + 1]
            want = np.where(np.isin(np.arange(6), keep), want, 0) / want[keep].sum()
        np.testing.assert_allclose(got, want, atol=0.01)
    assert np.array(sample_next(rows[:5], 0.0, 1.0)).tolist() == [0] * 5  # greedy


def test_top_k_and_min_p_keep_the_right_tokens_renormalized():
    """top_k keeps the k most likely tokens, min_p those at least min_p x the top one's probability (tempered)."""
    from mlxpost.rl.rollout import sample_next

    logits = mx.array([[2.0, 0.5, -1.0, 1.0, -3.0, 0.0]])
    rows = mx.repeat(logits, 40000, axis=0)
    p = np.array(mx.softmax(logits[0] / 0.7))
    cases = {(3, 0.0, 1.0): np.argsort(-p)[:3],  # tokens 0, 3, 1
             (0, 0.3, 1.0): np.flatnonzero(p >= 0.3 * p.max()),
             (4, 0.1, 1.0): np.intersect1d(np.argsort(-p)[:4], np.flatnonzero(p >= 0.1 * p.max())),
             (2, 0.0, 0.5): np.argsort(-p)[:1]}  # top_p after top_k: the top token holds >= 0.5 of the two
    for (top_k, min_p, top_p), keep in cases.items():
        mx.random.seed(5)
        got = np.bincount(np.array(sample_next(rows, 0.7, top_p, top_k, min_p)), minlength=6) / rows.shape[0]
        want = np.where(np.isin(np.arange(6), keep), p, 0)
        np.testing.assert_allclose(got, want / want.sum(), atol=0.01, err_msg=str((top_k, min_p, top_p)))


def test_sampling_across_vocabulary_blocks():
    """The two-level draw over a vocabulary of several blocks (not a multiple of the block size): the tempered
    softmax in distribution, mass spread over every block, and tokens filtered out (probability 0) never drawn."""
    from mlxpost.rl.rollout import SAMPLE_BLOCK, sample_next

    V = 3 * SAMPLE_BLOCK + 37
    rng = np.random.default_rng(0)
    base = rng.normal(size=V) * 0.5
    hot = rng.choice(V, 40, replace=False)  # 40 likely tokens scattered over every block, the last partial one too
    hot[:2] = [V - 1, SAMPLE_BLOCK]  # incl. the very last entry and the first of a block
    base[hot] += 4.0
    logits = mx.array(base[None].astype(np.float32))
    rows = mx.repeat(logits, 60000, axis=0)
    mx.random.seed(11)
    got = np.bincount(np.array(sample_next(rows, 0.8)), minlength=V) / rows.shape[0]
    want = np.array(mx.softmax(logits[0] / 0.8))
    assert 0.5 * np.abs(got - want).sum() < 0.04  # total variation; 60k exact draws give about 0.026
    for b in range(0, V, SAMPLE_BLOCK):  # the mass of every block
        assert abs(got[b:b + SAMPLE_BLOCK].sum() - want[b:b + SAMPLE_BLOCK].sum()) < 0.01, b
    np.testing.assert_allclose(got[hot[:2]], want[hot[:2]], atol=0.005)
    mx.random.seed(12)
    kept = np.array(sample_next(rows, 0.8, top_k=5))
    assert set(kept.tolist()) <= set(np.argsort(-base)[:5].tolist())
