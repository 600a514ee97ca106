"""The process-pool scorer: order, dedup, sympy spins time out and score 0, a hung worker is replaced, Ctrl-C
is left to the trainer."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest

from megatron_s2l.config import RewardConfig
from megatron_s2l.reward import MathScorer
from tests.utils import sigint_handler, spawned_children, wait_for


@pytest.fixture(scope="module")
def scorer():
    scorer = MathScorer(RewardConfig(timeout_s=2, num_workers=2))
    yield scorer
    scorer.close()


def test_batch_scores_in_order(scorer):
    responses = ["Answer: 4", "Answer: 5", "no answer", "\\boxed{\\frac{1}{2}}", "Answer: 4"]
    golds = ["4", "4", "4", "0.5", "3"]
    results = scorer.score_batch(responses, golds)
    assert [r.reward for r in results] == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert [r.answer for r in results] == ["4", "5", None, "\\frac{1}{2}", "4"]


def test_sympy_spin_returns_zero_within_the_timeout(scorer):
    start = time.monotonic()
    results = scorer.score_batch(["Answer: 9^{9^{9^{9}}}", "Answer: 7"], ["5", "7"])
    elapsed = time.monotonic() - start
    assert results[0].reward == 0.0 and results[0].timed_out
    assert results[1].reward == 1.0
    assert elapsed < 2 * 2 + 3  # the inner timeout (2 s) plus process overhead, never a hang


def test_a_worker_stuck_beyond_the_alarm_is_killed_and_the_rest_still_scored():
    from tests.reward_stub import equal_or_hang

    scorer = MathScorer(RewardConfig(timeout_s=1, num_workers=2), verify_fn=equal_or_hang)
    try:
        start = time.monotonic()
        results = scorer.score_batch(["Answer: 1", "Answer: hang", "Answer: 3", "Answer: 4"], ["1", "2", "3", "5"])
        assert time.monotonic() - start < 20  # killed at its deadline (3 x 1 s + 2 s), not after 600 s
        assert [r.reward for r in results] == [1.0, 0.0, 1.0, 0.0]
        assert results[1].timed_out and scorer.num_timeouts == 1
        assert scorer.score_batch(["Answer: 7"], ["7"])[0].reward == 1.0  # the rebuilt pool works
    finally:
        scorer.close()


def _ignores_sigint(process: psutil.Process) -> bool:
    status = Path(f"/proc/{process.pid}/status").read_text()
    ignored = int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)
    return bool(ignored >> (signal.SIGINT - 1) & 1)


def test_ctrl_c_leaves_the_workers_to_the_trainer():
    """A terminal's Ctrl-C reaches the workers too; the trainer stops cleanly, so they must keep scoring."""
    scorer = MathScorer(RewardConfig(timeout_s=2, num_workers=2))
    try:
        before = spawned_children()  # other tests' pools may be running
        with sigint_handler(signal.default_int_handler):  # the workers start as from a terminal
            scorer.score_batch(["Answer: 1"], ["1"])  # starts the pool
        workers = spawned_children() - before
        assert len(workers) == 2
        assert wait_for(lambda: all(map(_ignores_sigint, workers)), 30)  # once started (spawn takes a while)
        for worker in workers:
            worker.send_signal(signal.SIGINT)
        time.sleep(1)
        assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
        assert scorer.score_batch(["Answer: 2"], ["2"])[0].reward == 1.0
    finally:
        scorer.close()


def test_signed_scale_and_errors():
    scorer = MathScorer(RewardConfig(scale="signed", num_workers=0))
    assert [r.reward for r in scorer.score_batch(["Answer: 1", "Answer: 2"], ["1", "1"])] == [1.0, -1.0]
    with pytest.raises(ValueError, match="2 responses but 1 gold"):
        scorer.score_batch(["a", "b"], ["1"])
