"""SIGTERM: a wait on servers (rollout collection, evaluation) stops at once; anything else finishes the step."""

from __future__ import annotations

import os
import signal
import time

import pytest

from megatron_s2l import platform
from megatron_s2l.config import RunConfig
from megatron_s2l.train.trainer import Trainer, _stop_on_sigterm


def _sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)  # the handler runs in the main thread at the next check


def test_sigterm_stops_a_wait_on_servers_at_once_and_otherwise_asks_for_a_stop_after_the_step():
    trainer = Trainer(RunConfig(), learner=None, rollout=None, weight_sync=None, checkpointer=None, metrics=None)
    previous = signal.getsignal(signal.SIGTERM)
    with _stop_on_sigterm(trainer):
        _sigterm()  # during the update: the step goes on, the loop stops after it
        assert trainer.stop_requested and trainer.interruptible is None

        trainer.stop_requested = False
        started = time.monotonic()
        with pytest.raises(platform.StepInterrupted):
            with trainer._interruptible("step 4's evaluation"):
                _sigterm()
                time.sleep(30)  # a long wait on the servers
        assert time.monotonic() - started < 10 and trainer.stop_requested and trainer.interruptible is None
        _sigterm()  # a second SIGTERM (torchrun forwards one) while saving interrupts nothing

        with pytest.raises(platform.StepInterrupted):  # a SIGTERM that came just before: the wait never starts
            with trainer._interruptible("step 5's rollout collection"):
                pytest.fail("the wait started after SIGTERM")
    assert signal.getsignal(signal.SIGTERM) is previous


def test_an_interruption_reaches_every_rank_as_an_interruption_and_a_failure_as_a_failure():
    with pytest.raises(platform.StepInterrupted, match="step 2: collecting rollouts interrupted"):
        with platform.fail_together("step 2: collecting rollouts"):
            raise platform.StepInterrupted("SIGTERM")
    with pytest.raises(platform.StepFailed, match="step 2: evaluation failed: ConnectionError") as failure:
        with platform.fail_together("step 2: evaluation"):
            raise ConnectionError("server gone")
    assert not isinstance(failure.value, platform.StepInterrupted)
