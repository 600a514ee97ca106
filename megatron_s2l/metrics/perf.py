"""How hard the learner works: model FLOPs of a step's update, TFLOP/s and MFU per GPU, peak memory.

Megatron-LM reports TFLOP/s per GPU and memory so that users can tune micro-batches and parallel sizes;
the trainer logs the same as `perf/*` and `memory/*` every step, and benchmarks/bench_grpo_update.py uses
the same count for its MFU.
"""

from __future__ import annotations

import resource
import sys

import torch
import torch.distributed as dist

from megatron_s2l import platform
from megatron_s2l.model.specs import ModelArgs

# Dense BF16 peak per GPU in TFLOP/s, matched against torch.cuda.get_device_name() in this order.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("H20", 148.0),
                    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0))


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense BF16 peak, or None (CPU, or a GPU not in the table: no MFU is reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def update_flops(args: ModelArgs, lengths: torch.Tensor, response_tokens: int, reference: bool) -> float:
    """Model FLOPs of one step's learner work on sequences of `lengths` tokens (the columns the model sees,
    TrainBatch.lengths()) holding `response_tokens` response tokens in all (all ranks together).

    Forward + backward of the update (6 per parameter per token), the old-log-prob forward (2) and, with
    the KL term, the reference forward (2). Only real tokens count (padding is not useful work), and the
    output layer only over response tokens (the fused log-probs run it on nothing else). Attention scores
    and context add 12 x layers x (heads x head_dim) x seq^2 per sequence for forward + backward, counted
    over the full square as Megatron-LM and PaLM do.
    """
    per_token = 6 + 2 + (2 if reference else 0)
    output_layer = args.vocab_size * args.hidden_size
    body = args.num_parameters - output_layer * (1 if args.tie_embeddings else 2)  # lookups are free
    lengths = lengths.double()
    attention = 12 * args.num_layers * args.num_attention_heads * args.head_dim * float((lengths ** 2).sum())
    return (per_token * (body * float(lengths.sum()) + output_layer * response_tokens)
            + attention * per_token / 6)


def throughput_metrics(flops: float, seconds: float, device: torch.device) -> dict[str, float]:
    """perf/tflops_per_gpu over the learner's share of the step, and perf/mfu where the peak is known."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    tflops = flops / max(seconds, 1e-9) / world / 1e12
    metrics = {"perf/tflops_per_gpu": tflops}
    peak = peak_tflops(device)
    if peak:
        metrics["perf/mfu"] = tflops / peak
    return metrics


def memory_metrics(device: torch.device) -> dict[str, float]:
    """Peak memory since the last call, the largest over all ranks (every rank must call this).

    memory/device_peak_gib: CUDA memory allocated by tensors; memory/host_peak_gib: the process's resident
    memory. Both peaks are reset for the next step.
    """
    host = _host_peak_gib()
    device_peak = 0.0
    if device.type == "cuda":
        device_peak = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    host, device_peak = platform.max_over_ranks([host, device_peak])
    metrics = {"memory/host_peak_gib": host}
    if device.type == "cuda":
        metrics["memory/device_peak_gib"] = device_peak
    return metrics


def _host_peak_gib() -> float:
    """Linux: VmHWM, the peak resident set of this process image, then reset to the current size
    (/proc/self/clear_refs). getrusage's ru_maxrss cannot be reset and survives exec: a process started
    from a large one (a test runner) would report its parent's size."""
    try:
        with open("/proc/self/status") as status:
            kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return kib / 2**20
    except (OSError, StopIteration):  # not Linux: the lifetime peak (ru_maxrss is in bytes on macOS)
        unit = 2**30 if sys.platform == "darwin" else 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit
