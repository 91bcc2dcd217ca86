"""How tokens are drawn when a model writes: the settings every sampler takes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    max_new_tokens: int = 128
    stop: tuple = ()  # stop strings: the completion ends where one first appears (it is kept)
