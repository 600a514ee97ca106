"""A local Hugging Face checkpoint folder, checked without loading it: the folder and its config.json exist,
every safetensors file's header is whole and its tensors fit in the file, and a quick fingerprint of the
weights. No torch here, so the preflight of `s2l train` (and `s2l eval`, the pool build, `s2l convert`) can
refuse a missing or truncated checkpoint in milliseconds instead of in a library's traceback.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_HEADER_LIMIT = 100 * 2**20  # safetensors caps its JSON header at 100 MB
_DIGEST_WINDOW = 2**20  # bytes read at each of three places per weight file


def require_model_dir(path: str | Path, field: str) -> Path:
    """The folder `field` names, with its config.json; FileNotFoundError naming the field otherwise."""
    folder = Path(path)
    if not str(path):
        raise FileNotFoundError(f"{field} is empty: set it to a local HF checkpoint directory "
                                "(config.json + *.safetensors + tokenizer files)")
    if not folder.is_dir():
        raise FileNotFoundError(f"{field}={path}: no such directory; model paths must be local HF checkpoint "
                                "directories (nothing is downloaded): fix the path, or download the model "
                                "first")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{field}={path}: no config.json in it; point {field} at an HF checkpoint "
                                "directory (config.json + *.safetensors + tokenizer files)")
    return folder


def load_hf_config(path: str | Path) -> dict[str, Any]:
    """config.json of a local HF checkpoint directory as a dict (no hub access)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: model paths must be local HF checkpoint "
                                "directories (config.json + *.safetensors); nothing is downloaded")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}:{err.lineno}: not valid JSON ({err.msg}); the file is damaged: "
                         "copy it again from the model's source") from None


def check_safetensors(folder: str | Path) -> None:
    """Every *.safetensors file in `folder` (and every file its index names) is present and whole: a header
    that parses and tensors that end inside the file. ValueError naming the file otherwise."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            named = set(json.loads(index.read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise ValueError(f"{index}: not a safetensors index (JSON with a weight_map); "
                             "copy it again") from None
        missing = sorted(name for name in named if not (folder / name).is_file())
        if missing:
            raise FileNotFoundError(f"{folder}: {index.name} names {len(missing)} file(s) that are missing "
                                    f"(first: {missing[0]}); the download is incomplete: fetch those files")
    for file in files:
        _check_safetensors_file(file)


def _check_safetensors_file(file: Path) -> None:
    size = file.stat().st_size
    fix = "the file is truncated or damaged: copy or download it again"
    with file.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"{file}: {size} bytes, too short for a safetensors file; {fix}")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, _HEADER_LIMIT):
            raise ValueError(f"{file}: its header claims {length} bytes but the file holds {size}; {fix}")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{file}: the safetensors header is not valid JSON; {fix}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: the safetensors header is not a JSON object; {fix}")
    ends = [entry["data_offsets"][1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2]
    if max(ends, default=0) > size - 8 - length:
        raise ValueError(f"{file}: its tensors need {8 + length + max(ends)} bytes, the file holds {size}; "
                         f"{fix}")


def weights_digest(folder: str | Path) -> str:
    """A quick fingerprint of a checkpoint's weights: each weight file's name and size and 1 MiB read at its
    start, middle and end. Not a full hash (an 8B model would take a minute), but two different checkpoints
    of one architecture (a fine-tune, another size) differ in those bytes. "" when the folder has no
    weights."""
    files = sorted(f for f in Path(folder).iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES) \
        if Path(folder).is_dir() else []
    if not files:
        return ""
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as handle:
            for offset in sorted({0, max(0, size // 2 - _DIGEST_WINDOW // 2), max(0, size - _DIGEST_WINDOW)}):
                handle.seek(offset)
                digest.update(handle.read(_DIGEST_WINDOW))
    return "sha256:" + digest.hexdigest()[:16]
