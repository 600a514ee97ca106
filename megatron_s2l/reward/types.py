"""The reward's contract: what the collector, the evaluator and the pool build call, whatever scores."""

from __future__ import annotations

import dataclasses
from typing import Optional, Protocol, runtime_checkable


@dataclasses.dataclass
class ScoreResult:
    reward: float
    answer: Optional[str]  # the extracted final answer (None: no marker); answer-diversity metrics use it
    correct: bool  # kind=math: equivalent to the gold; kind=function: reward > 0
    timed_out: bool = False  # scoring ran out of time: scored as wrong


@runtime_checkable
class Reward(Protocol):
    """Scores responses against gold answers; one instance (and one process pool) serves the whole run."""

    def score_batch(self, responses: list[str], golds: list[str]) -> list[ScoreResult]:
        """One result per response, in order."""
        ...

    def close(self) -> None:
        """Stop the scoring processes."""
        ...
