"""Step-verified RL: a verifier checks every reasoning step; wrong steps are penalized on their own tokens.

GRPO's objective with one advantage per token instead of one per completion
(credit assignment: :mod:`mlxpost.rl.source`), the verifier's final-answer
score in the reward, and a gate on the step and final accuracy of the greedy
answers to the validation prompts at the end of the run.
"""

from __future__ import annotations

from dataclasses import dataclass

import click

from .base import check_fraction, check_non_negative
from .online_rl import OPTIONS, REWARDS_HELP, GRPOConfig, OnlineRLMethod, RLSettings, RLThresholds


@dataclass
class RLVRConfig:
    verifier: str = "arithmetic"  # arithmetic | exact | file.py:function | module:function
    step_weight: float = 1.0  # lam: penalty on the tokens of a wrong step (see mlxpost.rl.source)
    final_weight: float = 1.0  # weight of the final-answer score in the completion's reward
    gate_step_acc: float = 0.8  # end-of-run gates on the validation prompts
    gate_final_acc: float = 0.9


class RLVR(OnlineRLMethod):
    name = "rlvr"
    help = """Step-verified RL: a verifier checks every reasoning step; wrong steps are penalized on their own tokens.

\b
Examples:
  mlxpost rlvr                                   # bundled arithmetic tasks, arithmetic verifier
  mlxpost rlvr --model Qwen/Qwen2.5-0.5B-Instruct --data tasks.jsonl --verifier arithmetic
  mlxpost rlvr --data tasks.jsonl --verifier my_checks.py:verify --reward format@0.2
""" + REWARDS_HELP
    sections = {"grpo": GRPOConfig, "rlvr": RLVRConfig}
    plugin_keys = ("grpo.rewards", "rlvr.verifier")
    options = OPTIONS + (
        click.option("--verifier", "rlvr__verifier", metavar="NAME",
                     help="arithmetic, exact, path/to/file.py:function or package.module:function "
                          "(default arithmetic)."),
        click.option("--step-weight", "rlvr__step_weight", type=float,
                     help="Penalty on the tokens of a wrong step (default 1)."),
    )

    def validate(self, cfg) -> None:
        super().validate(cfg)
        check_non_negative(cfg, "rlvr.step_weight", "rlvr.final_weight")
        check_fraction(cfg, "rlvr.gate_step_acc", "rlvr.gate_final_acc")

    def settings(self, cfg) -> RLSettings:
        s = super().settings(cfg)
        s.step_weight, s.final_weight = cfg.rlvr.step_weight, cfg.rlvr.final_weight
        return s

    def verifier(self, cfg) -> str:
        return cfg.rlvr.verifier

    def thresholds(self, cfg) -> RLThresholds:
        t = super().thresholds(cfg)
        t.gate_step_acc, t.gate_final_acc = cfg.rlvr.gate_step_acc, cfg.rlvr.gate_final_acc
        return t

    def summarize(self, prep, result, summary: dict, *, monitor=None, evals=None) -> None:
        super().summarize(prep, result, summary, monitor=monitor, evals=evals)
        if monitor is not None:
            result.health = {**(result.health or {}), "quality_gate": monitor.gate((evals or {}).get("after"))}
