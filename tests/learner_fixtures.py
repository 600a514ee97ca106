"""A fixed, deterministic training batch and run config for learner equivalence tests."""

from __future__ import annotations

import torch

from megatron_s2l.config import RunConfig, load_config
from megatron_s2l.train.batch import TrainBatch


def fixed_batch(num_sequences: int = 8, seq_len: int = 24, vocab: int = 1000, seed: int = 0) -> TrainBatch:
    """Prompts of 4-7 tokens, responses of varying length (some ending early), mixed sources."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(10, vocab, (num_sequences, seq_len), generator=gen)
    mask = torch.zeros(num_sequences, seq_len, dtype=torch.bool)
    for row in range(num_sequences):
        prompt = 4 + row % 4
        response = 3 + (row * 5) % (seq_len - prompt - 3)
        mask[row, prompt:prompt + response] = True
        tokens[row, prompt + response:] = 0  # padding
    return TrainBatch(
        tokens=tokens, response_mask=mask,
        advantages=torch.randn(num_sequences, generator=gen),
        source=torch.tensor([0, 1] * (num_sequences // 2)),
        behaviour_logprobs=-torch.rand(num_sequences, seq_len, generator=gen) * mask)


def learner_config(**overrides) -> RunConfig:
    base = {"model.dtype": "float32", "explorer.mode": "off", "optimizer.lr": 1e-3,
            "parallel.micro_batch_size": 2, "rollout.prompts_per_step": 8, "rollout.group_size": 1,
            "rollout.max_response_length": 16, "algorithm.logprob_chunk_size": 7, "steps": 2}
    base.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])
