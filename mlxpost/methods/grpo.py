"""GRPO: sample a group of completions per prompt, reward them, reinforce the better ones.

The rewards are plain functions of the completions (:mod:`mlxpost.rl.rewards`);
the advantages, the clipped objective and the rollout plan are the online RL
family's (:mod:`mlxpost.methods.online_rl`).
"""

from __future__ import annotations

from ..errors import ConfigError
from .online_rl import REWARDS_HELP, GRPOConfig, OnlineRLMethod

# With no --data, --config or --reward: the bundled arithmetic tasks and these rewards.
BUNDLED_REWARDS = ["accuracy", "format@0.2"]


class GRPO(OnlineRLMethod):
    name = "grpo"
    help = """GRPO: sample a group of completions per prompt, reward them, reinforce the better ones.

\b
Examples:
  mlxpost grpo                                   # bundled arithmetic tasks, accuracy + format rewards
  mlxpost grpo --model Qwen/Qwen2.5-0.5B-Instruct --data prompts.jsonl --reward accuracy --reward format@0.2
  mlxpost grpo --data prompts.jsonl --reward my_rewards.py:brevity --group-size 16 --loss-norm dapo
""" + REWARDS_HELP
    sections = {"grpo": GRPOConfig}

    def validate(self, cfg) -> None:
        super().validate(cfg)
        if not cfg.grpo.rewards:
            raise ConfigError("grpo needs at least one reward: --reward accuracy, --reward path/to/file.py:function, "
                              "...")

    def without_data(self, values: dict) -> list[str]:
        if values.get("grpo.rewards"):
            return []
        values["grpo.rewards"] = list(BUNDLED_REWARDS)
        return ["no --reward: accuracy (final answer) and format@0.2 (an 'Answer: N' last line)"]
