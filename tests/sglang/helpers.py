"""Reference computations the real-server tests compare SGLang against."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


@functools.lru_cache(maxsize=None)
def hf_greedy(model_path: Path, prompt: tuple[int, ...], num_tokens: int) -> list[int]:
    """Greedy continuation by transformers in fp32: the reference every weight update is checked against."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(num_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def megatron_model(model_path: Path):
    """The learner's Megatron-Core GPT model (fp32, TP=PP=1) with an HF checkpoint's weights; needs the
    one-process world of the ``mcore_world1`` fixture."""
    from megatron_s2l.config import ModelConfig, ParallelConfig
    from megatron_s2l.model import checkpoint_io, convert, specs

    checkpoint = checkpoint_io.HFCheckpoint(model_path)
    args = specs.model_args_from_hf(checkpoint.hf_config)
    model = specs.build_gpt_model(args, ModelConfig(dtype="float32"), ParallelConfig())
    convert.load_hf_weights(model, checkpoint.get, args)
    return model.eval(), args
