"""ExplorerPool: build with LocalEngine, resume after a crash, reload, tokenizer check, deterministic draws,
cursor resume == uninterrupted, statistics."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import shutil
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import numpy as np
import pytest
import torch

from megatron_s2l.rollout.local import build_local_engine
from megatron_s2l.rollout.pool import CHUNKS, MANIFEST, ExplorerPool, build_pool, dataset_hash, tokenizer_hash
from megatron_s2l.rollout.types import Generation, PromptRecord, SamplingParams
from tests.utils import make_tiny_model, qwen3_tokenizer_dir

N = 4  # samples per prompt
PARAMS = SamplingParams(max_new_tokens=6, temperature=0.7, top_p=0.95)


@dataclasses.dataclass
class Prompt:
    prompt_id: str
    prompt_ids: list[int]
    gold: str


PROMPTS = [Prompt(f"p{i}", list(range(100 + i, 104 + 2 * i)), f"gold{i}") for i in range(5)]


@dataclasses.dataclass
class Result:
    reward: float
    answer: str | None


class RuleScorer:
    """Test stand-in for the reward module: correct when the text's CRC is even; answer = CRC mod 3."""

    def score_batch(self, responses, golds):
        assert len(responses) == len(golds)
        crcs = [zlib.crc32(text.encode()) for text in responses]
        return [Result(float(crc % 2 == 0), str(crc % 3)) for crc in crcs]


class RecordingEngine:
    """Passes calls through to an engine, counting them and how many overlap (a server would batch those
    together); raises on generate call number `crash_at` (1-based)."""

    def __init__(self, engine, crash_at: int | None = None):
        self.engine, self.name, self.crash_at = engine, engine.name, crash_at
        self.calls, self.running, self.most_at_once = 0, 0, 0

    async def generate(self, prompts, n, params):
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("simulated crash")
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        await asyncio.sleep(0.05)  # let other chunks start
        try:
            return await self.engine.generate(prompts, n, params)
        finally:
            self.running -= 1

    async def weight_version(self):
        return await self.engine.weight_version()


@pytest.fixture(scope="module")
def explorer_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("explorer"), seed=3, num_hidden_layers=2)


@pytest.fixture(scope="module")
def engine(explorer_dir):
    torch.set_num_threads(1)
    return build_local_engine(explorer_dir)


def build(engine, explorer_dir, out, scorer=None, **kwargs):
    args = dict(explorer_model=str(explorer_dir), tokenizer_dir=explorer_dir, dataset_name="toy",
                reward=scorer, chunk_size=2, seed=11) | kwargs
    return build_pool(engine, PROMPTS, N, PARAMS, out, **args)


@pytest.fixture(scope="module")
def pool_dir(engine, explorer_dir, tmp_path_factory):
    return build(engine, explorer_dir, tmp_path_factory.mktemp("pool") / "pool", scorer=RuleScorer())


def test_records_match_the_protocol():
    assert isinstance(PROMPTS[0], PromptRecord)


def test_build_writes_rows_and_manifest(pool_dir, explorer_dir):
    from transformers import AutoTokenizer

    manifest = json.loads((pool_dir / MANIFEST).read_text())
    assert manifest["status"] == "complete" and manifest["format_version"] == 1
    assert manifest["tokenizer_hash"] == tokenizer_hash(explorer_dir) == tokenizer_hash(qwen3_tokenizer_dir())
    assert manifest["dataset_hash"] == dataset_hash(PROMPTS)
    assert manifest["sampling"]["temperature"] == 0.7 and manifest["sampling"]["seed"] == 11
    assert (manifest["num_prompts"], manifest["num_samples"], manifest["num_chunks"]) == (5, 20, 3)
    assert manifest["explorer_model"] == str(explorer_dir) and manifest["created"]
    assert len(list((pool_dir / CHUNKS).glob("chunk-*.parquet"))) == 3

    rows = pq.read_table(pool_dir / CHUNKS / "chunk-00002.parquet").to_pylist()
    assert [r["prompt_id"] for r in rows] == ["p4"] * N and [r["sample_index"] for r in rows] == [0, 1, 2, 3]
    tokenizer = AutoTokenizer.from_pretrained(explorer_dir)
    for row in rows:
        assert row["prompt_ids"] == PROMPTS[4].prompt_ids
        assert 1 <= len(row["response_ids"]) == len(row["logprobs"]) <= 6
        assert all(lp <= 0 for lp in row["logprobs"])
        assert row["text"] == tokenizer.decode(row["response_ids"], skip_special_tokens=True)
        expected = RuleScorer().score_batch([row["text"]], ["x"])[0]
        assert (row["reward"], row["answer"]) == (expected.reward, expected.answer)
        assert row["finish_reason"] in ("stop", "length") and row["weight_version"] == "0"


def test_crashed_build_resumes_and_equals_an_uninterrupted_one(engine, explorer_dir, pool_dir, tmp_path):
    out = tmp_path / "pool"
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(RecordingEngine(engine, crash_at=2), explorer_dir, out, scorer=RuleScorer())
    assert json.loads((out / MANIFEST).read_text())["status"] == "building"
    assert [f.name for f in (out / CHUNKS).iterdir()] == ["chunk-00000.parquet"]
    with pytest.raises(ValueError, match="did not finish.*resume"):
        ExplorerPool.open(out, tokenizer_hash(explorer_dir))

    rerun = RecordingEngine(engine)
    build(rerun, explorer_dir, out, scorer=RuleScorer())
    assert rerun.calls == 2  # only the two missing chunks were generated
    for name in ("chunk-00000.parquet", "chunk-00001.parquet", "chunk-00002.parquet"):
        assert pq.read_table(out / CHUNKS / name).equals(pq.read_table(pool_dir / CHUNKS / name))


@pytest.mark.parametrize("in_flight", [1, 2])
def test_chunks_in_flight_overlap_and_build_the_same_pool(engine, explorer_dir, pool_dir, tmp_path, in_flight):
    recording = RecordingEngine(engine)
    out = build(recording, explorer_dir, tmp_path / "pool", scorer=RuleScorer(), chunks_in_flight=in_flight)
    assert recording.most_at_once == in_flight  # 3 chunks, never more than asked at once
    for name in ("chunk-00000.parquet", "chunk-00001.parquet", "chunk-00002.parquet"):
        assert pq.read_table(out / CHUNKS / name).equals(pq.read_table(pool_dir / CHUNKS / name))


def test_rerun_with_other_settings_is_refused(engine, explorer_dir, pool_dir, tmp_path):
    out = tmp_path / "pool"
    shutil.copytree(pool_dir, out)
    with pytest.raises(ValueError, match="different n_per_prompt.*new output directory"):
        build_pool(engine, PROMPTS, N + 1, PARAMS, out, explorer_model=str(explorer_dir),
                   tokenizer_dir=explorer_dir, dataset_name="toy", reward=RuleScorer(), chunk_size=2, seed=11)


def test_tokenizer_hash_is_canonical_and_sensitive(tmp_path):
    source = qwen3_tokenizer_dir()
    split_files = tmp_path / "split"
    split_files.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(source / name, split_files / name)
    assert tokenizer_hash(split_files) == tokenizer_hash(source)  # same tokenizer, other file layout

    changed = tmp_path / "changed"
    shutil.copytree(source, changed)
    spec = json.loads((changed / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (changed / "tokenizer.json").write_text(json.dumps(spec))
    assert tokenizer_hash(changed) != tokenizer_hash(source)


def test_open_refuses_a_pool_with_another_tokenizer(pool_dir):
    learner = "sha256:0123456789abcdef"
    with pytest.raises(ValueError) as err:
        ExplorerPool.open(pool_dir, learner)
    message = str(err.value)
    assert learner in message and tokenizer_hash(qwen3_tokenizer_dir()) in message
    assert "same tokenizer" in message and "explorer.pool_path" in message


QWEN3_HASH: list[str] = []  # computed once (reads an 11 MB tokenizer.json)


def open_pool(pool_dir, seed=0):
    if not QWEN3_HASH:
        QWEN3_HASH.append(tokenizer_hash(qwen3_tokenizer_dir()))
    return ExplorerPool.open(pool_dir, QWEN3_HASH[0], seed=seed)


def keys(samples):
    return [tuple(s.response_ids) + (s.text,) for s in samples]


def test_draws_are_without_replacement_within_an_epoch(pool_dir):
    pool = open_pool(pool_dir)
    all_samples = set(keys(pool.draw("p1", 4, step=1)))
    assert len(all_samples) == 4  # the prompt's whole epoch, each sample once
    first, second = keys(pool.draw("p1", 2, step=2)), keys(pool.draw("p1", 2, step=3))
    assert set(first) | set(second) == all_samples and not set(first) & set(second)
    third = keys(pool.draw("p1", 3, step=4))  # 0 left in this epoch: a new epoch starts
    assert len(set(third)) == 3
    fourth = keys(pool.draw("p1", 2, step=5))  # 1 left: skipped, a new epoch; still no repeats inside
    assert len(set(fourth)) == 2


def test_draw_returns_explorer_samples(pool_dir):
    sample = open_pool(pool_dir).draw("p2", 1, step=1)[0]
    assert sample.source == "explorer" and sample.prompt_id == "p2"
    assert sample.prompt_ids == PROMPTS[2].prompt_ids and sample.weight_version == "0"
    assert len(sample.logprobs) == len(sample.response_ids)


def test_draws_are_deterministic_from_seed_prompt_and_step(pool_dir):
    a, b, c = open_pool(pool_dir, seed=1), open_pool(pool_dir, seed=1), open_pool(pool_dir, seed=2)
    order_a = [keys(a.draw(p.prompt_id, 2, step=1)) for p in PROMPTS]
    order_b = [keys(b.draw(p.prompt_id, 2, step=1)) for p in reversed(PROMPTS)][::-1]  # other call order
    order_c = [keys(c.draw(p.prompt_id, 2, step=1)) for p in PROMPTS]
    assert order_a == order_b
    assert order_a != order_c
    assert keys(a.draw("p0", 2, step=1)) == order_a[0]  # the same step again replays, consumes nothing
    assert keys(a.draw("p0", 2, step=2)) != order_a[0]


def test_cursor_resume_draws_what_an_uninterrupted_run_would(pool_dir):
    plan = [(step, g_w) for step, g_w in enumerate([4, 3, 3, 2, 1, 1, 2, 3], start=1)]

    def draws(pool, steps):
        return [keys(pool.draw(p.prompt_id, g_w, step)) for step, g_w in steps for p in PROMPTS[:3]]

    uninterrupted = draws(open_pool(pool_dir, seed=5), plan)
    first = open_pool(pool_dir, seed=5)
    before = draws(first, plan[:4])
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
    resumed = open_pool(pool_dir, seed=5)
    resumed.load_state_dict(state)
    assert before + draws(resumed, plan[4:]) == uninterrupted
    fresh = open_pool(pool_dir, seed=5)
    assert draws(fresh, plan[4:]) != uninterrupted[len(before):]  # the cursor mattered

    with pytest.raises(ValueError, match="same explorer.pool_path and seed"):
        open_pool(pool_dir, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="restore the pool cursor"):
        resumed.draw("p0", 1, step=2)


@pytest.mark.parametrize("prompt_id, k, match", [("p0", 5, "holds 4.*n_per_prompt"),
                                                  ("nope", 1, "not in the explorer pool")])
def test_bad_draws_name_the_fix(pool_dir, prompt_id, k, match):
    with pytest.raises(ValueError, match=match):
        open_pool(pool_dir).draw(prompt_id, k, step=1)


class LongResponseEngine:
    """Returns long random responses at once: a pool whose token data dwarfs its index."""

    name = "long"

    async def generate(self, prompts, n, params):
        rng = np.random.default_rng(len(prompts))
        return [[Generation(rng.integers(0, 1000, 3000).tolist(), [-1.0] * 3000, "length", "0")
                 for _ in range(n)] for _ in prompts]

    async def weight_version(self):
        return "0"


def test_open_keeps_only_an_index_and_draws_read_one_prompts_row_group(explorer_dir, tmp_path, monkeypatch):
    pool_dir = build(LongResponseEngine(), explorer_dir, tmp_path / "pool")
    stored = pq.read_table(pool_dir / CHUNKS)
    gc.collect()
    before = pa.total_allocated_bytes()
    pool = open_pool(pool_dir)
    gc.collect()
    assert pa.total_allocated_bytes() - before < stored.nbytes / 20  # token data stays on disk
    assert pool.num_samples == stored.num_rows == 20

    read = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, *a, **kw: read.append(original(self, i, *a, **kw)) or read[-1])
    drawn = pool.draw("p3", 3, step=1)
    assert len(read) == 1 and read[0].column("prompt_id").to_pylist() == ["p3"] * N
    stored_p3 = [r for r in stored.to_pylist() if r["prompt_id"] == "p3"]
    assert {tuple(s.response_ids) for s in drawn} <= {tuple(r["response_ids"]) for r in stored_p3}
    assert [s.response_ids for s in pool.samples("p3")] == [r["response_ids"] for r in stored_p3]
    assert len(read) == 1  # the same prompt again: served from the row-group cache


def test_stats_per_prompt_and_overall(pool_dir):
    pool = open_pool(pool_dir)
    rows = pq.read_table(pool_dir / CHUNKS).to_pylist()
    per_prompt = pool.prompt_stats()
    for prompt in PROMPTS:
        mine = [r for r in rows if r["prompt_id"] == prompt.prompt_id]
        assert per_prompt[prompt.prompt_id]["success_rate"] == sum(r["reward"] > 0 for r in mine) / N
        assert per_prompt[prompt.prompt_id]["unique_answers"] == len({r["answer"] for r in mine})
    stats = pool.stats()
    assert stats["pool/num_prompts"] == 5 and stats["pool/num_samples"] == 20
    assert stats["pool/success_rate"] == pytest.approx(sum(r["reward"] > 0 for r in rows) / 20)
    assert stats["pool/mean_response_length"] == pytest.approx(sum(len(r["response_ids"]) for r in rows) / 20)
    assert 0 < stats["pool/unique_answer_ratio"] <= 3 / N


def test_unscored_pool_has_no_success_stats(engine, explorer_dir, tmp_path):
    out = build_pool(engine, PROMPTS[:2], 2, PARAMS, tmp_path / "pool", explorer_model="explorer",
                     tokenizer_dir=explorer_dir)
    stats = open_pool(out).stats()
    assert stats["pool/num_samples"] == 4 and "pool/success_rate" not in stats


def test_cli_build_from_run_overrides_then_inspect(explorer_dir, tmp_path, monkeypatch, capsys):
    """`s2l pool build` reads the run config; prompts come from the data module (stubbed here)."""
    import argparse

    from megatron_s2l import pool_cli

    monkeypatch.setattr(pool_cli, "_load_prompts", lambda cfg: PROMPTS[:3])
    parser = argparse.ArgumentParser()
    pool_cli.add_pool_arguments(parser.add_subparsers(dest="command"))
    out, data = tmp_path / "cli_pool", tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n" for i in range(3)))
    args = parser.parse_args(["pool", "build", "--chunk-size", "2", "--device", "cpu", f"--out={out}",
                              f"data.path={data}", "data.max_prompt_length=64",
                              f"explorer.model_path={explorer_dir}", "explorer.n_per_prompt=3",
                              "rollout.max_response_length=4", "seed=9"])
    assert args.handler(args) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert (manifest["status"], manifest["num_samples"], manifest["n_per_prompt"]) == ("complete", 9, 3)
    assert manifest["sampling"]["temperature"] == 0.7 and manifest["sampling"]["top_p"] == 0.95  # paper
    assert manifest["sampling"]["max_new_tokens"] == 4 and manifest["sampling"]["seed"] == 9

    capsys.readouterr()
    args = parser.parse_args(["pool", "inspect", str(out), "--json", "--show", "2",
                              "--learner-tokenizer", str(qwen3_tokenizer_dir())])
    assert args.handler(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokenizer_matches"] is True and report["stats"]["pool/num_samples"] == 9
    assert [s["sample_index"] for s in report["samples"]] == [0, 1]
    args = parser.parse_args(["pool", "inspect", str(out)])
    assert args.handler(args) == 0
    assert "explorer pool: complete" in capsys.readouterr().out
