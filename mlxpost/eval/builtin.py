"""The built-in offline tasks: arithmetic, perplexity, preference pairs, and tasks written as JSONL rows.

* :class:`ArithTask` (``arith[:FILE]``, ``arith:gen:N``): greedy answers to
  arithmetic tasks, each step checked by the ``arithmetic`` step verifier
  (:mod:`mlxpost.rl.verifiers`): ``final_acc`` (the final answer is right),
  ``step_acc`` (the share of ``a op b = c`` lines that are right, pooled over
  all answers) and ``format`` (the answer ends with an ``Answer:`` line).
* :class:`PerplexityTask` (``ppl:FILE``): mean negative log-likelihood per
  trained token of an SFT-format file (the tokens training computes its loss
  on: assistant turns, completions), and its exponential ``ppl``.
* :class:`PairsTask` (``pairs:FILE``): summed log-probs of the chosen and
  rejected answers of preference pairs: ``acc`` (chosen above rejected),
  ``acc_norm`` (the same per token), ``margin`` (chosen - rejected, nats). For a
  run directory also the implicit reward against its reference (its own
  adapter off, as preference training computes it): ``implicit_acc`` and
  ``implicit_margin`` (times the run's beta when it has one); these have no
  direction across runs (each run has its own reference), so retention
  leaves them out.
* :class:`UserTask` (``task:FILE.jsonl``): multiple-choice rows
  ``{"question", "choices", "answer"}`` scored by log-likelihood (``acc``;
  ``acc_norm`` divides by the choice's length in bytes, as lm-eval does) and
  generate-and-check rows ``{"prompt", "answer", ...}`` answered greedily and
  scored by the reward functions (``--reward``, as for GRPO: ``reward`` is
  their weighted total, and each also gets its own mean).

Metrics are means over samples with their standard errors (:mod:`.stats`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np

from ..assets import ARITH_TASKS_DIR
from ..core.batches import BatchSource
from ..core.logprobs import logprobs
from ..core.pairs import shared_prefix
from ..core.sampling import Sampling
from ..data.load import PairExample, PromptRow, load_prompts, tokenize_file, tokenize_pairs_file
from ..data.rows import read_jsonl, validate_pair_row, validate_prompt_row, validate_sft_row
from ..errors import DataError, MlxpostError, RowIssue
from ..files import file_sha256
from ..rl.rewards import RewardSet, format_reward
from ..rl.tasks import generate_tasks
from ..rl.verifiers import StepVerifier
from .context import EvalContext, Task, TaskResult
from .generation import complete
from .loglik import Group
from .stats import mean_metric, metric, ratio_stderr

MAX_SEQ_LEN = 4096  # tokens of an example before it is truncated (perplexity and pairs)


def check_rows(path: Path, validate, what: str) -> int:
    """Validate every row of a JSONL file; all problems at once, by file, line and field. Returns the row count."""
    if not path.is_file():
        raise MlxpostError(f"{path}: no such file ({what})")
    issues, n = [], 0
    for line, row, issue in read_jsonl(path):
        n += 1
        if issue is not None:
            issues.append(issue)
            continue
        issues += [RowIssue(str(path), line, f, msg) for f, msg in validate(row)]
    if issues:
        raise DataError(issues, n, hint=f"Fix these rows of the {what}.")
    if n == 0:
        raise MlxpostError(f"{path}: no rows ({what})")
    return n


def file_config(spec: str, path: Path, ctx: EvalContext, **extra) -> dict:
    return {"spec": spec, "file_sha256": file_sha256(path), "limit": ctx.limit, **extra}


# ---------------------------------------------------------------------------
# Arithmetic
# ---------------------------------------------------------------------------


def _arith_row(row: dict) -> list[tuple[str, str]]:
    problems = validate_prompt_row(row)
    if "answer" not in row:
        problems.append(("answer", "missing: arithmetic rows need the expected final answer"))
    return problems


class ArithTask(Task):
    """Arithmetic answered greedily, every step checked (see the module docstring)."""

    kind = "arith"

    def __init__(self, spec: str, source: str | None):
        super().__init__(spec)
        self.generated = None
        self.path = ARITH_TASKS_DIR / "valid.jsonl" if not source else None
        if source and source.startswith("gen:"):
            n = source[4:]
            if not n.isdigit() or int(n) < 1:
                raise MlxpostError(f"task {spec!r}: arith:gen:N needs a positive number of tasks, got {n!r}")
            self.generated = int(n)
        elif source:
            self.path = Path(source).expanduser()

    def check(self) -> None:
        if self.path is not None:
            check_rows(self.path, _arith_row, "arithmetic tasks (prompt, answer)")

    def config(self, ctx: EvalContext) -> dict:
        extra = {"max_new_tokens": ctx.max_new_tokens or 256, "seed": ctx.seed if self.generated else None}
        if self.generated:
            return {"spec": self.key, "limit": ctx.limit, **extra}
        return file_config(self.key, self.path, ctx, **extra)

    def rows(self, ctx: EvalContext) -> list[PromptRow]:
        if self.path is not None:
            rows, _ = load_prompts(self.path, ctx.renderer, max_prompt_len=MAX_SEQ_LEN, limit=ctx.limit)
            return rows
        out = []
        for i, t in enumerate(ctx.limited(generate_tasks(self.generated, seed=ctx.seed))):
            ids, text = ctx.renderer.prompt(t["prompt"])
            out.append(PromptRow(ids, text, {k: v for k, v in t.items() if k != "prompt"}, f"arith:gen:{i}",
                                 t["prompt"], i))
        return out

    def run(self, ctx: EvalContext) -> TaskResult:
        rows = self.rows(ctx)
        greedy = Sampling(temperature=0.0, max_new_tokens=ctx.max_new_tokens or 256)
        with ctx.progress(f"{self.key}: answering", len(rows)) as bar:
            texts, cut = complete(ctx.model, ctx.tokenizer, [r.tokens for r in rows], greedy,
                                  batch_size=ctx.batch_size, seed=ctx.seed, pad_id=ctx.pad_id, progress=bar.advance)
        verifier = StepVerifier("arithmetic")
        finals, right, steps = [], [], []
        for i, (r, t) in enumerate(zip(rows, texts)):
            v = verifier.verify(t[0], {**r.columns, "prompt_text": r.text}, row=i, source=r.source)
            finals.append(float(v.final_score >= 1.0))
            right.append(sum(s.score >= 1.0 for s in v.steps))
            steps.append(len(v.steps))
        fmt = format_reward([t[0] for t in texts])
        metrics = {"final_acc": mean_metric(finals), "step_acc": metric(*ratio_stderr(right, steps)),
                   "format": mean_metric(fmt)}
        samples = [{"source": r.source, "completion": t[0], "final": f} for r, t, f in zip(rows[:3], texts, finals)]
        return TaskResult(metrics, len(rows), {k: True for k in metrics},
                          {"samples": samples, "truncated": sum(c[0] for c in cut), "steps": sum(steps)})


# ---------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------


class FileTask(Task):
    """A task over the rows of one JSONL file: its rows are checked (file:line:field) before the model loads."""

    valid_row: Callable[[dict], list]  # a row's problems as (field, message); set by each file task
    rows_what = ""  # what a row must hold, for the error message

    def __init__(self, spec: str, path: str):
        super().__init__(spec)
        self.path = Path(path).expanduser()

    def check(self) -> None:
        check_rows(self.path, self.valid_row, self.rows_what)

    def config(self, ctx: EvalContext) -> dict:
        return file_config(self.key, self.path, ctx, max_seq_len=MAX_SEQ_LEN)


class PerplexityTask(FileTask):
    """Perplexity over the trained tokens of an SFT-format file, batched as training batches it."""

    kind = "ppl"
    valid_row = staticmethod(validate_sft_row)
    rows_what = "SFT rows (messages, prompt/completion or text)"

    def run(self, ctx: EvalContext) -> TaskResult:
        examples, stats = tokenize_file(self.path, ctx.renderer, max_seq_len=MAX_SEQ_LEN, limit=ctx.limit)
        if not examples:
            raise MlxpostError(f"{self.path}: no row has trained tokens (task {self.key})")
        split = ctx.scorer.split
        source = BatchSource(examples, mode="pad", batch_size=ctx.batch_size, max_len=max(len(e) for e in examples),
                             pad_id=ctx.pad_id, shuffle=False, select_bucket=64 if split else None)
        nll, count = [], []
        with ctx.progress(f"{self.key}: scoring", len(examples)) as bar:
            for batch in source:
                lp = logprobs(ctx.model, batch, reduction="none", split=split, select=batch.select)  # (B, L)
                sums, n = (-lp).sum(axis=1), batch.weights.sum(axis=1)  # (B,), (B,)
                for s, c in zip(np.array(sums).tolist(), np.array(n).tolist()):
                    if c > 0:  # rows that fill a short last batch hold nothing
                        nll.append(s)
                        count.append(c)
                bar.advance(batch.n_examples)
        mean, se = ratio_stderr(nll, count)
        ppl = math.exp(mean)
        metrics = {"nll": metric(mean, se), "ppl": metric(ppl, ppl * se)}  # the delta method: d exp(x) = exp(x) dx
        return TaskResult(metrics, len(nll), {"nll": False, "ppl": False},
                          {"tokens": int(sum(count)), "truncated": stats.truncated})


# ---------------------------------------------------------------------------
# Preference pairs
# ---------------------------------------------------------------------------


def pair_groups(pair: PairExample) -> list[Group]:
    """A pair as one :class:`Group` (the prompt, then both answers), or one group per side when they share
    no first token; only the answers' tokens (the pair's masks) count."""
    c, r = pair.chosen, pair.rejected
    q = shared_prefix(c, r)
    if q >= 1:
        return [Group(c.tokens[:q].tolist(), [c.tokens[q:].tolist(), r.tokens[q:].tolist()],
                      [c.mask[q:].astype(np.float32), r.mask[q:].astype(np.float32)])]
    return [Group(ex.tokens[:1].tolist(), [ex.tokens[1:].tolist()], [ex.mask[1:].astype(np.float32)]) for ex in (c, r)]


def side_scores(ctx: EvalContext, pairs: list[PairExample], what: str) -> np.ndarray:
    """(P, 2, 2): per pair, per side (chosen, rejected), the summed log-prob and the token count."""
    groups, owner = [], []
    for i, p in enumerate(pairs):
        gs = pair_groups(p)
        groups += gs
        owner += [i] * len(gs)
    out = np.zeros((len(pairs), 2, 2))
    side = np.zeros(len(pairs), np.int64)
    with ctx.progress(f"{what}", len(groups)) as bar:
        scores = ctx.scorer.score(groups, progress=bar.advance)
    for i, s in zip(owner, scores):
        for sc in s:
            out[i, side[i]] = (sc.logprob, sc.tokens)
            side[i] += 1
    return out


class PairsTask(FileTask):
    """Preference accuracy and margin of the model's log-probs (and, for a run, of its implicit reward)."""

    kind = "pairs"
    valid_row = staticmethod(validate_pair_row)
    rows_what = "preference pairs (prompt, chosen, rejected)"

    def run(self, ctx: EvalContext) -> TaskResult:
        pairs, _ = tokenize_pairs_file(self.path, ctx.renderer, max_seq_len=MAX_SEQ_LEN, limit=ctx.limit)
        if not pairs:
            raise MlxpostError(f"{self.path}: no pair left to score (task {self.key})")
        s = side_scores(ctx, pairs, f"{self.key}: scoring")
        diff = s[:, 0, 0] - s[:, 1, 0]
        per_token = s[:, 0, 0] / s[:, 0, 1] - s[:, 1, 0] / s[:, 1, 1]
        metrics = {"acc": mean_metric((diff > 0).astype(float).tolist()),
                   "acc_norm": mean_metric((per_token > 0).astype(float).tolist()),
                   "margin": mean_metric(diff.tolist())}
        info, hib = {}, {k: True for k in metrics}
        if ctx.reference is not None:
            with ctx.without_adapter():
                ref = side_scores(ctx, pairs, f"{self.key}: reference")
            h = diff - (ref[:, 0, 0] - ref[:, 1, 0])  # DPO's h: (pi_c - ref_c) - (pi_r - ref_r)
            beta = ctx.beta if ctx.beta is not None else 1.0
            metrics["implicit_acc"] = mean_metric((h > 0).astype(float).tolist())
            metrics["implicit_margin"] = mean_metric((beta * h).tolist())
            # Relative to this run's own reference: no direction across runs (two runs have two references).
            hib.update(implicit_acc=None, implicit_margin=None)
            info["beta"] = beta
        return TaskResult(metrics, len(pairs), hib, info)


# ---------------------------------------------------------------------------
# Your own tasks
# ---------------------------------------------------------------------------


def _user_row(row: dict) -> list[tuple[str, str]]:
    if "choices" in row or "question" in row:
        return _choice_row(row)
    if "prompt" in row:
        problems = validate_prompt_row(row)
        if "answer" not in row:
            problems.append(("answer", "missing: a generate-and-check row needs the expected 'answer'"))
        return problems
    keys = ", ".join(sorted(row)) or "none"
    return [("", f"unknown row (keys: {keys}); expected question/choices/answer (multiple choice) or "
                 "prompt/answer (generate and check)")]


def _choice_row(row: dict) -> list[tuple[str, str]]:
    q, choices, answer = row.get("question"), row.get("choices"), row.get("answer")
    if not isinstance(q, str) or not q.strip():
        return [("question", "expected a non-empty string")]
    if not isinstance(choices, list) or len(choices) < 2:
        return [("choices", "expected a list of at least two strings")]
    for i, c in enumerate(choices):
        if not isinstance(c, str) or not c.strip():
            return [(f"choices[{i}]", "expected a non-empty string")]
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        return [("answer", "expected the index of the right choice or its text")]
    if isinstance(answer, int) and not 0 <= answer < len(choices):
        return [("answer", f"index {answer} is out of range for {len(choices)} choices")]
    if isinstance(answer, str) and answer not in choices:
        return [("answer", f"{answer[:40]!r} is not one of the choices")]
    return []


class UserTask(FileTask):
    """Rows of your own: multiple choice by log-likelihood, or generate and check with reward functions."""

    kind = "task"
    valid_row = staticmethod(_user_row)
    rows_what = "task rows ({question, choices, answer} or {prompt, answer})"

    def config(self, ctx: EvalContext) -> dict:
        return file_config(self.key, self.path, ctx, rewards=list(ctx.rewards),
                           max_new_tokens=ctx.max_new_tokens or 256)

    def rows(self, ctx: EvalContext) -> list[tuple[str, dict]]:
        out = [(f"{self.path.name}:{line}", row) for line, row, _ in read_jsonl(self.path)]
        return ctx.limited(out)

    def choice_ids(self, ctx: EvalContext, choice: str) -> list[int]:
        """A choice's tokens after the prompt: the reply itself under a chat template, else after a space."""
        r = ctx.renderer
        return r.hf(choice if r.use_template else " " + choice.lstrip(), add_special_tokens=False)["input_ids"]

    def run(self, ctx: EvalContext) -> TaskResult:
        rows = self.rows(ctx)
        mc = [(src, row) for src, row in rows if "choices" in row]
        gen = [(src, row) for src, row in rows if "choices" not in row]
        metrics, info = {}, {}
        if mc:
            metrics.update(self.run_choices(ctx, mc))
        if gen:
            m, info["samples"] = self.run_generate(ctx, gen)
            metrics.update(m)
        info["rows"] = {"multiple_choice": len(mc), "generate": len(gen)}
        return TaskResult(metrics, len(rows), {k: True for k in metrics}, info)

    def run_choices(self, ctx: EvalContext, rows: list) -> dict:
        groups, gold, nbytes = [], [], []
        for _, row in rows:
            choices = row["choices"]
            groups.append(Group(ctx.renderer.prompt(row["question"])[0], [self.choice_ids(ctx, c) for c in choices]))
            a = row["answer"]
            gold.append(a if isinstance(a, int) else choices.index(a))
            nbytes.append([len(c.encode("utf-8")) for c in choices])
        with ctx.progress(f"{self.key}: choices", len(groups)) as bar:
            scores = ctx.scorer.score(groups, progress=bar.advance)
        acc = [float(int(np.argmax([s.logprob for s in ss])) == g) for ss, g in zip(scores, gold)]
        norm = [float(int(np.argmax([s.logprob / b for s, b in zip(ss, nb)])) == g)
                for ss, g, nb in zip(scores, gold, nbytes)]
        return {"acc": mean_metric(acc), "acc_norm": mean_metric(norm)}

    def run_generate(self, ctx: EvalContext, rows: list) -> tuple[dict, list]:
        prompts = [ctx.renderer.prompt(row["prompt"]) for _, row in rows]
        greedy = Sampling(temperature=0.0, max_new_tokens=ctx.max_new_tokens or 256)
        with ctx.progress(f"{self.key}: answering", len(rows)) as bar:
            texts, _ = complete(ctx.model, ctx.tokenizer, [p[0] for p in prompts], greedy, batch_size=ctx.batch_size,
                                seed=ctx.seed, pad_id=ctx.pad_id, progress=bar.advance)
        texts = [t[0] for t in texts]
        keys = sorted({k for _, row in rows for k in row if k != "prompt"})
        columns = {k: [row.get(k) for _, row in rows] for k in keys}
        rewards = RewardSet(list(ctx.rewards))
        sc = rewards.score(texts, columns, prompts=[p[1] for p in prompts], sources=[s for s, _ in rows])
        metrics = {"reward": mean_metric(sc.total)}
        for name, values in sc.per_function.items():
            metrics[name] = mean_metric([v for v in values if v is not None])
        samples = [{"source": s, "completion": t} for (s, _), t in zip(rows[:3], texts)]
        return metrics, samples
