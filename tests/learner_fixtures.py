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


def measured_learner_bytes(learner) -> dict[str, int]:
    """What the learner's tensors really take on this rank (after an update, when Adam state exists): unique
    storages of the parameters, megatron DDP's gradient buffers, the optimizer's own tensors (fp32 master
    copies, Adam state) and the reference model's parameters."""
    from megatron_s2l.model.convert import unwrap

    def storages(tensors) -> dict[int, int]:
        return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}

    weights = storages(unwrap(learner.model).parameters())
    optimizer: dict[int, int] = {}
    for inner in getattr(learner.optimizer, "chained_optimizers", [learner.optimizer]):
        tensors = [p for group in inner.optimizer.param_groups for p in group["params"]]
        tensors += [v for state in inner.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        optimizer |= {ptr: size for ptr, size in storages(tensors).items() if ptr not in weights}  # views: free
    reference = storages(learner.ref_model.parameters()) if learner.ref_model is not None else {}
    return {"weights": sum(weights.values()), "optimizer": sum(optimizer.values()),
            "gradients": sum(buffer.grad_data.untyped_storage().nbytes() for buffer in learner.model.buffers),
            "reference": sum(reference.values())}
