"""Shared by the benchmarks: run one measurement in a fresh process, so peak memory and warm caches of
one variant never leak into another's numbers."""

from __future__ import annotations

import multiprocessing as mp


def _call(fn, args, queue) -> None:
    queue.put(fn(*args))


def in_fresh_process(fn, *args, timeout_s: float = 3600):
    """fn(*args) in a spawned process (fn must be importable by name); returns its result."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_call, args=(fn, args, queue))
    proc.start()
    result = queue.get(timeout=timeout_s)
    proc.join()
    return result
