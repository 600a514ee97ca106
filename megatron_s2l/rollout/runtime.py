"""RolloutRuntime: the driver's one event loop. Every engine call (sampling, weight updates, evaluation) runs
on it, so that the explorer and the learner replica can be busy at the same time, and it is closed once.

The loop runs in the calling (main) thread, inside `run`, so a stop signal interrupts a wait on servers there.
Asynchronous rollouts (rollout.max_staleness >= 1) start later steps' collections as tasks and let the loop
go on in a helper thread while the learner computes (`in_background`); the main thread then leaves the loop
alone until the block ends."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Awaitable, Iterator, TypeVar

T = TypeVar("T")


class RolloutRuntime:
    def __init__(self):
        self.loop = asyncio.new_event_loop()

    def run(self, work: Awaitable[T]) -> T:
        """Run `work` to the end. If it fails or is interrupted (a stop signal), no request it started lingers."""
        try:
            return self.loop.run_until_complete(work)
        except BaseException:
            self._cancel_pending()
            raise

    @contextlib.contextmanager
    def in_background(self) -> Iterator[None]:
        """Tasks already on the loop (rollouts started ahead) make progress while the block runs."""
        thread = threading.Thread(target=self.loop.run_forever, name="rollout-loop", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            thread.join()

    def _cancel_pending(self) -> None:
        """Cancel the tasks still on the loop and wait for them, retrieving their exceptions: otherwise they
        run on in the next call, or asyncio reports them as "never retrieved" when they are collected."""
        seen: set[asyncio.Task] = set()
        for _ in range(10):  # a task that awaited the interrupted one carries the interrupt up again: go on
            left = [task for task in asyncio.all_tasks(self.loop) if not task.done()]
            if not left:
                break
            seen.update(left)
            for task in left:
                task.cancel()
            try:
                self.loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            except BaseException:
                pass
        for task in seen:
            if task.done() and not task.cancelled():
                task.exception()

    def close(self) -> None:
        if not self.loop.is_closed():
            self._cancel_pending()
            self.loop.close()
