"""RolloutCollector: one training step's groups, G_w explorer + G_s learner samples per prompt.

Legend: B prompts in the batch, G = G_w + G_s samples per group, T response tokens (ragged per sample).

    prompts [B] --split(step)--> explorer: G_w per prompt (pool draw, or a frozen engine)    } at the
                                 learner:  G_s per prompt (the learner replica, fresh)       } same time
            --> decode --> score (one verifier for both sources) --> groups [B][G]
            --> dynamic sampling (optional): drop all-equal groups, sample more prompts, <= N rounds

Each Sample records its source ("explorer" | "learner") and the weight version that produced it.
Explorer samples are always re-scored by the run's scorer, also when the pool stored rewards, so both
sources are on the same verifier and scale (the released code scored them differently; see PAPER.md).
Dynamic sampling (DAPO) is not in the paper; it is off by default. Sampling seeds come from
(seed, step, round, source), so a resumed run samples what an uninterrupted run would.

Scoring runs in the calling thread: math-verify's timeouts are signal based and need the main thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import Counter
from typing import Callable, Optional, Sequence, Union

from megatron_s2l.config import ExplorerConfig, RolloutConfig
from megatron_s2l.eval.diversity import unique_answer_ratio
from megatron_s2l.rollout.engine import RolloutEngine
from megatron_s2l.rollout.local import derive_seed
from megatron_s2l.rollout.pool import ExplorerPool, PromptRecord, Scorer
from megatron_s2l.rollout.schedule import AnnealSchedule
from megatron_s2l.rollout.types import SOURCES, Group, Sample, SamplingParams

logger = logging.getLogger(__name__)

DROP_REASONS = ("all_correct", "all_wrong", "all_truncated")


class RolloutCollector:
    """Builds the groups of one step; the trainer calls `collect(prompts, step)`."""

    # config
    learner_params: SamplingParams
    explorer_params: SamplingParams  # online explorer only; a pool has its own
    dynamic_sampling: bool
    max_oversample_rounds: int
    seed: int
    # components
    schedule: AnnealSchedule
    learner: RolloutEngine
    explorer: Union[ExplorerPool, RolloutEngine, None]  # None: plain GRPO (G_s = G)
    tokenizer: object  # decodes response ids (HF tokenizer)
    scorer: Scorer
    more_prompts: Optional[Callable[[int], Sequence[PromptRecord]]]  # refills for dynamic sampling
    loop: asyncio.AbstractEventLoop  # engines' async calls all run on this loop

    def __init__(self, schedule: AnnealSchedule, learner: RolloutEngine, learner_params: SamplingParams,
                 tokenizer, scorer: Scorer, *, explorer: Union[ExplorerPool, RolloutEngine, None] = None,
                 explorer_params: Optional[SamplingParams] = None, dynamic_sampling: bool = False,
                 max_oversample_rounds: int = 3,
                 more_prompts: Optional[Callable[[int], Sequence[PromptRecord]]] = None, seed: int = 0,
                 loop: Optional[asyncio.AbstractEventLoop] = None):
        self.schedule, self.learner, self.learner_params = schedule, learner, learner_params
        self.tokenizer, self.scorer, self.explorer = tokenizer, scorer, explorer
        self.explorer_params = explorer_params or learner_params
        self.dynamic_sampling, self.max_oversample_rounds = dynamic_sampling, max_oversample_rounds
        self.more_prompts, self.seed = more_prompts, seed
        self._owns_loop = loop is None
        self.loop = loop or asyncio.new_event_loop()

    def collect(self, prompts: Sequence[PromptRecord], step: int) -> tuple[list[Group], dict[str, float]]:
        """Groups for `prompts` at 1-indexed `step` (fewer only if dynamic sampling runs out of rounds)."""
        try:
            return self.loop.run_until_complete(self.collect_async(prompts, step))
        except BaseException:  # failed or interrupted (a stop signal): no request of this step may linger
            self._cancel_pending()
            raise

    def _cancel_pending(self) -> None:
        """Cancel the tasks still on the loop and wait for them, retrieving their exceptions: otherwise they
        run on in the next step's loop, or asyncio reports them as "never retrieved" when they are collected."""
        seen: set[asyncio.Task] = set()
        for _ in range(10):  # a task that awaited the interrupted one carries the interrupt up again: go on
            left = [task for task in asyncio.all_tasks(self.loop) if not task.done()]
            if not left:
                break
            seen.update(left)
            for task in left:
                task.cancel()
            try:
                self.loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            except BaseException:
                pass
        for task in seen:
            if task.done() and not task.cancelled():
                task.exception()

    def close(self) -> None:
        if self._owns_loop and not self.loop.is_closed():
            self.loop.close()

    def split(self, step: int) -> tuple[int, int]:
        """(G_w, G_s) for this step; all learner samples when there is no explorer."""
        if self.explorer is None:
            return 0, self.schedule.group_size
        return self.schedule.split(step)

    # ------------------------------------------------------------------------------------------

    async def collect_async(self, prompts: Sequence[PromptRecord], step: int
                            ) -> tuple[list[Group], dict[str, float]]:
        start = time.perf_counter()
        g_w, g_s = self.split(step)
        timing: Counter = Counter()
        kept, sampled, dropped, num_rounds = await self._rounds(list(prompts), step, g_w, g_s, timing)
        target = len(prompts)
        if len(kept) < target:
            logger.warning("step %d: dynamic sampling kept %d of %d groups after %d rounds; training on "
                           "fewer (raise rollout.max_oversample_rounds)", step, len(kept), target, num_rounds)
        success = {src: _success_rate(sampled, src) for src in SOURCES}
        self.schedule.observe(step, success["explorer"], success["learner"])
        stats = {"schedule/alpha": self.schedule.alpha(step) if self.explorer is not None else 0.0,
                 "schedule/G_w": float(g_w), "schedule/G_s": float(g_s),
                 "rollout/num_groups": float(min(len(kept), target)), "rollout/num_rounds": float(num_rounds),
                 "rollout/num_prompts_sampled": float(len(sampled)),
                 "rollout/num_samples": float(sum(len(g.samples) for g in kept[:target])),
                 "dynamic/num_surplus": float(max(0, len(kept) - target)),
                 "dynamic/num_short": float(max(0, target - len(kept))),
                 **{f"dynamic/dropped_{r}": float(dropped[r]) for r in DROP_REASONS},
                 **sample_metrics(sampled),  # over everything sampled: they describe the two policies
                 **{f"timing/{k}_s": v for k, v in timing.items()},
                 "timing/rollout_s": time.perf_counter() - start}
        return kept[:target], stats

    async def _rounds(self, batch: list[PromptRecord], step: int, g_w: int, g_s: int,
                      timing: Counter) -> tuple[list[Group], list[Group], Counter, int]:
        """Sample groups; with dynamic sampling drop all-equal ones and refill, for a bounded number of
        rounds. Returns (kept, every sampled group, drop counts by reason, rounds used)."""
        target = len(batch)
        kept, sampled, dropped = [], [], Counter()
        rounds = 1 + (self.max_oversample_rounds if self.dynamic_sampling else 0)
        for round_index in range(rounds):
            groups = await self._sample_groups(batch, step, round_index, g_w, g_s, timing)
            sampled += groups
            for group in groups:
                reason = drop_reason(group) if self.dynamic_sampling else None
                if reason is None:
                    kept.append(group)
                else:
                    dropped[reason] += 1
            if len(kept) >= target or round_index == rounds - 1:
                break
            batch = list(self._refill(target - len(kept), len(kept) / len(sampled)))
            if not batch:
                break
        return kept, sampled, dropped, round_index + 1

    def _refill(self, need: int, keep_rate: float) -> Sequence[PromptRecord]:
        """More prompts for dynamic sampling: enough to fill `need` at the keep rate seen so far (<= 4x)."""
        if self.more_prompts is None:
            raise ValueError("rollout.dynamic_sampling needs a prompt source to refill the batch; pass "
                             "more_prompts (the data iterator) to the collector or turn dynamic sampling off")
        return self.more_prompts(math.ceil(need / max(keep_rate, 0.25)))

    async def _sample_groups(self, prompts: list[PromptRecord], step: int, round_index: int, g_w: int,
                             g_s: int, timing: Counter) -> list[Group]:
        """Explorer and learner samples at the same time, then decode and score: groups [B][G]."""
        explorer, learner = await asyncio.gather(
            self._timed(self._explorer_samples(prompts, g_w, step, round_index), "explorer", timing),
            self._timed(self._engine_samples(self.learner, "learner", prompts, g_s,
                                             self._params(self.learner_params, step, round_index, "learner")),
                        "learner", timing))
        groups = [Group(p.prompt_id, list(p.prompt_ids), p.gold, ex + le)
                  for p, ex, le in zip(prompts, explorer, learner)]
        start = time.perf_counter()
        self._score([s for g in groups for s in g.samples], [g.gold for g in groups for _ in g.samples])
        timing["score"] += time.perf_counter() - start
        return groups

    async def _explorer_samples(self, prompts: list[PromptRecord], g_w: int, step: int, round_index: int
                                ) -> list[list[Sample]]:
        if g_w == 0:
            return [[] for _ in prompts]
        if isinstance(self.explorer, ExplorerPool):
            samples = [self.explorer.draw(p.prompt_id, g_w, step) for p in prompts]  # [B][G_w]
            for p, drawn in zip(prompts, samples):
                if drawn[0].prompt_ids != list(p.prompt_ids):
                    raise ValueError(f"prompt {p.prompt_id!r} is tokenized differently from when the "
                                     f"explorer pool {self.explorer.path} was built (template, max length or "
                                     "tokenizer changed); rebuild the pool with the current data settings")
            return samples
        params = self._params(self.explorer_params, step, round_index, "explorer")
        return await self._engine_samples(self.explorer, "explorer", prompts, g_w, params)

    async def _engine_samples(self, engine: RolloutEngine, source: str, prompts: list[PromptRecord], n: int,
                              params: SamplingParams) -> list[list[Sample]]:
        """n fresh samples per prompt from an engine, decoded: [B][n]."""
        if n == 0:
            return [[] for _ in prompts]
        generations = await engine.generate([list(p.prompt_ids) for p in prompts], n, params)
        texts = iter(self.tokenizer.batch_decode([g.response_ids for gens in generations for g in gens],
                                                 skip_special_tokens=True))
        return [[Sample.from_generation(g, p.prompt_id, p.prompt_ids, source, text=next(texts)) for g in gens]
                for p, gens in zip(prompts, generations)]

    def _score(self, samples: list[Sample], golds: list[str]) -> None:
        results = self.scorer.score_batch([s.text for s in samples], golds)
        if len(results) != len(samples):
            raise ValueError(f"scorer returned {len(results)} results for {len(samples)} responses; "
                             "score_batch must return one result per response, in order")
        for sample, result in zip(samples, results):
            sample.reward, sample.answer = float(result.reward), result.answer

    def _params(self, params: SamplingParams, step: int, round_index: int, source: str) -> SamplingParams:
        seed = derive_seed(self.seed, step, round_index, source) & (2**31 - 1)  # SGLang takes 32-bit seeds
        return dataclasses.replace(params, seed=seed)

    @staticmethod
    async def _timed(coro, name: str, timing: Counter):
        start = time.perf_counter()
        result = await coro
        timing[name] += time.perf_counter() - start
        return result


def drop_reason(group: Group) -> Optional[str]:
    """Why dynamic sampling drops a group (None: its rewards differ, so it carries gradient)."""
    rewards = group.rewards
    if len(set(rewards)) > 1:
        return None
    if all(s.finish_reason == "length" for s in group.samples):
        return "all_truncated"  # a hint that max_response_length is too short
    return "all_correct" if rewards[0] > 0 else "all_wrong"


def _success_rate(groups: list[Group], source: str) -> Optional[float]:
    rewards = [s.reward for g in groups for s in g.samples if s.source == source]
    return sum(r > 0 for r in rewards) / len(rewards) if rewards else None


def sample_metrics(groups: list[Group]) -> dict[str, float]:
    """Reward, success, length and truncation per source and overall, and answer diversity per group."""
    out = {}
    everything = [s for g in groups for s in g.samples]
    for name, samples in (("all", everything), *((src, [s for s in everything if s.source == src])
                                                 for src in SOURCES)):
        if not samples:
            continue
        suffix = "" if name == "all" else f"{name}_"
        count = len(samples)
        out[f"reward/{suffix}mean"] = sum(s.reward for s in samples) / count
        out[f"success/{suffix}rate"] = sum(s.reward > 0 for s in samples) / count
        out[f"response/{suffix}mean_length"] = sum(len(s.response_ids) for s in samples) / count
        out[f"response/{suffix}truncated_frac"] = sum(s.finish_reason == "length" for s in samples) / count
    if groups:
        out["groups/zero_variance_frac"] = sum(len(set(g.rewards)) <= 1 for g in groups) / len(groups)
        # the paper's policy-level diversity: distinct final answers per (mixed) group
        out["groups/unique_answer_ratio"] = sum(unique_answer_ratio([s.answer for s in g.samples])
                                                for g in groups) / len(groups)
    return out


def build_collector(rollout_cfg: RolloutConfig, explorer_cfg: ExplorerConfig, schedule: AnnealSchedule,
                    learner: RolloutEngine, explorer: Union[ExplorerPool, RolloutEngine, None], tokenizer,
                    scorer: Scorer, *, more_prompts: Optional[Callable[[int], Sequence[PromptRecord]]] = None,
                    seed: int = 0, loop: Optional[asyncio.AbstractEventLoop] = None) -> RolloutCollector:
    """A collector with sampling parameters from the config (learner: rollout.*, explorer: explorer.*)."""
    if explorer_cfg.mode == "off":
        explorer = None
    elif explorer is None:
        raise ValueError(f"explorer.mode={explorer_cfg.mode!r} needs an explorer pool or engine; "
                         "pass one, or set explorer.mode=off for plain GRPO")
    if isinstance(explorer, ExplorerPool) and explorer.manifest["n_per_prompt"] < schedule.split(1)[0]:
        raise ValueError(f"the explorer pool {explorer.path} holds {explorer.manifest['n_per_prompt']} "
                         f"samples per prompt but step 1 needs G_w={schedule.split(1)[0]}; build a pool with "
                         "n_per_prompt >= rollout.group_size")
    if rollout_cfg.dynamic_sampling and more_prompts is None:
        raise ValueError("rollout.dynamic_sampling=true needs a prompt source for refills (more_prompts)")
    learner_params = SamplingParams(max_new_tokens=rollout_cfg.max_response_length,
                                    temperature=rollout_cfg.temperature, top_p=rollout_cfg.top_p,
                                    top_k=rollout_cfg.top_k)
    explorer_params = SamplingParams(max_new_tokens=rollout_cfg.max_response_length,
                                     temperature=explorer_cfg.temperature, top_p=explorer_cfg.top_p)
    return RolloutCollector(schedule, learner, learner_params, tokenizer, scorer, explorer=explorer,
                            explorer_params=explorer_params, dynamic_sampling=rollout_cfg.dynamic_sampling,
                            max_oversample_rounds=rollout_cfg.max_oversample_rounds,
                            more_prompts=more_prompts, seed=seed, loop=loop)
