"""The rollout side's contracts: what every sampler implements (RolloutEngine), the settings it samples
with, and the records that flow to the learner: one Sample per generated response, one Group per prompt
(its G = G_w + G_s samples)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Iterable, Literal, Optional, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: the contracts stay importable without loading torch
    import torch

Source = Literal["explorer", "learner"]
SOURCES: tuple[Source, ...] = ("explorer", "learner")


@runtime_checkable
class PromptRecord(Protocol):
    """One training or held-out prompt, as the data module yields it."""

    prompt_id: str
    prompt_ids: list[int]
    gold: str


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


def version_age(version: str, current: int) -> int:
    """How many weight versions a sample's `version` is behind `current`. An engine's first weights ("0", or
    SGLang's "default") are version 0."""
    return current - (int(version) if version.isdigit() else 0)


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


@runtime_checkable
class RolloutEngine(Protocol):
    """What the collector, the weight sync and the evaluation need from anything that samples.

    Implementations: ``SGLangEngine`` (real servers over HTTP, rollout/sglang.py) and ``LocalEngine``
    (in-process transformers, rollout/local.py). Every method the trainer calls is here, with one signature
    for all engines, so no caller probes an engine with hasattr; tests/unit/test_local_engine.py and
    tests/sglang/test_sglang_contract.py call each of them. All methods are async so the driver can keep
    the explorer and the learner replica busy at the same time.
    """

    name: str

    async def generate(self, prompts: list[list[int]], n: int, params: SamplingParams
                       ) -> list[list[Generation]]:
        """n samples for each prompt (token ids in, token ids + log-probs out), prompt-major order."""
        ...

    async def update_weights(self, tensors: Iterable[tuple[str, torch.Tensor]], version: str) -> None:
        """Replace the weights with these HF-named full tensors and set the weight version."""
        ...

    async def update_weights_from_path(self, path: str, version: str) -> None:
        """Reload weights from an HF checkpoint directory and set the weight version."""
        ...

    async def weight_version(self) -> str:
        """The version of the weights the engine is serving now."""
        ...

    async def weights_digest(self, names: list[str]) -> Optional[str]:
        """``model.convert.tensor_digest`` of the weights the engine holds under these HF names, in this
        order, to compare bit for bit with what was sent. None means "cannot report" (SGLang 0.5.23 cannot
        read Qwen3 weights back), never "no weights": the caller falls back to ``weight_version``."""
        ...

    async def health(self) -> bool:
        """True when the engine answers."""
        ...

    async def pause(self) -> None:
        """Stop scheduling new work before a weight update; what happens to in-flight requests (aborted,
        held, or run to the end) is the engine's configuration, not the caller's."""
        ...

    async def resume(self) -> None:
        """Continue after ``pause``."""
        ...

    async def close(self) -> None:
        """Release resources (HTTP connections, processes this engine started)."""
        ...
