"""`s2l convert gguf-to-hf`: a GGUF file (llama.cpp's format, often quantised) -> a plain HF safetensors
folder, the only model format that training, the converters and the engines read.

transformers' GGUF loader dequantises the weights and rebuilds the config and the tokenizer (chat template
included), but the model it returns refuses `save_pretrained` (it is marked as quantised with gguf). So the
weights move into a fresh model built from the same config without that mark, which saves as any other.
A quantised file stays as accurate as its quantisation: the dequantised weights are exactly its values.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")


def load_gguf(gguf_file: str | Path):
    """(model, tokenizer) of a GGUF file, dequantised to float32 by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"--gguf {gguf_file}: no such file")
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError:
        raise ValueError("reading GGUF files needs the `gguf` package: pip install gguf") from None
    folder, name = str(gguf_file.parent), gguf_file.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer


def save_dequantized(model, tokenizer, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Save a GGUF-loaded model as plain safetensors in `dtype`, with its tokenizer and generation config."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # the mark that makes save_pretrained refuse
        del config.quantization_config
    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):  # no second random initialisation: the weights come from `model`
        plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    state = {name: tensor.to(torch_dtype) for name, tensor in model.state_dict().items()}
    plain.load_state_dict(state, strict=True, assign=True)
    plain.tie_weights()
    plain.generation_config = copy.deepcopy(model.generation_config)
    out_dir = Path(out_dir)
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def convert_gguf_to_hf(gguf_file: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """GGUF file -> HF folder (config.json, model.safetensors, tokenizer files) in `dtype`."""
    if dtype not in DTYPES:  # before the slow load
        raise ValueError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    model, tokenizer = load_gguf(gguf_file)
    out = save_dequantized(model, tokenizer, out_dir, dtype)
    logger.info("wrote HF checkpoint %s (%s, %s, %.0fM parameters)", out, type(model).__name__, dtype,
                sum(p.numel() for p in model.parameters()) / 1e6)
    return out
