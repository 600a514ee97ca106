"""Device and process-group setup, and the CPU adapter for megatron-core.

megatron-core assumes CUDA: it calls ``torch.cuda.current_device()``, creates tensors with
``device="cuda"``, moves tensors with ``.cuda()``, checks ``tensor.type()`` against CUDA type names and
keeps its RNG tracker in the CUDA generator. On a machine without CUDA (CI, laptops) we redirect exactly
those calls to the CPU so that the *unmodified* library runs there with gloo. The adapter lives only here,
is applied only when CUDA is absent, and ``PATCHED_SYMBOLS`` lists every symbol it touches so a test can
tell when a megatron-core release moves one of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import sys
import warnings
from typing import Any, Iterator, NoReturn, Optional

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from megatron_s2l.config import ParallelConfig
from megatron_s2l.seeding import seed_everything

logger = logging.getLogger(__name__)

# (module, attribute) pairs the CPU adapter replaces; checked by tests/unit/test_platform.py.
PATCHED_SYMBOLS: tuple[tuple[str, str], ...] = (
    ("torch.cuda", "current_device"),
    ("torch.cuda", "synchronize"),
    ("torch.cuda", "empty_cache"),
    ("torch.cuda", "get_rng_state"),
    ("torch.cuda", "set_rng_state"),
    ("torch.cuda", "manual_seed"),
    ("torch.cuda", "memory_allocated"),
    ("torch.cuda", "max_memory_allocated"),
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
)

_CPU = torch.device("cpu")
_cpu_adapter_mode: "_CudaToCpuMode | None" = None


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement to CPU for every torch call (factories, ``.to``, ``.cuda``, ``.type``).

    A torch-function mode sees every call, including ``torch.empty(..., device="cuda")`` inside
    megatron-core, so one small hook replaces dozens of per-module patches.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's optimizer accepts only 'torch.cuda.*Tensor' parameters.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = _CPU
        if "pin_memory" in kwargs:
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


def _patch(module_name: str, attribute: str, value: Any) -> None:
    module = __import__(module_name, fromlist=[attribute])
    if not hasattr(module, attribute):
        raise RuntimeError(
            f"CPU adapter: {module_name}.{attribute} no longer exists in this megatron-core/torch; "
            "update megatron_s2l/platform.py PATCHED_SYMBOLS for the installed version."
        )
    setattr(module, attribute, value)


def apply_cpu_adapter() -> None:
    """Make megatron-core run on CPU. Idempotent; a no-op when CUDA is available."""
    global _cpu_adapter_mode
    if torch.cuda.is_available() or _cpu_adapter_mode is not None:
        return
    cpu_rng_state = lambda device=None, *a, **k: torch.get_rng_state()  # noqa: E731
    replacements = {
        ("torch.cuda", "current_device"): lambda: _CPU,
        ("torch.cuda", "synchronize"): lambda device=None: None,
        ("torch.cuda", "empty_cache"): lambda: None,
        ("torch.cuda", "get_rng_state"): cpu_rng_state,
        ("torch.cuda", "set_rng_state"): lambda state, device=None: torch.set_rng_state(state),
        ("torch.cuda", "manual_seed"): lambda seed: torch.manual_seed(seed),
        ("torch.cuda", "memory_allocated"): lambda device=None: 0,
        ("torch.cuda", "max_memory_allocated"): lambda device=None: 0,
        ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"): cpu_rng_state,
        ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"): (
            lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
        ),
    }
    assert set(replacements) == set(PATCHED_SYMBOLS)
    for (module_name, attribute), value in replacements.items():
        _patch(module_name, attribute, value)
    _cpu_adapter_mode = _CudaToCpuMode()
    _cpu_adapter_mode.__enter__()  # stays active for the life of the process
    logger.debug("megatron-core CPU adapter applied")


def _quiet_expected_cpu_warnings() -> None:
    """Silence megatron-core notices that are expected without CUDA/TE/apex and not actionable. Its modules
    warn when imported, so this runs when this module is (cli imports it before anything of megatron-core)."""
    for pattern in ("Apex is not installed", "Transformer Engine and Apex are not installed",
                    "full scope is deprecated", "Please use DTensor instead",
                    "`load_state_dict` is deprecated", "`torch.distributed.reduce_scatter_tensor` is deprecated",
                    "`torch.distributed.all_gather_into_tensor` is deprecated"):
        warnings.filterwarnings("ignore", message=f".*{pattern}.*")
    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage())  # CPU is the "GPU" RNG here
    logger.debug("no CUDA: megatron-core runs without Transformer Engine and Apex (torch optimizers, local "
                 "kernels); its warnings saying so are hidden")


if not torch.cuda.is_available():
    _quiet_expected_cpu_warnings()


def device() -> torch.device:
    """The device this rank computes on."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return _CPU


@dataclasses.dataclass(frozen=True)
class ParallelDims:
    """The parallel layout of the learner; world = tp * pp * dp."""

    tp: int = 1
    pp: int = 1
    dp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


# The other ranks wait here while the driver collects rollouts, evaluates or syncs weights (fail_together),
# which can take far longer than any learner collective should: a gloo group with a timeout of its own.
_DRIVER_WAIT_GROUP: Optional[dist.ProcessGroup] = None


def init_distributed(tp: int = 1, pp: int = 1, seed: int = 1234,
                     timeout_minutes: float = ParallelConfig.distributed_timeout_minutes,
                     driver_wait_minutes: float = ParallelConfig.driver_wait_minutes) -> ParallelDims:
    """Start torch.distributed (nccl for CUDA tensors plus gloo for CPU ones on GPU; gloo on CPU) and
    megatron-core's parallel state.

    Works under torchrun (reads RANK/WORLD_SIZE/MASTER_*) and as a plain single process (world 1,
    a free local port). DP is whatever is left: world // (tp * pp). A collective that waits longer than
    `timeout_minutes` fails (a hung rank); waiting for the driver may take `driver_wait_minutes`.
    """
    global _DRIVER_WAIT_GROUP
    apply_cpu_adapter()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        # under torchrun MASTER_ADDR/PORT are set; a lone process picks a free port without touching the
        # environment (child processes would inherit a port this process holds)
        init_method = "env://" if "MASTER_ADDR" in os.environ else f"tcp://127.0.0.1:{free_port()}"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "cpu:gloo,cuda:nccl"  # NCCL for tensors on the GPU; gloo for small host-side ones (metrics)
        else:
            torch.set_num_threads(1)  # ranks share the CPU cores
            backend = "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    if _DRIVER_WAIT_GROUP is None:
        _DRIVER_WAIT_GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=driver_wait_minutes))
    world = dist.get_world_size()
    if world % (tp * pp) != 0:
        raise ValueError(
            f"parallel: world size {world} is not divisible by tp*pp={tp * pp}; "
            "launch tp*pp*dp processes (torchrun --nproc-per-node ...)."
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
        )
    seed_everything(seed)
    model_parallel_cuda_manual_seed(seed)
    return ParallelDims(tp=tp, pp=pp, dp=world // (tp * pp))


@contextlib.contextmanager
def distributed(parallel: ParallelConfig, seed: int) -> Iterator[ParallelDims]:
    """init_distributed for a run's parallel config, and always the teardown."""
    try:
        yield init_distributed(parallel.tp, parallel.pp, seed=seed,
                               timeout_minutes=parallel.distributed_timeout_minutes,
                               driver_wait_minutes=parallel.driver_wait_minutes)
    finally:
        destroy_distributed()


def destroy_distributed() -> None:
    """Tear down megatron-core parallel state and the process group."""
    global _DRIVER_WAIT_GROUP
    from megatron.core import parallel_state

    _DRIVER_WAIT_GROUP = None

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    import socket

    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def driver_wait_group() -> Optional[dist.ProcessGroup]:
    """The group in which ranks wait for the driver (train.stopping.fail_together); None before init."""
    return _DRIVER_WAIT_GROUP


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def max_over_ranks(values: list[float], group: Optional[dist.ProcessGroup] = None) -> list[float]:
    """Collective: each value's largest over all ranks (a small CPU tensor: gloo, also beside NCCL)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor.tolist()


def any_rank(flag: bool, group: Optional[dist.ProcessGroup] = None) -> bool:
    """Collective: whether `flag` is set on any rank."""
    return bool(max_over_ranks([float(flag)], group)[0])


def from_rank0(obj: Any) -> Any:
    """Collective: rank 0's `obj` (small, picklable) on every rank, so that all ranks take the same decision.
    Over the gloo group of `driver_wait_group` (works beside NCCL, and its long timeout lets ranks wait while
    one reads a large file)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_DRIVER_WAIT_GROUP)
    return box[0]


def gather_to_all(obj: Any) -> list[Any]:
    """Collective: every rank's `obj` (small, picklable), in rank order, on every rank (as `from_rank0`)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj, group=_DRIVER_WAIT_GROUP)
    return gathered


def end_as_ctrl_c() -> NoReturn:
    """End the process as Ctrl-C ends a Python program: cleanup, then death by SIGINT, so that a script
    running it stops too (bash carries on after a child that exits normally). Without the traceback: the
    caller has said what it did."""
    sys.excepthook = lambda *exc_info: None
    raise KeyboardInterrupt
