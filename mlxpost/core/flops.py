"""Model FLOPs of a training step, and MFU against a measured matmul peak.

Why: tokens/s says little across models and machines; model FLOPs per second,
and their fraction of what this machine's matmuls can do (MFU, "model FLOPs
utilisation" as in the PaLM paper), say how much of the hardware a run uses.

The count, per token of a batch (only matrix products; norms, activations,
softmax and the optimizer are left out, as is usual):

* Every linear layer ``in -> out`` of the model (as found in the module tree,
  adapters included): forward ``2 * in * out``. A LoRA layer is its frozen
  base ``in -> out`` plus ``A: in -> r`` and ``B: r -> out``.
* Attention, per layer: scores ``Q K^T`` and values ``P V`` are
  ``2 * 2 * d * c`` for a query attending to ``c`` keys (``d`` = heads x head
  dim of the queries). ``c`` is counted causally: a row of ``l`` positions has
  ``l (l + 1) / 2`` (query, key) pairs, taken from the step's mean row length.
* The output layer (hidden ``D`` -> vocabulary ``V``): ``2 * D * V`` per
  position that goes through it. With a head split
  (:mod:`mlxpost.core.logprobs`) that is only the trained positions.

Backward, per linear: the input gradient ``dx = dy W^T`` costs 1x its
forward, and only where something below it is trained; the weight gradient
``dW = x^T dy`` costs 1x forward and only for a trained weight. So a frozen
linear above the lowest trained block costs 2x forward in all, a trained one
(full fine-tuning, or LoRA's ``A`` and ``B``) 3x, and blocks below the lowest
trained block (``lora.num_layers``) no backward at all. Attention products
have two activation operands: 2x forward in the backward pass where the
block is on the gradient path. In the lowest trained block every linear's
input gradient is counted (an over-count of at most one block's q/k/v input
gradients). Full fine-tuning then gives about ``6 N`` per token (``N`` =
matmul parameters), the usual ``6 N T`` rule.

Gradient checkpointing recomputes the forward of every block on the gradient
path: those FLOPs are "hardware FLOPs" and do not count for MFU, which uses
model FLOPs only.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn
from mlx.utils import tree_flatten

from ..model.lora import LoRALinear, _dims


@dataclass(frozen=True)
class Linear:
    """One matrix product of the model, per token: ``n_in -> n_out``.

    ``block``: the index of the transformer block it is in (None outside the
    blocks, e.g. the output layer). ``trained``: whether its weight gets a
    gradient. ``head``: the output layer (applied only to the positions that
    go through it).
    """

    name: str
    n_in: int
    n_out: int
    block: int | None
    trained: bool
    head: bool = False

    @property
    def forward(self) -> int:
        """FLOPs of one token through it.

        >>> Linear("q", 4, 8, 0, False).forward
        64
        """
        return 2 * self.n_in * self.n_out


@dataclass(frozen=True)
class FlopModel:
    """What the count needs of a model: its linears, its blocks, its attention width."""

    linears: tuple[Linear, ...]
    n_layers: int
    attn_dim: int  # heads x head dim of the queries
    checkpointed: bool = False

    @property
    def first_trained_block(self) -> int | None:
        """The lowest block holding a trained weight (-1: a trained linear outside the blocks, taken as below
        them); None: nothing but perhaps the output layer is trained."""
        blocks = [-1 if lin.block is None else lin.block for lin in self.linears if lin.trained and not lin.head]
        return min(blocks) if blocks else None


def step_flops(fm: FlopModel, tokens: float, head_tokens: float, pairs: float, *, backward: bool = True) -> dict:
    """Model and hardware FLOPs of a pass over ``tokens`` positions.

    ``head_tokens``: positions through the output layer; ``pairs``: causal
    (query, key) pairs summed over the rows (see :func:`causal_pairs`).
    ``backward=False``: a forward pass only (a reference model, generation).
    Returns ``forward``, ``backward``, ``model`` (their sum) and ``hardware``
    (plus checkpointing's recomputed forward).

    A one-block model ``x -> q(4->8) -> head(8->10)``, q trained, 3 tokens,
    2 through the head, 6 pairs, attention width 8:

    >>> fm = FlopModel((Linear("q", 4, 8, 0, True), Linear("head", 8, 10, None, False, head=True)), 1, 8)
    >>> f = step_flops(fm, 3, 2, 6)
    >>> f["forward"] == 3 * 64 + 2 * 160 + 4 * 8 * 6
    True
    >>> f["backward"] == 3 * 2 * 64 + 2 * 160 + 2 * 4 * 8 * 6
    True
    """
    first = fm.first_trained_block
    fwd = bwd = recompute = 0.0
    for lin in fm.linears:
        n = head_tokens if lin.head else tokens
        f = lin.forward * n
        fwd += f
        if not backward:
            continue
        if lin.head:
            bwd += f * ((first is not None) + lin.trained)  # input gradient: for the trained blocks below
        elif first is None:
            continue
        elif lin.block is None:
            bwd += f * lin.trained  # below the blocks (a projected embedding): nothing under it to feed
        elif lin.block >= first:
            bwd += f * (1 + lin.trained)
            recompute += f
    attn = 4.0 * fm.attn_dim * pairs  # per layer
    fwd += attn * fm.n_layers
    if backward and first is not None:
        on_path = fm.n_layers - max(first, 0)
        bwd += 2 * attn * on_path
        recompute += attn * on_path
    hardware = fwd + bwd + (recompute if fm.checkpointed and backward else 0.0)
    return {"forward": fwd, "backward": bwd, "model": fwd + bwd, "hardware": hardware}


def reference_flops(fm: FlopModel, tokens: float, head_tokens: float, pairs: float, *, shared: bool) -> float:
    """Forward FLOPs of a live reference pass (the same weights with the adapters off).

    ``shared``: the reference starts from the policy's hidden states at the
    lowest adapted block (:mod:`mlxpost.core.shared_blocks`), so blocks below
    it are not run again.

    >>> fm = FlopModel((Linear("a", 4, 4, 0, False), Linear("b", 4, 4, 1, False), Linear("b.lora_a", 4, 1, 1, True),
    ...                 Linear("h", 4, 10, None, False, head=True)), 2, 4)
    >>> reference_flops(fm, 1, 1, 0, shared=False), reference_flops(fm, 1, 1, 0, shared=True)
    (144, 112)
    """
    first = max(fm.first_trained_block or 0, 0)
    total = 0
    for lin in fm.linears:
        if ".lora_" in lin.name or (shared and lin.block is not None and lin.block < first):
            continue
        total += lin.forward * (head_tokens if lin.head else tokens)
    layers = fm.n_layers - (first if shared else 0)
    return total + 4 * fm.attn_dim * pairs * layers


def training_flops(fm: FlopModel, tokens: float, head_tokens: float, pairs: float, reference: str | None) -> dict:
    """:func:`step_flops` of the policy plus the forward of a live reference pass (``reference``: None,
    ``"full"`` or ``"shared"``, as :meth:`mlxpost.methods.base.Method.reference_pass` says), in ``forward``,
    ``model`` and ``hardware``.

    >>> fm = FlopModel((Linear("a", 4, 4, 0, True), Linear("h", 4, 10, None, False, head=True)), 1, 4)
    >>> training_flops(fm, 1, 1, 1, "full")["model"] - training_flops(fm, 1, 1, 1, None)["model"]
    128.0
    """
    flops = step_flops(fm, tokens, head_tokens, pairs)
    if reference is None:
        return flops
    extra = reference_flops(fm, tokens, head_tokens, pairs, shared=reference == "shared")
    return {**flops, "forward": flops["forward"] + extra, "model": flops["model"] + extra,
            "hardware": flops["hardware"] + extra}


def generation_flops(fm: FlopModel, prompt_tokens: float, prompts: int, new_tokens: float, pairs: float) -> float:
    """Forward FLOPs of KV-cached sampling (:mod:`mlxpost.rl.rollout`): each prompt's positions once (the
    prefill, shared by its group), then one position per new token. The output layer runs on the new
    tokens and on each prompt's last position; ``pairs``: the (query, key) pairs attended in all (each
    prompt's causal prefill, then ``p + t`` keys at new token ``t``: see ``RolloutSource._count``). Forward only: sampling needs no gradient.

    >>> fm = FlopModel((Linear("a", 4, 4, 0, False), Linear("h", 4, 10, None, False, head=True)), 1, 4)
    >>> generation_flops(fm, 3, 1, 2, 15) == 5 * 32 + 3 * 80 + 4 * 4 * 15
    True
    """
    body = sum(lin.forward for lin in fm.linears if not lin.head)
    head = sum(lin.forward for lin in fm.linears if lin.head)
    return body * (prompt_tokens + new_tokens) + head * (prompts + new_tokens) + 4 * fm.attn_dim * pairs * fm.n_layers


def causal_pairs(tokens: float, rows: float) -> float:
    """(query, key) pairs of causal attention over ``rows`` rows holding ``tokens`` positions in all, each
    row taken at the mean length ``l = tokens / rows``: ``rows * l (l + 1) / 2``.

    >>> causal_pairs(8, 2)  # two rows of 4: 10 pairs each
    20.0
    """
    if rows <= 0:
        return 0.0
    length = tokens / rows
    return rows * length * (length + 1) / 2


def _block_of(path: str) -> int | None:
    parts = path.split(".")
    for i, p in enumerate(parts[:-1]):
        if p == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def flop_model(model: nn.Module, *, checkpointed: bool = False) -> FlopModel:
    """The :class:`FlopModel` of a loaded model (adapters applied), read from its module tree.

    Trained weights are the model's trainable parameters at the time of the
    call. The output layer is ``lm_head``, or the tied embedding (vocabulary
    x hidden) when there is none.
    """
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    linears: list[Linear] = []
    skip: set[str] = set()
    for path, mod in model.named_modules():
        if path in skip:
            continue
        block = _block_of(path)
        if isinstance(mod, LoRALinear):
            n_in, n_out = _dims(mod.linear)
            r = mod.rank
            skip.add(f"{path}.linear")
            linears.append(Linear(path, n_in, n_out, block, f"{path}.linear.weight" in trainable))
            linears.append(Linear(f"{path}.lora_a", n_in, r, block, f"{path}.lora_a" in trainable))
            linears.append(Linear(f"{path}.lora_b", r, n_out, block, f"{path}.lora_b" in trainable))
        elif isinstance(mod, (nn.Linear, nn.QuantizedLinear)):
            n_in, n_out = _dims(mod)
            head = path.split(".")[-1] == "lm_head"
            linears.append(Linear(path, n_in, n_out, None if head else block, f"{path}.weight" in trainable, head))
    if not any(lin.head for lin in linears):
        inner = getattr(model, "model", model)
        emb = getattr(inner, "embed_tokens", None)
        if emb is not None:
            vocab, dim = emb.weight.shape
            if isinstance(emb, nn.QuantizedEmbedding):
                dim = dim * 32 // emb.bits
            name = "model.embed_tokens" if inner is not model else "embed_tokens"
            linears.append(Linear(name, dim, vocab, None, f"{name}.weight" in trainable, head=True))
    layers = getattr(model, "layers", None) or getattr(getattr(model, "model", None), "layers", None) or []
    return FlopModel(tuple(linears), len(layers), _attn_dim(layers), checkpointed)


def _attn_dim(layers) -> int:
    """Heads x head dim of the queries of the first block (the query projection's output width)."""
    if not layers:
        return 0
    attn = getattr(layers[0], "self_attn", None)
    q = getattr(attn, "q_proj", None)
    if q is None:
        return 0
    q = q.linear if isinstance(q, LoRALinear) else q
    return _dims(q)[1]


def mfu(flops_per_s: float, peak_flops_per_s: float | None) -> float | None:
    """The fraction of the peak, or None without a measured peak (never an invented one).

    >>> mfu(2e9, 1e10), mfu(2e9, None)
    (0.2, None)
    """
    if not peak_flops_per_s:
        return None
    return flops_per_s / peak_flops_per_s


def throughput(flops: dict, seconds: float, peak: dict | None) -> dict:
    """The summary's fields: model and hardware FLOPs, FLOP/s and MFU against ``peak`` (``{"gflops", "key",
    ...}`` as cached by ``mlxpost doctor``; None: MFU unknown).

    >>> t = throughput({"model": 4e9, "hardware": 5e9}, 2.0, {"gflops": 10.0, "key": "cpu"})
    >>> t["model_flops_per_s"], t["mfu"], t["hardware_flops_per_s"], t["peak_gflops"]
    (2000000000.0, 0.2, 2500000000.0, 10.0)
    >>> throughput({"model": 4e9, "hardware": 4e9}, 2.0, None)["mfu"] is None
    True
    """
    t = max(seconds, 1e-9)
    out = {"model_flops": flops["model"], "hardware_flops": flops["hardware"],
           "model_flops_per_s": flops["model"] / t, "hardware_flops_per_s": flops["hardware"] / t,
           "mfu": mfu(flops["model"] / t, peak["gflops"] * 1e9 if peak else None),
           "peak_gflops": peak["gflops"] if peak else None, "peak": peak.get("key") if peak else None}
    return out
