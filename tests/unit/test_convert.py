"""HF <-> Megatron conversion at TP=PP=1 against transformers (multi-rank layouts: tests/dist)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_s2l.config import ModelConfig, ParallelConfig
from megatron_s2l.model import checkpoint_io, convert, specs
from tests.utils import make_tiny_model, smollm2_hf_checkpoint

FP32 = ModelConfig(dtype="float32")


def _prompt_ids(tokenizer_dir) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts = ["Natalia sold clips to 48 of her friends in April.", "What is 7 * 8? Answer: 56 and more"]
    batch = [tokenizer(t)["input_ids"][:10] for t in texts]
    return torch.tensor(batch)


def _megatron_from_hf(hf_dir):
    ckpt = checkpoint_io.HFCheckpoint(hf_dir)
    args = specs.model_args_from_hf(ckpt.hf_config)
    model = specs.build_gpt_model(args, FP32, ParallelConfig())
    convert.load_hf_weights(model, ckpt.get, args)
    return model.eval(), args


def _logits(model, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return model(ids, positions, None)[..., :vocab_size]


@pytest.mark.parametrize("family,overrides", [
    ("qwen3", {}),
    ("qwen2", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("qwen3", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
])
def test_convert_logits_match_transformers(mcore_world1, tmp_path, family, overrides):
    hf_dir = make_tiny_model(tmp_path / family, family=family, seed=1, num_hidden_layers=2, **overrides)
    reference = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    model, args = _megatron_from_hf(hf_dir)
    ids = _prompt_ids(hf_dir)
    with torch.no_grad():
        expected = reference(ids).logits
    actual = _logits(model, ids, args.vocab_size)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-4


def test_convert_round_trip_is_bit_exact(mcore_world1, tiny_qwen3, tmp_path):
    mcore_dir, hf_out = tmp_path / "mcore", tmp_path / "hf"
    hf_config = specs.load_hf_config(tiny_qwen3)
    checkpoint_io.convert_hf_to_megatron(tiny_qwen3, mcore_dir, FP32, ParallelConfig())
    checkpoint_io.convert_megatron_to_hf(mcore_dir, hf_out, FP32, ParallelConfig())
    original, exported = load_file(tiny_qwen3 / "model.safetensors"), load_file(hf_out / "model.safetensors")
    assert set(original) == set(exported)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        assert torch.equal(exported[name], tensor), name
    assert json.loads((hf_out / "config.json").read_text()) == hf_config
    assert (hf_out / "tokenizer.json").is_file()  # tokenizer travels with the checkpoint


def test_convert_bf16_round_trip_is_bit_exact(mcore_world1, tmp_path):
    hf_dir = make_tiny_model(tmp_path / "bf16", num_hidden_layers=2)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.bfloat16)
    model.save_pretrained(hf_dir)  # the same weights stored as bf16
    bf16 = ModelConfig(dtype="bfloat16")
    checkpoint_io.convert_hf_to_megatron(hf_dir, tmp_path / "mcore", bf16, ParallelConfig())
    checkpoint_io.convert_megatron_to_hf(tmp_path / "mcore", tmp_path / "out", bf16, ParallelConfig())
    original, exported = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "out/model.safetensors")
    assert all(exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], v) for k, v in original.items())


def test_megatron_to_hf_writes_the_checkpoints_dtype_by_default(mcore_world1, tmp_path):
    """`s2l convert megatron-to-hf --dtype auto`: a bf16 checkpoint of an fp32 HF model exports as bf16."""
    hf_dir = make_tiny_model(tmp_path / "fp32", num_hidden_layers=2)
    assert checkpoint_io.hf_dtype(specs.load_hf_config(hf_dir)) == "float32"
    bf16 = ModelConfig(dtype="bfloat16")
    checkpoint_io.convert_hf_to_megatron(hf_dir, tmp_path / "mcore", bf16, ParallelConfig())
    checkpoint_io.convert_megatron_to_hf(tmp_path / "mcore", tmp_path / "out", bf16, ParallelConfig())
    exported = load_file(tmp_path / "out/model.safetensors")
    assert {tensor.dtype for tensor in exported.values()} == {torch.bfloat16}
    assert checkpoint_io.hf_dtype(specs.load_hf_config(tmp_path / "out")) == "bfloat16"  # as its tensors
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))


def test_convert_streams_every_tensor_in_memory(mcore_world1, tiny_qwen3):
    model, args = _megatron_from_hf(tiny_qwen3)
    original = load_file(tiny_qwen3 / "model.safetensors")
    streamed = dict(convert.iter_hf_tensors(model, args))
    assert set(streamed) == set(original)
    assert all(torch.equal(streamed[k], v) for k, v in original.items())


def test_convert_refuses_mismatched_architecture(mcore_world1, tiny_qwen3, tmp_path):
    checkpoint_io.convert_hf_to_megatron(tiny_qwen3, tmp_path / "mcore", FP32, ParallelConfig())
    other = specs.load_hf_config(tiny_qwen3) | {"num_hidden_layers": 2, "intermediate_size": 96}
    model = specs.build_gpt_model(specs.model_args_from_hf(other), FP32, ParallelConfig())
    with pytest.raises(ValueError, match="num_layers: model has 2, checkpoint has 4"):
        checkpoint_io.load_megatron_checkpoint(model, tmp_path / "mcore", other)


def test_convert_refuses_missing_tensor(mcore_world1, tiny_qwen3, tmp_path):
    state = load_file(tiny_qwen3 / "model.safetensors")
    del state["model.layers.1.self_attn.k_norm.weight"]
    broken = tmp_path / "broken"
    broken.mkdir()
    from safetensors.torch import save_file

    save_file(state, str(broken / "model.safetensors"))
    (broken / "config.json").write_text((tiny_qwen3 / "config.json").read_text())
    with pytest.raises(KeyError, match="k_norm.weight.*is missing"):
        checkpoint_io.convert_hf_to_megatron(broken, tmp_path / "out", FP32, ParallelConfig())


def _rewrite_without(ckpt_dir, model, dropped) -> None:
    """Rewrite a converted checkpoint's model part without the sharded entries `dropped` selects."""
    import shutil

    from megatron.core import dist_checkpointing

    shutil.rmtree(ckpt_dir / checkpoint_io.MODEL_SUBDIR)
    (ckpt_dir / checkpoint_io.MODEL_SUBDIR).mkdir()
    state = {k: v for k, v in model.sharded_state_dict(prefix="").items() if not dropped(k)}
    dist_checkpointing.save(state, str(ckpt_dir / checkpoint_io.MODEL_SUBDIR))


def test_checkpoint_from_another_layer_implementation_loads_without_extra_state(mcore_world1, tiny_qwen3,
                                                                                 tmp_path):
    """TE modules keep `_extra_state` (FP8 metadata) that local modules lack: a checkpoint converted on CPU
    must load into the GPU model (simulated: a checkpoint without any), and one missing a weight must not."""
    source, args = _megatron_from_hf(tiny_qwen3)
    hf_config = specs.load_hf_config(tiny_qwen3)
    ckpt = checkpoint_io.convert_hf_to_megatron(tiny_qwen3, tmp_path / "mcore", FP32, ParallelConfig())
    assert any(k.endswith("_extra_state") for k in source.sharded_state_dict(prefix=""))
    _rewrite_without(ckpt, source, lambda key: key.endswith("_extra_state"))
    model = specs.build_gpt_model(args, FP32, ParallelConfig()).eval()
    checkpoint_io.load_megatron_checkpoint(model, ckpt, hf_config)
    ids = torch.randint(0, args.vocab_size, (2, 8))
    assert torch.equal(_logits(model, ids, args.vocab_size), _logits(source, ids, args.vocab_size))

    _rewrite_without(ckpt, source, lambda key: key == "decoder.final_layernorm.weight")
    with pytest.raises(ValueError, match="lacks 1 tensor.*decoder.final_layernorm.weight.*s2l convert"):
        checkpoint_io.load_megatron_checkpoint(model, ckpt, hf_config)


def test_convert_refuses_unsupported_architecture():
    with pytest.raises(ValueError, match="model_type='mistral'"):
        specs.model_args_from_hf({"model_type": "mistral"})
    config = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 8, "intermediate_size": 16,
              "num_attention_heads": 2, "vocab_size": 10, "rope_scaling": {"rope_type": "yarn"}}
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        specs.model_args_from_hf(config)


@pytest.mark.parametrize("tp", [2, 4])
def test_convert_tp_shard_unshard_inverse(tp):
    torch.manual_seed(0)
    for name, shape in [("decoder.layers.0.mlp.linear_fc1.weight", (16, 6)),
                        ("decoder.layers.3.self_attention.linear_qkv.weight", (24, 6)),
                        ("decoder.layers.0.self_attention.linear_proj.weight", (6, 8)),
                        ("embedding.word_embeddings.weight", (32, 6)),
                        ("decoder.final_layernorm.weight", (6,))]:
        full = torch.randn(shape)
        shards = [convert.tp_shard(name, full, r, tp) for r in range(tp)]
        assert torch.equal(convert.tp_unshard(name, shards), full), name
    gate_up = torch.arange(16.0).unsqueeze(1)  # rows 0-7 gate, 8-15 up
    shard = convert.tp_shard("decoder.layers.0.mlp.linear_fc1.weight", gate_up, 1, 2)
    assert shard.squeeze(1).tolist() == [4, 5, 6, 7, 12, 13, 14, 15]  # [gate_1; up_1]


def test_convert_padded_vocab_is_tp_independent():
    args = specs.model_args_from_hf({"model_type": "qwen3", "num_hidden_layers": 2, "hidden_size": 8,
                                     "intermediate_size": 16, "num_attention_heads": 2, "vocab_size": 259})
    assert {args.padded_vocab_size(128, tp) for tp in (1, 2, 4, 8)} == {384}
    assert args.padded_vocab_size(1, 2) == 260


@pytest.mark.slow
def test_convert_real_smollm2_checkpoint(mcore_world1, tmp_path):
    """SmolLM2-135M-Instruct (real weights, Llama family, tied embeddings) through the converter."""
    hf_dir = smollm2_hf_checkpoint(tmp_path / "smollm2")
    reference = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    checkpoint_io.convert_hf_to_megatron(hf_dir, tmp_path / "mcore", FP32, ParallelConfig())
    args = specs.model_args_from_hf(specs.load_hf_config(hf_dir))
    model = specs.build_gpt_model(args, FP32, ParallelConfig()).eval()
    checkpoint_io.load_megatron_checkpoint(model, tmp_path / "mcore", specs.load_hf_config(hf_dir))
    ids = _prompt_ids(hf_dir)
    with torch.no_grad():
        expected = reference(ids).logits
    assert (_logits(model, ids, args.vocab_size) - expected).abs().max().item() <= 1e-4
    assert (expected.argmax(-1) == _logits(model, ids, args.vocab_size).argmax(-1)).all()


def test_fp8_without_transformer_engine_is_refused_clearly():
    from megatron_s2l.config import ConfigError, FP8Config

    args = specs.model_args_from_hf({"model_type": "qwen3", "num_hidden_layers": 2, "hidden_size": 64,
                                     "intermediate_size": 128, "num_attention_heads": 4, "vocab_size": 100})
    cfg = ModelConfig(dtype="bfloat16", fp8=FP8Config(recipe="delayed"))
    if specs.use_transformer_engine(ModelConfig()):
        pytest.skip("this machine has Transformer Engine on CUDA (tests/gpu covers FP8 there)")
    with pytest.raises(ConfigError, match="model.fp8 needs Transformer Engine"):
        specs.transformer_config(args, cfg, ParallelConfig())


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_settings_reach_megatron_core_as_it_names_them(recipe, monkeypatch):
    """What TE would run with, checked by megatron-core's own TransformerConfig validation on CPU."""
    from megatron_s2l.config import FP8Config

    monkeypatch.setattr(specs, "use_transformer_engine", lambda model_cfg: True)  # as on an H100 with TE
    args = specs.model_args_from_hf({"model_type": "qwen3", "num_hidden_layers": 2, "hidden_size": 64,
                                     "intermediate_size": 128, "num_attention_heads": 4, "vocab_size": 100})
    fp8 = FP8Config(recipe=recipe, margin=1, amax_history=16)
    config = specs.transformer_config(args, ModelConfig(dtype="bfloat16", fp8=fp8), ParallelConfig())
    assert (config.fp8, config.fp8_recipe, config.fp8_margin) == ("hybrid", recipe, 1)
    assert (config.fp8_amax_history_len, config.fp8_amax_compute_algo) == (16, "max")
    assert config.bf16 and not config.fp8_param  # weights stay BF16; FP8 only inside the GEMMs


def test_a_bf16_model_is_bf16_throughout(mcore_world1, tmp_path):
    """Norm weights too: a float32 norm in a bf16 model sends torch's RMSNorm down its slow unfused path."""
    model_dir = make_tiny_model(tmp_path / "m", num_hidden_layers=2)
    args = specs.model_args_from_hf(specs.load_hf_config(model_dir))
    model = specs.build_gpt_model(args, ModelConfig(dtype="bfloat16"), ParallelConfig())
    assert {name: p.dtype for name, p in model.named_parameters() if p.dtype != torch.bfloat16} == {}
