"""Supervised fine-tuning: mean negative log-likelihood of the trained tokens.

The loss is summed over every trained token of a micro-batch and returned with
the token count; the training loop divides by the total count of the whole
optimizer step (all micro-batches, all ranks), so each token weighs the same
however the step is split.

Health checks (the ``sft`` section), shown live, logged and summed up at the
end by :class:`SFTHealth`, which reads the loss of every step and every
validation evaluation and reports the first time a problem shows:

* **flat loss**: ``flat_window`` steps after warmup, the mean loss of the
  last ``flat_window`` steps is less than ``flat_min_drop`` (relative) below
  the mean of the first ``flat_window`` steps after warmup: the adapter is
  not learning (learning rate too low, nothing to learn, a masked-out target);
* **validation loss rising**: ``rising_evals`` evaluations in a row, each
  above the one before: the run is overfitting (or diverging);
* **oscillation**: over the last ``oscillation_window`` steps after warmup,
  the loss changes direction at least ``oscillation_flips`` of the time with
  a mean step-to-step change of at least ``oscillation_amplitude`` of the
  mean loss: a zig-zag, the mark of a learning rate too high. (For
  independent noise a change of direction comes about two times in three,
  so the share alone would flag ordinary noise; the amplitude keeps small
  wobbles out.)
* **quality gate** (end of run): validation perplexity below
  ``gate_max_val_ppl`` (default 20), pass or fail in the summary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

from ..assets import DEFAULT_SFT_RECIPE
from ..core.logprobs import HeadSplit, logprobs
from ..training.health import Finding, HealthMonitor
from ..training.loop import Objective
from .base import Bundled, Method, check_fraction, check_positive


@dataclass
class SFTConfig:
    gate_max_val_ppl: float = 20.0  # quality gate: validation perplexity below this
    flat_window: int = 10  # steps averaged to call the loss flat after warmup
    flat_min_drop: float = 0.01  # relative fall of the loss below which it is flat
    rising_evals: int = 3  # validation losses rising in a row before a warning
    oscillation_window: int = 20  # steps watched for a zig-zag loss
    oscillation_flips: float = 0.8  # share of changes of direction that makes a zig-zag
    oscillation_amplitude: float = 0.1  # ... with steps of at least this share of the mean loss


def direction_changes(values: list[float]) -> tuple[float, float]:
    """Share of consecutive step-to-step changes that reverse direction, and the mean absolute change.

    >>> direction_changes([1.0, 2.0, 1.0, 2.0, 1.0])
    (1.0, 1.0)
    >>> direction_changes([4.0, 3.0, 2.0, 1.0])
    (0.0, 1.0)
    """
    d = [b - a for a, b in zip(values, values[1:])]
    if len(d) < 2:
        return 0.0, 0.0
    flips = sum(1 for x, y in zip(d, d[1:]) if x * y < 0) / (len(d) - 1)
    return flips, sum(abs(x) for x in d) / len(d)


def rising_run(values: list[float]) -> int:
    """How many of the last values each rose above the one before (0 when the last did not rise).

    >>> rising_run([3.0, 2.0, 2.1, 2.2, 2.3]), rising_run([2.0, 2.1, 2.0])
    (3, 0)
    """
    n = 0
    for a, b in zip(reversed(values[:-1]), reversed(values[1:])):
        if b <= a:
            break
        n += 1
    return n


class SFTHealth(HealthMonitor):
    """Watches one SFT run (see the module docstring)."""

    checks = {"flat_loss": "flat-loss", "val_rising": "val-rising", "oscillation": "oscillation"}

    def __init__(self, total_steps: int, thresholds: SFTConfig | None = None, warmup: int = 0):
        super().__init__(total_steps)
        self.t = thresholds or SFTConfig()
        self.warmup = warmup  # steps of learning-rate warmup: the loss checks start after them
        self.losses: list[float] = []  # after warmup
        self.val: list[float] = []

    def check(self, step: int, m: dict) -> list[Finding]:
        """The SFT checks of one step (the base monitor's stuck check runs first, in ``observe``)."""
        t = self.t
        loss = m.get("loss")
        if loss is None or not math.isfinite(loss) or step <= self.warmup:
            return []
        self.losses.append(loss)
        out: list[Finding] = []
        w = t.flat_window
        if len(self.losses) >= 2 * w:
            first, last = sum(self.losses[:w]) / w, sum(self.losses[-w:]) / w
            if first > 0 and (first - last) / first < t.flat_min_drop:
                out += self.found(
                    "flat", "flat-loss", step,
                    f"the training loss has not fallen since warmup (mean {first:.4f} over the first {w} steps "
                    f"after it, {last:.4f} over the last {w}): the adapter is not learning.",
                    "a higher learning rate (train.lr), a larger LoRA rank or more layers (lora.num_layers); "
                    "check that the data's trained tokens are the answers (data_stats.json: target_tokens).")
        if len(self.losses) >= t.oscillation_window:
            window = self.losses[-t.oscillation_window:]
            flips, amp = direction_changes(window)
            mean = sum(window) / len(window)
            if flips >= t.oscillation_flips and mean > 0 and amp / mean >= t.oscillation_amplitude:
                out += self.found(
                    "oscillation", "oscillation", step,
                    f"the training loss zig-zags: over the last {len(window)} steps it changed direction "
                    f"{flips:.0%} of the time, by {amp / mean:.0%} of its mean each step.",
                    "a lower learning rate (train.lr), more warmup (train.warmup_steps), gradient clipping "
                    "(train.max_grad_norm) or a larger batch (train.grad_accum).")
        return out

    def observe_eval(self, step: int, val: dict) -> list[Finding]:
        v = val.get("val_loss")
        if v is None or not math.isfinite(v):
            return []
        self.val.append(v)
        k = self.t.rising_evals
        if rising_run(self.val) < k:
            return []
        return self.found(
            "rising", "val-rising", step,
            f"the validation loss rose {k} evaluations in a row (now {v:.4f}, lowest {min(self.val):.4f}): the "
            "run is overfitting its training data.",
            "the best adapter (best/, lowest validation loss); fewer steps or epochs, early stopping "
            "(train.early_stopping_patience), more data, or lora.dropout.")

    def gate(self, val: dict | None) -> dict:
        """The end-of-run quality gate: validation perplexity below ``gate_max_val_ppl``."""
        limit = self.t.gate_max_val_ppl
        if not val or "val_ppl" not in val:
            return {"verdict": "skipped", "reason": "no validation data"}
        ppl = val["val_ppl"]
        return {"verdict": "pass" if ppl < limit else "fail", "val_ppl": ppl, "max_val_ppl": limit,
                "detail": f"val perplexity {ppl:.2f} vs < {limit}"}

    def summary(self, val: dict | None = None) -> dict:
        checks = super().summary(val)
        checks["non_finite"] = {"verdict": "ok"}
        checks["quality_gate"] = self.gate(val)
        return checks


def sft_loss(token_logprobs: mx.array, weights: mx.array) -> tuple[mx.array, mx.array, dict]:
    """Summed NLL and token count.

    token_logprobs: (B, L) log p(target), zero where not trained.
    weights: (B, L) 1.0 at trained positions.

    >>> lp = mx.array([[-1.0, -2.0, 0.0]]); w = mx.array([[1.0, 1.0, 0.0]])
    >>> loss, n, _ = sft_loss(lp, w); (loss.item(), n.item())
    (3.0, 2.0)
    """
    return -(token_logprobs * weights).sum(), weights.sum(), {}


def objective(split: HeadSplit | None = None, monitor=None) -> Objective:
    """The SFT objective; ``split`` computes logits only at trained positions; ``monitor``: a health monitor factory."""

    def loss(model, batch):
        lp = logprobs(model, batch, reduction="none", split=split, select=batch.select, grad=True)  # (B, L)
        return sft_loss(lp, batch.weights)

    return Objective(loss=loss, unit="token", perplexity=True, monitor=monitor)


class SFT(Method):
    name = "sft"
    help = """Fine-tune with LoRA on chat, prompt/completion or text data.

\b
Examples:
  mlxpost sft                                   # built-in default
  mlxpost sft --model Qwen/Qwen2.5-0.5B-Instruct --data data/ --steps 500
  mlxpost sft --config recipes/smollm2-135m-sft.yaml --set train.lr=2e-4
  mlxpost sft --resume runs/sft-20260101-120000  # continue after a kill
"""
    data = "sft"
    sections = {"sft": SFTConfig}
    bundled = Bundled(f"no --data and no --config: the built-in default run ({DEFAULT_SFT_RECIPE.name})",
                      recipe=DEFAULT_SFT_RECIPE)

    def validate(self, cfg) -> None:
        check_positive(cfg, "sft.gate_max_val_ppl", "sft.flat_window", "sft.rising_evals", "sft.oscillation_window")
        check_fraction(cfg, "sft.flat_min_drop", "sft.oscillation_flips")

    def monitor(self, cfg):
        """A factory of the run's health monitor (:class:`SFTHealth`)."""
        s, tr = cfg.sft, cfg.train
        return lambda total: SFTHealth(total, s, warmup=tr.warmup_steps or int(round(tr.warmup_ratio * total)))

    def objective(self, prep) -> Objective:
        return objective(prep.split, monitor=self.monitor(prep.cfg))
