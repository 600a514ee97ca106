"""Scoring many responses fast without ever hanging the trainer: the rewards behind `build_reward`.

math-verify bounds its own work with SIGALRM, which only works in a process's main thread, so scoring
runs in a pool of worker processes (each task runs in its worker's main thread). On top of that inner
timeout, every item has an outer deadline: a worker stuck where the alarm cannot reach it (inside a C
extension, or a user's reward function that never returns) is killed with the whole pool, the pool is
rebuilt and the remaining items are resubmitted. A timed-out item scores as wrong and is counted.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import time
from typing import Any, Callable, Optional

from megatron_s2l.config import RewardConfig
from megatron_s2l.reward.function import call_reward_function, load_reward_function
from megatron_s2l.reward.math import extract_answer, reward_value, verify_answer
from megatron_s2l.reward.types import Reward, ScoreResult

logger = logging.getLogger(__name__)

Task = Callable[..., tuple[Any, bool]]  # task(*item) -> (value, timed_out); module-level: workers import it


def _leave_ctrl_c_to_the_trainer() -> None:
    """Pool initializer. Ctrl-C reaches every process of the terminal's job; the trainer stops cleanly and
    closes the pool, so a worker must not die of it mid-task (a traceback each, and a pool to rebuild)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class ScoringPool:
    """Runs a task on many items in spawned worker processes (in order), each item within its deadline."""

    def __init__(self, num_workers: int, item_budget_s: float):
        self.num_workers, self.item_budget_s = num_workers, item_budget_s
        self._pool = None  # multiprocessing Pool, started on first use

    def map(self, task: Task, items: list[tuple], on_deadline: tuple[Any, bool]) -> list[tuple[Any, bool]]:
        """task(*item) for each item; `on_deadline` for an item killed at its deadline. num_workers=0: in
        this process, with no deadline."""
        if self.num_workers == 0:
            return [task(*item) for item in items]
        results: dict[int, tuple[Any, bool]] = {}
        pending = list(range(len(items)))
        while pending:
            pending = self._run_round(task, items, pending, results, on_deadline)
        return [results[i] for i in range(len(items))]

    def _run_round(self, task, items, indices, results, on_deadline) -> list[int]:
        """Submit `indices`; collect until one misses its deadline; return what still needs scoring."""
        if self._pool is None:
            self._pool = mp.get_context("spawn").Pool(self.num_workers, _leave_ctrl_c_to_the_trainer)
        futures = [(i, self._pool.apply_async(task, items[i])) for i in indices]
        start = time.monotonic()
        for position, (i, future) in enumerate(futures):
            # worst case: every item ahead of this one in its worker's queue used its whole budget
            deadline = start + (position // self.num_workers + 1) * self.item_budget_s
            try:
                results[i] = future.get(timeout=max(0.0, deadline - time.monotonic()))
            except mp.TimeoutError:
                logger.warning("scoring %.200r exceeded %ss; scored as wrong, restarting the scorer pool",
                               items[i], self.item_budget_s)
                results[i] = on_deadline
                self.close()
                return [j for j, _ in futures[position + 1:]]
        return []

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None


class _PooledReward:
    """What every reward kind shares: the config check, one pool for the run, the length check, the counts."""

    def __init__(self, cfg: Optional[RewardConfig] = None):
        self.cfg = cfg or RewardConfig()
        self.cfg.validate()
        # math-verify spends up to timeout_s on each of: parsing the gold, parsing the answer, comparing
        self.pool = ScoringPool(self.cfg.num_workers, 3 * self.cfg.timeout_s + 2)
        self.num_timeouts = 0  # responses scored as wrong because scoring ran out of time
        self.num_scored = 0

    def score_batch(self, responses: list[str], golds: list[str]) -> list[ScoreResult]:
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
        results = self._score(responses, golds)
        self.num_scored += len(results)
        self.num_timeouts += sum(r.timed_out for r in results)
        return results

    def _score(self, responses: list[str], golds: list[str]) -> list[ScoreResult]:
        raise NotImplementedError

    def close(self) -> None:
        self.pool.close()


class MathScorer(_PooledReward):
    """reward.kind=math: the response's final answer (extract_answer) checked against the gold by math-verify.

    `verify_fn(answer, gold, timeout_s) -> (correct, timed_out)` decides equivalence of an extracted
    answer; it must be a module-level function (workers import it by name)."""

    def __init__(self, cfg: Optional[RewardConfig] = None, verify_fn: Task = verify_answer):
        super().__init__(cfg)
        reward_value(True, self.cfg.scale)  # an unknown scale fails now, not at the first score
        self.verify_fn = verify_fn

    def _score(self, responses: list[str], golds: list[str]) -> list[ScoreResult]:
        answers = [extract_answer(r) for r in responses]
        pairs = sorted({(a, g) for a, g in zip(answers, golds) if a is not None})  # each distinct pair once
        items = [(a, g, self.cfg.timeout_s) for a, g in pairs]
        verdicts = dict(zip(pairs, self.pool.map(self.verify_fn, items, on_deadline=(False, True))))
        results = []
        for answer, gold in zip(answers, golds):
            correct, timed_out = verdicts.get((answer, gold), (False, False))
            results.append(ScoreResult(reward_value(correct, self.cfg.scale), answer, correct, timed_out))
        return results


class FunctionReward(_PooledReward):
    """reward.kind=function: the user's reward.function(completion, gold) per response (reward/function.py).

    `answer` is the response's extracted final answer (extract_answer, None without a marker), kept for the
    answer-diversity metrics only; `correct` is reward > 0."""

    def __init__(self, cfg: RewardConfig):
        super().__init__(cfg)
        load_reward_function(self.cfg.function)  # a bad name fails here, in the trainer, before any training

    def _score(self, responses: list[str], golds: list[str]) -> list[ScoreResult]:
        items = [(self.cfg.function, r, g) for r, g in zip(responses, golds)]
        scored = self.pool.map(call_reward_function, items, on_deadline=(0.0, True))
        return [ScoreResult(reward, extract_answer(response), reward > 0, timed_out)
                for response, (reward, timed_out) in zip(responses, scored)]


def build_reward(cfg: Optional[RewardConfig] = None) -> Reward:
    """The run's reward, by reward.kind; None: math-verify with the defaults (`s2l eval` has no run config)."""
    cfg = cfg or RewardConfig()
    return FunctionReward(cfg) if cfg.kind == "function" else MathScorer(cfg)
