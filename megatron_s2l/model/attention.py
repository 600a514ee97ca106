"""Core attention for the local (no Transformer Engine) layer spec, through torch's fused SDPA.

megatron-core's local DotProductAttention materialises [batch, heads, s, s] scores and probabilities, and
saves them for the backward: at s = 4096 that is gigabytes per layer, and it runs at a fraction of the
GPU's speed. torch.nn.functional.scaled_dot_product_attention picks a flash or memory-efficient kernel on
GPU (and a fused one on CPU) that never holds the s x s matrix. It covers what the policy model uses:
causal self-attention without dropout, masks, biases or packed sequences; anything else falls back to
megatron-core's implementation. Import this module only where megatron-core may be imported.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class CausalSDPAttention(DotProductAttention):
    """DotProductAttention (same construction, scale and checkpoint layout) with a fused causal forward."""

    def _fused_applies(self, query, key, attention_mask, attn_mask_type, attention_bias, packed_seq_params) -> bool:
        return (attention_mask is None and (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
                and attention_bias is None and packed_seq_params is None and self.softmax_offset is None
                and query.shape[0] == key.shape[0]  # no KV cache: top-left causal alignment is right
                and not self.config.apply_query_key_layer_scaling
                and self.scale_mask_softmax.window_size is None
                and not (self.training and self.attention_dropout.p > 0))

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query [s, b, heads, d], key/value [s, b, groups, d] -> context [s, b, heads * d]."""
        if not self._fused_applies(query, key, attention_mask, attn_mask_type, attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads or groups, s, d]
        context = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
        seq, batch = query.shape[:2]
        return context.permute(2, 0, 1, 3).reshape(seq, batch, self.hidden_size_per_partition)
