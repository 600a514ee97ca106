"""The fused causal attention of the local spec against megatron-core's DotProductAttention (the reference:
explicit scores, masked softmax), forward and backward, with grouped-query heads."""

from __future__ import annotations

import pytest
import torch

from megatron_s2l.config import ModelConfig, ParallelConfig
from megatron_s2l.model import specs


def _pair(heads: int, groups: int, dropout: float = 0.0, dtype: str = "float32"):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_s2l.model.attention import CausalSDPAttention

    args = specs.model_args_from_hf({"model_type": "qwen3", "num_hidden_layers": 1, "hidden_size": 64,
                                     "intermediate_size": 128, "num_attention_heads": heads,
                                     "num_key_value_heads": groups, "head_dim": 16, "vocab_size": 100})
    config = specs.transformer_config(args, ModelConfig(dtype=dtype), ParallelConfig())
    config.attention_dropout = dropout
    # a softmax scale other than SDPA's default 1/sqrt(head_dim): it must be passed through
    return [cls(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self", softmax_scale=0.3)
            for cls in (DotProductAttention, CausalSDPAttention)]


def _inputs(heads: int, groups: int, seq: int = 12, batch: int = 3):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(seq, batch, n, 16, generator=gen).requires_grad_() for n in (heads, groups, groups)]


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (6, 1)])
def test_fused_attention_matches_megatron_core(mcore_world1, heads, groups):
    reference, fused = _pair(heads, groups)
    outputs, grads = [], []
    for module in (reference, fused):
        inputs = _inputs(heads, groups)
        out = module(*inputs, attention_mask=None)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        outputs.append(out.detach())
        grads.append([t.grad for t in inputs])
    assert outputs[1].shape == (12, 3, heads * 16)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    for fused_grad, reference_grad in zip(grads[1], grads[0]):
        torch.testing.assert_close(fused_grad, reference_grad, rtol=1e-4, atol=1e-5)


def test_anything_but_plain_causal_attention_takes_megatron_cores_path(mcore_world1):
    reference, fused = _pair(4, 2)
    query, key, value = _inputs(4, 2)
    mask = torch.rand(3, 1, 12, 12, generator=torch.Generator().manual_seed(1)) > 0.7  # True = masked out
    mask[..., 0] = False  # every query sees at least the first key
    torch.testing.assert_close(fused(query, key, value, attention_mask=mask),
                               reference(query, key, value, attention_mask=mask))
    assert not torch.allclose(fused(query, key, value, attention_mask=mask),
                              fused(query, key, value, attention_mask=None))  # the mask was applied
