"""The offline ExplorerPool: explorer samples generated once, stored, and drawn G_w at a time per step.

Layout of a pool directory:
  manifest.json              explorer, tokenizer hash, sampling params, dataset hash, counts, status
  chunks/chunk-00000.parquet one row per sample, one row group per prompt; chunk i holds prompts
                             [i*chunk_size, (i+1)*chunk_size)

Building writes one chunk at a time (temp file, then rename), so a crash loses at most the chunk in flight
and rerunning the same build resumes after the last finished chunk. `ExplorerPool.open` refuses a pool
whose tokenizer differs from the learner's: token ids would mean different text.

Draws: the samples of a prompt are used in a seeded random order (one permutation per "prompt epoch",
from (seed, prompt_id, epoch)); each draw takes the next k, so no sample repeats within an epoch. When
fewer than k are left the leftovers are skipped and a new epoch starts, so one draw never holds a sample
twice. The cursor is part of the trainer's checkpoint, so a resumed run draws what an uninterrupted run
would. The paper stores 32 samples per prompt (T=0.7, top_p=0.95) and draws without replacement; the
epoch/skip rule and the per-step replay (see `draw`) are ours.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from megatron_s2l.model.files import weights_digest
from megatron_s2l.reward import Reward
from megatron_s2l.rollout.pool_manifest import (CHUNKS, DATA_INDEX, FORMAT_VERSION, MANIFEST, check_tokenizer,
                                                 longest_response, read_manifest, tokenizer_files_digest,
                                                 tokenizer_hash)
from megatron_s2l.rollout.sampling import sample_and_score
from megatron_s2l.rollout.types import PromptRecord, RolloutEngine, Sample, SamplingParams
from megatron_s2l.seeding import derive_seed

logger = logging.getLogger(__name__)

SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("sample_index", pa.int32()), ("prompt_ids", pa.list_(pa.int32())),
    ("response_ids", pa.list_(pa.int32())), ("logprobs", pa.list_(pa.float32())),
    ("finish_reason", pa.string()), ("reward", pa.float64()), ("answer", pa.string()), ("text", pa.string()),
    ("weight_version", pa.string()),
])
INDEX_COLUMNS = ["prompt_id", "sample_index", "reward", "answer"]  # what ExplorerPool keeps in memory
ROW_GROUP_CACHE = 8  # decoded row groups ExplorerPool keeps
# manifest keys that must agree for a rerun to resume an unfinished build
BUILD_SETTINGS = ("explorer_model", "explorer_digest", "tokenizer_hash", "sampling", "n_per_prompt",
                  "chunk_size", "dataset_hash", "scored")
__all__ = ["CHUNKS", "MANIFEST", "ExplorerPool", "build_pool", "dataset_hash", "tokenizer_hash"]


# ---------------------------------------------------------------------------------------------
# identities (the tokenizer's and the checks against a run: pool_manifest.py)


def dataset_hash(prompts: Sequence[PromptRecord]) -> str:
    """Hash of the prompt records in order (ids, token ids, gold): the template and tokenizer are in it."""
    digest = hashlib.sha256()
    for record in prompts:
        digest.update(json.dumps([record.prompt_id, list(record.prompt_ids), record.gold]).encode())
    return "sha256:" + digest.hexdigest()[:16]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# building


def build_pool(engine: RolloutEngine, prompts: Sequence[PromptRecord], n_per_prompt: int,
               params: SamplingParams, out_dir: str | Path, *, explorer_model: str, tokenizer_dir: str | Path,
               dataset_name: str = "", reward: Optional[Reward] = None, chunk_size: int = 64,
               seed: int = 0, chunks_in_flight: int = 1, data_index: Optional[dict] = None) -> Path:
    """Generate `n_per_prompt` explorer samples per prompt into `out_dir` (resumable); returns out_dir.

    `params.seed` (or `seed` when it is None) seeds the engine; with LocalEngine a prompt's samples then
    depend only on that seed and the prompt, so a resumed build equals an uninterrupted one.
    `chunks_in_flight` > 1 keeps a server busy while a chunk's last, longest responses finish.
    `data_index` (pool_manifest.data_index: the rows the prompts came from) lets a run check that the pool
    covers its dataset without rendering prompts.
    """
    from transformers import AutoTokenizer

    ids = [p.prompt_id for p in prompts]
    if len(set(ids)) != len(ids):
        raise ValueError("prompt_id values repeat in the dataset; the pool is keyed by prompt_id, so "
                         "deduplicate the prompts (the paper deduplicates DAPO-Math-17k) first")
    if min(n_per_prompt, chunk_size, chunks_in_flight) < 1:
        raise ValueError(f"n_per_prompt={n_per_prompt}, chunk_size={chunk_size}, chunks_in_flight="
                         f"{chunks_in_flight}: all must be >= 1")
    params = dataclasses.replace(params, seed=seed if params.seed is None else params.seed)
    out_dir = Path(out_dir)
    manifest = {
        "format_version": FORMAT_VERSION, "status": "building", "created": _now(),
        "explorer_model": explorer_model, "explorer_digest": weights_digest(explorer_model),
        "engine": engine.name, "tokenizer_hash": tokenizer_hash(tokenizer_dir),
        "tokenizer_files": tokenizer_files_digest(tokenizer_dir),
        "sampling": dataclasses.asdict(params), "n_per_prompt": n_per_prompt, "chunk_size": chunk_size,
        "dataset_name": dataset_name, "dataset_hash": dataset_hash(prompts), "scored": reward is not None,
        "num_prompts": len(prompts), "num_chunks": -(-len(prompts) // chunk_size),
    }
    manifest = _start_or_resume(out_dir, manifest)
    if data_index is not None:
        _write_json(out_dir / DATA_INDEX, data_index)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    version = asyncio.run(_build_chunks(engine, prompts, manifest, params, out_dir, tokenizer, reward,
                                        chunks_in_flight))
    manifest.update(status="complete", completed=_now(), num_samples=len(prompts) * n_per_prompt,
                    explorer_weight_version=version, max_response_tokens=longest_response(out_dir))
    _write_json(out_dir / MANIFEST, manifest)
    logger.info("explorer pool complete: %s (%d prompts x %d samples)", out_dir, len(prompts), n_per_prompt)
    return out_dir


def _start_or_resume(out_dir: Path, manifest: dict) -> dict:
    """Write a fresh manifest, or keep the old one if its build settings match (then chunks are reused)."""
    path = out_dir / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        # a key added since an unfinished build began is not in its manifest: nothing to compare
        changed = [k for k in BUILD_SETTINGS if old.get(k, manifest[k]) != manifest[k]]
        if changed:
            raise ValueError(f"{out_dir} holds a pool built with different {', '.join(changed)}; "
                             "use a new output directory, or delete this one to rebuild")
        if old.get("status") == "complete":
            logger.info("%s is already complete; nothing to build", out_dir)
        return old
    (out_dir / CHUNKS).mkdir(parents=True, exist_ok=True)
    manifest["pool_id"] = derive_seed(manifest["created"], manifest["dataset_hash"], os.getpid())
    _write_json(path, manifest)
    return manifest


async def _build_chunks(engine, prompts, manifest, params, out_dir, tokenizer, reward, in_flight: int) -> str:
    """Generate every missing chunk, `in_flight` at a time; returns the engine's weight version (one event loop
    for all calls). Chunks finish in any order: each is its own file, so a resume skips exactly the done ones."""
    size, n, total = manifest["chunk_size"], manifest["n_per_prompt"], manifest["num_chunks"]
    paths = [out_dir / CHUNKS / f"chunk-{index:05d}.parquet" for index in range(total)]
    limiter, missing = asyncio.Semaphore(in_flight), [i for i, path in enumerate(paths) if not path.is_file()]
    done = 0

    async def build(index: int) -> None:
        nonlocal done
        async with limiter:
            start = time.perf_counter()
            records = prompts[index * size:(index + 1) * size]
            samples = await sample_and_score(engine, records, n, params, tokenizer, reward, "explorer")
        table = _chunk_table(samples)
        tmp = paths[index].with_suffix(".parquet.tmp")
        pq.write_table(table, tmp, row_group_size=n)  # one row group per prompt: draws read just that
        os.replace(tmp, paths[index])  # a chunk file exists only when complete
        done += 1
        logger.info("pool chunk %d/%d: %d prompts x %d samples in %.1f s (%d/%d this run)", index + 1,
                    total, len(records), n, time.perf_counter() - start, done, len(missing))

    await asyncio.gather(*map(build, missing))
    return await engine.weight_version()


def _chunk_table(samples: list[list[Sample]]) -> pa.Table:
    """One row per sample, prompt after prompt ([B][n] in, sample_index counts within a prompt)."""
    rows = [s for row in samples for s in row]
    columns = {name: [getattr(s, name) for s in rows] for name in SCHEMA.names if name != "sample_index"}
    columns["sample_index"] = [j for row in samples for j in range(len(row))]
    return pa.table(columns, schema=SCHEMA)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# reading and drawing


class ExplorerPool:
    """A finished pool with a draw cursor. Only an index is held in memory: where each prompt's samples
    lie, plus reward and answer for stats (~100 MB for the paper's 17k prompts x 32 samples). Token ids
    and log-probs stay on disk and are read one prompt's row group at a time when drawn, so a pool far
    larger than RAM (the paper's, at up to 8k tokens a sample) works."""

    # config
    path: Path
    manifest: dict
    seed: int
    max_response_length: Optional[int]  # the run's cap: a longer drawn response is refused
    # index
    _files: list[pq.ParquetFile]
    _group_starts: list[list[int]]  # per file: first row of each row group
    _rows: dict[str, list[tuple[int, int]]]  # prompt_id -> (file, row) of its samples, by sample_index
    _rewards: dict[str, list[Optional[float]]]
    _answers: dict[str, list[Optional[str]]]
    # state: prompt_id -> [epoch, pos, last_step, epoch_before_last_step, pos_before_last_step]
    _cursor: dict[str, list[int]]

    def __init__(self, path: Path, manifest: dict, files: list[Path], seed: int,
                 max_response_length: Optional[int] = None):
        self.path, self.manifest, self.seed = path, manifest, seed
        self.max_response_length = max_response_length
        self._files = [pq.ParquetFile(f) for f in files]
        self._group_starts = [np.cumsum([0] + [f.metadata.row_group(i).num_rows
                                               for i in range(f.num_row_groups)]).tolist()
                              for f in self._files]
        entries = []  # (prompt_id, sample_index, file, row, reward, answer)
        for file_index, file in enumerate(self._files):
            index = file.read(columns=INDEX_COLUMNS).to_pydict()
            entries += zip(index["prompt_id"], index["sample_index"], [file_index] * file.metadata.num_rows,
                           range(file.metadata.num_rows), index["reward"], index["answer"])
        entries.sort(key=lambda e: (e[0], e[1]))
        self._rows, self._rewards, self._answers = {}, {}, {}
        for pid, _, file_index, row, reward, answer in entries:
            self._rows.setdefault(pid, []).append((file_index, row))
            self._rewards.setdefault(pid, []).append(reward)
            self._answers.setdefault(pid, []).append(answer)
        self._cursor = {}
        self._cache: collections.OrderedDict[tuple[int, int], pa.Table] = collections.OrderedDict()

    @classmethod
    def open(cls, path: str | Path, expected_tokenizer_hash: str, seed: int = 0,
             max_response_length: Optional[int] = None) -> "ExplorerPool":
        """Open a complete pool; refuse one whose tokenizer differs from the learner's. With
        `max_response_length` (the run's cap), a drawn response longer than that is refused."""
        path = Path(path)
        manifest = read_manifest(path)
        check_tokenizer(path, manifest, expected_tokenizer_hash)
        pool = cls(path, manifest, sorted((path / CHUNKS).glob("chunk-*.parquet")), seed, max_response_length)
        on_disk = sum(f.metadata.num_rows for f in pool._files)
        if on_disk != manifest["num_samples"]:
            raise ValueError(f"{path}: {on_disk} samples on disk, manifest says {manifest['num_samples']}; "
                             "the directory was altered, rebuild the pool")
        return pool

    @property
    def num_prompts(self) -> int:
        return len(self._rows)

    @property
    def num_samples(self) -> int:
        return sum(len(rows) for rows in self._rows.values())

    def __contains__(self, prompt_id: str) -> bool:
        return prompt_id in self._rows

    def samples(self, prompt_id: str) -> list[Sample]:
        """Every stored sample of `prompt_id`, by sample index (for inspection; training uses `draw`)."""
        return self._read(self._rows_of(prompt_id))

    def draw(self, prompt_id: str, k: int, step: int) -> list[Sample]:
        """k distinct samples of `prompt_id` for training step `step` (1-indexed), source "explorer".

        The result depends only on (seed, prompt_id, step) and this prompt's cursor. Drawing the same
        prompt again in the same step replays that step's draw (it does not consume more samples), so a
        retried step sees the same explorer samples.
        """
        rows = self._rows_of(prompt_id)
        if not 0 <= k <= len(rows):
            raise ValueError(f"asked for {k} explorer samples of {prompt_id!r}, the pool holds {len(rows)}; "
                             "build a pool with n_per_prompt >= G or lower rollout.group_size")
        if step < 1:
            raise ValueError(f"step={step}: steps are 1-indexed")
        epoch, pos, last_step, epoch0, pos0 = self._cursor.get(prompt_id, [0, 0, 0, 0, 0])
        if step < last_step:
            raise ValueError(f"pool cursor for {prompt_id!r} is at step {last_step}, draw asked for step "
                             f"{step}; restore the pool cursor from the same checkpoint as the trainer")
        if step == last_step:
            epoch, pos = epoch0, pos0
        if k == 0:
            return []
        before = [epoch, pos]
        if pos + k > len(rows):  # skip the leftovers: a draw never repeats a sample
            epoch, pos = epoch + 1, 0
        order = np.random.default_rng(derive_seed(self.seed, prompt_id, epoch)).permutation(len(rows))
        self._cursor[prompt_id] = [epoch, pos + k, step, *before]
        samples = self._read([rows[i] for i in order[pos:pos + k]])
        cap = self.max_response_length
        if cap is not None and any(len(s.response_ids) > cap for s in samples):
            longest = max(len(s.response_ids) for s in samples)
            raise ValueError(f"explorer pool {self.path}: a response of {prompt_id!r} has {longest} "
                             f"tokens, more than rollout.max_response_length={cap}; explorer samples are "
                             "never cut or kept silently: raise rollout.max_response_length, or rebuild the "
                             "pool with this cap")
        return samples

    def _rows_of(self, prompt_id: str) -> list[tuple[int, int]]:
        rows = self._rows.get(prompt_id)
        if rows is None:
            raise ValueError(f"prompt {prompt_id!r} is not in the explorer pool {self.path} (dataset "
                             f"{self.manifest.get('dataset_name')!r}); build the pool from the training data")
        return rows

    def _read(self, locations: list[tuple[int, int]]) -> list[Sample]:
        """Samples at (file, row) locations, in that order, reading only the row groups that hold them."""
        out = []
        for file_index, row in locations:
            starts = self._group_starts[file_index]
            group = bisect.bisect_right(starts, row) - 1
            table = self._row_group(file_index, group)
            out.append(_to_sample(table.slice(row - starts[group], 1).to_pylist()[0]))
        return out

    def _row_group(self, file_index: int, group: int) -> pa.Table:
        """A decoded row group; the last few are kept (a prompt's samples share one in pools built here)."""
        key = (file_index, group)
        if key in self._cache:
            self._cache.move_to_end(key)
        else:
            self._cache[key] = self._files[file_index].read_row_group(group)
            if len(self._cache) > ROW_GROUP_CACHE:
                self._cache.popitem(last=False)
        return self._cache[key]

    def state_dict(self) -> dict:
        return {"pool_id": self.manifest.get("pool_id"), "seed": self.seed,
                "cursor": {k: list(v) for k, v in self._cursor.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["pool_id"] != self.manifest.get("pool_id") or state["seed"] != self.seed:
            raise ValueError(f"the checkpoint's pool cursor is for pool {state['pool_id']} with seed "
                             f"{state['seed']}, this is pool {self.manifest.get('pool_id')} ({self.path}) "
                             f"with seed {self.seed}; resume with the same explorer.pool_path and seed")
        self._cursor = {k: list(v) for k, v in state["cursor"].items()}

    # ------------------------------------------------------------------------------------------
    # stats

    def prompt_stats(self) -> dict[str, dict[str, float]]:
        """Per prompt: num_samples, success_rate (reward > 0; None if unscored), unique_answers."""
        out = {}
        for pid, rewards in self._rewards.items():
            scored = [r for r in rewards if r is not None]
            out[pid] = {"num_samples": len(rewards),
                        "success_rate": sum(r > 0 for r in scored) / len(scored) if scored else None,
                        "unique_answers": len({a for a in self._answers[pid] if a is not None})}
        return out

    def stats(self) -> dict[str, float]:
        """Flat pool metrics: sizes, lengths, truncation; success and diversity when scored.

        Lengths and finish reasons are streamed from disk one row group at a time.
        """
        tokens = truncated = 0
        for file in self._files:
            for group in range(file.num_row_groups):
                table = file.read_row_group(group, columns=["response_ids", "finish_reason"])
                tokens += pc.sum(pc.list_value_length(table.column("response_ids"))).as_py() or 0
                truncated += pc.sum(pc.equal(table.column("finish_reason"), "length")).as_py() or 0
        total = max(self.num_samples, 1)
        out = {"pool/num_prompts": float(self.num_prompts), "pool/num_samples": float(self.num_samples),
               "pool/mean_response_length": tokens / total, "pool/truncated_frac": truncated / total}
        per_prompt = self.prompt_stats().values()
        rates = [p["success_rate"] for p in per_prompt if p["success_rate"] is not None]
        if rates:
            out["pool/success_rate"] = sum(rates) / len(rates)
            out["pool/frac_prompts_all_correct"] = sum(r == 1.0 for r in rates) / len(rates)
            out["pool/frac_prompts_all_wrong"] = sum(r == 0.0 for r in rates) / len(rates)
            out["pool/unique_answer_ratio"] = (sum(p["unique_answers"] / p["num_samples"] for p in per_prompt)
                                               / len(per_prompt))
        return out


def _to_sample(row: dict) -> Sample:
    return Sample(prompt_id=row["prompt_id"], prompt_ids=row["prompt_ids"], response_ids=row["response_ids"],
                  logprobs=row["logprobs"], source="explorer", weight_version=row["weight_version"],
                  finish_reason=row["finish_reason"], reward=row["reward"], answer=row["answer"],
                  text=row["text"])
