"""Converter at TP=2, PP=2 and TP=2 x PP=2 under torchrun + gloo, against transformers' logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_s2l.config import ModelConfig, ParallelConfig
from megatron_s2l.model import checkpoint_io
from tests.utils import run_torchrun

WORKER = Path(__file__).parent / "workers" / "convert_worker.py"
FP32 = ModelConfig(dtype="float32")


@pytest.fixture(scope="module")
def reference(mcore_world1, tiny_qwen3, tmp_path_factory):
    """Prompt ids, transformers logits and a TP=1 Megatron checkpoint of the tiny Qwen3."""
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_qwen3))
    texts = ["Natalia sold clips to 48 of her friends in April.", "The answer is 42, since 6 * 7 = 42."]
    ids = torch.tensor([tokenizer(t)["input_ids"][:9] for t in texts])
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(str(tiny_qwen3), dtype=torch.float32)(ids).logits
    tp1_ckpt = tmp_path_factory.mktemp("tp1") / "mcore"
    checkpoint_io.convert_hf_to_megatron(tiny_qwen3, tp1_ckpt, FP32, ParallelConfig())
    return ids, logits, tp1_ckpt


@pytest.mark.dist
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_convert_parallel_logits_export_and_reshard(mcore_world1, tiny_qwen3, reference, tmp_path, tp, pp):
    ids, expected, tp1_ckpt = reference
    torch.save(ids, tmp_path / "ids.pt")
    run_torchrun(WORKER, tp * pp, [tiny_qwen3, tp1_ckpt, tmp_path, tp, pp], timeout=600)

    for tag in ("direct", "resharded"):  # loaded from HF at this layout / from the TP=1 checkpoint
        logits = torch.load(tmp_path / f"logits_{tag}.pt")
        assert (logits - expected).abs().max().item() <= 1e-4, tag

    original = load_file(tiny_qwen3 / "model.safetensors")
    exported = load_file(tmp_path / "export" / "model.safetensors")
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], v) for k, v in original.items())

    # ... and the checkpoint saved at this layout reads back at TP=1 bit-exactly.
    checkpoint_io.convert_megatron_to_hf(tmp_path / "mcore", tmp_path / "back", FP32, ParallelConfig())
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert all(torch.equal(back[k], v) for k, v in original.items())
