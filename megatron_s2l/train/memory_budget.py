"""The learner's memory per GPU before any activation: weights, gradients, optimizer state and the frozen
reference model, from the parameters each rank really holds (as Megatron-LM's --report-theoretical-memory).

Logged at startup, so that a layout that cannot fit is known in seconds rather than after the first
rollout. Activations come on top; memory/device_peak_gib shows the whole after every step.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from megatron_s2l import platform
from megatron_s2l.model import convert

logger = logging.getLogger(__name__)

ADAM_STATE_BYTES = 8  # exp_avg and exp_avg_sq in fp32
FP32_MAIN_COPY_BYTES = 4  # bf16 training keeps fp32 master weights in the optimizer
GRAD_BYTES = 4  # megatron DDP accumulates and reduces gradients in fp32 (grad_reduce_in_fp32)


@dataclasses.dataclass
class MemoryBudget:
    """Bytes on the fullest GPU."""

    weights: float
    gradients: float
    optimizer: float
    reference: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.reference

    def describe(self) -> str:
        gib = {f.name: getattr(self, f.name) / 2**30 for f in dataclasses.fields(self)}
        parts = ", ".join(f"{name} {value:.2f}" for name, value in gib.items())
        return f"{self.total / 2**30:.2f} GiB ({parts})"


def learner_memory_budget(learner) -> MemoryBudget:
    """This rank's budget, the largest of each part over all ranks (pipeline stages differ); every rank
    must call it."""
    cfg = learner.cfg
    local_params = sum(p.numel() for p in convert.unwrap(learner.model).parameters())
    weight_bytes = getattr(torch, cfg.model.dtype).itemsize
    optimizer_bytes = ADAM_STATE_BYTES + (FP32_MAIN_COPY_BYTES if weight_bytes < 4 else 0)
    if cfg.parallel.use_distributed_optimizer:
        from megatron.core import parallel_state

        optimizer_bytes /= parallel_state.get_data_parallel_world_size()
    return MemoryBudget(*platform.max_over_ranks([
        local_params * weight_bytes, local_params * GRAD_BYTES, local_params * optimizer_bytes,
        local_params * weight_bytes if learner.ref_model is not None else 0.0]))


def report_memory_budget(learner) -> MemoryBudget:
    """Log the budget; warn when it leaves little of the GPU for activations (every rank must call it)."""
    budget = learner_memory_budget(learner)
    if not platform.is_rank0():
        return budget
    logger.info("learner memory per GPU before activations: %s", budget.describe())
    device = learner.device
    if device.type == "cuda":
        capacity = torch.cuda.get_device_properties(device).total_memory
        if budget.total > 0.8 * capacity:
            logger.warning(
                "the learner's weights, gradients and optimizer state take %.1f of the GPU's %.1f GiB, leaving "
                "too little for activations: raise parallel.tp or parallel.pp, or shard the optimizer over more "
                "data-parallel ranks (parallel.use_distributed_optimizer=true)", budget.total / 2**30,
                capacity / 2**30)
    return budget
