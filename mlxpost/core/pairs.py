"""Preference pairs in one batch: chosen and rejected sides padded, packed, or sharing their prompt.

:class:`PairSource` puts the two sides of ``batch_size`` pairs in one batch
so that one forward pass scores both; :func:`pair_layout` packs the
sequences into rows of the cheapest width, and :func:`shared_segment` lays a
pair out as ``[prompt | chosen | rejected]`` when the prompt goes through
the model once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import numpy as np

from ..data.load import Example
from ..errors import MlxpostError
from .batches import Batch, BatchSource, _stack, bucketed, pack_rows
from .forward import chunk_bounds


def pair_layout(lengths: Sequence[int], multiple: int, cap: int,
                span: float | None = None, chunk: int | None = None) -> tuple[int, list[list[int]]]:
    """Rows for the sequences of one pair batch: ``(width, rows)``, rows as lists of indices.

    Chosen and rejected replies differ in length, so padding every sequence
    to the longest wastes a quarter of the compute on typical preference
    data. Here the sequences are packed (best fit) into rows of a width
    between the longest (rounded up to ``multiple``) and twice that, never
    wider than ``cap``, choosing the width of least estimated cost (ties:
    the narrower).

    The cost of a row of ``width`` positions is ``width * (1 + width / span)``:
    each position pays its share of the linear layers, and its attention
    over the whole row (the block-diagonal mask hides other sequences but
    their scores are still computed). ``span`` (:func:`attention_span`) is
    the width at which the two are equal; ``None`` counts positions only.
    ``chunk``: the query chunk of training passes (:func:`forward`), which
    computes only the scores on and below the diagonal between chunks.
    """
    longest = max(lengths)
    w0 = min(cap, -(-longest // multiple) * multiple)
    best = None
    for width in range(w0, min(cap, 2 * w0) + 1, multiple):
        rows = pack_rows(lengths, width)
        cost = layout_cost(width, len(rows), span, chunk)
        if best is None or cost < best[0]:
            best = (cost, width, rows)
        if len(rows) == 1:
            break
    return best[1], best[2]


def layout_cost(width: int, rows: int, span: float | None, chunk: int | None = None) -> float:
    """Estimated cost of ``rows`` rows of ``width`` positions (see :func:`pair_layout`).

    In ``n`` query chunks a row computes ``(n + 1) / (2n)`` of its attention
    scores (:func:`forward`).
    """
    if not span:
        return rows * width
    n = len(chunk_bounds(width, chunk)) - 1
    return rows * width * (1 + width / span * (n + 1) / (2 * n))


class PairSource(BatchSource):
    """Batches of preference pairs: the chosen and rejected sides of ``batch_size`` pairs in one batch.

    ``mode="pad"``: ``2 * batch_size`` padded rows; rows ``0..P-1`` hold the
    chosen sides and rows ``P..2P-1`` the rejected sides of the same pairs,
    so one forward pass scores both and pair ``i`` is rows ``i`` and ``P + i``.

    ``mode="pack"``: the ``2P`` sequences are packed into fewer rows
    (:func:`pair_layout`), each isolated by the block-diagonal mask as in SFT
    packing; ``extra["seq"]`` (rows, width) says which sequence each position
    belongs to (chosen of pair ``i``: ``i``; rejected: ``P + i``; padding:
    ``-1``) and ``extra["seq_ids"]`` is ``arange(2P)``, so the losses sum
    per sequence exactly as over padded rows. ``span``: the model's
    :func:`attention_span`, which weighs a wide row's attention against the
    positions it saves; ``chunk``: the query chunk of the training passes
    (fewer scores computed per row, see :func:`layout_cost`).

    A short last batch is filled with empty pairs (no trained tokens), which
    the losses mask out.

    ``share_prompt`` (packed only; needs ``select_bucket``, i.e. a head
    split): each pair is one segment, its prompt once and both replies after
    it (:func:`shared_segment`), instead of two sequences that each repeat
    the prompt. The mask (:func:`tree_mask`, from ``branches``) keeps the
    replies apart and ``positions`` gives the rejected reply the RoPE
    positions it has after the prompt, so every log-prob is the one of the
    unshared layout (float rounding aside); the prompt's positions go through
    the model once. Log-probs then come per trained entry:
    ``select = (index, valid, targets)`` (K,), where the prompt's last
    position appears twice (it predicts the first token of both replies), and
    ``extra["seq"]`` (K,) names each entry's sequence. A batch is laid out
    this way when :func:`layout_cost` rates it no dearer than the ordinary
    packing of the same pairs: a segment holds both replies, so its row may be
    wider (up to twice ``max_len``), and the scores between the two replies
    are computed, then masked (long replies after a short prompt: ordinary
    packing). A sliding window counts ``positions`` (:class:`MaskCache`).

    ``ref``: optional precomputed reference log-probs, one
    ``(chosen_values, rejected_values)`` per pair, each holding the values at
    that side's trained positions in order; batches then carry them as
    ``extra["ref_logps"]``, aligned with ``targets`` (with entries: with them).
    """

    def __init__(self, pairs: list, *, mode: str = "pad", ref: list | None = None, span: float | None = None,
                 share_prompt: bool = False, chunk: int | None = None, **kw):
        if mode not in ("pad", "pack"):
            raise MlxpostError(f"preference pairs are batched with data.batching=pad or pack, got {mode!r}")
        super().__init__(pairs, mode="pad", **kw)  # the plan: pairs in length-sorted batches
        self.pack = mode == "pack"
        self.span = span
        self.chunk = chunk  # the training passes' query chunk, which the layout costs count
        if share_prompt and not (self.pack and self.select_bucket):
            raise MlxpostError("pairs share their prompt only in packed batches with a head split")
        self.share_prompt = share_prompt
        if ref is not None and len(ref) != len(pairs):
            raise MlxpostError(f"reference log-probs for {len(ref)} pairs, but there are {len(pairs)} pairs")
        self.ref = ref

    def set_reference(self, ref: list | None) -> None:
        if ref is not None and len(ref) != len(self.examples):
            raise MlxpostError(f"reference log-probs for {len(ref)} pairs, but there are {len(self.examples)} pairs")
        self.ref = ref

    def _build(self, plan_rows: list[list[int]]) -> Batch:
        return self.build_pairs([r[0] for r in plan_rows])

    def build_pairs(self, idx: list[int], packed: bool | None = None, shared: bool | None = None) -> Batch:
        """The batch of the pairs at positions ``idx`` (at most ``batch_size``).

        ``packed``: override the mode. ``shared`` (with ``share_prompt``): True
        lays the pairs out with their prompt shared, False never, None when that
        is the cheaper layout.
        """
        P = self.batch_size
        pairs = [self.examples[i] for i in idx]
        seqs = self._sequences(pairs)
        m = self.pad_multiple
        pack = self.pack if packed is None else packed
        if pack:
            real, width, layout, segmented = self._packed_layout(pairs, seqs, shared)
            if segmented is not None:
                return self._build_shared(idx, pairs, *segmented)
            rows = [[real[j] for j in row] for row in layout]
        else:
            longest = max(len(p) - 1 for p in pairs)
            width = min(self.row_len, -(-longest // m) * m)
            rows = [[k] if seqs[k] is not None else [] for k in range(2 * P)]
        batch = _stack([[seqs[k] for k in row] for row in rows], width, self.pad_id, packed=pack,
                       select_bucket=self.select_bucket)
        batch.n_examples = len(pairs)
        batch.sources = [p.chosen.source for p in pairs] + [p.rejected.source for p in pairs]
        # Where each sequence starts: (row, offset).
        start = {}
        for r, row in enumerate(rows):
            pos = 0
            for k in row:
                start[k] = (r, pos)
                pos += len(seqs[k]) - 1
        extra = {}
        if batch.segments is not None:
            seq = np.full((len(rows), width), -1, np.int32)
            for k, (r, pos) in start.items():
                seq[r, pos:pos + len(seqs[k]) - 1] = k
            extra["seq"] = mx.array(seq)
            extra["seq_ids"] = mx.arange(2 * P, dtype=mx.int32)
        if self.ref is not None:
            ref = np.zeros((len(rows), width), np.float32)
            for k, i in enumerate(idx):
                for side, key in ((0, k), (1, P + k)):
                    r, pos = start[key]
                    ref[r, pos + np.flatnonzero(seqs[key].mask[1:])] = self.ref[i][side]
            extra["ref_logps"] = mx.array(ref)
        batch.extra = extra or None
        return batch

    def _sequences(self, pairs: list) -> list:
        """The 2P sequence slots of a batch: chosen sides, then rejected sides (None for missing pairs)."""
        P = self.batch_size
        seqs = [p.chosen for p in pairs] + [None] * (P - len(pairs)) + [p.rejected for p in pairs]
        return seqs + [None] * (2 * P - len(seqs))

    def _packed_layout(self, pairs: list, seqs: list, shared: bool | None) -> tuple:
        """``(real, width, layout, segmented)``: the packed rows of the sequences, and the shared-prompt
        ``(segments, width, rows)`` when the batch takes that layout (else None).

        Shared when asked (``shared=True``) or, with ``shared=None``, when it
        costs no more: a segment holds both replies, so its row may be wider
        (up to twice a sequence's row), and attention over a wide row can cost
        more than the prompt positions saved.
        """
        real = [k for k, ex in enumerate(seqs) if ex is not None]
        width, layout = pair_layout([len(seqs[k]) - 1 for k in real], self.pad_multiple, self.row_len, self.span,
                                    self.chunk)
        if not self.share_prompt or shared is False:
            return real, width, layout, None
        segs = [shared_segment(p.chosen, p.rejected) for p in pairs]
        s_width, s_rows = pair_layout([len(s.inputs) for s in segs], self.pad_multiple, 2 * self.row_len, self.span,
                                      self.chunk)
        if shared or (layout_cost(s_width, len(s_rows), self.span, self.chunk)
                      <= layout_cost(width, len(layout), self.span, self.chunk)):
            return real, width, layout, (segs, s_width, s_rows)
        return real, width, layout, None

    def shared_batches(self) -> tuple[int, int]:
        """How many batches of this epoch's plan share their prompt, of how many (no arrays are built)."""
        plan = self._plan_for_epoch()
        if not (self.share_prompt and self.pack):
            return 0, len(plan)
        n = 0
        for batch in plan:
            pairs = [self.examples[r[0]] for r in batch]
            n += self._packed_layout(pairs, self._sequences(pairs), None)[3] is not None
        return n, len(plan)

    def _build_shared(self, idx: list[int], pairs: list, segs: list, width: int, rows: list) -> Batch:
        """A packed batch of shared-prompt segments, one per pair, in ``rows`` of ``width`` (see the class doc)."""
        P = self.batch_size
        R = len(rows)
        inputs = np.full((R, width), self.pad_id, np.int32)
        segments = np.full((R, width), -1, np.int32)
        branches = np.zeros((R, width), np.int32)
        positions = np.zeros((R, width), np.int32)
        targets = np.zeros((R, width), np.int32)
        weights = np.zeros((R, width), np.float32)
        flat, tgt, seq, ref = [], [], [], []
        n_tokens = 0
        for r, row in enumerate(rows):
            pos = 0
            for s_, k in enumerate(row):
                sg = segs[k]
                n = len(sg.inputs)
                sl = slice(pos, pos + n)
                inputs[r, sl], branches[r, sl], positions[r, sl] = sg.inputs, sg.branches, sg.positions
                segments[r, sl] = s_
                for side, key in ((0, k), (1, P + k)):
                    at = r * width + pos + sg.at[side]
                    flat.append(at)
                    tgt.append(sg.targets[side])
                    seq.append(np.full(len(at), key, np.int32))
                    if self.ref is not None:
                        ref.append(np.asarray(self.ref[idx[k]][side], np.float32))
                    targets.reshape(-1)[at] = sg.targets[side]
                    weights.reshape(-1)[at] = 1.0
                pos += n
            n_tokens += pos
        flat, tgt, seq = np.concatenate(flat), np.concatenate(tgt), np.concatenate(seq)
        K = len(flat)
        size = bucketed(K, self.select_bucket)
        index, valid = np.zeros(size, np.int32), np.zeros(size, np.float32)
        etargets, eseq = np.zeros(size, np.int32), np.full(size, -1, np.int32)
        index[:K], valid[:K], etargets[:K], eseq[:K] = flat, 1.0, tgt, seq
        extra = {"seq": mx.array(eseq), "seq_ids": mx.arange(2 * P, dtype=mx.int32)}
        if self.ref is not None:
            values = np.zeros(size, np.float32)
            values[:K] = np.concatenate(ref)
            extra["ref_logps"] = mx.array(values)
        return Batch(
            inputs=mx.array(inputs), targets=mx.array(targets), weights=mx.array(weights),
            segments=mx.array(segments), n_tokens=n_tokens, n_targets=K, n_examples=len(pairs),
            select=(mx.array(index), mx.array(valid), mx.array(etargets)),
            sources=[p.chosen.source for p in pairs] + [p.rejected.source for p in pairs], extra=extra,
            branches=mx.array(branches), positions=mx.array(positions))


@dataclass
class SharedSegment:
    """One pair as a prompt followed by both replies (see :func:`shared_segment`)."""

    inputs: np.ndarray  # (n,) int32: prompt, chosen reply, rejected reply
    branches: np.ndarray  # (n,) int32: 0, 1, 2
    positions: np.ndarray  # (n,) int32: each token's position in its own sequence
    at: tuple  # per side: offsets in the segment of that side's trained positions, in order
    targets: tuple  # per side: the tokens they predict


def shared_prefix(chosen: Example, rejected: Example) -> int:
    """How many leading input positions the two sides of a pair can share.

    The common prefix of their tokens, but no further than the first trained
    position of either side: below it no position is trained on either side,
    and the last shared position may be trained (it predicts each side's own
    next token, so it appears once per side among the entries).
    """
    a, b = chosen.tokens, rejected.tokens
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    lcp = int(diff[0]) if len(diff) else n
    first = [int(np.flatnonzero(ex.mask[1:])[0]) if ex.mask[1:].any() else len(ex) - 2 for ex in (chosen, rejected)]
    return max(0, min(lcp, first[0] + 1, first[1] + 1))


def shared_segment(chosen: Example, rejected: Example) -> SharedSegment:
    """Lay out a pair as ``[prompt | chosen reply | rejected reply]`` input positions.

    Sequence ``x`` of ``T`` tokens has input positions ``0..T-2`` (position
    ``j`` predicts token ``j + 1``). The first ``p`` (:func:`shared_prefix`)
    are common; then come the chosen side's positions ``p..Tc-2`` and the
    rejected side's ``p..Tr-2``, each at its own RoPE position ``j``.
    """
    p = shared_prefix(chosen, rejected)
    nc, nr = len(chosen) - 1 - p, len(rejected) - 1 - p
    inputs = np.concatenate([chosen.tokens[:p], chosen.tokens[p:-1], rejected.tokens[p:-1]]).astype(np.int32)
    branches = np.concatenate([np.zeros(p), np.ones(nc), np.full(nr, 2)]).astype(np.int32)
    positions = np.concatenate([np.arange(p + nc), np.arange(p, p + nr)]).astype(np.int32)
    at, targets = [], []
    for ex, start in ((chosen, p), (rejected, p + nc)):
        j = np.flatnonzero(ex.mask[1:])  # trained input positions of this side
        at.append(np.where(j < p, j, start + (j - p)).astype(np.int64))
        targets.append(ex.tokens[1:][j].astype(np.int32))
    return SharedSegment(inputs, branches, positions, tuple(at), tuple(targets))
