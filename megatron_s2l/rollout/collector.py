"""RolloutCollector: the driver's rollout side of one step. It owns the prompt cursor, the schedule, the explorer
(pool or engine), the learner replica's sampling and the rollout ledger, and turns a step number into groups of
G_w explorer + G_s learner samples.

Legend: B prompts in the batch, G = G_w + G_s samples per group, T response tokens (ragged per sample).

    dataset --next B--> prompts --split(step)--> explorer: G_w per prompt (pool draw, or a frozen engine)  } at the
                                                 learner:  G_s per prompt (the learner replica, fresh)     } same time
            --> decode --> score (one verifier for both sources) --> groups [B][G]
            --> dynamic sampling (optional): drop all-equal groups, sample more prompts, <= N rounds

Each Sample records its source ("explorer" | "learner") and the weight version that produced it.
Explorer samples are always re-scored by the run's reward, also when the pool stored rewards, so both
sources are on the same verifier and scale (the released code scored them differently; see PAPER.md).
Dynamic sampling (DAPO) is not in the paper; it is off by default. Sampling seeds come from
(seed, step, round, source), so a resumed run samples what an uninterrupted run would. A step that fails
consumes no prompts, pool draws or ledger counts: the resumed run repeats it.

Asynchronous rollouts (max_staleness = k >= 1): once step t's groups are handed over, the collections of steps
t+1..t+k start as tasks on the event loop, one after another (each takes its prompts and pool draws in step
order), and go on while the learner trains (`in_background`). Their learner samples come from weights up to
k versions old; a sample older than k (a skipped sync, say) is dropped and regenerated, and the loss corrects
the stale ones with truncated importance weights (algo/loss.py). Explorer samples never go stale: the explorer
is frozen. A checkpoint saves the state after the last step handed over; work in flight is regenerated on
resume, so a resumed run trains on the same prompts in the same order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence, Union

from megatron_s2l.rollout.ledger import RolloutLedger
from megatron_s2l.reward import Reward
from megatron_s2l.rollout.diversity import unique_answer_ratio
from megatron_s2l.rollout.pool import ExplorerPool
from megatron_s2l.rollout.runtime import RolloutRuntime
from megatron_s2l.rollout.sampling import sample_and_score, score_samples
from megatron_s2l.rollout.schedule import AnnealSchedule
from megatron_s2l.rollout.types import (SOURCES, Group, PromptRecord, RolloutEngine, Sample, SamplingParams,
                                        version_age)
from megatron_s2l.seeding import derive_seed

logger = logging.getLogger(__name__)

DROP_REASONS = ("all_correct", "all_wrong", "all_truncated")


class RolloutCollector:
    """`collect(step)`: this step's scored groups and their metrics (the driver's whole rollout side)."""

    # config
    prompts_per_step: int
    learner_params: SamplingParams
    explorer_params: SamplingParams  # online explorer only; a pool has its own
    dynamic_sampling: bool
    max_oversample_rounds: int
    seed: int
    pad_id: int  # the token that pads the training batch
    max_staleness: int  # k: learner samples may come from weights up to k versions old (0: synchronous)
    last_step: int  # no collection starts ahead beyond it
    rollouts_dir: Optional[Path]  # where each step's samples are written (logging.save_rollouts)
    # components
    dataset: object  # megatron_s2l.data PromptDataset: next_batch(n), with a cursor that checkpoints
    schedule: AnnealSchedule
    ledger: RolloutLedger
    learner: RolloutEngine
    explorer: Union[ExplorerPool, RolloutEngine, None]  # None: plain GRPO (G_s = G)
    tokenizer: object  # decodes response ids (HF tokenizer)
    reward: Reward
    runtime: RolloutRuntime
    # state
    _ahead: dict[int, asyncio.Task]  # step -> its collection, started ahead (max_staleness >= 1)
    _order: asyncio.Lock  # collections take prompts, schedule and pool draws in step order
    _committed: dict  # dataset, schedule and pool after the last step handed over

    def __init__(self, dataset, schedule: AnnealSchedule, ledger: RolloutLedger, learner: RolloutEngine,
                 learner_params: SamplingParams, tokenizer, reward: Reward, runtime: RolloutRuntime, *,
                 prompts_per_step: int, explorer: Union[ExplorerPool, RolloutEngine, None] = None,
                 explorer_params: Optional[SamplingParams] = None, dynamic_sampling: bool = False,
                 max_oversample_rounds: int = 3, seed: int = 0, pad_id: int = 0, max_staleness: int = 0,
                 last_step: int = 0, rollouts_dir: Optional[Path] = None):
        if isinstance(explorer, ExplorerPool) and explorer.manifest["n_per_prompt"] < schedule.split(1)[0]:
            raise ValueError(f"the explorer pool {explorer.path} holds {explorer.manifest['n_per_prompt']} "
                             f"samples per prompt but step 1 needs G_w={schedule.split(1)[0]}; build a pool with "
                             "n_per_prompt >= rollout.group_size")
        self.dataset, self.schedule, self.ledger, self.runtime = dataset, schedule, ledger, runtime
        self.learner, self.learner_params, self.explorer = learner, learner_params, explorer
        self.explorer_params = explorer_params or learner_params
        self.tokenizer, self.reward = tokenizer, reward
        self.prompts_per_step, self.dynamic_sampling = prompts_per_step, dynamic_sampling
        self.max_oversample_rounds, self.seed, self.pad_id = max_oversample_rounds, seed, pad_id
        self.max_staleness, self.last_step, self.rollouts_dir = max_staleness, last_step, rollouts_dir
        self._ahead, self._order, self._committed = {}, asyncio.Lock(), self._progress()
        if explorer is None:
            logger.info("explorer off: every group is G=%d learner samples (GRPO)", schedule.group_size)
        else:
            logger.info("schedule %s, G=%d, T_mix=%d: G_w per step %s", schedule.kind, schedule.group_size,
                        schedule.t_mix, [g_w for _, _, g_w, _ in schedule.table()])

    def collect(self, step: int) -> tuple[list[Group], dict[str, float]]:
        """Groups for the next prompts at 1-indexed `step` (fewer only if dynamic sampling runs out of rounds).
        Then, with max_staleness = k >= 1, the next k steps' collections start (see the module docstring)."""
        task = self._ahead.pop(step, None)
        started_ahead = task is not None
        try:
            if task is None:
                task = self.runtime.loop.create_task(self._collect_step(step))
            groups, metrics, progress = self.runtime.run(task)
            if not groups:
                raise RuntimeError(f"step {step}: dynamic sampling kept no group with differing rewards after "
                                   f"{self.max_oversample_rounds} extra rounds; raise rollout.max_oversample_rounds")
            if self.max_staleness:  # the synchronous loop samples from the newest weights by construction
                metrics |= self.runtime.run(self._refresh_stale(groups, step))
        except BaseException:  # failed or interrupted: the resumed run repeats this step
            self._rewind()
            raise
        self._committed = progress
        metrics["rollout/started_ahead"] = float(started_ahead)
        self._write_rollouts(step, groups)
        for later in range(step + 1, min(step + self.max_staleness, self.last_step) + 1):
            if later not in self._ahead:
                self._ahead[later] = self.runtime.loop.create_task(self._collect_step(later))
        return groups, metrics | self.ledger.record(groups) | _weight_versions(groups)

    def in_background(self) -> contextlib.AbstractContextManager:
        """Around the learner's work: collections started ahead go on meanwhile (nothing to do when none are)."""
        return self.runtime.in_background() if self._ahead else contextlib.nullcontext()

    def split(self, step: int) -> tuple[int, int]:
        """(G_w, G_s) for this step; all learner samples when there is no explorer."""
        if self.explorer is None:
            return 0, self.schedule.group_size
        return self.schedule.split(step)

    def state_dict(self) -> dict:
        """What a checkpoint saves: the prompt cursor, schedule and pool draws after the last step handed over
        (not those of collections started ahead), and the ledger."""
        return self._committed | {"ledger": self.ledger.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._cancel_ahead()
        self.dataset.load_state_dict(state["dataset"])
        self.schedule.load_state_dict(state["schedule"])
        self.ledger.load_state_dict(state["ledger"])
        if "pool" in state and isinstance(self.explorer, ExplorerPool):
            self.explorer.load_state_dict(state["pool"])
        self._committed = self._progress()

    def _progress(self) -> dict:
        """A fresh copy of what collections move on: the prompt cursor, the schedule and the pool draws."""
        state = {"dataset": self.dataset.state_dict(), "schedule": self.schedule.state_dict()}
        if isinstance(self.explorer, ExplorerPool):
            state["pool"] = self.explorer.state_dict()
        return state

    def _rewind(self) -> None:
        """Back to the last step handed over: collections in flight are cancelled and their prompts unread."""
        self.load_state_dict(self.state_dict())

    def _cancel_ahead(self) -> None:
        tasks, self._ahead = list(self._ahead.values()), {}
        for task in tasks:
            task.cancel()
        if tasks and not self.runtime.loop.is_closed():
            self.runtime.run(asyncio.gather(*tasks, return_exceptions=True))

    def close(self) -> None:
        """Close the engines (a pool has nothing to close), the reward's worker pool and the event loop."""
        engines = [e for e in (self.learner, self.explorer) if e is not None and not isinstance(e, ExplorerPool)]
        try:
            self._cancel_ahead()
            for engine in engines:
                self.runtime.run(engine.close())
        finally:
            self.reward.close()
            self.runtime.close()

    # ------------------------------------------------------------------------------------------

    async def _collect_step(self, step: int) -> tuple[list[Group], dict[str, float], dict]:
        """One step's collection, in step order with the others; also returns the progress after it."""
        async with self._order:
            prompts = self.dataset.next_batch(self.prompts_per_step)
            groups, metrics = await self._collect(prompts, step)
            return groups, metrics, self._progress()

    async def _refresh_stale(self, groups: list[Group], step: int) -> dict[str, float]:
        """Learner samples older than max_staleness weight versions are never trained on: regenerate the
        learner samples of their groups now, from the current weights. Returns the age histogram."""
        current = step - 1  # the learner's weights now: after step - 1 updates
        stale = [g for g in groups if any(s.source == "learner" and version_age(s.weight_version, current)
                                          > self.max_staleness for s in g.samples)]
        dropped = sum(s.source == "learner" for g in stale for s in g.samples)
        if stale:
            logger.warning("step %d: %d learner samples are more than %d weight versions old; regenerating them",
                           step, dropped, self.max_staleness)
            params = self._params(self.learner_params, step, self.max_oversample_rounds + 1, "learner")
            g_s = sum(s.source == "learner" for s in stale[0].samples)
            fresh = await sample_and_score(self.learner, stale, g_s, params, self.tokenizer, self.reward, "learner")
            for group, new in zip(stale, fresh):
                group.samples = [s for s in group.samples if s.source != "learner"] + new
        ages = Counter(version_age(s.weight_version, current) for g in groups for s in g.samples
                       if s.source == "learner")
        total = sum(ages.values())
        metrics = {f"rollout/age{age}_frac": count / total for age, count in sorted(ages.items())}
        return metrics | {"rollout/stale_dropped": float(dropped)}

    def _write_rollouts(self, step: int, groups: list[Group]) -> None:
        """logging.save_rollouts: this step's samples as JSON lines (prompt, source, version, reward, text)."""
        if self.rollouts_dir is None:
            return
        self.rollouts_dir.mkdir(parents=True, exist_ok=True)
        with (self.rollouts_dir / f"step_{step:06d}.jsonl").open("w") as file:
            for group in groups:
                for s in group.samples:
                    file.write(json.dumps({"prompt_id": s.prompt_id, "source": s.source,
                                           "weight_version": s.weight_version, "reward": s.reward,
                                           "finish_reason": s.finish_reason, "answer": s.answer,
                                           "text": s.text}) + "\n")

    async def _collect(self, prompts: Sequence[PromptRecord], step: int) -> tuple[list[Group], dict[str, float]]:
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
                 "timing/collect_s": time.perf_counter() - start}  # its own time; timing/rollout_s: the wait
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
            keep_rate = len(kept) / len(sampled)  # refill enough to fill the rest at this rate (<= 4x)
            batch = list(self.dataset.next_batch(math.ceil((target - len(kept)) / max(keep_rate, 0.25))))
        return kept, sampled, dropped, round_index + 1

    async def _sample_groups(self, prompts: list[PromptRecord], step: int, round_index: int, g_w: int,
                             g_s: int, timing: Counter) -> list[Group]:
        """Explorer and learner samples at the same time, each decoded and scored: groups [B][G]."""
        learner_params = self._params(self.learner_params, step, round_index, "learner")
        explorer, learner = await asyncio.gather(
            self._timed(self._explorer_samples(prompts, g_w, step, round_index), "explorer", timing),
            self._timed(sample_and_score(self.learner, prompts, g_s, learner_params, self.tokenizer, self.reward,
                                         "learner"), "learner", timing))
        return [Group(p.prompt_id, list(p.prompt_ids), p.gold, ex + le)
                for p, ex, le in zip(prompts, explorer, learner)]

    async def _explorer_samples(self, prompts: list[PromptRecord], g_w: int, step: int, round_index: int
                                ) -> list[list[Sample]]:
        if g_w == 0 or not isinstance(self.explorer, ExplorerPool):
            params = self._params(self.explorer_params, step, round_index, "explorer")
            return await sample_and_score(self.explorer, prompts, g_w, params, self.tokenizer, self.reward,
                                          "explorer")
        samples = [self.explorer.draw(p.prompt_id, g_w, step) for p in prompts]  # [B][G_w]
        for p, drawn in zip(prompts, samples):
            if drawn[0].prompt_ids != list(p.prompt_ids):
                raise ValueError(f"prompt {p.prompt_id!r} is tokenized differently from when the "
                                 f"explorer pool {self.explorer.path} was built (template, max length or "
                                 "tokenizer changed); rebuild the pool with the current data settings")
        score_samples(self.reward, prompts, samples)
        return samples

    def _params(self, params: SamplingParams, step: int, round_index: int, source: str) -> SamplingParams:
        seed = derive_seed(self.seed, step, round_index, source) & (2**31 - 1)  # SGLang takes 32-bit seeds
        return dataclasses.replace(params, seed=seed)

    @staticmethod
    async def _timed(coro, name: str, timing: Counter):
        start = time.perf_counter()
        result = await coro
        timing[name] += time.perf_counter() - start
        return result


class NullRollout:
    """What ranks other than the driver hold: they sample nothing and receive the driver's batch."""

    pad_id = 0

    def collect(self, step: int) -> tuple[list[Group], dict[str, float]]:
        return [], {}

    def in_background(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _weight_versions(groups: list[Group]) -> dict[str, float]:
    """Oldest weight version behind this step's learner samples (the replica's staleness, in steps)."""
    versions = [s.weight_version for g in groups for s in g.samples if s.source == "learner"]
    numeric = [float(v) for v in versions if v.isdigit()]
    return {"rollout/learner_weight_version": min(numeric)} if numeric else {}


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
