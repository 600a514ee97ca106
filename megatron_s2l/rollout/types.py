"""Records that flow from the rollout side to the learner: one Sample per generated response,
one Group per prompt (its G = G_w + G_s samples)."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

Source = Literal["explorer", "learner"]
SOURCES: tuple[Source, ...] = ("explorer", "learner")


@dataclasses.dataclass
class SamplingParams:
    """Sampling settings shared by every engine (SGLang names; -1 / None mean off)."""

    max_new_tokens: int = 4096
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    presence_penalty: float = 0.0
    stop_token_ids: Optional[list[int]] = None
    seed: Optional[int] = None


@dataclasses.dataclass
class Generation:
    """One response as an engine returns it."""

    response_ids: list[int]
    logprobs: list[float]  # behaviour log-prob of each response token under the sampling engine
    finish_reason: str  # "stop" | "length" | "abort"
    weight_version: str = ""


@dataclasses.dataclass
class Sample:
    """One response to one prompt, with where it came from and how it scored."""

    prompt_id: str
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]  # behaviour log-probs (explorer or learner replica), len == len(response_ids)
    source: Source
    weight_version: str = ""
    finish_reason: str = "length"
    reward: Optional[float] = None
    answer: Optional[str] = None  # the extracted final answer, if any
    text: str = ""  # decoded response (for scoring and logging)

    @classmethod
    def from_generation(cls, gen: Generation, prompt_id: str, prompt_ids: list[int], source: Source,
                        text: str = "") -> "Sample":
        return cls(prompt_id=prompt_id, prompt_ids=list(prompt_ids), response_ids=list(gen.response_ids),
                   logprobs=list(gen.logprobs), source=source, weight_version=gen.weight_version,
                   finish_reason=gen.finish_reason, text=text)


@dataclasses.dataclass
class Group:
    """All samples for one prompt in one step: G_w explorer + G_s learner samples."""

    prompt_id: str
    prompt_ids: list[int]
    gold: str
    samples: list[Sample]

    def count(self, source: Source) -> int:
        return sum(s.source == source for s in self.samples)

    @property
    def rewards(self) -> list[float]:
        return [s.reward if s.reward is not None else 0.0 for s in self.samples]
