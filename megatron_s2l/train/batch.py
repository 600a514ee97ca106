"""The token-level training batch: built from a step's groups on the driver, broadcast to every rank,
then cut into mini-batches (one optimizer update each), data-parallel shards and micro-batches.

Legend: B sequences (all samples of the step), S padded sequence length (prompt + response).
Log-prob tensors are aligned with `tokens`: column s holds log p(tokens[s] | tokens[:s]), so only
response columns (``response_mask``) carry values.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist

from megatron_s2l.rollout.types import SOURCES, Group, version_age

_BROADCAST_FIELDS = ("tokens", "response_mask", "advantages", "source", "behaviour_logprobs", "age")


@dataclasses.dataclass
class TrainBatch:
    tokens: torch.Tensor  # [B, S] int64, right-padded
    response_mask: torch.Tensor  # [B, S] bool
    advantages: torch.Tensor  # [B] float32
    source: torch.Tensor  # [B] int64: 0 explorer, 1 learner
    behaviour_logprobs: torch.Tensor  # [B, S] float32, from the engine that sampled
    age: Optional[torch.Tensor] = None  # [B] int64: weight versions from the sampler's to the learner's (0: fresh
    # or explorer; asynchronous rollouts); None: all 0
    old_logprobs: Optional[torch.Tensor] = None  # [B, S], filled by the learner
    ref_logprobs: Optional[torch.Tensor] = None  # [B, S], filled by the learner when KL is on
    weights: Optional[torch.Tensor] = None  # [B, S] loss reduction weights (global over a mini-batch)

    def __post_init__(self):
        if self.age is None:
            self.age = torch.zeros(self.tokens.shape[0], dtype=torch.long, device=self.tokens.device)

    @property
    def num_sequences(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    def select(self, rows: torch.Tensor | slice) -> "TrainBatch":
        """The same batch restricted to some rows (mini-batch, shard, micro-batch)."""
        return TrainBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows]
                             for f in dataclasses.fields(self)})

    def to(self, device: torch.device) -> "TrainBatch":
        """The same batch with every tensor on `device` (the model's, before the forward)."""
        return TrainBatch(**{f.name: None if v is None else v.to(device)
                             for f in dataclasses.fields(self) for v in [getattr(self, f.name)]})

    def lengths(self) -> torch.Tensor:
        """Per row, the columns the model must see: up to the last response token (at least 1). [B]"""
        columns = torch.arange(1, self.response_mask.shape[1] + 1, device=self.response_mask.device)
        return (self.response_mask * columns).amax(dim=1).clamp(min=1)

    def trimmed(self, multiple: int = 8) -> "TrainBatch":
        """The same rows without the padding columns no row needs: width = longest row rounded up to
        `multiple` (zero columns are added when the batch is narrower than that)."""
        width = round_up(int(self.lengths().max()), multiple)

        def fit(v: torch.Tensor) -> torch.Tensor:
            extra = v.new_zeros(v.shape[0], max(0, width - v.shape[1]))
            return torch.cat([v[:, :width], extra], dim=1)

        return TrainBatch(**{f.name: fit(v) if v is not None and v.dim() == 2 else v
                             for f in dataclasses.fields(self) for v in [getattr(self, f.name)]})

    @classmethod
    def from_groups(cls, groups: list[Group], advantages: list[list[float]], pad_id: int,
                    pad_to_multiple: int = 8, weights_version: int = 0) -> "TrainBatch":
        """Concatenate prompt + response ids of every sample, right-padded to one length. No groups: a rank
        other than the driver, which receives the batch (a placeholder). `weights_version`: the learner's now,
        against which learner samples' ages are counted."""
        samples = [(s, a) for g, adv in zip(groups, advantages) for s, a in zip(g.samples, adv)]
        if not samples:
            return cls.placeholder()
        lengths = [len(s.prompt_ids) + len(s.response_ids) for s, _ in samples]
        seq_len = round_up(max(lengths), pad_to_multiple)
        tokens = torch.full((len(samples), seq_len), pad_id, dtype=torch.long)
        mask = torch.zeros(len(samples), seq_len, dtype=torch.bool)
        behaviour = torch.zeros(len(samples), seq_len)
        for row, (sample, _) in enumerate(samples):
            start, end = len(sample.prompt_ids), len(sample.prompt_ids) + len(sample.response_ids)
            tokens[row, :end] = torch.tensor(sample.prompt_ids + sample.response_ids)
            mask[row, start:end] = True
            behaviour[row, start:end] = torch.tensor(sample.logprobs, dtype=torch.float32)
        return cls(tokens=tokens, response_mask=mask,
                   advantages=torch.tensor([a for _, a in samples], dtype=torch.float32),
                   source=torch.tensor([SOURCES.index(s.source) for s, _ in samples]),
                   behaviour_logprobs=behaviour,
                   age=torch.tensor([version_age(s.weight_version, weights_version) if s.source == "learner" else 0
                                     for s, _ in samples]))

    def broadcast(self, src: int = 0, device: torch.device | None = None) -> "TrainBatch":
        """Send the driver's batch to every rank (collective; other ranks may pass a placeholder)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self
        device = device or self.tokens.device
        shape = torch.tensor(list(self.tokens.shape) if dist.get_rank() == src else [0, 0], device=device)
        dist.broadcast(shape, src)
        batch, seq = shape.tolist()
        out = {}
        for name in _BROADCAST_FIELDS:
            template = getattr(self, name)
            dims = (batch, seq) if template.dim() == 2 else (batch,)
            tensor = template.to(device) if dist.get_rank() == src else torch.empty(dims, dtype=template.dtype,
                                                                                      device=device)
            dist.broadcast(tensor, src)
            out[name] = tensor
        return TrainBatch(**out)

    @classmethod
    def placeholder(cls) -> "TrainBatch":
        """What non-driver ranks pass to ``broadcast`` (only dtypes and ranks matter)."""
        empty2 = torch.zeros(0, 0)
        return cls(tokens=empty2.long(), response_mask=empty2.bool(), advantages=torch.zeros(0),
                   source=torch.zeros(0, dtype=torch.long), behaviour_logprobs=empty2)


def round_up(n: int, multiple: int) -> int:
    """The least multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


def width_multiple(tp: int, sequence_parallel: bool, fp8: bool) -> int:
    """What every micro-batch's width must be a multiple of: 8 positions per GEMM input for tensor-core
    friendly shapes, 16 under FP8 (Transformer Engine refuses FP8 GEMMs on other token counts). Sequence
    parallelism gives each TP rank 1/TP of the width, so that share must be the multiple."""
    per_input = 16 if fp8 else 8
    return per_input * tp if sequence_parallel else per_input
