"""Hugging Face <-> Megatron-Core weights for Qwen3, Qwen2 and Llama, at any TP x PP.

One mapping serves every path: importing an HF checkpoint into a (sharded) GPTModel, exporting the
learner as HF safetensors, and the per-step weight sync to rollout engines (``iter_hf_tensors``).

Megatron layouts (full = unsharded; TP splits dim 0 unless noted):
  linear_qkv  [G * (Q/G + 2) * d, H]  per query group g: q heads of g, then k_g, then v_g
  linear_fc1  [2F, H]                 gate then up; TP shard r is [gate_r; up_r]
  linear_proj [H, Q*d], linear_fc2 [H, F]   split on dim 1
  word_embeddings / output_layer [V_pad, H]  rows >= V are padding (zeros)
Names use the local spec; the TE spec's fused norms are mapped onto them (``_canonical``).
"""

from __future__ import annotations

import hashlib
import re
from typing import Callable, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist

from megatron_s2l.model.specs import ModelArgs

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_SPLIT_DIM0 = ("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight", "output_layer.weight")
_SPLIT_DIM1 = ("linear_proj.weight", "linear_fc2.weight")


# ---------------------------------------------------------------------------------------------
# full-tensor mapping (no parallelism)


def hf_names_for(name: str, args: ModelArgs) -> list[str]:
    """HF tensor names that make up Megatron tensor `name` (global layer index)."""
    if name == "embedding.word_embeddings.weight":
        return ["model.embed_tokens.weight"]
    if name == "decoder.final_layernorm.weight":
        return ["model.norm.weight"]
    if name == "output_layer.weight":
        return ["model.embed_tokens.weight" if args.tie_embeddings else "lm_head.weight"]
    layer, rest = _split_layer(name)
    p = f"model.layers.{layer}."
    return {
        "input_layernorm.weight": [p + "input_layernorm.weight"],
        "self_attention.linear_qkv.weight": [p + f"self_attn.{x}_proj.weight" for x in "qkv"],
        "self_attention.linear_qkv.bias": [p + f"self_attn.{x}_proj.bias" for x in "qkv"],
        "self_attention.q_layernorm.weight": [p + "self_attn.q_norm.weight"],
        "self_attention.k_layernorm.weight": [p + "self_attn.k_norm.weight"],
        "self_attention.linear_proj.weight": [p + "self_attn.o_proj.weight"],
        "pre_mlp_layernorm.weight": [p + "post_attention_layernorm.weight"],
        "mlp.linear_fc1.weight": [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
        "mlp.linear_fc2.weight": [p + "mlp.down_proj.weight"],
    }[rest]


def megatron_names(args: ModelArgs) -> list[str]:
    """Every Megatron tensor of the model in a fixed global order (the export/sync order)."""
    per_layer = ["input_layernorm.weight", "self_attention.linear_qkv.weight"]
    if args.qkv_bias:
        per_layer.append("self_attention.linear_qkv.bias")
    if args.qk_norm:
        per_layer += ["self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"]
    per_layer += ["self_attention.linear_proj.weight", "pre_mlp_layernorm.weight",
                  "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
    names = ["embedding.word_embeddings.weight"]
    names += [f"decoder.layers.{i}.{rest}" for i in range(args.num_layers) for rest in per_layer]
    names.append("decoder.final_layernorm.weight")
    if not args.tie_embeddings:
        names.append("output_layer.weight")
    return names


def hf_to_megatron(name: str, hf: list[torch.Tensor], args: ModelArgs, padded_vocab: int) -> torch.Tensor:
    """Full Megatron tensor `name` from its HF parts (in ``hf_names_for`` order)."""
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        q, k, v = hf
        groups, per_group = args.num_query_groups, args.num_attention_heads // args.num_query_groups
        trailing = q.shape[1:]
        q = q.reshape(groups, per_group * args.head_dim, *trailing)
        k = k.reshape(groups, args.head_dim, *trailing)
        v = v.reshape(groups, args.head_dim, *trailing)
        return torch.cat([q, k, v], dim=1).reshape(-1, *trailing)
    if name.endswith("linear_fc1.weight"):
        return torch.cat(hf, dim=0)
    if name.endswith("word_embeddings.weight") or name == "output_layer.weight":
        (table,) = hf
        padding = table.new_zeros(padded_vocab - table.shape[0], table.shape[1])
        return torch.cat([table, padding], dim=0)
    (tensor,) = hf
    return tensor


def megatron_to_hf(name: str, full: torch.Tensor, args: ModelArgs) -> list[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs for full Megatron tensor `name`; inverse of ``hf_to_megatron``."""
    names = hf_names_for(name, args)
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        groups, per_group = args.num_query_groups, args.num_attention_heads // args.num_query_groups
        trailing = full.shape[1:]
        grouped = full.reshape(groups, (per_group + 2) * args.head_dim, *trailing)
        q, k, v = grouped.split([per_group * args.head_dim, args.head_dim, args.head_dim], dim=1)
        parts = [t.reshape(-1, *trailing) for t in (q, k, v)]
    elif name.endswith("linear_fc1.weight"):
        parts = list(full.chunk(2, dim=0))
    elif name.endswith("word_embeddings.weight") or name == "output_layer.weight":
        parts = [full[: args.vocab_size]]
    else:
        parts = [full]
    return [(n, t.contiguous()) for n, t in zip(names, parts)]


def megatron_full_shape(name: str, args: ModelArgs, padded_vocab: int) -> tuple[int, ...]:
    """Shape of the full (unsharded) Megatron tensor `name`."""
    h, d = args.hidden_size, args.head_dim
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return (padded_vocab, h)
    if name == "decoder.final_layernorm.weight":
        return (h,)
    rest = _split_layer(name)[1]
    qkv_rows = (args.num_attention_heads + 2 * args.num_query_groups) * d
    return {
        "input_layernorm.weight": (h,),
        "self_attention.linear_qkv.weight": (qkv_rows, h),
        "self_attention.linear_qkv.bias": (qkv_rows,),
        "self_attention.q_layernorm.weight": (d,),
        "self_attention.k_layernorm.weight": (d,),
        "self_attention.linear_proj.weight": (h, args.num_attention_heads * d),
        "pre_mlp_layernorm.weight": (h,),
        "mlp.linear_fc1.weight": (2 * args.ffn_hidden_size, h),
        "mlp.linear_fc2.weight": (h, args.ffn_hidden_size),
    }[rest]


# ---------------------------------------------------------------------------------------------
# tensor-parallel sharding


def tp_shard(name: str, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This TP rank's slice of full Megatron tensor `name`."""
    if size == 1:
        return full
    if name.endswith("linear_fc1.weight"):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size)[rank], up.chunk(size)[rank]], dim=0)
    if name.endswith(_SPLIT_DIM0):
        return full.chunk(size, dim=0)[rank]
    if name.endswith(_SPLIT_DIM1):
        return full.chunk(size, dim=1)[rank]
    return full


def tp_unshard(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Full Megatron tensor from all TP ranks' slices (inverse of ``tp_shard``)."""
    if len(shards) == 1:
        return shards[0]
    if name.endswith("linear_fc1.weight"):
        gates, ups = zip(*(s.chunk(2, dim=0) for s in shards))
        return torch.cat([*gates, *ups], dim=0)
    if name.endswith(_SPLIT_DIM0):
        return torch.cat(shards, dim=0)
    if name.endswith(_SPLIT_DIM1):
        return torch.cat(shards, dim=1)
    return shards[0]


# ---------------------------------------------------------------------------------------------
# GPTModel <-> HF


def unwrap(model):
    """The bare GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _split_layer(name: str) -> tuple[int, str]:
    match = _LAYER.match(name)
    if match is None:
        raise KeyError(f"unexpected Megatron tensor name {name!r}")
    return int(match.group(1)), match.group(2)


def _canonical(local_name: str, layer_offset: int) -> str:
    """Global, local-spec name for a parameter name of this rank's model chunk."""
    match = _LAYER.match(local_name)
    if match is None:
        return local_name
    rest = _TE_TO_LOCAL.get(match.group(2), match.group(2))
    return f"decoder.layers.{int(match.group(1)) + layer_offset}.{rest}"


def local_parameters(model) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters keyed by canonical (global, local-spec) names."""
    gpt = unwrap(model)
    offset = gpt.decoder.layers[0].layer_number - 1 if len(gpt.decoder.layers) else 0
    return {_canonical(n, offset): p for n, p in gpt.named_parameters()}


def _tp_group_rank_size():
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_group(),
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


@torch.no_grad()
def load_hf_weights(model, get_hf: Callable[[str], torch.Tensor], args: ModelArgs) -> None:
    """Copy HF tensors (read through `get_hf`) into this rank's shards of `model`."""
    _, tp_rank, tp_size = _tp_group_rank_size()
    padded_vocab = unwrap(model).vocab_size
    for name, param in local_parameters(model).items():
        full = hf_to_megatron(name, [get_hf(n) for n in hf_names_for(name, args)], args, padded_vocab)
        shard = tp_shard(name, full, tp_rank, tp_size)
        if shard.shape != param.shape:
            raise ValueError(f"{name}: HF gives shard {tuple(shard.shape)}, model has {tuple(param.shape)}; "
                             "the checkpoint does not match its config.json")
        param.copy_(shard)


@torch.no_grad()
def iter_hf_tensors(model, args: ModelArgs, dtype: torch.dtype | None = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (HF name, full tensor) for the whole model, on every rank, one tensor at a time.

    Within a pipeline stage, TP shards are all-gathered; then the owning stage broadcasts the full
    tensor over the pipeline group so every rank (in particular global rank 0, which talks to the
    rollout engines) sees all tensors. Collective: all ranks of the model-parallel group must iterate.
    """
    from megatron.core import parallel_state

    tp_group, _, tp_size = _tp_group_rank_size()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    params = local_parameters(model)
    padded_vocab = unwrap(model).vocab_size
    owners = _owner_stages(params, args) if pp_size > 1 else {}
    for name in megatron_names(args):
        full = None
        if name in params:
            shard = params[name].detach()
            if tp_size > 1 and name.endswith((*_SPLIT_DIM0, *_SPLIT_DIM1, "linear_fc1.weight")):
                gathered = [torch.empty_like(shard) for _ in range(tp_size)]
                dist.all_gather(gathered, shard.contiguous(), group=tp_group)
                full = tp_unshard(name, gathered)
            else:
                full = shard
        if pp_size > 1:
            if full is None:
                full = torch.empty(megatron_full_shape(name, args, padded_vocab),
                                   dtype=next(iter(params.values())).dtype,
                                   device=next(iter(params.values())).device)
            src = dist.get_global_rank(pp_group, owners[name])
            dist.broadcast(full.contiguous(), src=src, group=pp_group)
        for hf_name, tensor in megatron_to_hf(name, full, args):
            yield hf_name, tensor if dtype is None else tensor.to(dtype)


def _owner_stages(params: Mapping[str, torch.Tensor], args: ModelArgs) -> dict[str, int]:
    """Pipeline stage that owns each Megatron tensor (even split of layers across stages)."""
    from megatron.core import parallel_state

    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    per_stage = args.num_layers // pp_size
    owners = {}
    for name in megatron_names(args):
        if name == "embedding.word_embeddings.weight":
            owners[name] = 0
        elif name.startswith("decoder.layers."):
            owners[name] = _split_layer(name)[0] // per_stage
        else:
            owners[name] = pp_size - 1
    return owners


# ---------------------------------------------------------------------------------------------
# weight digests (here, below rollout and train, so the learner and every engine hash HF tensors alike)


def update_digest(hasher, name: str, tensor: torch.Tensor) -> None:
    """Feed one HF-named tensor's name and exact bytes to `hasher` (a hashlib object)."""
    hasher.update(name.encode())
    hasher.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


def tensor_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """The digest a verified weight sync compares: names and exact bytes, in order."""
    hasher = hashlib.blake2b(digest_size=16)
    for name, tensor in named:
        update_digest(hasher, name, tensor)
    return hasher.hexdigest()
