"""Hugging Face config (Qwen3, Qwen2, Llama) -> megatron-core TransformerConfig, layer spec and GPTModel.

The three families share one decoder shape (pre-RMSNorm, SwiGLU MLP, RoPE, GQA); they differ only in
QK-norm (Qwen3), QKV bias (Qwen2) and head_dim (explicit in Qwen3/Llama configs). We use megatron-core's
stock spec functions: the Transformer Engine spec on CUDA when TE is installed, the local spec otherwise
(with one substitution: its torch RMSNorm refuses sequence parallelism, ours supports it).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path
from typing import Any

import torch

from megatron_s2l.config import ConfigError, ModelConfig, ParallelConfig, check_parallel_fits_model
from megatron_s2l.model import files

SUPPORTED_FAMILIES = ("qwen3", "qwen2", "llama")


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """The architecture facts the converter and the Megatron model both need, read from config.json."""

    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    norm_eps: float
    tie_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    max_position_embeddings: int

    @property
    def num_parameters(self) -> int:
        """Parameter count (what the HF checkpoint stores)."""
        h, d = self.hidden_size, self.head_dim
        attention = h * d * (2 * self.num_attention_heads + 2 * self.num_query_groups)
        attention += (self.num_attention_heads + 2 * self.num_query_groups) * d if self.qkv_bias else 0
        attention += 2 * d if self.qk_norm else 0
        layer = attention + 3 * h * self.ffn_hidden_size + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + embeddings + h

    def padded_vocab_size(self, divisible_by: int, tp: int = 1) -> int:
        """Vocabulary rounded up to a multiple of lcm(divisible_by, tp): the same for every TP that
        divides `divisible_by`, so checkpoints reshard across those TP sizes."""
        multiple = math.lcm(divisible_by, tp)
        return -(-self.vocab_size // multiple) * multiple


def load_hf_config(path: str | Path) -> dict[str, Any]:
    """config.json of a local HF checkpoint directory as a dict (no hub access)."""
    return files.load_hf_config(path)


def model_args_from_hf(hf_config: dict[str, Any]) -> ModelArgs:
    """Validate an HF config dict and extract ModelArgs; unsupported features are refused by name."""
    family = hf_config.get("model_type", "")
    if family not in SUPPORTED_FAMILIES:
        raise ConfigError(f"model_type={family!r} is not supported; supported: {SUPPORTED_FAMILIES}")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={hf_config['hidden_act']!r}: only SwiGLU (silu) MLPs are supported")
    rope = hf_config.get("rope_parameters") or {}
    scaling = hf_config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ConfigError(f"rope_type={rope_type!r} is not supported yet (only plain RoPE)")
    if hf_config.get("use_sliding_window"):
        raise ConfigError("use_sliding_window=true is not supported; every layer must be full attention")
    if hf_config.get("mlp_bias"):
        raise ConfigError("mlp_bias=true is not supported")
    heads = hf_config["num_attention_heads"]
    return ModelArgs(
        family=family,
        num_layers=hf_config["num_hidden_layers"],
        hidden_size=hf_config["hidden_size"],
        ffn_hidden_size=hf_config["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf_config.get("num_key_value_heads") or heads,
        head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
        vocab_size=hf_config["vocab_size"],
        rope_theta=float(rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))),
        norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2" or bool(hf_config.get("attention_bias", False)),
        qk_norm=family == "qwen3",
        max_position_embeddings=hf_config.get("max_position_embeddings", 4096),
    )


def use_transformer_engine(model_cfg: ModelConfig) -> bool:
    """TE layers on CUDA when installed (or when asked for explicitly); local modules otherwise."""
    if model_cfg.transformer_impl == "local":
        return False
    try:
        import transformer_engine  # noqa: F401

        have_te = torch.cuda.is_available()
    except ImportError:
        have_te = False
    if model_cfg.transformer_impl == "transformer_engine" and not have_te:
        raise ConfigError("model.transformer_impl=transformer_engine needs CUDA and transformer-engine; "
                          "install the [gpu] extra or use model.transformer_impl=auto")
    return have_te


def transformer_config(args: ModelArgs, model_cfg: ModelConfig, parallel: ParallelConfig):
    """megatron-core TransformerConfig for these args; checks the parallel layout fits the model."""
    from megatron.core.transformer import TransformerConfig

    check_parallel_fits_model(parallel, args.num_attention_heads, args.num_query_groups, args.num_layers)
    dtype = torch.bfloat16 if model_cfg.dtype == "bfloat16" else torch.float32
    on_cuda = torch.cuda.is_available()
    fp8: dict[str, Any] = {}
    if model_cfg.fp8 is not None:
        if not use_transformer_engine(model_cfg):
            raise ConfigError("model.fp8 needs Transformer Engine layers on CUDA; install the [gpu] extra (or use "
                              "the NGC container) or set model.fp8=null")
        # delayed scaling takes the max over the amax history (megatron-core's default, most_recent,
        # would ignore all but the last entry)
        fp8 = dict(fp8="hybrid", fp8_recipe=model_cfg.fp8.recipe, fp8_margin=model_cfg.fp8.margin,
                   fp8_amax_history_len=model_cfg.fp8.amax_history, fp8_amax_compute_algo="max", fp8_param=False)
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=args.norm_eps,
        qk_layernorm=args.qk_norm,
        add_bias_linear=False,
        add_qkv_bias=args.qkv_bias,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel.tp,
        sequence_parallel=parallel.sequence_parallel and parallel.tp > 1,
        variable_seq_lengths=parallel.pp > 1 and parallel.length_grouping,  # each micro-batch its own shape
        moe_token_dispatcher_type="alltoall",  # unused (dense); the default refuses variable_seq_lengths
        pipeline_model_parallel_size=parallel.pp,
        **(dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
           if parallel.recompute == "full" else {}),
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        attention_softmax_in_fp32=True,
        use_cpu_initialization=not on_cuda,
        perform_initialization=True,
        # Fused kernels exist only on CUDA; on CPU megatron-core's torch fallbacks run instead. The masked
        # softmax kernel comes from apex (megatron-core imports it unguarded once the flag is on).
        bias_activation_fusion=on_cuda,
        masked_softmax_fusion=on_cuda and importlib.util.find_spec("scaled_masked_softmax_cuda") is not None,
        persist_layer_norm=on_cuda,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        **fp8,
    )


class RMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm built the way megatron-core builds norms, for the local spec.

    megatron-core's own torch wrapper refuses sequence parallelism. With it, each TP rank normalises its
    own slice of the sequence, so the weight's gradient is partial: the `sequence_parallel` mark makes
    megatron-core's finalize_model_grads sum it over the TP group (as TE's and apex's norms do).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)  # bf16 like the rest: torch's fused path
        self.weight.sequence_parallel = config.sequence_parallel


def layer_spec(args: ModelArgs, use_te: bool, config):
    """megatron-core's stock GPT layer spec with QK-norm when the family has it: TE's (a layer spec), or
    the local one as a block spec (this stage's layers and the final norm) with our RMSNorm and fused
    causal attention (model/attention.py)."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)

    # lazy: megatron (megatron-core import cost)
    from megatron_s2l.model.attention import CausalSDPAttention

    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=args.qk_norm)
    layer = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=args.qk_norm, normalization="RMSNorm")
    attention = layer.submodules.self_attention.submodules
    attention.core_attention = CausalSDPAttention
    for owner, name in ((layer.submodules, "input_layernorm"), (layer.submodules, "pre_mlp_layernorm"),
                        (attention, "q_layernorm"), (attention, "k_layernorm")):
        if getattr(owner, name) is not IdentityOp:
            setattr(owner, name, RMSNorm)
    layers = [layer] * get_num_layers_to_build(config)  # this pipeline stage's
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=RMSNorm)


def build_gpt_model(args: ModelArgs, model_cfg: ModelConfig, parallel: ParallelConfig):
    """The GPTModel chunk for this rank's pipeline stage (megatron-core parallel state must be set up)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(args, model_cfg, parallel)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(args, use_transformer_engine(model_cfg), config),
        vocab_size=args.padded_vocab_size(model_cfg.make_vocab_size_divisible_by, parallel.tp),
        max_sequence_length=args.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=args.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(args.rope_theta) if float(args.rope_theta).is_integer() else args.rope_theta,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
