"""The RolloutEngine protocol: what the collector and weight sync need from anything that samples.

Implementations: ``SGLangEngine`` (real servers over HTTP, rollout/sglang.py) and ``LocalEngine``
(in-process transformers, rollout/local.py). All methods are async so the driver can keep the explorer
and the learner replica busy at the same time.
"""

from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable

import torch

from megatron_s2l.rollout.types import Generation, SamplingParams


@runtime_checkable
class RolloutEngine(Protocol):
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

    async def health(self) -> bool:
        """True when the engine answers."""
        ...

    async def pause(self) -> None:
        """Stop scheduling new work (in-flight requests are aborted or held) before a weight update."""
        ...

    async def resume(self) -> None:
        """Continue after ``pause``."""
        ...

    async def close(self) -> None:
        """Release resources (HTTP connections, processes this engine started)."""
        ...
