"""How weights travel to SGLang servers: buckets of HF-named tensors, tensor handles for
``/update_weights_from_tensor``, and the broadcast group for ``/update_weights_from_distributed``.

Kept apart from the engine (rollout/sglang.py) because this is collective and thread code with its own
failure rules (a broadcast a server never joins must end without taking the trainer down), not HTTP.

The group is a private c10d backend (gloo on CPU, nccl on GPU) built from its own TCPStore; it is never
registered with torch.distributed, so a default group that torchrun created in the trainer is neither
used nor changed.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import io
import logging
import os
import threading
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing  # registers the tensor reductions ForkingPickler uses

logger = logging.getLogger(__name__)


def iter_buckets(tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
                 ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group the stream into lists of at most ``bucket_bytes`` (a larger tensor travels alone)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def flag_last(items: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """(item, is_last) pairs: the version goes with the last bucket, known only one bucket late."""
    iterator = iter(items)
    try:
        previous = next(iterator)
    except StopIteration:
        return
    for item in iterator:
        yield previous, False
        previous = item
    yield previous, True


def serialize_tensors(named: list[tuple[str, torch.Tensor]]) -> str:
    """base64 of a ForkingPickler dump, the payload ``/update_weights_from_tensor`` expects.

    The pickle holds handles, not data: CPU storages are moved to shared-memory files ("file_system"
    strategy, set only for this call so the trainer's own multiprocessing keeps its strategy), CUDA
    storages become IPC handles. Callers must keep ``named`` alive until the server has answered.
    """
    previous = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        if any(tensor.device.type == "cpu" for _, tensor in named):
            _start_shm_manager_detached()
        buffer = io.BytesIO()
        ForkingPickler(buffer).dump(named)
    finally:
        torch.multiprocessing.set_sharing_strategy(previous)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


_shm_manager_started = False


def _start_shm_manager_detached() -> None:
    """Start torch's shared-memory manager (the first "file_system" share does) with its stderr on /dev/null.

    The manager outlives the trainer while a server still maps the weights, and it inherits the trainer's
    stderr: `s2l train 2>&1 | tee log` or `subprocess.run(..., capture_output=True)` would then wait for an
    end of file that never comes. fd 2 points at /dev/null only for this one tiny share."""
    global _shm_manager_started
    if _shm_manager_started:
        return
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        torch.zeros(1).share_memory_()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    _shm_manager_started = True


class BroadcastGroup:
    """Our end (rank 0) of a process group shared with SGLang servers (ranks 1..world-1).

    SGLang builds its end with c10d's process-group helper: TCPStore -> PrefixStore(name) ->
    PrefixStore(name + "/") -> PrefixStore(device + "/"). We build the backend on the same key space
    directly, without registering it in torch.distributed, so no default group is needed or touched.
    """

    def __init__(self, name: str, backend: str, world_size: int, store: dist.TCPStore, pg: Any):
        self.name, self.backend, self.world_size = name, backend, world_size
        self._store, self._pg = store, pg  # the store must outlive the group
        self._aborted = threading.Event()

    @classmethod
    def create(cls, name: str, backend: str, port: int, world_size: int, timeout_s: float
               ) -> "BroadcastGroup":
        """Blocks until every server rank has joined (call it while the init requests are in flight).
        Give it a longer timeout than the servers' requests: a failed request then ends a broadcast through
        abort() before NCCL's watchdog, at this timeout, takes the whole process down."""
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore("0.0.0.0", port, world_size, is_master=True, timeout=timeout,
                              wait_for_workers=False)
        device = "cuda" if backend == "nccl" else "cpu"
        scoped = dist.PrefixStore(f"{device}/", dist.PrefixStore(f"{name}/", dist.PrefixStore(name, store)))
        if backend == "gloo":
            pg = dist.ProcessGroupGloo(scoped, 0, world_size, timeout)
        elif backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            pg = dist.ProcessGroupNCCL(scoped, 0, world_size, options)
        else:
            raise ValueError(f"weight-update group backend {backend!r}: use 'gloo' (CPU) or 'nccl' (GPU)")
        return cls(name, backend, world_size, store, pg)

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Send each tensor from rank 0, in the order the servers were told; returns once all are sent, or
        once the backend has let go of them after abort().

        Polls instead of calling ``work.wait()`` early: on NCCL that makes this thread's current stream (the
        device's default stream, which the trainer computes on) wait for the broadcast, so one a failed server
        never finishes would stall the trainer's next kernels, the checkpoint save on failure included. After
        abort() it still waits (NCCL: at once; gloo: until its timeout), holding the group: whichever thread
        drops a group with an operation in flight blocks until that ends.
        """
        works = []
        for tensor in tensors:
            options = dist.BroadcastOptions()
            options.rootRank, options.rootTensor = 0, 0
            works.append(self._pg.broadcast([tensor], options))
        while not all(work.is_completed() for work in works):
            self._aborted.wait(0.002)
        if not self._aborted.is_set():
            for work in works:
                work.wait()  # raises the error of one that failed; all have completed, so nothing waits

    def abort(self) -> None:
        """End the group's broadcast in progress: the servers will not finish it (one failed)."""
        self._aborted.set()
        try:
            self._pg.abort()  # NCCL: frees the kernel waiting for peers that are gone
        except RuntimeError as exc:  # a backend without abort; its operation ends at the group's timeout
            logger.debug("weight-update group %s: abort: %s", self.name, exc)


async def run_alongside(blocking: Callable[[], Any], requests: list[asyncio.Task]) -> Any:
    """Run a blocking collective in a thread while the servers' requests for it are in flight.

    Fails as soon as either side fails, so a server that refuses (bad group, no session) is reported at
    once instead of after the collective's timeout. The thread is a daemon, not the loop's executor, so
    an abandoned collective (it ends at its timeout) holds up neither the loop's shutdown nor exit.
    """
    work = _in_daemon_thread(blocking)
    await asyncio.wait([work, *requests], return_when=asyncio.FIRST_EXCEPTION)
    for task in (*requests, work):
        if task.done() and task.exception() is not None:
            for other in requests:
                other.cancel()
            raise task.exception()
    await asyncio.gather(*requests)
    return work.result()


def _in_daemon_thread(fn: Callable[[], Any]) -> asyncio.Future:
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result: Any, error: Optional[BaseException]) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    def target() -> None:
        try:
            result, error = fn(), None
        except BaseException as exc:  # handed to the awaiting coroutine
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    threading.Thread(target=target, name="s2l-weight-collective", daemon=True).start()
    return future

