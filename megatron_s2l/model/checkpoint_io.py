"""Model weights on disk: HF safetensors checkpoints, Megatron dist checkpoints, and the two
conversion commands (`s2l convert hf-to-megatron | megatron-to-hf`).

A Megatron checkpoint directory holds ``model/`` (dist_checkpointing, torch_dist format, reshardable to
any TP x PP), ``s2l_model.json`` (the HF config it came from, checked on every load) and ``hf_assets/``
(tokenizer and config files, so an export is a complete HF checkpoint again).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_s2l.model import convert, specs
from megatron_s2l.model.convert import unwrap
from megatron_s2l.model.files import check_safetensors
from megatron_s2l.model.specs import model_args_from_hf

logger = logging.getLogger(__name__)

MODEL_META_FILE = "s2l_model.json"
MODEL_SUBDIR = "model"
HF_ASSETS_SUBDIR = "hf_assets"
HF_ASSET_SUFFIXES = (".json", ".txt", ".model", ".jinja")  # config, tokenizer, generation config




class HFCheckpoint:
    """Lazy reader of a local HF safetensors checkpoint (single file or sharded with an index)."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{self.path}: no model.safetensors or model.safetensors.index.json; "
                                    f"{_how_to_make_safetensors(self.path)}")
        check_safetensors(self.path)  # a damaged file: a named error, not safetensors' bare one
        self._handles = {f: safe_open(str(self.path / f), framework="pt") for f in files}
        self._where = {k: f for f, h in self._handles.items() for k in h.keys()}
        self.hf_config = json.loads((self.path / "config.json").read_text())

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"{self.path}: tensor {name!r} is missing; is this checkpoint the "
                           f"{self.hf_config.get('model_type')} architecture its config.json claims?")
        return self._handles[self._where[name]].get_tensor(name)

    def names(self) -> set[str]:
        return set(self._where)




def _how_to_make_safetensors(path: Path) -> str:
    """The fix for a model folder without safetensors, for the files it does hold."""
    gguf = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if gguf:
        return f"make one from the GGUF file with `s2l convert gguf-to-hf --gguf {gguf[0]} --out <new dir>`"
    return ("a GGUF file converts with `s2l convert gguf-to-hf --gguf FILE --out DIR`; .bin weights with "
            "transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir)")


def save_megatron_checkpoint(model, out_dir: str | Path, hf_config: dict,
                             hf_assets_from: str | Path | None = None, extra_meta: dict | None = None) -> Path:
    """Write the model with dist_checkpointing (torch_dist, reshardable) plus its HF config.

    Collective. Layout: ``out_dir/model/`` (dist checkpoint), ``out_dir/s2l_model.json`` (HF config),
    ``out_dir/hf_assets/`` (tokenizer and config files, so an export is a complete HF checkpoint).
    """
    from megatron.core import dist_checkpointing

    out_dir = Path(out_dir)
    (out_dir / MODEL_SUBDIR).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(unwrap(model).sharded_state_dict(prefix=""), str(out_dir / MODEL_SUBDIR))
    if not dist.is_initialized() or dist.get_rank() == 0:
        meta = {"hf_config": hf_config, "padded_vocab_size": unwrap(model).vocab_size, **(extra_meta or {})}
        (out_dir / MODEL_META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if hf_assets_from is not None:
            copy_hf_assets(hf_assets_from, out_dir / HF_ASSETS_SUBDIR)
    if dist.is_initialized():
        dist.barrier()
    return out_dir


def read_checkpoint_hf_config(ckpt_dir: str | Path) -> dict:
    return read_checkpoint_meta(ckpt_dir)["hf_config"]


def check_same_architecture(expected: dict, found: dict, where: str) -> None:
    """Refuse a checkpoint whose architecture differs from the configured model, naming the fields."""
    a, b = model_args_from_hf(expected), model_args_from_hf(found)
    diffs = [f"{f}: model has {getattr(a, f)!r}, checkpoint has {getattr(b, f)!r}"
             for f in a.__dataclass_fields__ if getattr(a, f) != getattr(b, f)]
    if diffs:
        raise ValueError(f"{where} does not match the configured model ({'; '.join(diffs)}); "
                         "point model.path at the HF checkpoint this was converted from")


def load_megatron_checkpoint(model, ckpt_dir: str | Path, hf_config: dict) -> None:
    """Load a dist checkpoint into `model` at whatever TP/PP it was built with. Collective.

    A checkpoint written with the other layer implementation (local on CPU, Transformer Engine on GPU)
    lacks some modules' `_extra_state` (e.g. TE attention's FP8 metadata): those start fresh. A missing
    weight is an error."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    ckpt_dir = Path(ckpt_dir)
    check_same_architecture(hf_config, read_checkpoint_hf_config(ckpt_dir), str(ckpt_dir))
    gpt = unwrap(model)
    state, _, absent = dist_checkpointing.load(gpt.sharded_state_dict(prefix=""), str(ckpt_dir / MODEL_SUBDIR),
                                               strict=StrictHandling.RETURN_UNEXPECTED)
    absent_weights = sorted(key for key in absent if not key.endswith("_extra_state"))
    if absent_weights:
        raise ValueError(f"{ckpt_dir} lacks {len(absent_weights)} tensor(s) the model needs "
                         f"({', '.join(absent_weights[:4])}{', ...' if len(absent_weights) > 4 else ''}); "
                         "the checkpoint is incomplete: write it again with `s2l convert hf-to-megatron`")
    if absent:
        logger.info("%s has no extra state for %d module(s) (written with another layer implementation); "
                    "they start fresh", ckpt_dir, len(absent))
    gpt.load_state_dict(state, strict=False)


def copy_hf_assets(src: str | Path, dst: str | Path) -> None:
    """Copy config/tokenizer/generation files (not weights) of an HF checkpoint directory."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for file in Path(src).iterdir():
        if file.is_file() and file.suffix in HF_ASSET_SUFFIXES and not file.name.endswith(".index.json"):
            shutil.copy2(file, dst / file.name)


def save_hf_checkpoint(tensors: Iterator[tuple[str, torch.Tensor]], out_dir: str | Path,
                       hf_config: dict, assets_from: str | Path | None = None,
                       max_shard_bytes: int = 4 * 2**30) -> Path:
    """Write streamed HF tensors as safetensors shards (each written as soon as it fills), an index
    when there is more than one, and the config/tokenizer files."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if assets_from is not None:
        copy_hf_assets(assets_from, out_dir)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    total = size = 0

    def flush() -> None:
        file = out_dir / f"model-part{len(written) + 1:05d}.safetensors"
        save_file(shard, str(file), metadata={"format": "pt"})
        written.append((file, list(shard)))
        shard.clear()

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = tensor.detach().cpu().contiguous()
        size += nbytes
        total += nbytes
    flush()
    if len(written) == 1:
        written[0][0].rename(out_dir / "model.safetensors")
        return out_dir
    weight_map = {}
    for i, (file, names) in enumerate(written):
        final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        file.rename(out_dir / final)
        weight_map.update({name: final for name in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out_dir


# ---------------------------------------------------------------------------------------------
# conversion commands (collective: every rank of the job calls them)


def hf_dtype(hf_config: dict) -> str:
    """The dtype an HF config declares ("float32" or "bfloat16"; fp16 checkpoints load as fp32)."""
    declared = str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32")
    return "bfloat16" if "bfloat16" in declared else "float32"


def with_dtype(hf_config: dict, dtype: torch.dtype) -> dict:
    """The HF config declaring `dtype` (what the exported tensors are), under the key(s) it already uses."""
    keys = [key for key in ("dtype", "torch_dtype") if hf_config.get(key)] or ["torch_dtype"]
    return {**hf_config, **{key: str(dtype).removeprefix("torch.") for key in keys}}


def convert_hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, model_cfg, parallel) -> Path:
    """HF safetensors -> Megatron dist checkpoint, built at `parallel`'s TP x PP.

    The result reshards on load, so converting at TP=PP=1 is enough unless one process cannot hold the
    model; under torchrun each rank converts only its own shard.
    """
    checkpoint = HFCheckpoint(hf_dir)
    args = specs.model_args_from_hf(checkpoint.hf_config)
    model = specs.build_gpt_model(args, model_cfg, parallel)
    convert.load_hf_weights(model, checkpoint.get, args)
    meta = {"dtype": model_cfg.dtype}
    out = save_megatron_checkpoint(model, out_dir, checkpoint.hf_config, hf_assets_from=hf_dir, extra_meta=meta)
    logger.info("wrote Megatron checkpoint %s (tp=%d pp=%d, %s)", out, parallel.tp, parallel.pp, model_cfg.dtype)
    return out


def convert_megatron_to_hf(ckpt_dir: str | Path, out_dir: str | Path, model_cfg, parallel,
                           dtype: torch.dtype | None = None) -> Path:
    """Megatron dist checkpoint (any TP x PP it was saved at) -> HF safetensors, written by rank 0.

    Tensors are written in `dtype`, by default the checkpoint's (norms that Megatron keeps in fp32 go back to
    it), and the written config declares it."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_checkpoint_meta(ckpt_dir)
    hf_config = meta["hf_config"]
    args = specs.model_args_from_hf(hf_config)
    model = specs.build_gpt_model(args, model_cfg, parallel)
    load_megatron_checkpoint(model, ckpt_dir, hf_config)
    dtype = dtype or getattr(torch, meta.get("dtype") or hf_dtype(hf_config))
    hf_config = with_dtype(hf_config, dtype)
    tensors = convert.iter_hf_tensors(model, args, dtype=dtype)
    assets = ckpt_dir / HF_ASSETS_SUBDIR
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_hf_checkpoint(tensors, out_dir, hf_config, assets_from=assets if assets.is_dir() else None)
        logger.info("wrote HF checkpoint %s", out_dir)
    else:
        for _ in tensors:  # the gather is collective: every rank walks the stream
            pass
    if dist.is_initialized():
        dist.barrier()
    return Path(out_dir)


def read_checkpoint_meta(ckpt_dir: str | Path) -> dict:
    """Everything in s2l_model.json (hf_config, padded_vocab_size, dtype)."""
    meta_file = Path(ckpt_dir) / MODEL_META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a megatron-s2l checkpoint ({MODEL_META_FILE} missing); "
                                "make one with `s2l convert hf-to-megatron`")
    return json.loads(meta_file.read_text())
