"""What a step verifier returns: scored character spans of a completion, and the final answer's score."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Step:
    """One verified step: ``completion[start:end]``, scored in [0, 1] (1 = correct)."""

    start: int
    end: int
    score: float
    reason: str = ""


@dataclass
class Verdict:
    """A verifier's judgement of one completion: its steps and its final answer."""

    steps: list[Step] = field(default_factory=list)
    final_score: float = 0.0
    final_reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def all_correct(self) -> bool:
        return self.final_score == 1.0 and all(s.score == 1.0 for s in self.steps)
