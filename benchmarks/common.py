"""Shared by the benchmarks: run one measurement in a fresh process, so peak memory and warm caches of
one variant never leak into another's numbers."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path


def shared_data_dir() -> Path:
    """The real datasets: $S2L_SHARED_DIR/data, the clone's ../shared/data, or /work/shared/data."""
    for base in (os.environ.get("S2L_SHARED_DIR"), Path(__file__).resolve().parents[2] / "shared", "/work/shared"):
        if base and (Path(base) / "data" / "gsm8k").is_dir():
            return Path(base) / "data"
    raise SystemExit("shared data not found: set S2L_SHARED_DIR to the folder holding data/gsm8k")


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
