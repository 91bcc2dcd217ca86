"""Online RL as a batch source: sample, score, compute advantages, yield batches.

:class:`RolloutSource` plugs into the one training loop like any other
batch source. For every optimizer step it takes ``prompts_per_step`` prompts,
samples ``group_size`` completions of each in one batch
(:func:`mlxpost.rl.rollout.sample_groups`), scores them with the reward
functions and/or a step verifier, turns the scores into advantages and yields
the completions as padded training rows (prompt + completion, loss on the
completion only) with per-token advantages in ``batch.extra["adv"]``. With
``num_iterations > 1`` the same rollout is used for that many optimizer steps,
and the log-probs of the policy that sampled it (``extra["old_logps"]``) are
kept, so the importance ratio and its clipping act.

Credit assignment of step-verified RLVR
---------------------------------------

A verifier splits completion ``i`` into steps ``k`` (character spans) with a
score ``v_ik`` in [0, 1] (1 = correct), plus a final-answer score ``f_i``.
The completion's reward is ``r_i = w_f * f_i + sum_j w_j * R_j(o_i)`` (final
answer plus any reward functions), and its group-relative advantage ``A_i``
is computed as in GRPO (:func:`mlxpost.methods.online_rl.group_advantages`). Each
token t then gets

    a_t = max(A_i, 0)                          t in a correct step   (v_ik = 1)
    a_t = min(A_i, 0) - lam * (1 - v_ik)       t in a step with v_ik < 1
    a_t = A_i                                  t outside every step (the final answer, EOS)

so a wrong step is pushed down on exactly its own tokens, whatever the final
answer (a right answer reached through a wrong step is not rewarded as a
whole), a correct step is never pushed down for a mistake made elsewhere,
and the final answer carries the outcome signal. ``lam`` is
``rlvr.step_weight`` (default 1). A token belongs to a step when its
characters overlap the step's span.
"""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np

from ..core.batches import Batch, selection
from ..core.logprobs import HeadSplit, token_logprobs
from ..data.load import PromptRow
from ..errors import MlxpostError
from ..methods.online_rl import RLSettings, group_advantages
from .rollout import sample_groups


def token_char_ends(tokenizer, tokens: list[int]) -> list[float]:
    """Character offset in ``decode(tokens)`` where each token's text ends; token k spans ``[ends[k-1], ends[k])``.

    A byte-level tokenizer may split one character of several UTF-8 bytes
    (``−``, ``×``, ``中``) over several tokens. Every token holding some of its
    bytes gets a share of that character: a character at offset ``c`` spread
    over ``m`` tokens gives them ``[c, c + 1/m)``, ``[c + 1/m, c + 2/m)``, ...
    The spans stay contiguous and increasing, and since step spans are whole
    characters, each of those tokens overlaps every step that holds the
    character, so :func:`step_token_advantages` gives it that step's
    advantage. (Taking ``len(decode(tokens[:k]))`` instead gave a token that
    only completes a character an empty span, and with it the completion's
    advantage inside a wrong step.) Offsets are ints where whole, floats
    inside a character.

    Each token is decoded with the tokens since the last character boundary
    and checked against the full text; a trailing U+FFFD there marks a
    character begun but not finished. A tokenizer whose pieces do not decode
    consistently on their own (a SentencePiece leading space) is decoded
    prefix by prefix instead.
    """
    final = tokenizer.decode(tokens)

    def common(text: str, off: int) -> int:  # the longest prefix of text that final has at off
        lo, hi = 0, len(text)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if final.startswith(text[:mid], off):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def settle(text: str, off: int) -> tuple[int, bool] | None:
        """(characters complete, a character pending) after ``text`` placed at ``off``; None if it does not fit."""
        if final.startswith(text, off):
            return off + len(text), False
        n = common(text, off)
        rest = text[n:]
        return (off + n, True) if not rest.strip("\ufffd") else None

    touched = []  # per token: [first, end) of the characters it holds bytes of
    done, pending = 0, False
    anchor = anchor_off = 0  # window start: the first token after the last character boundary
    windowed = True
    k = 0
    while k < len(tokens) or (windowed and pending):
        if windowed and k < len(tokens):
            piece = tokenizer.decode(tokens[anchor:k + 1])
            got = settle(piece, anchor_off)
        else:
            piece, got = "", None
        if got is None and windowed:
            # A window that does not fit the text (or one still open at the end, so never checked
            # whole): the pieces do not decode on their own. Redo it from full prefixes.
            windowed = False
            del touched[anchor:]
            done, pending, k = anchor_off, False, anchor
            continue
        if got is None:
            text = tokenizer.decode(tokens[:k + 1])
            got = settle(text, 0) or (common(text, 0), False)
        now, now_pending = max(got[0], done), got[1]
        hi = min(now + now_pending, len(final))
        touched.append((done, hi) if now > done or now_pending else (done, done))
        done, pending = now, now_pending
        k += 1
        if windowed and not pending and not piece.endswith("\ufffd"):
            # A boundary, unless the text ends in U+FFFD: invalid bytes there may still join the next ones.
            anchor, anchor_off = k, done
    # Share each character among the tokens that hold its bytes: only a token's first or last
    # character can be shared (the tokens' ranges are in order and meet at most in one character).
    count: dict[int, int] = {}
    for lo, hi in touched:
        if hi > lo:
            for c in {lo, hi - 1}:
                count[c] = count.get(c, 0) + 1
    seen: dict[int, int] = {}
    ends: list[float] = []
    prev: float = 0
    for lo, hi in touched:
        if hi > lo:
            c = hi - 1
            seen[c] = seen.get(c, 0) + 1
            prev = hi if seen[c] == count[c] else c + seen[c] / count[c]
        ends.append(prev)
    return ends


def step_token_advantages(ends: list[int], steps: list, adv: float, lam: float) -> np.ndarray:
    """Per-token advantages of one completion (see the module docstring)."""
    a = np.full(len(ends), adv, np.float32)
    start = 0
    spans = [(s.start, s.end, s.score) for s in steps]
    for t, end in enumerate(ends):
        lo, hi = start, end
        start = end
        if hi <= lo:
            continue
        hit = [v for (s0, s1, v) in spans if lo < s1 and hi > s0]
        if not hit:
            continue
        v = min(hit)
        a[t] = max(adv, 0.0) if v >= 1.0 else min(adv, 0.0) - lam * (1.0 - v)
    return a


def score_completions(settings: RLSettings, rows: list[PromptRow], texts: list[str],
                      ids: list[list[int]] | None = None, *, rewards=None, verifier=None) -> dict:
    """Rewards, verdicts and advantages of P*G completions (row p is prompt p, repeated G times).

    Reward functions receive the rows' columns, plus ``prompts`` (the
    rendered prompt text) and ``completion_ids`` (the sampled token ids).
    """
    G = settings.group_size
    n = len(texts)
    per_row = [rows[i // G] for i in range(n)]
    total = np.zeros(n, np.float64)
    per_function = {}
    if rewards is not None:
        keys = sorted({k for r in rows for k in r.columns})
        columns = {k: [r.columns.get(k) for r in per_row] for k in keys}
        if ids is not None:
            columns["completion_ids"] = [list(c) for c in ids]
        sc = rewards.score(texts, columns, prompts=[r.text for r in per_row], sources=[r.source for r in per_row])
        total += np.asarray(sc.total, np.float64)
        per_function = sc.per_function
    verdicts = None
    if verifier is not None:
        # A StepVerifier: picks the columns the function takes, wraps its
        # exceptions and checks its verdicts (naming the verifier and row).
        verdicts = [verifier.verify(text, {**r.columns, "prompt_text": r.text}, row=i, source=r.source)
                    for i, (r, text) in enumerate(zip(per_row, texts))]
        final = np.array([v.final_score for v in verdicts], np.float64)
        total += settings.final_weight * final
    adv = group_advantages(total, G, settings.scale)
    return {"total": total, "per_function": per_function, "verdicts": verdicts, "adv": adv}


class RolloutSource:
    """An endless, resumable stream of rollout batches for :class:`mlxpost.training.loop.Trainer`."""

    mode = "pad"
    shuffle = True

    def __init__(self, model, tokenizer, rows: list[PromptRow], settings: RLSettings, *, rewards=None,
                 verifier=None, split: HeadSplit | None = None, seed: int = 0, pad_id: int = 0,
                 pad_multiple: int = 32):
        s = settings
        if not rows:
            raise MlxpostError("no prompts to train on")
        if len(rows) < s.prompts_per_step:
            raise MlxpostError(f"{len(rows)} prompts, fewer than grpo.prompts_per_step={s.prompts_per_step}")
        if (s.group_size * s.prompts_per_step) % s.micro_batch:
            raise MlxpostError(f"train.batch_size={s.micro_batch} must divide prompts_per_step x group_size = "
                               f"{s.prompts_per_step * s.group_size}")
        if rewards is None and verifier is None:
            raise MlxpostError("no reward: pass --reward (and/or a --verifier for rlvr)")
        self.model, self.tok, self.examples, self.s = model, tokenizer, rows, settings
        self.rewards, self.verifier = rewards, verifier
        self.split, self.seed, self.pad_id = split, seed, pad_id
        self.pad_multiple = pad_multiple
        # Rows of a step are as wide as its longest prompt + completion, rounded
        # up to pad_multiple, at most the longest prompt plus the token limit;
        # the trained entries (with a head split) are counted in quarters of
        # their most. A new shape means a new compiled graph (on Linux a JIT
        # build of its kernels), so shapes come in a few coarse sizes, each
        # traced once; short completions then do not pay for the token limit.
        longest = max(len(r.tokens) for r in rows) + s.sampling.max_new_tokens - 1
        self.width = -(-longest // pad_multiple) * pad_multiple
        self.select_size = s.micro_batch * s.sampling.max_new_tokens
        self.select_bucket = max(1, -(-self.select_size // 4))
        self.batch_size = s.micro_batch
        self.micro_per_step = s.group_size * s.prompts_per_step // s.micro_batch
        self.epoch, self.index, self.iteration = 0, 0, 0
        # What this process's rollouts generated, for their FLOP count (mlxpost.core.flops.generation_flops).
        self.generated = {"seconds": 0.0, "prompts": 0, "prompt_tokens": 0, "new_tokens": 0, "pairs": 0.0}
        self.epoch_limit = None
        self._plan = None
        self.last_metrics: dict = {}
        self.last_rollout: dict | None = None  # texts and scores of the latest rollout, for inspection

    # -- plan and state ---------------------------------------------------------
    def _plan_for_epoch(self) -> list[list[int]]:
        if self._plan is None:
            rng = np.random.default_rng([self.seed, self.epoch])
            order = rng.permutation(len(self.examples)).tolist()
            P = self.s.prompts_per_step
            self._plan = [order[i:i + P] for i in range(0, len(order) - P + 1, P)][: self.epoch_limit]
        return self._plan

    def limit_epoch(self, n: int) -> None:
        self.epoch_limit = n
        self._plan = None

    def batches_per_epoch(self) -> int:
        """Micro-batches per pass over the prompts (the loop divides by ``grad_accum``)."""
        return len(self._plan_for_epoch()) * self.s.num_iterations * self.micro_per_step

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "iteration": self.iteration, "generated": dict(self.generated)}

    def load_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.iteration = int(state.get("iteration", 0))
        if isinstance(state.get("generated"), dict):  # a checkpoint from before the count was kept: from 0
            self.generated = {**self.generated, **state["generated"]}
        self._plan = None

    @property
    def epoch_progress(self) -> float:
        n = max(1, len(self._plan_for_epoch()))
        return self.epoch + (self.index + self.iteration / self.s.num_iterations) / n

    def __iter__(self):
        while True:
            plan = self._plan_for_epoch()
            while self.index < len(plan):
                # A run resumed in the middle of a rollout's iterations samples
                # that rollout afresh (from the resumed policy) and finishes them.
                micro = self.rollout(plan[self.index])
                n_it = self.s.num_iterations
                for it in range(self.iteration, n_it):
                    for j, mb in enumerate(micro):
                        if j == len(micro) - 1:  # what a checkpoint after this step records
                            if it + 1 == n_it:
                                self.iteration, self.index = 0, self.index + 1
                            else:
                                self.iteration = it + 1
                        self.last_metrics["iteration"] = it + 1
                        yield mb
            self.epoch += 1
            self.index = 0
            self._plan = None

    # -- one rollout --------------------------------------------------------
    def score(self, rows: list[PromptRow], texts: list[str], ids: list[list[int]] | None = None) -> dict:
        return score_completions(self.s, rows, texts, ids, rewards=self.rewards, verifier=self.verifier)

    def rollout(self, idx: list[int]) -> list[Batch]:
        """Sample the prompts at ``idx`` and build the step's micro-batches."""
        rows = [self.examples[i] for i in idx]
        ro = sample_groups(self.model, self.tok, [r.tokens for r in rows], self.s.group_size, self.s.sampling,
                           pad_id=self.pad_id)
        self._count(rows, ro)
        return self.build(rows, ro)

    def _count(self, rows: list[PromptRow], ro) -> None:
        """Add a rollout to :attr:`generated`: each prompt prefilled once (causal pairs ``p (p + 1) / 2``),
        then completion ``k`` of prompt ``i`` (row ``i * G + g``) attends ``p_i + t`` keys at its token ``t``."""
        G, p = self.s.group_size, [len(r.tokens) for r in rows]
        g = self.generated
        g["seconds"] += ro.seconds
        g["prompts"] += len(rows)
        g["prompt_tokens"] += sum(p)
        g["new_tokens"] += ro.sampled_tokens
        g["pairs"] += sum(n * (n + 1) / 2 for n in p) + sum(
            len(c) * p[k // G] + len(c) * (len(c) + 1) / 2 for k, c in enumerate(ro.completions))

    def build(self, rows: list[PromptRow], ro) -> list[Batch]:
        """Score sampled completions (``ro``: :class:`mlxpost.rl.rollout.Rollouts`) and batch them."""
        s = self.s
        t_score = time.perf_counter()
        sc = self.score(rows, ro.texts, ro.completions)
        eos = set(getattr(self.tok, "eos_token_ids", None) or {self.tok.eos_token_id})
        tok_adv = []
        for i, comp in enumerate(ro.completions):
            a = np.full(len(comp), sc["adv"][i], np.float32)
            v = sc["verdicts"][i] if sc["verdicts"] is not None else None
            if v is not None and v.steps:
                body = [t for t in comp if t not in eos]
                ends = token_char_ends(self.tok, body)
                a[: len(body)] = step_token_advantages(ends, v.steps, float(sc["adv"][i]), s.step_weight)
            tok_adv.append(a)
        score_s = time.perf_counter() - t_score
        micro = self._batches(rows, ro, tok_adv)
        self.last_metrics = self._metrics(ro, sc, tok_adv, score_s)
        self.last_rollout = {"prompts": [r.source for r in rows], "texts": ro.texts,
                             "rewards": sc["total"].tolist(), "advantages": sc["adv"].tolist()}
        return micro

    def _batches(self, rows: list[PromptRow], ro, tok_adv: list[np.ndarray]) -> list[Batch]:
        s, G = self.s, self.s.group_size
        seqs = [(rows[i // G].tokens, c) for i, c in enumerate(ro.completions)]
        needed = max(len(p) + len(c) - 1 for p, c in seqs)
        width = min(self.width, -(-needed // self.pad_multiple) * self.pad_multiple)
        out = []
        for b0 in range(0, len(seqs), s.micro_batch):
            B = s.micro_batch
            inputs = np.full((B, width), self.pad_id, np.int32)
            targets = np.zeros((B, width), np.int32)
            weights = np.zeros((B, width), np.float32)
            adv = np.zeros((B, width), np.float32)
            n_tokens = 0
            for r in range(B):
                i = b0 + r
                p, c = seqs[i]
                toks = np.array(list(p) + list(c), np.int32)
                L = len(toks) - 1
                inputs[r, :L] = toks[:-1]
                targets[r, :L] = toks[1:]
                lo = len(p) - 1  # the first completion token is the target at position len(p) - 1
                if not (s.mask_truncated and ro.truncated[i]):
                    weights[r, lo:lo + len(c)] = 1.0
                adv[r, lo:lo + len(c)] = tok_adv[i]
                n_tokens += L
            batch = Batch(inputs=mx.array(inputs), targets=mx.array(targets), weights=mx.array(weights),
                          segments=None, n_tokens=n_tokens, n_targets=int(weights.sum()), n_examples=B,
                          select=selection(weights, self.select_bucket) if self.split
                          else None,
                          sources=[rows[(b0 + r) // G].source for r in range(B)])
            batch.extra = {"adv": mx.array(adv)}
            if s.num_iterations > 1:
                # Log-probs of the policy that sampled (no dropout), for the importance ratio.
                was = self.model.training
                self.model.eval()
                old = token_logprobs(self.model, batch, self.split, batch.select)
                mx.eval(old)
                if was:
                    self.model.train()
                batch.extra["old_logps"] = mx.stop_gradient(old)
            out.append(batch)
        return out

    def _metrics(self, ro, sc: dict, tok_adv: list, score_s: float) -> dict:
        G = self.s.group_size
        total = sc["total"]
        groups = total.reshape(-1, G)
        lens = np.array([len(c) for c in ro.completions])
        m = {
            "reward": float(total.mean()), "reward_std": float(total.std()),
            "all_equal_groups": float(np.mean(np.ptp(groups, axis=1) < 1e-9)),
            "adv_std": float(np.concatenate(tok_adv).std()) if tok_adv else 0.0,
            "completion_len": float(lens.mean()), "completion_len_max": int(lens.max()),
            "truncated": float(ro.truncated.mean()),
            "rollout_s": round(ro.seconds, 3), "rollout_tok_s": ro.sampled_tokens / max(ro.seconds, 1e-9),
            "score_s": round(score_s, 3),
        }
        for name, vals in sc["per_function"].items():
            xs = [v for v in vals if v is not None]
            if xs:
                m[f"reward/{name}"] = float(np.mean(xs))
                m[f"reward/{name}_std"] = float(np.std(xs))
        if sc["verdicts"] is not None:
            steps = [st.score for v in sc["verdicts"] for st in v.steps]
            m["step_acc"] = float(np.mean([x >= 1.0 for x in steps])) if steps else float("nan")
            m["final_acc"] = float(np.mean([v.final_score >= 1.0 for v in sc["verdicts"]]))
            m["steps_per_completion"] = len(steps) / len(sc["verdicts"])
        return m
