"""`s2l convert gguf-to-hf` on the shipped SmolLM2-135M-Instruct GGUF: the HF folder it writes is the GGUF
model, and a folder that holds only a GGUF file names that command."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_s2l.cli import main
from megatron_s2l.model import checkpoint_io
from megatron_s2l.model.gguf import load_gguf, save_dequantized
from tests.utils import smollm2_gguf


@pytest.fixture(scope="module")
def gguf_model():
    """The GGUF file as transformers loads it (dequantised, float32) and its tokenizer."""
    model, tokenizer = load_gguf(smollm2_gguf())
    return model.eval(), tokenizer


@pytest.mark.slow
def test_gguf_to_hf_writes_the_gguf_model(gguf_model, tmp_path):
    gguf, tokenizer = gguf_model
    assert main(["convert", "gguf-to-hf", "--gguf", str(smollm2_gguf()), "--out", str(tmp_path / "hf")]) == 0
    converted = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    converted_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    chat = [{"role": "user", "content": "Natalia sold 48 clips in April and half as many in May. How many?"}]
    text = converted_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = converted_tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == tokenizer(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, gguf(ids).logits)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization_config" not in config and checkpoint_io.hf_dtype(config) == "float32"


def test_gguf_to_hf_saves_the_dtype_asked_for(gguf_model, tmp_path):
    gguf, tokenizer = gguf_model
    save_dequantized(gguf, tokenizer, tmp_path, "bfloat16")
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as saved:
        embedding = saved.get_tensor("model.embed_tokens.weight")
        assert {saved.get_tensor(name).dtype for name in saved.keys()} == {torch.bfloat16}
    assert torch.equal(embedding, gguf.model.embed_tokens.weight.detach().to(torch.bfloat16))
    assert checkpoint_io.hf_dtype(json.loads((tmp_path / "config.json").read_text())) == "bfloat16"


def test_a_model_folder_with_only_a_gguf_file_names_the_conversion(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.Q4_1.gguf").write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match=r"s2l convert gguf-to-hf --gguf \S*model.Q4_1.gguf --out"):
        checkpoint_io.HFCheckpoint(tmp_path)
    (tmp_path / "model.Q4_1.gguf").unlink()
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        checkpoint_io.HFCheckpoint(tmp_path)


def test_gguf_to_hf_refuses_a_missing_file_with_exit_2(tmp_path):
    argv = ["convert", "gguf-to-hf", "--gguf", str(tmp_path / "no.gguf"), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
