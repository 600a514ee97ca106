"""Shared by the benchmarks: run one measurement in a fresh process, so peak memory and warm caches of
one variant never leak into another's numbers."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import torch


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
