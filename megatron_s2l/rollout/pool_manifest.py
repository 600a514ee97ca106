"""An explorer pool's identity, checked against the run that uses it, from files alone (no torch, no pyarrow):
the manifest (format, status, tokenizer, explorer model, sampling settings, samples per prompt) and the data
index (the question keys of the rows the pool was built from, with the template and length cap).

A run refuses a pool built by another explorer (weights digest, else the folder name), at another temperature,
top_p, top_k or max_new_tokens than its explorer.* and rollout.max_response_length, unless
explorer.accept_pool_mismatch=true (then it warns with the list). Responses longer than the run's cap are
refused either way: the learner would score tokens past its own limit. `s2l train` runs these checks in its
preflight; ExplorerPool (pool.py) reads the pool's samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
from pathlib import Path
from typing import Optional, Sequence

from megatron_s2l.config import RunConfig
from megatron_s2l.data.loaders import RawRow, question_key
from megatron_s2l.model.files import weights_digest
from megatron_s2l.rollout.schedule import build_schedule

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CHUNKS = "chunks"
DATA_INDEX = "data_index.json"  # the build's data settings and the question keys of every row it read
# sampling settings a run must share with its pool: manifest key -> the run's field
SAMPLING_FIELDS = {"temperature": "explorer.temperature", "top_p": "explorer.top_p",
                   "top_k": "explorer.top_k", "max_new_tokens": "rollout.max_response_length"}


def tokenizer_hash(tokenizer_dir: str | Path) -> str:
    """Hash of what gives token ids their meaning: vocabulary, merges and added (special) tokens.

    Read from tokenizer.json, or vocab.json + merges.txt + tokenizer_config.json, into one canonical
    form, so the same tokenizer saved either way hashes the same; chat templates and EOS settings are
    left out (they do not change what an id means). SentencePiece models hash the tokenizer.model bytes.
    """
    folder = Path(tokenizer_dir)
    vocab, merges, added, spm = None, [], {}, ""
    if (folder / "tokenizer.json").is_file():
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        vocab, merges = spec["model"].get("vocab"), spec["model"].get("merges", [])
        added = {int(t["id"]): t["content"] for t in spec.get("added_tokens", [])}
    elif (folder / "vocab.json").is_file():
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        if (folder / "merges.txt").is_file():
            lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
            merges = [m for m in lines if m and not m.startswith("#version")]
    elif (folder / "tokenizer.model").is_file():
        spm = hashlib.sha256((folder / "tokenizer.model").read_bytes()).hexdigest()
    else:
        raise FileNotFoundError(f"{folder}: no tokenizer.json, vocab.json or tokenizer.model; point at the "
                                "model directory that holds the tokenizer files")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        decoder = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        added.update({int(i): t["content"] for i, t in decoder.items() if int(i) not in added})
    if (folder / "added_tokens.json").is_file():
        extra = json.loads((folder / "added_tokens.json").read_text(encoding="utf-8"))
        added.update({int(i): tok for tok, i in extra.items() if int(i) not in added})
    canonical = {
        "vocab": sorted(vocab.items(), key=lambda kv: kv[1]) if isinstance(vocab, dict) else vocab,
        "merges": [" ".join(m) if isinstance(m, list) else m for m in merges],
        "added": sorted(added.items()), "spm": spm,
    }
    text = json.dumps(canonical, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def tokenizer_files_digest(tokenizer_dir: str | Path) -> str:
    """Hash of the tokenizer files' bytes (and tokenizer_config.json's added tokens): fast where
    `tokenizer_hash` parses megabytes of JSON. Equal digests mean equal tokenizers; different ones (the same
    tokenizer saved another way) still need `tokenizer_hash`."""
    folder, digest = Path(tokenizer_dir), hashlib.sha256()
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json"):
        if (folder / name).is_file():
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    if (folder / "tokenizer_config.json").is_file():
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        digest.update(json.dumps(config.get("added_tokens_decoder"), sort_keys=True).encode())
    return "sha256:" + digest.hexdigest()[:16]


def read_manifest(path: str | Path) -> dict:
    """The manifest of a complete pool of this format; a named error for anything else."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"{path} has no {MANIFEST}; build a pool with `s2l pool build`")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path / MANIFEST}:{err.lineno}: not valid JSON ({err.msg}); "
                         "rebuild the pool") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: pool format {manifest.get('format_version')} is not {FORMAT_VERSION}; "
                         "rebuild it with this version of `s2l pool build`")
    if manifest.get("status") != "complete":
        raise ValueError(f"{path}: the pool build did not finish; rerun `s2l pool build` with the same "
                         "arguments to resume it")
    return manifest


def check_learner_tokenizer(path: str | Path, manifest: dict, tokenizer_dir: str | Path) -> None:
    """The pool's token ids mean what they mean to the learner whose tokenizer is in `tokenizer_dir`."""
    if manifest.get("tokenizer_files") != tokenizer_files_digest(tokenizer_dir):  # else the same files
        check_tokenizer(path, manifest, tokenizer_hash(tokenizer_dir))


def check_tokenizer(path: str | Path, manifest: dict, expected_tokenizer_hash: str) -> None:
    if manifest["tokenizer_hash"] != expected_tokenizer_hash:
        raise ValueError(
            f"{path}: the pool's tokenizer ({manifest['tokenizer_hash']}, explorer "
            f"{manifest['explorer_model']}) differs from the learner's ({expected_tokenizer_hash}); its "
            "token ids would mean different text. Build a pool with an explorer of the learner's family "
            "(same tokenizer), or point explorer.pool_path at a pool built for this learner")


def run_mismatches(manifest: dict, cfg: RunConfig) -> list[str]:
    """How the pool's explorer and sampling settings differ from this run's, one entry per difference."""
    out = []
    built_model, run_model = manifest.get("explorer_model", ""), cfg.explorer.model_path
    if run_model:  # a run that names no explorer model has nothing to compare
        recorded = manifest.get("explorer_digest")
        mine = weights_digest(run_model) if recorded else ""
        if mine and mine != recorded:
            out.append(f"explorer model: pool {built_model} (weights {recorded}), run explorer.model_path="
                       f"{run_model} (weights {mine})")
        elif not mine and Path(built_model).name != Path(run_model).name:
            out.append(f"explorer model: pool {built_model}, run explorer.model_path={run_model}")
    sampling = manifest.get("sampling", {})
    for key, field in SAMPLING_FIELDS.items():
        built = sampling.get(key, -1 if key == "top_k" else None)  # pools from before explorer.top_k: off
        run_value = operator.attrgetter(field)(cfg)
        if built is None or abs(float(built) - float(run_value)) > 1e-9:
            out.append(f"{key}: pool {built}, run {field}={run_value}")
    return out


def check_against_run(path: str | Path, manifest: dict, cfg: RunConfig) -> None:
    """The pool fits the run: same explorer and sampling (or accepted), enough samples per prompt, and no
    response longer than rollout.max_response_length."""
    mismatches = run_mismatches(manifest, cfg)
    if mismatches and not cfg.explorer.accept_pool_mismatch:
        raise ValueError(f"explorer.pool_path={path} does not match this run: {'; '.join(mismatches)}. "
                         "Rebuild the pool with this run's settings (`s2l pool build --config <this run's "
                         "YAML>`), set the run's values to the pool's, or explorer.accept_pool_mismatch=true "
                         "to use it anyway")
    if mismatches:
        logger.warning("explorer.pool_path=%s differs from this run (accepted by "
                       "explorer.accept_pool_mismatch): %s", path, "; ".join(mismatches))
    need = max_explorer_draw(cfg)
    if manifest["n_per_prompt"] < need:
        raise ValueError(f"explorer.pool_path={path} holds {manifest['n_per_prompt']} samples per prompt, "
                         f"and a step of this run draws up to G_w={need} of them; build the pool with "
                         f"explorer.n_per_prompt >= {need}, or lower rollout.group_size")
    cap, built_cap = cfg.rollout.max_response_length, manifest.get("sampling", {}).get("max_new_tokens")
    if built_cap is None or built_cap > cap:  # the pool's responses may exceed this run's cap
        longest = manifest.get("max_response_tokens")
        if longest is None:
            longest = longest_response(path)
        if longest > cap:
            raise ValueError(f"explorer.pool_path={path} holds responses of up to {longest} tokens (sampled "
                             f"with max_new_tokens={built_cap}), longer than rollout.max_response_length="
                             f"{cap}; they are never cut or kept silently: raise rollout.max_response_length "
                             f"to {longest}, or rebuild the pool with this run's cap")


def max_explorer_draw(cfg: RunConfig) -> int:
    """The largest G_w of any step: the samples per prompt one draw takes from the pool."""
    schedule = build_schedule(cfg.schedule, cfg.rollout.group_size, cfg.t_mix, cfg.steps)
    return max(g_w for _, _, g_w, _ in schedule.table())


def longest_response(path: str | Path) -> int:
    """The longest stored response in tokens, read from the chunks (pools made before the manifest kept
    it)."""
    import pyarrow.compute as pc  # lazy: pyarrow (only for pools without max_response_tokens)
    import pyarrow.parquet as pq

    longest = 0
    for chunk in sorted((Path(path) / CHUNKS).glob("chunk-*.parquet")):
        lengths = pc.list_value_length(pq.read_table(chunk, columns=["response_ids"]).column("response_ids"))
        longest = max(longest, pc.max(lengths).as_py() or 0)
    return longest


# ---------------------------------------------------------------------------------------------
# which rows the pool covers


def data_index(rows: Sequence[RawRow], template: str, max_prompt_length: int, chat_template: str) -> dict:
    """What the build read: its data settings and every row's question key (written next to the manifest)."""
    return {"template": template, "max_prompt_length": max_prompt_length, "chat_template": chat_template,
            "question_keys": sorted({question_key(row.question) for row in rows})}


def uncovered_rows(path: str | Path, rows: Sequence[RawRow], template: str, max_prompt_length: int,
                   chat_template: str) -> Optional[list[RawRow]]:
    """The rows whose prompts the pool lacks, decided from the data index without rendering a prompt; None
    when the index cannot decide (a pool without one, or built with another template, chat template or a
    lower length cap: then only rendering the prompts tells)."""
    index_file = Path(path) / DATA_INDEX
    if not index_file.is_file():
        return None
    index = json.loads(index_file.read_text())
    if (index["template"] != template or max_prompt_length > index["max_prompt_length"]
            or (template != "plain" and index["chat_template"] != chat_template)):
        return None
    # a row the build read made a pool prompt, or was too long for the build's cap and so for this run's
    keys = set(index["question_keys"])
    return [row for row in rows if question_key(row.question) not in keys]
