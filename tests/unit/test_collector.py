"""RolloutCollector: G_w explorer + G_s learner samples per group over the schedule (pool and online
explorer), sources and weight versions recorded, concurrency, one scorer for both, dynamic sampling, and a
failed step that consumes nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import time
import zlib

import pytest
import torch

from megatron_s2l.config import RunConfig
from megatron_s2l.data.dataset import PromptDataset
from megatron_s2l.rollout.collector import RolloutCollector, drop_reason, sample_metrics
from megatron_s2l.rollout.engines import sampling_params
from megatron_s2l.rollout.ledger import RolloutLedger
from megatron_s2l.rollout.local import build_local_engine
from megatron_s2l.rollout.pool import ExplorerPool, build_pool, tokenizer_hash
from megatron_s2l.rollout.runtime import RolloutRuntime
from megatron_s2l.rollout.schedule import AnnealSchedule
from megatron_s2l.rollout.types import Group, Sample, SamplingParams
from tests.utils import make_tiny_model

G, T_MIX = 6, 4  # G_w per step: 6, 4, 2, 0, 0
EXPECTED_SPLITS = {1: (6, 0), 2: (4, 2), 3: (2, 4), 4: (0, 6), 5: (0, 6)}
PARAMS = SamplingParams(max_new_tokens=5, temperature=1.0)


@dataclasses.dataclass
class Prompt:
    prompt_id: str
    prompt_ids: list[int]
    gold: str


PROMPTS = [Prompt(f"q{i}", [200 + i, 31, 52, 7 + i], "mixed") for i in range(3)]


@dataclasses.dataclass
class Result:
    reward: float
    answer: str | None


class GoldRuleScorer:
    """Test stand-in for the reward module. gold "all": always right, "none": never; "mixed": right for
    every other response of the batch (so a group of even size has both); otherwise by the text's CRC."""

    def __init__(self):
        self.num_calls = 0

    def score_batch(self, responses, golds):
        self.num_calls += 1
        rewards = []
        for i, (text, gold) in enumerate(zip(responses, golds)):
            rule = {"all": 1.0, "none": 0.0, "mixed": float(i % 2)}
            rewards.append(rule.get(gold, float(zlib.crc32(text.encode()) % 2)))
        return [Result(r, text[:1] or None) for r, text in zip(rewards, responses)]


class Recorder:
    """Wraps an engine: records each generate call's (start, end), after a small delay."""

    def __init__(self, engine, delay: float = 0.0):
        self.engine, self.delay, self.calls = engine, delay, []
        self.name = engine.name

    async def generate(self, prompts, n, params):
        start = time.perf_counter()
        await asyncio.sleep(self.delay)
        out = await self.engine.generate(prompts, n, params)
        self.calls.append((start, time.perf_counter(), n, params))
        return out


@pytest.fixture(scope="module")
def explorer_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("explorer"), seed=3, num_hidden_layers=2)


@pytest.fixture(scope="module")
def engines(explorer_dir, tiny_qwen3):
    torch.set_num_threads(1)
    return build_local_engine(explorer_dir, version="explorer-v0"), build_local_engine(tiny_qwen3)


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen3)


@pytest.fixture(scope="module")
def built_pool(engines, explorer_dir, tmp_path_factory):
    out = build_pool(engines[0], PROMPTS, G, SamplingParams(max_new_tokens=5, temperature=0.7, top_p=0.95),
                     tmp_path_factory.mktemp("pool") / "pool", explorer_model=str(explorer_dir),
                     tokenizer_dir=explorer_dir, chunk_size=2)
    return ExplorerPool.open(out, tokenizer_hash(explorer_dir), seed=1)


@pytest.fixture
def pool(built_pool):
    """The module's pool with its draw cursor rewound (each test starts a run at step 1)."""
    built_pool.load_state_dict({**built_pool.state_dict(), "cursor": {}})
    return built_pool


class CountingDataset(PromptDataset):
    """The prompts in file order; records how many each draw asked for."""

    def __init__(self, prompts):
        super().__init__(list(prompts), seed=0, shuffle=False)
        self.asked = []

    def next_batch(self, n):
        self.asked.append(n)
        return super().next_batch(n)


def make_collector(learner, tokenizer, explorer, prompts=PROMPTS, prompts_per_step=None,
                   **kwargs) -> RolloutCollector:
    """A collector whose every step draws `prompts_per_step` (default: all) of `prompts`, in order."""
    schedule = AnnealSchedule("linear", G, T_MIX, total_steps=5)
    return RolloutCollector(CountingDataset(prompts), schedule, RolloutLedger(learner_params=2, explorer_params=1),
                            learner, PARAMS, tokenizer, GoldRuleScorer(), RolloutRuntime(),
                            prompts_per_step=prompts_per_step or len(prompts), explorer=explorer, **kwargs)


def check_groups(groups, step, learner_version, explorer_version):
    g_w, g_s = EXPECTED_SPLITS[step]
    assert [g.prompt_id for g in groups] == [p.prompt_id for p in PROMPTS]
    for group, prompt in zip(groups, PROMPTS):
        assert (group.count("explorer"), group.count("learner"), len(group.samples)) == (g_w, g_s, G)
        assert group.gold == prompt.gold and group.prompt_ids == prompt.prompt_ids
        for sample in group.samples:
            assert sample.prompt_ids == prompt.prompt_ids and sample.reward in (0.0, 1.0)
            assert len(sample.logprobs) == len(sample.response_ids) >= 1
            expected = explorer_version if sample.source == "explorer" else learner_version
            assert sample.weight_version == expected


def test_pool_mode_mixes_g_w_pool_and_g_s_learner_samples(engines, tokenizer, pool):
    collector = make_collector(engines[1], tokenizer, pool)
    pool_responses = {tuple(s.response_ids) for p in PROMPTS for s in pool.samples(p.prompt_id)}
    for step in range(1, 6):
        if step == 3:  # a weight sync between steps: later learner samples carry the new version
            asyncio.run(engines[1].update_weights([], version="v3"))
        groups, stats = collector.collect(step)
        check_groups(groups, step, "0" if step < 3 else "v3", "explorer-v0")
        explorer = [s for g in groups for s in g.samples if s.source == "explorer"]
        assert all(tuple(s.response_ids) in pool_responses for s in explorer)
        # one verifier for both sources: pool rewards (None, unscored build) were replaced
        assert all(s.reward is not None for g in groups for s in g.samples)
        assert (stats["schedule/G_w"], stats["schedule/G_s"]) == EXPECTED_SPLITS[step]
        assert stats["rollout/num_groups"] == 3 and stats["rollout/num_samples"] == 3 * G
        assert ("reward/explorer_mean" in stats) == (EXPECTED_SPLITS[step][0] > 0)
        assert ("reward/learner_mean" in stats) == (EXPECTED_SPLITS[step][1] > 0)
    asyncio.run(engines[1].update_weights([], version="0"))
    collector.runtime.close()


def test_online_explorer_runs_concurrently_with_the_learner(engines, tokenizer):
    explorer, learner = Recorder(engines[0], delay=0.3), Recorder(engines[1], delay=0.3)
    collector = make_collector(learner, tokenizer, explorer,
                               explorer_params=SamplingParams(max_new_tokens=4, temperature=0.7, top_p=0.95))
    for step in (1, 2, 3, 4):
        groups, stats = collector.collect(step)
        check_groups(groups, step, "0", "explorer-v0")
        assert stats["timing/collect_s"] > 0
    # no call when a source has 0 samples; n = G_w / G_s; each source its own sampling params
    assert [c[2] for c in explorer.calls] == [6, 4, 2] and [c[2] for c in learner.calls] == [2, 4, 6]
    assert all(c[3].temperature == 0.7 and c[3].max_new_tokens == 4 for c in explorer.calls)
    (e_start, e_end, *_), (l_start, l_end, *_) = explorer.calls[1], learner.calls[0]  # both at step 2
    assert e_start < l_end and l_start < e_end  # the two generate calls overlapped
    assert explorer.calls[1][3].seed != learner.calls[0][3].seed


def test_sampling_is_reproducible_from_seed_and_step(engines, tokenizer):
    def learner_ids(seed, step):
        collector = make_collector(engines[1], tokenizer, None, seed=seed)
        groups, _ = collector.collect(step)
        collector.runtime.close()
        return [s.response_ids for g in groups for s in g.samples]

    assert learner_ids(0, 2) == learner_ids(0, 2)
    assert learner_ids(0, 2) != learner_ids(0, 3)
    assert learner_ids(0, 2) != learner_ids(1, 2)


def test_no_explorer_is_plain_grpo(engines, tokenizer):
    groups, stats = make_collector(engines[1], tokenizer, None).collect(1)
    assert all(g.count("learner") == G for g in groups)
    assert stats["schedule/G_w"] == 0 and stats["schedule/alpha"] == 0.0


def test_success_rates_feed_the_schedule(engines, tokenizer, pool):
    collector = make_collector(engines[1], tokenizer, pool)
    groups, stats = collector.collect(2)
    explorer_rate, learner_rate = collector.schedule.observations[2]
    explorer = [s.reward for g in groups for s in g.samples if s.source == "explorer"]
    assert explorer_rate == sum(r > 0 for r in explorer) / len(explorer) == stats["success/explorer_rate"]
    assert learner_rate == stats["success/learner_rate"]


def test_dynamic_sampling_drops_all_equal_groups_and_refills(engines, tokenizer):
    batch = [Prompt("a", [5, 6, 7], "all"), Prompt("b", [8, 9], "mixed"), Prompt("c", [10, 11], "none"),
             Prompt("d", [12, 13, 14], "mixed")]
    refills = [Prompt("e", [15], "mixed"), Prompt("f", [16], "all"), Prompt("g", [17], "mixed"),
               Prompt("h", [18], "none"), Prompt("i", [19], "mixed")]
    params = dataclasses.replace(PARAMS, stop_token_ids=list(range(0, 151936, 2)))  # most samples stop early
    collector = make_collector(engines[1], tokenizer, None, prompts=batch + refills, prompts_per_step=4,
                               dynamic_sampling=True)
    collector.learner_params = params
    groups, stats = collector.collect(step=5)
    assert collector.dataset.asked == [4, 4]  # 2 of 4 kept in round 1: keep rate 1/2, so 2 missing -> 4 more
    assert [g.prompt_id for g in groups] == ["b", "d", "e", "g"]
    assert all(len(set(g.rewards)) == 2 for g in groups)
    assert stats["dynamic/dropped_all_correct"] == 2 and stats["dynamic/dropped_all_wrong"] == 2
    assert stats["dynamic/dropped_all_truncated"] == 0
    assert stats["rollout/num_rounds"] == 2 and stats["rollout/num_prompts_sampled"] == 8
    assert stats["dynamic/num_short"] == 0 and stats["rollout/num_groups"] == 4
    assert stats["groups/zero_variance_frac"] == 0.5


def test_dynamic_sampling_gives_up_after_the_bounded_rounds(engines, tokenizer, caplog):
    prompts = [Prompt("m", [3, 4], "mixed"), Prompt("n", [4, 5], "none")]
    prompts += [Prompt(f"z{i}", [20 + i], "none") for i in range(6)]
    collector = make_collector(engines[1], tokenizer, None, prompts=prompts, prompts_per_step=2,
                               dynamic_sampling=True, max_oversample_rounds=2)
    groups, stats = collector.collect(step=5)
    assert [g.prompt_id for g in groups] == ["m"]
    assert collector.dataset.asked == [2, 2, 4]  # keep rate 1/2, then 1/4: at most 4x the missing count
    assert stats["rollout/num_rounds"] == 3 and stats["dynamic/num_short"] == 1
    assert stats["dynamic/dropped_all_wrong"] + stats["dynamic/dropped_all_truncated"] == 7
    assert "kept 1 of 2 groups" in caplog.text


def test_drop_reasons():
    def group(rewards, finish="stop"):
        return Group("p", [1], "g", [Sample("p", [1], [2], [-0.1], "learner", finish_reason=finish, reward=r)
                                     for r in rewards])

    assert drop_reason(group([1.0, 0.0])) is None
    assert drop_reason(group([1.0, 1.0])) == "all_correct"
    assert drop_reason(group([-1.0, -1.0])) == "all_wrong"
    assert drop_reason(group([0.0, 0.0], finish="length")) == "all_truncated"


def test_pool_built_from_other_prompt_tokens_is_refused(engines, tokenizer, pool):
    changed = [Prompt("q0", [1, 2, 3], "mixed")]
    with pytest.raises(ValueError, match="tokenized differently.*rebuild the pool"):
        make_collector(engines[1], tokenizer, pool, prompts=changed).collect(1)


def test_sampling_params_per_role_and_a_pool_too_small_for_step_one(engines, tokenizer, pool):
    cfg = RunConfig()
    cfg.rollout.max_response_length, cfg.rollout.temperature, cfg.rollout.top_k = 7, 0.9, 20
    learner, explorer = sampling_params(cfg, "learner"), sampling_params(cfg, "explorer")
    assert (learner.temperature, learner.top_k, learner.max_new_tokens) == (0.9, 20, 7)
    assert (explorer.temperature, explorer.top_p, explorer.max_new_tokens) == (0.7, 0.95, 7)
    assert sampling_params(cfg, "eval").presence_penalty == cfg.eval.presence_penalty
    big = AnnealSchedule("linear", 8, T_MIX, total_steps=5)
    with pytest.raises(ValueError, match="n_per_prompt >= rollout.group_size"):
        RolloutCollector(CountingDataset(PROMPTS), big, RolloutLedger(2, 1), engines[1], PARAMS, tokenizer,
                         GoldRuleScorer(), RolloutRuntime(), prompts_per_step=3, explorer=pool)


def test_sample_metrics_split_by_source_and_count_distinct_answers_per_group():
    def group(prompt_id, rows):  # rows: (source, reward, answer, length, finish_reason)
        return Group(prompt_id, [1], "2", [Sample(prompt_id, [1], [7] * n, [0.0] * n, src, finish_reason=fin,
                                                  reward=r, answer=a) for src, r, a, n, fin in rows])

    groups = [group("a", [("explorer", 1.0, "2", 4, "stop"), ("explorer", 0.0, "3", 6, "length"),
                          ("learner", 0.0, None, 8, "length"), ("learner", 0.0, None, 2, "stop")]),
              group("b", [("learner", 1.0, "2", 3, "stop"), ("learner", 1.0, "2", 5, "stop")])]
    stats = sample_metrics(groups)
    assert stats["reward/explorer_mean"] == 0.5 and stats["success/learner_rate"] == 0.5
    assert stats["response/mean_length"] == 28 / 6 and stats["response/learner_truncated_frac"] == 0.25
    assert stats["groups/zero_variance_frac"] == 0.5
    assert stats["groups/unique_answer_ratio"] == (3 / 4 + 1 / 2) / 2  # "2", "3", no answer; "2"


class _Interrupted:
    """An engine whose generate is interrupted the way a stop signal interrupts it: by a KeyboardInterrupt."""

    name = "interrupted"

    async def generate(self, prompts, n, params):
        await asyncio.sleep(0)
        raise KeyboardInterrupt


def test_an_interrupted_collection_leaves_no_request_in_flight(engines, tokenizer, caplog):
    """The next step, or the loop's close, must not meet the interrupted step's requests ("Task exception was
    never retrieved" tracebacks after a Ctrl-C, seen in CI)."""
    explorer = Recorder(engines[0], delay=30)  # still waiting when the learner side is interrupted
    collector = make_collector(_Interrupted(), tokenizer, explorer, explorer_params=PARAMS)
    with pytest.raises(KeyboardInterrupt):
        collector.collect(2)
    assert not asyncio.all_tasks(collector.runtime.loop)
    collector.runtime.close()
    gc.collect()
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text


def test_a_failed_step_consumes_no_prompts_draws_or_ledger_counts(engines, tokenizer, pool):
    """The resumed run repeats a failed step exactly: the cursor, the pool's draws, the schedule's observations
    and the ledger are as before it."""
    collector = make_collector(engines[1], tokenizer, pool, prompts=PROMPTS * 2, prompts_per_step=3)
    collector.collect(1)
    before = collector.state_dict()
    collector.learner = _Interrupted()
    with pytest.raises(KeyboardInterrupt):
        collector.collect(2)
    assert collector.state_dict() == before
    collector.learner = engines[1]
    groups, metrics = collector.collect(2)
    assert collector.state_dict()["dataset"]["position"] == 6 and metrics["rollout/learner_tokens"] > 0
