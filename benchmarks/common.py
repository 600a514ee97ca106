"""Shared by the benchmarks: run one measurement in a fresh process, so peak memory and warm caches of
one variant never leak into another's numbers."""

from __future__ import annotations

import json
import multiprocessing as mp
import platform as host
import queue as queue_module
import sys
import time
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/X.py` from anywhere: reuse the tests' helpers
    sys.path.insert(0, str(REPO))


def shared_data_dir() -> Path:
    """The real datasets, found as the tests find them ($S2L_SHARED_DIR, ../shared or /work/shared)."""
    from tests.utils import shared_dir

    return shared_dir() / "data"


def sglang_report(benchmark: str, **settings) -> Optional[dict]:
    """The head of an SGLang benchmark's JSON line (name, device, machine, settings); None, after printing the
    line with the reason it was skipped, when there is no SGLang venv."""
    from megatron_s2l.rollout.sglang_launch import sglang_python

    report = {"benchmark": benchmark, "device": "cuda" if torch.cuda.is_available() else "cpu",
              "machine": host.machine(), **settings}
    if sglang_python() is None:
        print(json.dumps(report | {"skipped": "no SGLang venv (run tools/sglang_cpu/setup_venv.sh)"}))
        return None
    return report


def _call(fn, args, queue) -> None:
    queue.put(fn(*args))


def in_fresh_process(fn, *args, timeout_s: float = 3600):
    """fn(*args) in a spawned process (fn must be importable by name); returns its result, or raises as
    soon as the process dies without one (out of memory, a crash) instead of waiting out the timeout."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_call, args=(fn, args, queue))
    proc.start()
    deadline = time.monotonic() + timeout_s
    while True:
        alive = proc.is_alive()  # read first: a result sent before it exited is in the queue by now
        try:
            result = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not alive:
                raise RuntimeError(f"{fn.__name__}{args} died with exit code {proc.exitcode} and no result")
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"{fn.__name__}{args} gave no result within {timeout_s:.0f} s")
    proc.join()
    return result


def synthetic_batch(sequences: int, seq_len: int, vocab: int, lengths: str = "full"):
    """Prompts of a quarter of seq_len; responses fill the rest (`full`) or follow a long tail
    (`longtail`: u^3 of the response budget, median ~1/8, one sequence at the limit as in every real step)."""
    from megatron_s2l.train.batch import TrainBatch

    gen = torch.Generator().manual_seed(0)
    prompt = seq_len // 4
    if lengths == "full":
        response = torch.full((sequences,), seq_len - prompt)
    else:
        response = (torch.rand(sequences, generator=gen) ** 3 * (seq_len - prompt)).long().clamp(min=1)
        response[0] = seq_len - prompt
    mask = torch.zeros(sequences, seq_len, dtype=torch.bool)
    for row, length in enumerate(response.tolist()):
        mask[row, prompt:prompt + length] = True
    return TrainBatch(tokens=torch.randint(0, vocab, (sequences, seq_len), generator=gen),
                      response_mask=mask, advantages=torch.randn(sequences, generator=gen),
                      source=torch.ones(sequences, dtype=torch.long),
                      behaviour_logprobs=torch.zeros(sequences, seq_len))
