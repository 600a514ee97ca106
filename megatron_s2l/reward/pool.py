"""Scoring many responses fast without ever hanging the trainer.

math-verify bounds its own work with SIGALRM, which only works in a process's main thread, so scoring
runs in a pool of worker processes (each task runs in its worker's main thread). On top of that inner
timeout, every item has an outer deadline: a worker stuck where the alarm cannot reach it (inside a C
extension) is killed with the whole pool, the pool is rebuilt and the remaining items are resubmitted.
A timed-out item scores as wrong and is counted.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import time
from typing import Callable, Optional
from megatron_s2l.config import RewardConfig
from megatron_s2l.reward.math import ScoreResult, extract_answer, reward_value

logger = logging.getLogger(__name__)


def verify_math(answer: str, gold: str, timeout_s: int) -> tuple[bool, bool]:
    """(correct, timed_out) for one (answer, gold) pair; runs in a worker's main thread."""
    from megatron_s2l.reward.math import equivalent

    start = time.monotonic()
    correct = equivalent(answer, gold, timeout_s)
    return correct, (not correct and time.monotonic() - start >= timeout_s)


def _leave_ctrl_c_to_the_trainer() -> None:
    """Pool initializer. Ctrl-C reaches every process of the terminal's job; the trainer stops cleanly and
    closes the pool, so a worker must not die of it mid-task (a traceback each, and a pool to rebuild)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _task(verify_fn: Callable[[str, str, int], tuple[bool, bool]], answer: str, gold: str, timeout_s: int):
    return verify_fn(answer, gold, timeout_s)


class MathScorer:
    """The run's scorer: `score_batch(responses, golds)` in order; one process pool for the whole run.

    `verify_fn(answer, gold, timeout_s) -> (correct, timed_out)` decides equivalence of an extracted
    answer; it must be a module-level function (workers import it by name)."""

    def __init__(self, cfg: Optional[RewardConfig] = None,
                 verify_fn: Callable[[str, str, int], tuple[bool, bool]] = verify_math):
        cfg = cfg or RewardConfig()
        reward_value(True, cfg.scale)  # validates the scale
        self.cfg = cfg
        self.verify_fn = verify_fn
        self._pool = None  # multiprocessing Pool, started on first use
        self.num_timeouts = 0
        self.num_scored = 0

    def _get_pool(self):
        if self._pool is None and self.cfg.num_workers > 0:
            self._pool = mp.get_context("spawn").Pool(self.cfg.num_workers, _leave_ctrl_c_to_the_trainer)
        return self._pool

    def score_batch(self, responses: list[str], golds: list[str]) -> list[ScoreResult]:
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
        answers = [extract_answer(r) for r in responses]
        pairs = sorted({(a, g) for a, g in zip(answers, golds) if a is not None})  # each distinct pair once
        verdicts = self._verify(pairs)
        results = []
        for answer, gold in zip(answers, golds):
            correct, timed_out = verdicts.get((answer, gold), (False, False))
            results.append(ScoreResult(reward_value(correct, self.cfg.scale), answer, correct, timed_out))
        self.num_scored += len(results)
        return results

    def _verify(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[bool, bool]]:
        tasks = [(self.verify_fn, a, g, self.cfg.timeout_s) for a, g in pairs]
        pool = self._get_pool()
        if pool is None:
            return {pair: _task(*task) for pair, task in zip(pairs, tasks)}
        verdicts: dict[tuple[str, str], tuple[bool, bool]] = {}
        pending = list(range(len(tasks)))
        while pending:
            pending = self._run_round(pending, pairs, tasks, verdicts)
        return verdicts

    def _run_round(self, indices, pairs, tasks, verdicts) -> list[int]:
        """Submit `indices`; collect until one misses its deadline; return what still needs scoring."""
        pool = self._get_pool()
        futures = [(i, pool.apply_async(_task, tasks[i])) for i in indices]
        # math-verify spends up to timeout_s on each of: parsing the gold, parsing the answer, comparing
        start, budget = time.monotonic(), 3 * self.cfg.timeout_s + 2
        workers = self.cfg.num_workers
        for position, (i, future) in enumerate(futures):
            # worst case: every item ahead of this one in its worker's queue used its whole budget
            deadline = start + (position // workers + 1) * budget
            try:
                correct, timed_out = future.get(timeout=max(0.0, deadline - time.monotonic()))
            except mp.TimeoutError:
                logger.warning("scoring %r against gold %r exceeded %ss; scored 0, restarting the scorer pool",
                               pairs[i][0][:80], pairs[i][1][:80], budget)
                verdicts[pairs[i]] = (False, True)
                self.num_timeouts += 1
                self._pool.terminate()
                self._pool = None
                return [j for j, f in futures[position + 1:] if pairs[j] not in verdicts]
            verdicts[pairs[i]] = (correct, timed_out)
            self.num_timeouts += timed_out
        return []

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None


def build_scorer(cfg: Optional[RewardConfig] = None) -> MathScorer:
    return MathScorer(cfg)
