"""Log-likelihoods of continuations after a shared context, in batches: the scoring engine of evaluation.

Multiple-choice questions, lm-eval's ``loglikelihood`` requests and
preference pairs all ask the same thing: the log-probability of several
continuations of one context. A :class:`Group` is one context and its
continuations; :class:`Scorer` scores many groups.

Layout. The context goes through the model **once** per group, followed by
every continuation (as preference pairs share their prompt in training,
:func:`mlxpost.core.pairs.shared_segment`)::

    row:       [ c0 c1 c2 c3 | a0 a1 | b0 b1 b2 ]      prefix c, continuations a and b
    branch:      0  0  0  0    1  1    2  2  2         a continuation sees the prefix and itself
    position:    0  1  2  3    4  5    4  5  6         RoPE: each token at its place in its own sequence

Continuation ``a`` of ``T`` tokens has its first token predicted from the
last prefix slot and token ``j > 0`` from its own slot ``j - 1``, so the row
holds ``T - 1`` of its tokens. For a one-token answer (``" A"`` of MMLU) the
row holds nothing of it: four choices cost one pass over the question. The
mask is :func:`mlxpost.core.forward.tree_mask` and RoPE is per position
(:func:`mlxpost.core.forward.positioned`); :func:`sharing_problem` checks on
the model itself that this gives the hidden states of separate sequences,
and a model that fails gets one row per continuation instead (always exact).

A batch whose rows each hold one sequence at its own positions (questions
with one-token choices, single continuations) runs under the model's own
causal mask, without the tree. Rows of one batch are groups of similar
length (sorted), right-padded; only
the scored positions go through the output layer when the model's head can
be split off (:class:`mlxpost.core.logprobs.HeadSplit`): a batch computes
``K x V`` logits for its ``K`` continuation tokens rather than ``B x L x V``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

from ..core.forward import forward, rope_owners
from ..core.logprobs import HeadSplit, head_chunk, target_logprobs


@dataclass
class Group:
    """One context and the continuations scored after it.

    ``weights`` (optional, one list per continuation, aligned with its
    tokens): which tokens count (1) and which are context that happens to
    follow the shared prefix (0), as the loss mask of a rendered preference
    pair; default: every continuation token counts.
    """

    prefix: Sequence[int]  # (P,) context tokens, P >= 1
    conts: list  # each (T_i,) continuation tokens, T_i >= 1
    weights: list | None = None

    def cont_weights(self, i: int) -> np.ndarray:
        if self.weights is None:
            return np.ones(len(self.conts[i]), np.float32)
        return np.asarray(self.weights[i], np.float32)


@dataclass
class Score:
    """A continuation's log-likelihood: the sum over its counted tokens, how many, and greedy or not."""

    logprob: float
    tokens: int
    greedy: bool  # every counted token is the model's most likely next token


@dataclass
class _Row:
    """One row of a batch: input tokens, their branch and RoPE position, and the entries scored."""

    inputs: np.ndarray  # (W,) int32
    branches: np.ndarray  # (W,) int32
    positions: np.ndarray  # (W,) int32
    slots: np.ndarray  # (K,) where each scored token is predicted from
    targets: np.ndarray  # (K,) the token predicted
    owner: np.ndarray  # (K,) which continuation of the group it belongs to

    @property
    def plain(self) -> bool:
        """One sequence at its own positions (at most one continuation holds slots): the causal mask serves."""
        return bool((self.positions == np.arange(len(self.positions))).all())


def shared_row(group: Group) -> _Row:
    """The group as one row: prefix, then every continuation but its last token (see the module docstring).

    >>> r = shared_row(Group([5, 6, 7], [[8, 9], [4]]))
    >>> r.inputs.tolist(), r.branches.tolist(), r.positions.tolist()
    ([5, 6, 7, 8], [0, 0, 0, 1], [0, 1, 2, 3])
    >>> r.slots.tolist(), r.targets.tolist(), r.owner.tolist()
    ([2, 3, 2], [8, 9, 4], [0, 0, 1])
    """
    P = len(group.prefix)
    inputs, branches, positions = [np.asarray(group.prefix, np.int32)], [np.zeros(P, np.int32)], [np.arange(P)]
    slots, targets, owner = [], [], []
    start = P
    for i, cont in enumerate(group.conts):
        c = np.asarray(cont, np.int32)
        n = len(c) - 1  # input slots this continuation adds
        inputs.append(c[:-1])
        branches.append(np.full(n, i + 1, np.int32))
        positions.append(np.arange(P, P + n))
        at = np.concatenate([[P - 1], start + np.arange(n)]).astype(np.int64)
        keep = group.cont_weights(i) > 0
        slots.append(at[keep])
        targets.append(c[keep])
        owner.append(np.full(int(keep.sum()), i, np.int32))
        start += n
    return _Row(np.concatenate(inputs), np.concatenate(branches), np.concatenate(positions).astype(np.int32),
                np.concatenate(slots), np.concatenate(targets).astype(np.int32), np.concatenate(owner))


def separate_rows(group: Group) -> list[_Row]:
    """One row per continuation, ``prefix + continuation`` without its last token (the plain layout).

    >>> [(r.inputs.tolist(), r.slots.tolist()) for r in separate_rows(Group([5, 6], [[8, 9], [4]]))]
    [([5, 6, 8], [1, 2]), ([5, 6], [1])]
    """
    P = len(group.prefix)
    rows = []
    for i, cont in enumerate(group.conts):
        seq = np.concatenate([np.asarray(group.prefix, np.int32), np.asarray(cont, np.int32)])
        keep = group.cont_weights(i) > 0
        slots = (P - 1 + np.arange(len(cont)))[keep]
        rows.append(_Row(seq[:-1], np.zeros(len(seq) - 1, np.int32), np.arange(len(seq) - 1, dtype=np.int32),
                         slots.astype(np.int64), np.asarray(cont, np.int32)[keep],
                         np.full(int(keep.sum()), i, np.int32)))
    return rows


def _stack(rows: list[_Row], pad_id: int) -> dict:
    """Right-padded (B, W) arrays of the rows and their flat scored entries (K,)."""
    B, W = len(rows), max(len(r.inputs) for r in rows)
    inputs = np.full((B, W), pad_id, np.int32)
    segments = np.full((B, W), -1, np.int32)
    branches = np.zeros((B, W), np.int32)
    positions = np.zeros((B, W), np.int32)
    for b, r in enumerate(rows):
        n = len(r.inputs)
        inputs[b, :n], segments[b, :n], branches[b, :n], positions[b, :n] = r.inputs, 0, r.branches, r.positions
    flat = np.concatenate([b * W + r.slots for b, r in enumerate(rows)])
    return {"inputs": inputs, "segments": segments, "branches": branches, "positions": positions, "flat": flat,
            "targets": np.concatenate([r.targets for r in rows])}


def entry_states(model, split: HeadSplit | None, arrays: dict, shared: bool, chunk: int | None = None) -> mx.array:
    """What the output layer reads at every scored entry of a stacked batch: (K, D) hidden states with a
    head split, else (K, V) logits.

    ``shared``: rows hold several branches (tree mask, per-position RoPE);
    otherwise each row is one plain sequence under the model's causal mask.
    """
    x = mx.array(arrays["inputs"])
    kw = dict(segments=mx.array(arrays["segments"]), branches=mx.array(arrays["branches"]),
              positions=mx.array(arrays["positions"])) if shared else {}
    flat = mx.array(arrays["flat"].astype(np.int32))
    out = forward(model, x, body=split.body if split is not None else None, chunk=chunk, **kw)  # (B, W, D or V)
    return out.reshape(-1, out.shape[-1])[flat]


def run_entries(model, split: HeadSplit | None, arrays: dict, shared: bool, chunk: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Log-prob (K,) and greedy flag (K,) of every scored entry of a stacked batch (one forward pass).

    With a head split only the K scored positions go through the output layer.
    """
    states = entry_states(model, split, arrays, shared, chunk)
    targets = mx.array(arrays["targets"])
    if split is None:  # states are the logits already
        return _score(states, targets)
    rows = head_chunk(split.head(states[:1]).shape[-1], states.shape[0])  # (rows, V) logits at a time
    parts = [_score(split.head(states[i:i + rows]), targets[i:i + rows]) for i in range(0, states.shape[0], rows)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _score(logits: mx.array, targets: mx.array) -> tuple[np.ndarray, np.ndarray]:
    """Log-prob and greedy flag per row of (K, V) logits, evaluated (so the logits can go)."""
    lp = target_logprobs(logits, targets)
    greedy = mx.argmax(logits, axis=-1) == targets
    mx.eval(lp, greedy)
    return np.array(lp, np.float64), np.array(greedy)


def sharing_problem(model, split: HeadSplit | None, chunk: int | None = None) -> str | None:
    """Why continuations cannot share their context's pass on this model, or None when they can.

    A random context with three continuations (one of a single token) goes
    through the model in the shared layout and in separate rows; what the
    output layer reads at every scored position must agree. Hidden states
    (or logits), not log-probs: a random test model's log-probs hardly depend
    on the context, so they would hide a leaked branch or a misplaced
    position, which change the states at order 1 (float rounding: 1e-6).
    Models without a RoPE module in their blocks keep the plain layout.
    """
    if not rope_owners(model):
        return "no RoPE module found in its blocks"
    rng = np.random.default_rng(3)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    vocab = min(1000, embed.weight.shape[0]) if embed is not None and hasattr(embed, "weight") else 100
    group = Group(rng.integers(1, vocab, 9).tolist(), [rng.integers(1, vocab, n).tolist() for n in (5, 1, 7)])
    was_training = model.training
    model.eval()
    try:
        shared = entry_states(model, split, _stack([shared_row(group)], 0), True, chunk)
        plain = mx.concatenate([entry_states(model, split, _stack([r], 0), False, chunk)
                                for r in separate_rows(group)])
        exact = shared.dtype == mx.float32
        shared, plain = shared.astype(mx.float32), plain.astype(mx.float32)
        err = (mx.linalg.norm(shared - plain) / mx.linalg.norm(plain)).item()
    except Exception as e:  # noqa: BLE001 - an architecture this layout cannot drive
        return f"the shared layout failed to run ({type(e).__name__}: {e})"
    finally:
        if was_training:
            model.train()
    if not err <= (1e-5 if exact else 1e-2):
        return f"its hidden states with a shared context differ from separate sequences (relative error {err:.1e})"
    return None


class Scorer:
    """Scores :class:`Group` lists on one model, in batches of at most ``batch_size`` rows.

    ``share``: ``"auto"`` lays each group out as one row when the model
    passes :func:`sharing_problem`, ``"off"`` uses one row per continuation.
    ``max_tokens`` bounds a batch's rows x width (memory). ``chunk``: attention
    in query chunks (see :func:`mlxpost.core.forward.forward`), None for whole rows.
    """

    def __init__(self, model, *, batch_size: int = 8, share: str = "auto", max_tokens: int = 16384,
                 pad_id: int = 0, chunk: int | None = None):
        self.model = model
        self.batch_size = max(1, batch_size)
        self.max_tokens = max_tokens
        self.pad_id = pad_id
        self.chunk = chunk
        self.split = HeadSplit.find(model)
        self.problem = "off (share=off)" if share == "off" else sharing_problem(model, self.split, chunk)
        self.shared = self.problem is None

    def rows(self, group: Group) -> list[_Row]:
        return [shared_row(group)] if self.shared else separate_rows(group)

    def score(self, groups: Sequence[Group], progress: Callable[[int], None] | None = None) -> list[list[Score]]:
        """Per group, per continuation, its :class:`Score`; ``progress(n)`` after every batch (groups done)."""
        for g in groups:
            if len(g.prefix) == 0 or any(len(c) == 0 for c in g.conts):
                raise ValueError("every group needs a non-empty context and non-empty continuations")
        units = [(gi, row) for gi, g in enumerate(groups) for row in self.rows(g)]
        order = sorted(range(len(units)), key=lambda u: -len(units[u][1].inputs))  # similar widths together
        sums = [np.zeros(len(g.conts)) for g in groups]
        counts = [np.zeros(len(g.conts), np.int64) for g in groups]
        greedy = [np.ones(len(g.conts), bool) for g in groups]
        left = np.bincount([gi for gi, _ in units], minlength=len(groups))  # rows of a group not yet scored
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in self._batches(order, units):
                rows = [units[u][1] for u in batch]
                tree = self.shared and not all(r.plain for r in rows)  # one-token choices need no tree mask
                lp, ok = run_entries(self.model, self.split, _stack(rows, self.pad_id), tree, self.chunk)
                start, done = 0, 0
                for u, row in zip(batch, rows):
                    gi, k = units[u][0], len(row.targets)
                    np.add.at(sums[gi], row.owner, lp[start:start + k])
                    np.add.at(counts[gi], row.owner, 1)
                    np.logical_and.at(greedy[gi], row.owner, ok[start:start + k])
                    start += k
                    left[gi] -= 1
                    done += left[gi] == 0
                if progress is not None and done:
                    progress(int(done))
        finally:
            if was_training:
                self.model.train()
        return [[Score(float(s), int(c), bool(q)) for s, c, q in zip(*t)] for t in zip(sums, counts, greedy)]

    def _batches(self, order: list[int], units: list) -> list[list[int]]:
        """Consecutive units (widest first) in batches of at most ``batch_size`` rows and ``max_tokens`` positions."""
        batches, cur, width = [], [], 0
        for u in order:
            w = len(units[u][1].inputs)
            if cur and (len(cur) >= self.batch_size or max(width, w) * (len(cur) + 1) > self.max_tokens):
                batches.append(cur)
                cur, width = [], 0
            cur.append(u)
            width = max(width, w)
        if cur:
            batches.append(cur)
        return batches
