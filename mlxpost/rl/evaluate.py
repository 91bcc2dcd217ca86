"""Greedy answers to validation prompts, scored by the rewards and the verifier."""

from __future__ import annotations

import numpy as np

from ..core.sampling import Sampling
from ..data.load import PromptRow
from ..methods.online_rl import RLSettings
from .rollout import sample_groups
from .source import score_completions


def evaluate(model, tokenizer, rows: list[PromptRow], settings: RLSettings, *, rewards=None, verifier=None,
             batch_prompts: int = 64) -> dict:
    """Greedy completions of ``rows``, scored: reward mean, final-answer and step accuracy.

    Also every prompt's own outcome (``rewards``; ``finals`` with a verifier:
    whether its final answer is right), so that a change between two
    evaluations on the same prompts can be judged against noise
    (:func:`mlxpost.stats.paired_change`). ``batch_prompts`` prompts are
    answered together (one KV-cached batch).
    """
    greedy = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=settings.sampling.max_new_tokens,
                      stop=settings.sampling.stop)
    one = RLSettings(**{**settings.__dict__, "group_size": 1, "sampling": greedy})
    totals, finals, steps, texts = [], [], [], []
    for i in range(0, len(rows), batch_prompts):
        chunk = rows[i:i + batch_prompts]
        ro = sample_groups(model, tokenizer, [r.tokens for r in chunk], 1, greedy)
        sc = score_completions(one, chunk, ro.texts, ro.completions, rewards=rewards, verifier=verifier)
        totals += sc["total"].tolist()
        texts += ro.texts
        if sc["verdicts"] is not None:
            finals += [v.final_score >= 1.0 for v in sc["verdicts"]]
            steps += [st.score >= 1.0 for v in sc["verdicts"] for st in v.steps]
    out = {"n": len(rows), "reward": float(np.mean(totals)) if totals else float("nan"), "rewards": totals}
    if verifier is not None:
        out["final_acc"] = float(np.mean(finals)) if finals else float("nan")
        out["step_acc"] = float(np.mean(steps)) if steps else float("nan")
        out["finals"] = finals
    def shown(r):
        p = r.prompt if isinstance(r.prompt, str) else (r.prompt[-1]["content"] if r.prompt else r.text)
        return p.split("\n")[0]

    out["samples"] = [{"prompt": shown(r), "source": r.source, "completion": t} for r, t in zip(rows[:4], texts[:4])]
    return out
