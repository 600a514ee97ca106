"""An optional torch.profiler window over a few training steps, and named ranges for every step phase.

`logging.profile_steps=[3,4]` records steps 3 to 4 on the ranks in `logging.profile_ranks` and writes,
per rank, `<run_dir>/profile/rank<r>_steps3-4.json` (a Chrome trace: open it in https://ui.perfetto.dev)
and `..._top_ops.txt` (the operators that took the most time). Each phase of a step (rollout, logprob,
train, sync, eval) is a named range, `s2l/<phase>`, in that trace and, on CUDA, an NVTX range for
Nsight Systems (`nsys profile -t cuda,nvtx torchrun ...`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from megatron_s2l.config import LoggingConfig
from megatron_s2l.metrics import perf

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def phase_range(phase: str) -> Iterator[None]:
    """Mark one phase of a step for torch.profiler and, on CUDA, for Nsight Systems."""
    nvtx = torch.cuda.is_available()
    if nvtx:
        torch.cuda.nvtx.range_push(f"s2l/{phase}")
    try:
        with record_function(f"s2l/{phase}"):
            yield
    finally:
        if nvtx:
            torch.cuda.nvtx.range_pop()


class StepProfiler:
    """Starts torch.profiler when the first profiled step begins and writes the trace when the last one
    ends (or when training stops inside the window); does nothing on ranks or steps outside it."""

    def __init__(self, cfg: LoggingConfig, rank: int):
        self.window = tuple(cfg.profile_steps) if rank in cfg.profile_ranks else ()
        self.out_dir = Path(cfg.run_dir) / "profile"
        self.rank = rank
        self._profile: Optional[profile] = None
        self._first_step = 0

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator["StepTimer"]:
        """Around one training step: the profiler window opens and closes at step boundaries; the timer
        times its phases."""
        self.step_begins(step)
        yield StepTimer()
        self.step_ends(step)

    def step_begins(self, step: int) -> None:
        if self.window and self.window[0] <= step <= self.window[1] and self._profile is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._profile = profile(activities=activities, record_shapes=True, profile_memory=True)
            self._profile.start()
            self._first_step = step
            logger.info("profiling steps %d-%d on rank %d", step, self.window[1], self.rank)

    def step_ends(self, step: int) -> None:
        if self._profile is not None and step >= self.window[1]:
            self.close(last_step=step)

    def close(self, last_step: Optional[int] = None) -> None:
        """Stop and write what was recorded (also for a run that stopped inside the window)."""
        if self._profile is None:
            return
        profiler, self._profile = self._profile, None
        profiler.stop()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = self.out_dir / f"rank{self.rank}_steps{self._first_step}-{last_step or 'stop'}"
        profiler.export_chrome_trace(f"{stem}.json")
        sort_by = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        Path(f"{stem}_top_ops.txt").write_text(profiler.key_averages().table(sort_by=sort_by, row_limit=30))
        logger.info("profile written: %s.json (open in https://ui.perfetto.dev), %s_top_ops.txt", stem, stem)


class StepTimer:
    """Wall time per phase of one step (a named range in profiles), as timing/<phase>_s metrics, plus
    tokens/s, the learner's TFLOP/s and MFU per GPU, and the step's peak memory."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        begin = time.perf_counter()
        with phase_range(phase):
            yield
        self.seconds[phase] = time.perf_counter() - begin

    def metrics(self, num_response_tokens: int, learner_flops: float, device: torch.device) -> dict[str, float]:
        total = time.perf_counter() - self.start
        out = {f"timing/{phase}_s": s for phase, s in self.seconds.items()}
        out["timing/step_s"] = total
        # response tokens sampled and trained on per second of the whole step
        out["throughput/tokens_per_s"] = num_response_tokens / total if total > 0 else 0.0
        learner_seconds = self.seconds.get("logprob", 0.0) + self.seconds.get("train", 0.0)
        out |= perf.throughput_metrics(learner_flops, learner_seconds, device)
        return out | perf.memory_metrics(device)  # peaks of this step, reset for the next
