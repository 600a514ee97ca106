"""Learner -> learner replica after every update: HF-named full tensors streamed from the (TP/PP-sharded)
Megatron model into the rollout engine, tagged with a weight version that each later sample records.

Collective: every rank walks the tensor stream (TP all-gathers, PP broadcasts inside
``convert.iter_hf_tensors``); only the driver hands tensors to the engine. Transports:
  memory       LocalEngine in the driver process (tensors are copied into its model)
  tensor       SGLang /update_weights_from_tensor (colocated; CPU tensors or CUDA IPC)
  distributed  SGLang /update_weights_from_distributed (a broadcast group between driver and server)
  disk         an HF checkpoint written to <run_dir>/weight_sync and /update_weights_from_disk
The engine is paused around the update so no request samples from half-updated weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from megatron_s2l.model import checkpoint_io, convert
from megatron_s2l.rollout.runtime import RolloutRuntime
from megatron_s2l.rollout.types import RolloutEngine
from megatron_s2l.train.stopping import fail_together

logger = logging.getLogger(__name__)


class _Counted:
    """Wraps the tensor stream to count what went through (for GB/s) and, optionally, digest it."""

    def __init__(self, tensors: Iterable[tuple[str, torch.Tensor]], digest: bool):
        self._tensors = tensors
        self.num_bytes = 0
        self.num_tensors = 0
        self.names: list[str] = []
        self._hash = hashlib.blake2b(digest_size=16) if digest else None

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self._tensors:
            self.num_bytes += tensor.numel() * tensor.element_size()
            self.num_tensors += 1
            self.names.append(name)
            if self._hash is not None:
                convert.update_digest(self._hash, name, tensor)
            yield name, tensor

    @property
    def digest(self) -> str:
        return self._hash.hexdigest()


class WeightSync:
    """Pushes the learner's weights to the learner-replica engine (the explorer is never synced)."""

    def __init__(self, engine: Optional[RolloutEngine], mode: str, runtime: Optional[RolloutRuntime],
                 dtype: torch.dtype, staging_dir: Path, hf_dir: str | Path, verify: bool = False):
        self.engine = engine  # None on ranks other than the driver: they only take part in the gathers
        self.mode = mode
        self.runtime = runtime
        self.dtype = dtype
        self.staging_dir = staging_dir  # disk mode: complete HF checkpoints, one per version
        self.hf_dir = hf_dir  # config and tokenizer files that go with each version
        self.verify = verify  # compare a digest of what was sent with what the engine holds

    def sync(self, learner, version: str, verify: bool = False) -> dict[str, float]:
        """Send the current weights as `version`; returns timing and bandwidth metrics (driver). `verify`:
        check the engine's weights afterwards also when rollout.verify_weight_sync is off."""
        start = time.perf_counter()
        verify = verify or self.verify
        stream = _Counted(convert.iter_hf_tensors(learner.model, learner.args, dtype=self.dtype),
                          digest=verify and self.engine is not None)
        with fail_together(f"weight sync of version {version} to the learner replica"):
            try:
                if self.engine is not None:
                    self.runtime.run(self._send(stream, version, verify))
            finally:
                for _ in stream:  # take part in the gathers (the driver: those a failed send left)
                    pass
        seconds = time.perf_counter() - start
        gigabytes = stream.num_bytes / 1e9
        return {"sync/seconds": seconds, "sync/gigabytes": gigabytes,
                "sync/gb_per_s": gigabytes / seconds if seconds > 0 else 0.0, "sync/tensors": stream.num_tensors}

    async def _verify(self, stream: _Counted) -> None:
        """Bit-exact check that the engine now holds what the learner sent (engines that can read their
        weights back: LocalEngine. SGLang 0.5.23 cannot for Qwen3, so there the version check remains)."""
        held = await self.engine.weights_digest(stream.names)
        if held is None:
            logger.info("%s cannot report its weights, so only their version is checked after the sync",
                        self.engine.name)
            return
        if held != stream.digest:
            raise RuntimeError(f"weight sync to {self.engine.name}: the engine's weights differ from the learner's "
                               f"after the update (digest {held} != {stream.digest}); the update was incomplete")

    async def _send(self, stream: _Counted, version: str, verify: bool) -> None:
        await self.engine.pause()
        try:
            if self.mode == "disk":
                target = self.staging_dir / f"version-{version}"
                hf_config = json.loads((Path(self.hf_dir) / "config.json").read_text())
                checkpoint_io.save_hf_checkpoint(iter(stream), target, hf_config, assets_from=self.hf_dir)
                await self.engine.update_weights_from_path(str(target), version)
                for old in self.staging_dir.glob("version-*"):
                    if old != target:
                        shutil.rmtree(old, ignore_errors=True)
            else:
                await self.engine.update_weights(iter(stream), version)
        finally:
            await self.engine.resume()
        if verify:
            await self._verify(stream)
        served = await self.engine.weight_version()
        if served != version:
            raise RuntimeError(f"weight sync to {self.engine.name}: the engine reports weight version {served!r} "
                               f"after an update to {version!r}; is another trainer updating the same server?")
