"""Checkpoint manifests: the size and CRC-32 of every file of a checkpoint, written last of all as the save's
commit mark, and checked before a resume. A truncated, missing or changed file is then found by name, instead
of surfacing as a raw load error, or not at all (zeroed bytes inside a shard load without complaint).

CRC-32 (zlib) is the fastest sound checksum in the standard library (docs/BENCHMARKS.md: about 1.1 GB/s on
one core, against 0.5-0.8 GB/s for blake2b, sha1, md5 and sha256; Adler-32 is faster but weaker); it finds
accidental damage, not tampering.
The files are split over the ranks, and over a few threads in each (zlib and file reads release the GIL),
so that verifying a large checkpoint runs at about the rate its file system can be read.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch.distributed as dist

from megatron_s2l import platform

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
_FORMAT = 1
_CHUNK_BYTES = 16 << 20
_THREADS_PER_RANK = 4


def file_crc32(path: Path) -> str:
    """CRC-32 of a file's bytes, as 8 hex digits; 'unreadable (...)' when it cannot be read."""
    crc = 0
    try:
        with path.open("rb", buffering=0) as stream:
            buffer = bytearray(min(_CHUNK_BYTES, max(1, path.stat().st_size)))
            view = memoryview(buffer)
            while size := stream.readinto(buffer):
                crc = zlib.crc32(view[:size], crc)
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    return f"{crc:08x}"


def checksums(root: Path, sizes: dict[str, int]) -> dict[str, str]:
    """Collective: `file_crc32` of every file named in `sizes` (relative to `root`; the same on every rank),
    each rank reading a share (largest files dealt out first) and every rank getting all of them."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = sorted(sizes, key=lambda name: (-sizes[name], name))[rank::world]
    with ThreadPoolExecutor(max_workers=max(1, min(_THREADS_PER_RANK, len(mine)))) as pool:
        found = dict(zip(mine, pool.map(lambda name: file_crc32(root / name), mine)))
    return {name: crc for share in platform.gather_to_all(found) for name, crc in share.items()}


def write_manifest(root: Path) -> None:
    """Collective, once every rank's files are on disk: rank 0 lists `root`, every rank hashes a share, and
    rank 0 writes the manifest, the save's last file."""
    sizes = platform.from_rank0(_sizes(root) if platform.is_rank0() else None)
    crcs = checksums(root, sizes)
    unreadable = sorted(name for name, crc in crcs.items() if crc.startswith("unreadable"))
    if unreadable:  # every rank has every checksum: all of them fail the save together
        raise OSError(f"{root / unreadable[0]} cannot be read back: {crcs[unreadable[0]]}")
    if platform.is_rank0():
        files = {name: {"bytes": size, "crc32": crcs[name]} for name, size in sizes.items()}
        (root / MANIFEST_FILE).write_text(json.dumps({"format": _FORMAT, "files": files}, indent=1))


def verify(root: Path) -> str:
    """Collective: '' when every file the manifest of `root` lists is there with its size and checksum, else
    what is wrong (the first file found wrong, and how). Logs the rate it read at."""
    start = time.perf_counter()
    expected, problem = platform.from_rank0(_expected(root) if platform.is_rank0() else None)
    if problem:
        return problem
    sizes = {name: entry["bytes"] for name, entry in expected.items()}
    for name, crc in sorted(checksums(root, sizes).items()):
        if crc != expected[name]["crc32"]:
            if crc.startswith("unreadable"):
                return f"{name} is {crc}"
            saved = expected[name]["crc32"]
            return f"{name} has changed since the save (CRC-32 {crc}, the manifest says {saved})"
    seconds, total = time.perf_counter() - start, sum(sizes.values())
    logger.info("verified %s: %d files, %.1f MB in %.2f s (%.0f MB/s)", root, len(sizes), total / 1e6,
                seconds, total / 1e6 / max(seconds, 1e-9))
    return ""


def _sizes(root: Path) -> dict[str, int]:
    return {path.relative_to(root).as_posix(): path.stat().st_size for path in sorted(root.rglob("*"))
            if path.is_file() and path.name != MANIFEST_FILE}


def _expected(root: Path) -> tuple[dict[str, dict], str]:
    """The manifest's entries and '' when each file is there with its size; else ({}, what is wrong)."""
    try:
        listed = json.loads((root / MANIFEST_FILE).read_text())["files"]
        files = {name: {"bytes": int(e["bytes"]), "crc32": str(e["crc32"])} for name, e in listed.items()}
    except FileNotFoundError:
        return {}, f"{MANIFEST_FILE} is missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return {}, f"{MANIFEST_FILE} is unreadable ({type(err).__name__}: {err})"
    for name, entry in sorted(files.items()):
        path = root / name
        if not path.is_file():
            return {}, f"{name} is missing"
        size = path.stat().st_size
        if size != entry["bytes"]:
            what = "truncated: " if size < entry["bytes"] else ""
            return {}, f"{name} is {what}{size:,} bytes, the manifest says {entry['bytes']:,}"
    return files, ""
