"""From a resolved configuration to a finished run: the pipeline every method shares.

load model -> attach adapters -> read and render data -> batch sources ->
objective -> the training loop -> samples and summary. A method contributes
only its objective (``methods/<name>.py``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .batching import (DEFAULT_ATTENTION_CHUNK, BatchSource, PairSource, _stack, attention_chunk, attention_span,
                       forward, rope_owners, set_attention_chunk)
from .config import RunConfig, dump_yaml, load_recipe, set_value, validate
from .data import (DataStats, Example, Renderer, resolve_data_files, split_examples, tokenize_file,
                   tokenize_pairs_file)
from .errors import ConfigError, MlxpostError
from .logprobs import HeadSplit, logprobs
from .methods import Method, get as get_method
from .model import (LoadedModel, adapter_config, attach_adapters, fuse_adapters, is_quantized,
                    load_model, quantize_blocks, read_adapter_config, resolve_targets, trainable_count)
from .runs import RunDir, new_run_dir
from .train import NonFiniteError, Objective, Trainer, TrainResult, steps_for_epochs

# Keys that may change when a run is resumed (everything else must match).
RESUMABLE_KEYS = ("train.steps", "train.epochs", "train.eval_every", "train.save_every", "train.report_every",
                  "train.early_stopping_patience", "train.early_stopping_min_delta", "train.keep_checkpoints",
                  "train.eval_batches", "sample.max_tokens", "train.attention_chunk")


@dataclass
class Prepared:
    cfg: RunConfig
    loaded: LoadedModel
    train: BatchSource
    valid: BatchSource | None
    stats: dict
    split: HeadSplit | None
    adapter_cfg: dict
    trainable: int
    batching: str
    rl: dict = field(default_factory=dict)  # online RL: eval prompts, rewards, verifier, settings
    timings: dict = field(default_factory=dict)  # one-off work before training (seconds)
    trunk: object = None  # a SharedTrunk when the live reference pass can reuse the policy's lower blocks
    prompt: str | None = None  # pairs: how each prompt goes through the model (shared or repeated, and why)
    shared_batches: tuple | None = None  # pairs: (batches of the first epoch that share their prompt, batches)


def _world():
    world = mx.distributed.init()
    return world if world.size() > 1 else None


def agree(world, fn: Callable, what: str):
    """Run ``fn`` on every rank; if it fails on any rank, fail on every rank.

    Without this a rank that hit an error (bad data row, existing run
    directory, missing checkpoint) would exit while the others wait forever
    in the next collective operation.
    """
    error = None
    try:
        value = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the vote
        error, value = e, None
    if world is not None:
        failed = mx.distributed.all_sum(mx.array(int(error is not None)), group=world, stream=mx.cpu).item()
        if failed and error is None:
            raise MlxpostError(f"{what} failed on another process (its own message says why)")
    if error is not None:
        raise error
    return value


# ---------------------------------------------------------------------------
# Checks on the model
# ---------------------------------------------------------------------------


def _probe_tokens(model, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` random token ids (int32) within the model's vocabulary (at most the first 1000), for probes."""
    vocab = model.model.embed_tokens.weight.shape[0] if hasattr(model, "model") and hasattr(
        model.model, "embed_tokens") else 100
    return rng.integers(1, min(vocab, 1000), n).astype(np.int32)


def packing_is_exact(model, atol: float = 1e-4) -> bool:
    """Do packed rows give the same log-probs as one-by-one rows for this model?

    Two random sequences are run packed (block-diagonal mask through
    :class:`mlxpost.batching.MaskCache`) and separately. Architectures that do not build their
    mask from the cache, or whose layers mix positions in other ways, fail
    this check and are trained with padding instead.
    """
    rng = np.random.default_rng(0)
    a = Example(_probe_tokens(model, rng, 9), np.ones(9, bool))
    b = Example(_probe_tokens(model, rng, 7), np.ones(7, bool))
    try:
        packed = logprobs(model, _stack([[a, b]], 16, 0, packed=True))
        one = logprobs(model, _stack([[a]], 8, 0, packed=False))
        two = logprobs(model, _stack([[b]], 6, 0, packed=False))
        ref = mx.concatenate([one[0], two[0]])
        err = mx.abs(packed[0, :14] - ref).max().item()
    except Exception:
        return False
    return err < atol


def chunking_is_exact(model, chunk: int = 8) -> bool:
    """Does attention in query chunks (:func:`mlxpost.batching.forward`) cut something and give the same logits?"""
    return chunking_problem(model, chunk) is None


def chunking_problem(model, chunk: int = 8) -> str | None:
    """Why this model cannot run attention in query chunks, or None when it can.

    A random row of ``3 * chunk`` positions goes through the model whole and
    with attention in chunks (:func:`mlxpost.kernels.query_chunks`),
    unpacked and as two packed sequences. A model whose attention lets a
    position see later ones while still passing a mask (a bidirectional span
    of the prompt, say) fails and is run whole; so would anything else that
    changes its logits; so does one whose attention never reaches
    ``mx.fast.scaled_dot_product_attention`` with a causal-shaped mask
    (nothing would be cut, and batch layouts would count a saving that does
    not happen).
    """
    from . import kernels

    L = 3 * chunk
    x = mx.array(_probe_tokens(model, np.random.default_rng(1), L)[None])
    segments = mx.array((np.arange(L) >= L // 2 + 1).astype(np.int32)[None])
    cut = []
    real = kernels._chunked
    kernels._chunked = lambda *a, **k: cut.append(1) or real(*a, **k)  # counts the attention calls cut
    try:
        err, exact_dtype = 0.0, True
        for seg in (None, segments):
            try:
                whole = forward(model, x, seg, chunk=0)
            except Exception:
                if seg is None:
                    raise
                break  # packed rows fail whole too: packing is this model's problem (padded rows are used)
            try:
                parts = forward(model, x, seg, chunk=chunk)
            except Exception as e:  # an attention call this cannot cut: run it whole
                return f"its attention cannot run in query chunks ({type(e).__name__}: {e})"
            exact_dtype = exact_dtype and whole.dtype == mx.float32
            whole, parts = whole.astype(mx.float32), parts.astype(mx.float32)
            err = max(err, (mx.linalg.norm(whole - parts) / mx.linalg.norm(whole)).item())
    finally:
        kernels._chunked = real
    if not cut:
        return "its attention does not go through mx.fast.scaled_dot_product_attention with a causal mask"
    # The same operations on differently shaped pieces differ by rounding only;
    # a lost key changes the logits at order 1.
    if err > (1e-5 if exact_dtype else 1e-2):
        return f"its logits with attention in query chunks differ from whole rows (relative error {err:.1e})"
    return None


def resolve_attention_chunk(setting: int, model, warn=None) -> int | None:
    """``train.attention_chunk``: -1 (auto) chunks on MLX's CPU backend only, where it is measured faster.

    ``warn``: called when an explicit length cannot be used.
    """
    if setting == 0:
        return None
    chunk = setting if setting > 0 else (DEFAULT_ATTENTION_CHUNK if mx.default_device() == mx.cpu else None)
    if chunk is None:
        return None
    problem = chunking_problem(model)
    if problem is not None:
        if setting > 0 and warn is not None:
            warn(f"train.attention_chunk={setting}: this model cannot run in query chunks: {problem}; "
                 "running whole rows")
        return None
    return chunk


def prompt_sharing_problem(model, split) -> str | None:
    """Why pairs cannot share their prompt on this model, or None when they can.

    Two random pairs (a common prompt, replies of different lengths) go
    through the model in a shared-prompt batch, whole and in query chunks,
    and as ordinary packed sequences; the hidden states that score each
    trained token must agree (hidden states, not log-probs: a random model's
    log-probs hardly depend on the context, so they would hide a misplaced
    position). Models whose blocks do not rotate keys and queries with a
    ``rope`` module the way mlx-lm's do (taking one offset per batch
    element), or that mix positions in other ways, fail and keep the
    ordinary layout.
    """
    if split is None:
        return "the model's output layer could not be split off (entries need the head split)"
    from .batching import PairSource
    from .data import PairExample

    rng = np.random.default_rng(2)
    pairs = []
    for n_prompt, n_c, n_r in ((9, 5, 8), (6, 7, 3)):
        prompt = _probe_tokens(model, rng, n_prompt)
        sides = []
        for n in (n_c, n_r):
            tokens = np.concatenate([prompt, _probe_tokens(model, rng, n)])
            sides.append(Example(tokens, np.arange(len(tokens)) >= n_prompt))
        pairs.append(PairExample(*sides))

    was_training = model.training
    model.eval()  # no dropout: both layouts must see the same weights
    try:
        if not rope_owners(model):
            return "no RoPE module found in its blocks"
        states, grads = [], []
        saved = attention_chunk(model)
        for share, chunk in ((False, None), (True, None), (True, 4)):
            src = PairSource(pairs, mode="pack", batch_size=2, max_len=32, select_bucket=16, share_prompt=share,
                             shuffle=False)
            b = src.build_pairs([0, 1], shared=share)
            set_attention_chunk(model, chunk)
            try:
                # The states, and the gradient of their sum (the same sum in both layouts) with respect to
                # the trainable weights: the backward pass through per-position RoPE must agree too.
                def summed(m):
                    h = scored_states(m, split, b)
                    return h.astype(mx.float32).sum(), h

                (_, h), g = nn.value_and_grad(model, summed)(model)  # one pass gives the states and the gradient
                states.append(h)
                grads.append(mx.concatenate([x.reshape(-1).astype(mx.float32) for _, x in tree_flatten(g)]))
            finally:
                set_attention_chunk(model, saved)
        exact_dtype = all(s.dtype == mx.float32 for s in states)

        def rel(xs):
            want = xs[0].astype(mx.float32)
            return max((mx.linalg.norm(x.astype(mx.float32) - want) / mx.linalg.norm(want)).item() for x in xs[1:])

        err = rel(states)
        grad_err = rel(grads) if grads[0].size else 0.0
    except Exception as e:
        return f"the probe failed to run its blocks with per-position RoPE ({type(e).__name__}: {e})"
    finally:
        if was_training:
            model.train()
    # The same operations on differently laid out rows differ by rounding only;
    # a misplaced position changes the states at order 1.
    if err > (1e-5 if exact_dtype else 1e-2):
        return f"its hidden states with a shared prompt differ from separate sequences (relative error {err:.1e})"
    if grad_err > (1e-4 if exact_dtype else 5e-2):
        return f"its gradients with a shared prompt differ from separate sequences (relative error {grad_err:.1e})"
    return None


def scored_states(model, split, b) -> mx.array:
    """Hidden states (before the head) of a pair batch's trained entries, by sequence and position.

    The same rows, in the same order, whether or not the pairs share their
    prompt (the prompt's last position once per side); padding entries left out.
    """
    h = forward(model, b.inputs, b.segments, body=split.body, branches=b.branches, positions=b.positions)
    index, valid = np.array(b.select[0]), np.array(b.select[1]) > 0
    seq = np.array(b.extra["seq"]) if b.entries else np.array(b.extra["seq"]).reshape(-1)[index]
    order = np.argsort(np.where(valid, seq, 1 << 20), kind="stable")[: int(valid.sum())]
    return h.reshape(-1, h.shape[-1])[mx.array(index[order])]


def resolve_share_prompt(setting: str, model, batching: str, split, grad_checkpoint: bool) -> tuple[bool, str]:
    """``preference.share_prompt``: whether pair batches put each prompt through the model once, and why not.

    ``auto`` shares when the batches are packed, gradient checkpointing is
    off and the model passes :func:`prompt_sharing_problem`; ``on`` requires it.
    """
    if setting == "off":
        return False, "off (preference.share_prompt=off)"
    reason = None
    if batching != "pack":
        reason = "pair batches are padded, not packed"
    elif grad_checkpoint:
        reason = "gradient checkpointing is on"
    else:
        reason = prompt_sharing_problem(model, split)
    if reason is None:
        return True, "once per pair (both replies after it) in the batches where that costs less"
    if setting == "on":
        raise MlxpostError(f"preference.share_prompt=on: {reason}")
    return False, f"repeated on each side ({reason})"


def choose_batching(mode: str, model, pairs: bool = False) -> str:
    """Resolve ``data.batching``.

    ``auto`` packs on a GPU (Metal, CUDA) and pads (length-sorted batches) on
    MLX's CPU backend. On the CPU the softmax of attention is costly (MLX's
    CPU ``exp`` is scalar) and a packed row pays attention over its whole
    length, while length-sorted padding wastes little; measured with
    ``benchmarks/bench_sft.py``, padding was the faster of the two there.

    Preference ``pairs`` pack on every backend: their rows are at most twice
    the longest sequence (:func:`mlxpost.batching.pair_layout`), and padding
    a pair's two replies, which differ in length, to the longer wastes about
    a quarter of the positions (measured with ``benchmarks/bench_dpo.py``).

    Packing also needs the model to isolate packed examples: that is checked
    on the model itself (:func:`packing_is_exact`).
    """
    if mode == "pad" or (mode == "auto" and not pairs and mx.default_device() == mx.cpu):
        return "pad"
    ok = packing_is_exact(model)
    if mode == "pack" and not ok:
        raise MlxpostError("data.batching=pack: this model architecture does not isolate packed examples "
                           "(its attention mask is not built from the cache); use data.batching=pad")
    return "pack" if ok else "pad"


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def default_data_dir(kind: str = "sft") -> Path:
    """The bundled example data of a kind of method (``sft`` rows or preference ``pairs``)."""
    if kind == "pairs":
        from .assets.pref_behaviour import DATASET_DIR
    elif kind == "prompts":
        from .assets import ARITH_TASKS_DIR as DATASET_DIR
    else:
        from .assets.behaviour import DATASET_DIR

    return DATASET_DIR


def load_data(cfg: RunConfig, tokenizer, rank: int = 0, world: int = 1, kind: str = "sft"):
    """Tokenized train and validation examples (or pairs) of this rank, and data statistics."""
    d = cfg.data
    files = resolve_data_files(d.path or default_data_dir(kind), d.valid)
    renderer = Renderer(tokenizer, chat_template=d.chat_template, add_eos=d.add_eos)
    tokenize = tokenize_pairs_file if kind == "pairs" else tokenize_file
    # Every rank validates every row (errors are the same everywhere) but
    # renders only its own share.
    shard = (rank, world) if world > 1 else None
    opts = dict(max_seq_len=d.max_seq_len, overflow=d.overflow, skip_bad_rows=d.skip_bad_rows, shard=shard)
    train, tstats = tokenize(files["train"], renderer, limit=d.max_examples, **opts)
    valid, vstats = [], None
    has_valid = False  # globally: every rank reaches the same answer
    if "valid" in files:
        has_valid = True
        valid, vstats = tokenize(files["valid"], renderer, **opts)
    elif d.valid_fraction > 0 and tstats.valid_rows >= 20:
        # Decided on the global row count, so every rank agrees.
        train, valid = split_examples(train, d.valid_fraction, cfg.train.seed, total=tstats.valid_rows)
        has_valid = True
    stats = {"files": {k: str(v) for k, v in files.items()}, "train": tstats.summary(),
             "valid": vstats.summary() if vstats else None, "train_examples": len(train),
             "valid_examples": len(valid)}
    return train, (valid if has_valid else None), stats, tstats


def _warn_data(stats: DataStats, cfg: RunConfig, rep) -> None:
    if stats.bad_rows:
        rep.warn(f"skipped {stats.bad_rows} bad rows (data.skip_bad_rows)")
    if stats.truncated:
        rep.warn(f"{stats.truncated} examples were longer than data.max_seq_len={cfg.data.max_seq_len} "
                 "tokens and were truncated (data.overflow=drop drops them instead)")
    if stats.dropped_too_long:
        rep.warn(f"dropped {stats.dropped_too_long} examples longer than data.max_seq_len={cfg.data.max_seq_len}")
    if stats.dropped_no_targets:
        rep.warn(f"dropped {stats.dropped_no_targets} examples with no trained tokens left (for pairs: the "
                 "prompt filled data.max_seq_len)")
    if stats.dropped_identical:
        rep.warn(f"dropped {stats.dropped_identical} pairs whose chosen and rejected answers differ only beyond "
                 f"data.max_seq_len={cfg.data.max_seq_len} tokens (raise it to keep them)")
    if stats.prefix_fallback:
        rep.warn(f"{stats.prefix_fallback} conversations: the chat template rewrites earlier turns, so only "
                 "their final assistant turn is trained on")


# ---------------------------------------------------------------------------
# Preparation shared by every method
# ---------------------------------------------------------------------------


def _from_section(cfg: RunConfig):
    """The config section holding ``from_run`` for this method (None: the method has none)."""
    return {"pairs": cfg.preference, "prompts": cfg.grpo}.get(get_method(cfg.method).data)


def resolve_from_run(cfg: RunConfig) -> None:
    """``--from`` (``preference.from_run`` / ``grpo.from_run``): train on top of an earlier run.

    The run's adapter is merged into the base when the model is loaded
    (:func:`prepare`); here the base model, dtype and quantization default
    to the ones that run used, and a different base is refused.
    """
    sec = _from_section(cfg)
    src = sec.from_run if sec is not None else None
    if not src:
        return
    d = Path(src).expanduser()
    if not d.is_dir():
        raise MlxpostError(f"--from {src}: not a directory (give an SFT run directory or an adapter directory)")
    meta = read_adapter_config(d).get("mlxpost", {})
    base = meta.get("base_model")
    if cfg.model.path == "default" and base:
        cfg.model.path = base
        if cfg.model.quantize is None:
            cfg.model.quantize = meta.get("quantize")
            cfg.model.quantize_group_size = meta.get("quantize_group_size") or cfg.model.quantize_group_size
        if cfg.model.dtype == "auto" and meta.get("dtype"):
            cfg.model.dtype = meta["dtype"]
    elif base and cfg.model.path != base and Path(cfg.model.path).expanduser().resolve() != Path(base):
        raise MlxpostError(f"--from {src}: that adapter was trained on {base}, not on {cfg.model.path} "
                           "(leave --model out to use the run's base model)")
    sec.from_run = str(d.resolve())


def merge_from_run(model, cfg: RunConfig, rep) -> dict:
    """Merge the ``--from`` run's adapter (and whatever it was trained on top of) into the base in memory."""
    from .model import load_adapter_stack
    from .reference import file_hash

    d = Path(_from_section(cfg).from_run)
    load_adapter_stack(model, d)
    fuse_adapters(model)  # quantized layers come back dequantized ...
    if cfg.model.quantize:  # ... and are quantized again, so memory stays that of a quantized base
        quantize_blocks(model, cfg.model.quantize, cfg.model.quantize_group_size)
    mx.eval(model.parameters())
    rep.info(f"merged the adapter of {d} into the base: it is the starting policy and the reference")
    return {"from_adapter": str(d), "from_adapter_sha256": file_hash(d / "adapters.safetensors")}


def prepare(cfg: RunConfig, rep, rank: int = 0, world_size: int = 1, cache=None) -> Prepared:
    """``cache``: reuse across runs in one process (see :class:`mlxpost.sweep.RunCache`): an object
    with ``model(model_cfg, load) -> LoadedModel`` (a clean base model) and
    ``data(cfg, loaded, kind, rank, world_size, read) -> load_data's result``."""
    mx.random.seed(cfg.train.seed)
    method = get_method(cfg.method)
    m = cfg.model

    def load() -> LoadedModel:
        return load_model(m.path, dtype=m.dtype, quantize=m.quantize, group_size=m.quantize_group_size,
                          revision=m.revision, trust_remote_code=m.trust_remote_code, log=rep.info)

    with rep.status(f"loading model {m.path}"):
        loaded = cache.model(m, load) if cache is not None else load()
    # Building the model draws random initial weights (then overwritten); a model from a cache draws
    # none. Seeding again makes the adapters' initial values depend on the seed alone.
    mx.random.seed(cfg.train.seed)
    model = loaded.model
    from_info = {}
    sec = _from_section(cfg)
    if sec is not None and sec.from_run:
        with rep.status(f"merging the adapter of {sec.from_run}"):
            from_info = merge_from_run(model, cfg, rep)

    lcfg = cfg.lora
    if lcfg.init:
        from .export import load_init_adapter  # mlx-lm's layout or PEFT's

        init_cfg = load_init_adapter(model, lcfg.init, dropout=lcfg.dropout)
        lp = init_cfg["lora_parameters"]
        keys, rank_, scale = lp["keys"], lp["rank"], lp["scale"]
        num_layers, dora = init_cfg["num_layers"], init_cfg.get("fine_tune_type") == "dora"
        rep.info(f"starting from adapter {lcfg.init}")
    else:
        keys = resolve_targets(model, lcfg.targets)
        n_layers = len(model.layers)
        num_layers = n_layers if lcfg.num_layers in (-1, 0) else lcfg.num_layers
        rank_, scale, dora = lcfg.rank, lcfg.resolved_scale(), lcfg.type == "dora"
        attach_adapters(model, rank=rank_, scale=scale, dropout=lcfg.dropout, keys=keys, num_layers=num_layers,
                        dora=dora)
    model.eval()  # the probes below must not see dropout; the loop switches to train mode
    trainable = trainable_count(model)
    local = Path(m.path).expanduser()
    base = str(local.resolve()) if local.exists() else m.path  # absolute, so it works from anywhere
    extra = {"base_model": base, "model_dir": str(Path(loaded.path).resolve()), "method": cfg.method, "alpha": scale * rank_,
             "quantize": m.quantize, "quantize_group_size": m.quantize_group_size if m.quantize else None,
             "base_quantized": is_quantized(model), "dtype": m.dtype, **from_info}
    acfg = adapter_config(rank=rank_, scale=scale, dropout=lcfg.dropout, keys=keys, num_layers=num_layers,
                          dora=dora, extra=extra)

    split = HeadSplit.find(model)
    set_attention_chunk(model, None)  # the probes below run whole rows
    chunk = resolve_attention_chunk(cfg.train.attention_chunk, model, warn=rep.warn)
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    if method.data == "prompts":
        set_attention_chunk(model, chunk)
        return _prepare_rl(cfg, loaded, split, pad_id, acfg, trainable, rep)

    with rep.status("reading and tokenizing data"):
        def read():
            return load_data(cfg, loaded.tokenizer, rank, world_size, kind=method.data)

        train, valid, stats, tstats = (cache.data(cfg, loaded, method.data, rank, world_size, read)
                                       if cache is not None else read())
    _warn_data(tstats, cfg, rep)
    if not train:
        raise MlxpostError("no training examples left after reading the data")

    # Pairs: chosen and rejected sides of a batch in one forward pass, packed or padded.
    batching = choose_batching(cfg.data.batching, model, pairs=method.data == "pairs")
    set_attention_chunk(model, chunk)
    if cfg.data.batching == "auto" and batching == "pad" and (method.data == "pairs" or mx.default_device() != mx.cpu):
        rep.warn("this model does not isolate packed examples; using padded batches")

    span = attention_span(model) if method.data == "pairs" else None  # weighs wide pair rows' attention

    def source(examples: list, shuffle: bool) -> BatchSource:
        # Each source sizes its own rows: long validation chats must not widen
        # every training row (that padding costs as much as real tokens).
        B, L = cfg.train.batch_size, pack_length(cfg, examples) if examples else cfg.data.max_seq_len
        bucket = max(64, (B * L // 16) // 64 * 64) if batching == "pack" and method.data != "pairs" else 64
        kw = dict(mode=batching, batch_size=B, max_len=L, pad_id=pad_id, seed=cfg.train.seed, shuffle=shuffle,
                  select_bucket=bucket if split else None)
        if method.data == "pairs":
            return PairSource(examples, span=span, share_prompt=share, chunk=chunk, **kw)
        return BatchSource(examples, **kw)

    share, share_note = False, None
    if method.data == "pairs":
        share, share_note = resolve_share_prompt(cfg.preference.share_prompt, model, batching, split,
                                                 cfg.train.grad_checkpoint)

    train_src = source(train, shuffle=True)
    valid_src = source(valid, shuffle=False) if valid is not None else None
    prep = Prepared(cfg, loaded, train_src, valid_src, stats, split, acfg, trainable, batching)
    prep.prompt = share_note
    if method.data == "pairs":
        prep.shared_batches = n, total = train_src.shared_batches()
        if share:
            prep.prompt = (f"once per pair (both replies after it) in {n} of {total} batches an epoch "
                           "(where that costs less)")
    if method.reference and cfg.preference.precompute_ref:
        precompute_reference(prep, rep)
    elif method.reference:
        from .trunk import SharedTrunk

        prep.trunk = SharedTrunk.find(model)
    return prep


def _default_micro_batch(n: int, cap: int = 16) -> int:
    """Completions per forward pass when grpo.micro_batch is not set: all of them, at most ``cap``
    (the largest divisor of ``n`` not above it), so that big rollouts do not hold every
    completion's activations at once."""
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _prepare_rl(cfg: RunConfig, loaded: LoadedModel, split, pad_id: int, acfg: dict, trainable: int,
                rep) -> Prepared:
    """Online RL: prompts, rewards and verifier, and the rollout source."""
    from .rewards import RewardSet, parse_reward_option
    from .rl import RLSettings, RolloutSource, load_prompts
    from .rollout import Sampling

    g, d = cfg.grpo, cfg.data
    files = resolve_data_files(d.path or default_data_dir("prompts"), d.valid)
    renderer = Renderer(loaded.tokenizer, chat_template=d.chat_template, add_eos=d.add_eos)
    with rep.status("reading prompts"):
        train, tstats = load_prompts(files["train"], renderer, max_prompt_len=g.max_prompt_len,
                                     skip_bad_rows=d.skip_bad_rows, limit=d.max_examples)
        valid, vstats = ([], None)
        if "valid" in files:
            valid, vstats = load_prompts(files["valid"], renderer, max_prompt_len=g.max_prompt_len,
                                         skip_bad_rows=d.skip_bad_rows)
        elif d.valid_fraction > 0 and len(train) >= 20:
            rng = np.random.default_rng(cfg.train.seed)
            order = rng.permutation(len(train))
            k = max(1, int(round(len(train) * d.valid_fraction)))
            valid = [train[i] for i in sorted(order[:k])]
            train = [train[i] for i in sorted(order[k:])]
    if tstats.dropped_too_long:
        rep.warn(f"{tstats.dropped_too_long} prompts longer than grpo.max_prompt_len={g.max_prompt_len} tokens "
                 "were dropped")
    rewards = RewardSet([parse_reward_option(r) for r in g.rewards]) if g.rewards else None
    verifier = None
    if cfg.method == "rlvr":
        from .verifiers import StepVerifier

        verifier = StepVerifier(cfg.rlvr.verifier)
    n = g.group_size * g.prompts_per_step
    settings = RLSettings(group_size=g.group_size, prompts_per_step=g.prompts_per_step,
                          micro_batch=g.micro_batch or _default_micro_batch(n), num_iterations=g.num_iterations,
                          scale=g.scale_rewards,
                          mask_truncated=g.mask_truncated, step_weight=cfg.rlvr.step_weight,
                          final_weight=cfg.rlvr.final_weight,
                          sampling=Sampling(temperature=g.temperature, top_p=g.top_p,
                                            max_new_tokens=g.max_new_tokens, stop=tuple(g.stop)))
    src = RolloutSource(loaded.model, loaded.tokenizer, train, settings, rewards=rewards, verifier=verifier,
                        split=split, seed=cfg.train.seed, pad_id=pad_id)
    # The micro-batches of one rollout make one optimizer step.
    cfg.train.grad_accum = src.micro_per_step
    stats = {"files": {k: str(v) for k, v in files.items()}, "train": tstats.summary(),
             "valid": vstats.summary() if vstats else None, "train_examples": len(train),
             "valid_examples": len(valid)}
    rl = {"eval_rows": valid[: g.eval_prompts], "rewards": rewards, "verifier": verifier,
          "settings": settings}
    return Prepared(cfg, loaded, src, None, stats, split, acfg, trainable, "pad", rl)


def evaluate_rl(prep: Prepared, rep, when: str) -> dict | None:
    """Greedy answers to the validation prompts, scored (reward, final and step accuracy)."""
    from .rl import evaluate

    rows = prep.rl.get("eval_rows")
    if not rows:
        return None
    with rep.status(f"answering {len(rows)} validation prompts ({when})"):
        t0 = time.time()
        ev = evaluate(prep.loaded.model, prep.loaded.tokenizer, rows, prep.rl["settings"],
                      rewards=prep.rl["rewards"], verifier=prep.rl["verifier"])
        ev["seconds"] = round(time.time() - t0, 1)
    shown = ", ".join(f"{k} {ev[k]:.3f}" for k in ("reward", "final_acc", "step_acc") if k in ev)
    rep.info(f"validation ({when}): {shown}")
    return ev


def precompute_reference(prep: Prepared, rep) -> None:
    """``--precompute-ref``: reference log-probs of every pair once, from the cache when it fits."""
    from . import reference

    cfg = prep.cfg
    data_path = Path(cfg.data.path) if cfg.data.path else default_data_dir("pairs")
    directory = Path(cfg.preference.ref_cache_dir) if cfg.preference.ref_cache_dir else \
        reference.default_cache_dir(data_path)
    if not reference.writable(directory):
        fallback = Path.home() / ".cache" / "mlxpost" / "ref"
        rep.warn(f"{directory} is not writable; caching reference log-probs in {fallback}")
        directory = fallback
    adapter_hash = prep.adapter_cfg["mlxpost"].get("from_adapter_sha256")
    for name, src in (("train", prep.train), ("valid", prep.valid)):
        if src is None or not src.examples:
            continue
        key = reference.fingerprint(prep.loaded.model, src.examples, adapter_hash)
        path = reference.cache_path(directory, key)
        ref = reference.load(path, src.examples) if path.exists() else None
        if ref is not None:
            rep.info(f"reference log-probs ({name}): from the cache {path}")
        else:
            t0 = time.time()
            with rep.status(f"computing reference log-probs of {len(src.examples)} {name} pairs"):
                ref = reference.compute(prep.loaded.model, src, prep.split)
            reference.save(path, ref, {"model": cfg.model.path, "data": str(data_path), "split": name})
            dt = time.time() - t0
            prep.timings["precompute_ref_seconds"] = round(prep.timings.get("precompute_ref_seconds", 0.0) + dt, 2)
            rep.info(f"reference log-probs ({name}): computed in {dt:.1f}s, cached in {path}")
        src.set_reference(ref)


def pack_length(cfg: RunConfig, examples: list[Example]) -> int:
    """Tokens per packed row: ``data.pack_len``, else the longest example rounded up to 32.

    Attention costs O(row length^2) whatever the mask, so rows no longer than
    the longest example keep packing from paying for attention it discards
    (this matters most on MLX's CPU backend).
    """
    if cfg.data.pack_len:
        longest = max(len(e) for e in examples)
        if cfg.data.pack_len < longest:
            raise MlxpostError(f"data.pack_len={cfg.data.pack_len} is shorter than the longest example ({longest} "
                               "tokens); raise it or lower data.max_seq_len")
        return cfg.data.pack_len
    longest = max(len(e) for e in examples)
    return min(cfg.data.max_seq_len, -(-longest // 32) * 32)


def total_steps(cfg: RunConfig, source: BatchSource) -> int:
    if cfg.train.steps:
        return cfg.train.steps
    return steps_for_epochs(source, cfg.train.epochs, cfg.train.grad_accum)


# ---------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------


def sample_prompts(cfg: RunConfig) -> list[str]:
    if cfg.sample.prompts:
        return [str(p) for p in cfg.sample.prompts]
    if cfg.data.path is None:
        if get_method(cfg.method).data == "prompts":
            return []  # online RL answers its validation prompts before and after instead
        if get_method(cfg.method).data == "pairs":
            from .assets.pref_behaviour import PREF_SAMPLE_PROMPTS

            return list(PREF_SAMPLE_PROMPTS)
        from .assets.behaviour import SAMPLE_PROMPTS

        return list(SAMPLE_PROMPTS)
    return []


def behaviour_scores(cfg: RunConfig, prompts: list[str], replies: list[str]):
    """How the bundled data's behaviour shows in sampled replies (bundled data only)."""
    if get_method(cfg.method).data == "pairs":
        from .assets.pref_behaviour import pref_behaviour_scores

        return pref_behaviour_scores(replies, prompts)
    from .assets.behaviour import json_answer_rate

    return json_answer_rate(replies)


def run_samples(model, tokenizer, prompts: list[str], cfg: RunConfig) -> list[str]:
    """Replies to ``prompts`` (chat template applied), all decoded together in one KV-cached batch.

    Greedy by default (``sample.temperature``); one batch instead of one
    prompt after another makes the before/after samples several times faster.
    """
    from .generate import prompt_ids
    from .rollout import Sampling, sample_groups

    if not prompts:
        return []
    mx.random.seed(cfg.train.seed)
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    pad = getattr(tokenizer, "pad_token_id", None)
    try:
        out = sample_groups(model, tokenizer, ids, 1,
                            Sampling(temperature=cfg.sample.temperature, max_new_tokens=cfg.sample.max_tokens),
                            pad_id=pad if pad is not None else 0)
        return [t.strip() for t in out.texts]
    except Exception:  # an architecture the batched sampler cannot drive: mlx-lm's generate, one by one
        from .generate import generate_text

        return [generate_text(model, tokenizer, p, max_tokens=cfg.sample.max_tokens,
                              temperature=cfg.sample.temperature) for p in prompts]


# ---------------------------------------------------------------------------
# A whole run
# ---------------------------------------------------------------------------


def _checkpoint_step(ckpt: Path | None) -> int:
    return json.loads((ckpt / "trainer_state.json").read_text())["step"] if ckpt else -1


def _resume_point(rundir: RunDir, steps: int) -> Path | None:
    """The checkpoint to resume from, or an error saying why the run cannot continue."""
    ckpt = rundir.latest_checkpoint()
    if ckpt is None:
        return None
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if state.get("stopped") == "early_stopping":
        raise MlxpostError(f"{rundir.path} stopped early at step {state['step']} (validation loss no longer "
                           "improved); its best adapter is in best/")
    if state["step"] >= steps:
        raise MlxpostError(f"{rundir.path} already finished {state['step']} of {steps} steps "
                           "(raise train.steps with --set train.steps=N to train longer; the "
                           "learning-rate schedule is then stretched over the new length)")
    return ckpt


def resume_config(run_dir: Path, sets: list[str]) -> RunConfig:
    f = run_dir / "config.yaml"
    if not f.exists():
        raise MlxpostError(f"{run_dir}: no config.yaml (not a run directory)")
    cfg = load_recipe(f)
    for item in sets:
        from .config import parse_set

        key, value = parse_set(item)
        if key not in RESUMABLE_KEYS:
            raise ConfigError(f"--set {item}: {key} cannot change when resuming (only {', '.join(RESUMABLE_KEYS)})")
        set_value(cfg, key, value, f"--set {item}", raw=item.split("=", 1)[1])
    validate(cfg)
    return cfg


def run(cfg: RunConfig, objective_for: Callable[[Prepared], Objective] | None = None, *, reporter,
        resume: Path | None = None, cache=None) -> tuple[Path, TrainResult]:
    """Run one training job end to end; returns the run directory and the result.

    ``objective_for``: builds the objective from the prepared run (default:
    the method's own, from :data:`mlxpost.methods.METHODS`). ``cache``: see :func:`prepare`.
    """
    method: Method = get_method(cfg.method)
    objective_for = objective_for or method.objective
    if resume is None:
        resolve_from_run(cfg)
    world = _world()
    rank = world.rank() if world else 0
    size = world.size() if world else 1
    rep = reporter

    if world is not None and method.data == "prompts":
        raise MlxpostError(f"{cfg.method} runs in one process for now (distributed rollouts are not supported)")
    if world is not None and resume is None and cfg.output.name is None:
        raise MlxpostError("distributed runs need an explicit run name (--name) so every rank writes the same place")

    def make_run_dir() -> Path:
        if resume is not None:
            return Path(resume)
        if rank == 0:
            return new_run_dir(cfg.output.dir, cfg.output.name, cfg.method, cfg.output.overwrite)
        return Path(cfg.output.dir) / cfg.output.name

    run_path = agree(world, make_run_dir, "creating the run directory")
    rundir = RunDir(run_path, writer=rank == 0)
    rundir.write_text("config.yaml", dump_yaml(cfg))
    rep.info(f"run directory: {run_path}")

    t_start = time.time()
    prep = agree(world, lambda: prepare(cfg, rep, rank, size, cache=cache), "loading the model or the data")
    model, tok = prep.loaded.model, prep.loaded.tokenizer
    if world is not None:
        # Every rank drops batches beyond the smallest share's epoch, so that
        # data positions agree and rank 0's checkpoint describes every rank.
        n = prep.train.batches_per_epoch()
        n_min = int(mx.distributed.all_gather(mx.array([n]), group=world, stream=mx.cpu).min().item())
        prep.train.limit_epoch(n_min)
    steps = total_steps(cfg, prep.train)
    ckpt = None
    if resume is not None:
        ckpt = agree(world, lambda: _resume_point(rundir, steps), "reading the checkpoint")
        if ckpt is None:
            rep.warn(f"{run_path}: no checkpoint yet; starting this run from the beginning")
        if world is not None:
            mine = _checkpoint_step(ckpt)
            steps_seen = mx.distributed.all_gather(mx.array([mine]), group=world, stream=mx.cpu).tolist()
            if len(set(steps_seen)) > 1:
                raise MlxpostError(
                    f"the processes see different checkpoints in {run_path} (steps {steps_seen}, -1 = none): "
                    "resuming a run on several machines needs its run directory on every machine "
                    "(a shared filesystem, or copy it to each)")

    info = [("model", cfg.model.path), ("model dir", str(prep.loaded.path)),
            ("trainable params", f"{prep.trainable:,}"), ("adapter", f"{prep.adapter_cfg['fine_tune_type']} "
                                                                     f"r={prep.adapter_cfg['lora_parameters']['rank']}"),
            ("train examples", prep.stats["train_examples"] * size), ("valid examples", prep.stats["valid_examples"] * size),
            ("batching", prep.batching), ("steps", steps), ("processes", size),
            ("logits", "trained positions only" if prep.split else "all positions")]
    chunk = attention_chunk(prep.loaded.model)
    info.append(("attention", f"in query chunks of ~{chunk} positions (at most 8 a row)" if chunk
                 else "whole rows"))
    if method.data == "pairs":
        info[4:6] = [("train pairs", prep.stats["train_examples"] * size),
                     ("valid pairs", prep.stats["valid_examples"] * size)]
        info[6] = ("batching", f"chosen+rejected in one {'packed' if prep.batching == 'pack' else 'padded'} batch")
        ref = "none (reference-free)"
        if method.reference:
            ref = "precomputed (cached)" if cfg.preference.precompute_ref else "same weights, adapters off"
            if prep.trunk is not None:
                ref += f" (blocks 0-{prep.trunk.k - 1} shared with the policy pass)"
        info.append(("reference", ref))
        if prep.prompt:
            info.append(("prompt", prep.prompt))
        if cfg.preference.from_run:
            info.append(("from", cfg.preference.from_run))
    if method.data == "prompts":
        g = cfg.grpo
        info[4:7] = [("train prompts", prep.stats["train_examples"]), ("valid prompts", prep.stats["valid_examples"]),
                     ("rollout", f"{g.prompts_per_step} prompts x {g.group_size} completions, "
                                 f"<= {g.max_new_tokens} new tokens, T={g.temperature}, top-p {g.top_p}")]
        info.append(("rewards", ", ".join(g.rewards) or "none"))
        if cfg.method == "rlvr":
            info.append(("verifier", cfg.rlvr.verifier))
        if g.from_run:
            info.append(("from", g.from_run))
        info.append(("objective", f"clip [{1 - g.epsilon_low:.2f}, {1 + g.epsilon_high:.2f}], norm {g.loss_norm}, "
                                  f"scale {g.scale_rewards}, beta {g.beta}, {g.num_iterations} step(s)/rollout"))
    rep.table("setup", info)
    rundir.write_json("data_stats.json", prep.stats)
    rundir.log({"kind": "setup", "steps": steps, "trainable_params": prep.trainable, "batching": prep.batching,
                "world_size": size, "data": prep.stats, "attention_chunk": chunk,
                **({"reference_shares_blocks": prep.trunk.k} if prep.trunk is not None else {}),
                **({"prompt_shared": prep.train.share_prompt,
                    "prompt_shared_batches": list(prep.shared_batches)} if method.data == "pairs" else {})})

    prompts = sample_prompts(cfg)
    before = []
    if prompts and ckpt is None and rank == 0:
        with rep.status("sampling before training"):
            before = run_samples(model, tok, prompts, cfg)
        rundir.write_json("samples_before.json", before)

    rl_before = None
    if method.data == "prompts" and ckpt is None and rank == 0:
        rl_before = evaluate_rl(prep, rep, "before training")
        if rl_before is not None:
            rundir.write_json("rl_eval_before.json", rl_before)

    objective = objective_for(prep)
    trainer = Trainer(model, objective, cfg.train, total_steps=steps, run=rundir, reporter=rep,
                      adapter_cfg=prep.adapter_cfg, world=world)
    try:
        result = trainer.fit(prep.train, prep.valid, resume_from=ckpt)
    except NonFiniteError:
        rundir.write_json("summary.json", {"run_dir": str(run_path), "method": cfg.method, "stopped": "non_finite",
                                           "steps": trainer.step, "wall_seconds": round(time.time() - t_start, 1)})
        raise
    finally:
        rep.end()

    after = []
    if prompts and rank == 0:
        with rep.status("sampling after training"):
            after = run_samples(model, tok, prompts, cfg)
        prev = run_path / "samples_before.json"
        if not before and prev.exists():  # a resumed run sampled before training the first time
            before = json.loads(prev.read_text())
        rows = [{"prompt": p, **({"before": b} if before else {}), "after": a}
                for p, b, a in zip(prompts, before or [""] * len(prompts), after)]
        rundir.write_json("samples.json", rows)
        rep.samples(rows)

    summary = {
        "run_dir": str(run_path), "method": cfg.method, "stopped": result.stopped, "steps": result.steps,
        "final_train_loss": result.final_loss, "val_loss": result.val_loss, "best_val_loss": result.best_val_loss,
        "best_step": result.best_step, "tokens": result.tokens, "trained_tokens": result.trained_tokens,
        "train_seconds": round(result.train_seconds, 2),
        "tokens_per_s": result.tokens / max(result.train_seconds, 1e-9),
        "trained_tokens_per_s": result.trained_tokens / max(result.train_seconds, 1e-9),
        "peak_memory_gb": result.peak_memory_gb, "wall_seconds": round(time.time() - t_start, 1),
        **prep.timings,
    }
    last = next((h for h in reversed(result.history) if h.get("kind") == "train"), None)
    if method.data == "pairs" and last:
        summary["final_metrics"] = {k: v for k, v in last.items() if "/" in k or k in ("kl", "nll", "log_odds")}
    if result.val_metrics:
        summary["val_metrics"] = {k: v for k, v in result.val_metrics.items() if k != "eval_seconds"}
    if cfg.data.path is None and after:
        if before:
            summary["behaviour_before"] = behaviour_scores(cfg, prompts, before)
        summary["behaviour_after"] = behaviour_scores(cfg, prompts, after)
    if method.data == "prompts":
        last = next((h for h in reversed(result.history) if h.get("kind") == "train"), None) or {}
        keys = ("reward", "reward_std", "all_equal_groups", "kl", "clip_low", "clip_high", "adv_std",
                "completion_len", "completion_len_max", "truncated", "step_acc", "final_acc", "rollout_tok_s")
        summary["final_metrics"] = {k: v for k, v in last.items() if k in keys or k.startswith("reward/")}
        prev = run_path / "rl_eval_before.json"
        if rl_before is None and prev.exists():
            rl_before = json.loads(prev.read_text())
        rl_after = evaluate_rl(prep, rep, "after training") if rank == 0 else None
        if rl_before is not None:
            summary["eval_before"] = {k: v for k, v in rl_before.items() if k != "samples"}
        if rl_after is not None:
            summary["eval_after"] = {k: v for k, v in rl_after.items() if k != "samples"}
            rundir.write_json("rl_eval_after.json", rl_after)
        if trainer.monitor is not None and cfg.method == "rlvr":
            result.health = dict(result.health or {})
            result.health["quality_gate"] = trainer.monitor.gate(rl_after)
    if result.health is not None:
        summary["health"] = result.health
    rundir.write_json("summary.json", summary)
    skip = ("run_dir", "final_metrics", "val_metrics", "health", "eval_before", "eval_after")
    rows = [(k, v) for k, v in summary.items() if k not in skip]
    rows += [(f"val {k[4:]}", v) for k, v in (summary.get("val_metrics") or {}).items()
             if k[4:] in ("rewards/margins", "rewards/accuracies", "kl", "nll")]
    rep.table(f"summary: {run_path}", rows)
    if result.health is not None:
        report_health(result.health, rep)
    return run_path, result


def report_health(health: dict, rep) -> None:
    """The health checks' verdicts, one row each, with the first finding's reason."""
    rows = []
    for check, h in health.items():
        verdict = h["verdict"]
        if check == "quality_gate" and verdict in ("pass", "fail") and "step_acc" in h:
            verdict += (f" (val step accuracy {h['step_acc']:.3f} vs > {h['min_step_acc']}, final accuracy "
                        f"{h['final_acc']:.3f} vs > {h['min_final_acc']})")
        elif check == "quality_gate" and verdict in ("pass", "fail"):
            verdict += (f" (val margin {h['margin']:.3f} vs > {h['min_margin']}, accuracy {h['accuracy']:.3f} "
                        f"vs >= {h['min_accuracy']})")
        elif check == "quality_gate":
            verdict += f" ({h.get('reason', '')})"
        elif h.get("findings"):
            f = h["findings"][0]
            verdict += f" (step {f['step']}: {f['message'][:90]}...)"
        rows.append((check, verdict))
    rep.table("health checks", rows)
