"""SIGTERM or Ctrl-C: a wait on servers (rollout collection, evaluation) stops at once; anything else finishes
the step, which then skips its weight sync (the servers are stopping too) and saves. Ctrl-C twice: at once."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from megatron_s2l.config import RunConfig
from megatron_s2l.eval.runner import Evaluator
from megatron_s2l.rollout.collector import NullRollout
from megatron_s2l.train.stopping import RunControl, StepFailed, StepInterrupted, _stop_on_signals, fail_together
from megatron_s2l.train.learner import StepPlan
from megatron_s2l.train.trainer import Trainer
from tests.utils import sigint_handler


def _signal(signum: int = signal.SIGTERM) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.01)  # the handler runs in the main thread at the next check


def _driver_control() -> RunControl:
    """The driver's run control (its phases wait on servers), outside any run."""
    return RunControl(is_driver=True)


def test_sigterm_stops_a_wait_on_servers_at_once_and_otherwise_asks_for_a_stop_after_the_step():
    control = _driver_control()
    previous = signal.getsignal(signal.SIGTERM)
    with _stop_on_signals(control):
        _signal()  # during the update: the step goes on, the loop stops after it
        assert control.stop_requested and control.interruptible is None

        control.stop_requested, control.stop_signal = False, None
        started = time.monotonic()
        with pytest.raises(StepInterrupted):
            with control.phase("step 4's evaluation"):
                _signal()
                time.sleep(30)  # a long wait on the servers
        assert time.monotonic() - started < 10 and control.stop_requested and control.interruptible is None
        _signal()  # a second SIGTERM (torchrun forwards one) while saving interrupts nothing

        with pytest.raises(StepInterrupted):  # a SIGTERM that came just before: the wait never starts
            with control.phase("step 5's rollout collection"):
                pytest.fail("the wait started after SIGTERM")
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_stop_signal_ends_a_wait_on_servers_even_inside_code_that_catches_exception():
    control = _driver_control()
    with _stop_on_signals(control):
        with pytest.raises(StepInterrupted, match="SIGTERM"):
            with control.phase("step 3's rollout collection"):
                try:  # as math-verify does around a verification, and asyncio around a callback
                    _signal()
                    time.sleep(30)
                except Exception:
                    pass
                pytest.fail("the rollout collection went on after SIGTERM")


def test_ctrl_c_stops_like_sigterm_and_a_second_ctrl_c_stops_at_once():
    control = _driver_control()
    with sigint_handler(signal.default_int_handler):
        with _stop_on_signals(control):
            _signal(signal.SIGINT)
            assert control.stop_requested and control.stop_signal == "SIGINT"
            with pytest.raises(KeyboardInterrupt):
                _signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_sigint_stays_ignored():
    """The launchers start the trainer with SIGINT ignored and turn Ctrl-C into one SIGTERM: the trainer must
    not also act on the terminal's SIGINT (a SIGINT after that SIGTERM would count as a second Ctrl-C)."""
    control = _driver_control()
    with sigint_handler(signal.SIG_IGN):
        with _stop_on_signals(control):
            _signal(signal.SIGINT)
            assert not control.stop_requested and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            _signal(signal.SIGTERM)
            assert control.stop_signal == "SIGTERM"


def test_an_interruption_reaches_every_rank_as_an_interruption_and_a_failure_as_a_failure():
    with pytest.raises(StepInterrupted, match="step 2: collecting rollouts interrupted"):
        with fail_together("step 2: collecting rollouts"):
            raise StepInterrupted("SIGTERM")
    with pytest.raises(StepFailed, match="step 2: evaluation failed: ConnectionError") as failure:
        with fail_together("step 2: evaluation"):
            raise ConnectionError("server gone")
    assert not isinstance(failure.value, StepInterrupted)


class _Recorder:
    """Stands in for the learner, weight sync, checkpointer and metrics logger around the real loop (the
    rollout side is the one ranks other than the driver hold)."""

    def __init__(self, sigterm_in_update_of: int):
        self.sigterm_in_update_of, self.step = sigterm_in_update_of, 0
        self.synced, self.saved, self.rows = [], [], []
        self.device, self.ref_model = torch.device("cpu"), None

    def plan(self, batch):
        self.step += 1
        return StepPlan([], num_response_tokens=0, flops=0.0, num_groups_trimmed=0)

    def compute_logprobs(self, plan, reference=False):
        pass

    def train_step(self, plan):
        if self.step == self.sigterm_in_update_of:
            _signal()  # preemption while the learner updates
        return {"loss/pg": 0.5}

    def sync(self, learner, version, verify=False):
        self.synced.append(version)
        return {}

    def resume_path(self):
        return None

    def save(self, step, learner, state):
        self.saved.append(step)

    def log(self, step, metrics):
        self.rows.append((step, metrics))

    def close(self):
        pass


def test_sigterm_during_the_update_saves_the_trained_step_without_syncing_it():
    cfg = RunConfig()
    cfg.steps, cfg.checkpoint.every_steps = 5, 0
    parts = _Recorder(sigterm_in_update_of=2)
    trainer = Trainer(cfg, learner=parts, rollout=NullRollout(), evaluator=Evaluator.nothing(), weight_sync=parts,
                      checkpointer=parts, metrics=parts, control=RunControl())
    trainer.run()  # returns: a requested stop is not an error
    assert parts.synced == ["0", "1"]  # before step 1, after step 1; step 2 trained but went to no server
    assert parts.saved == [2] and trainer.step == trainer.control.saved_step == 2
    assert [step for step, _ in parts.rows] == [1, 2]
    assert parts.rows[1][1]["step/interrupted"] == 1.0 and parts.rows[1][1]["loss/pg"] == 0.5
    assert "step/interrupted" not in parts.rows[0][1]


class _SignalledWhileFinalized:
    def __del__(self):
        _signal()  # the handler runs here, where an exception cannot propagate


def test_a_stop_signal_whose_exception_is_lost_in_a_finalizer_still_ends_the_phase(capfd):
    """Python runs a signal handler wherever the main thread is, also inside a finalizer or a weakref callback
    (seen in CI: importlib's module-lock callback), which report the exception and go on. The phase must still
    end as interrupted, when its work is done, and without that report's traceback."""
    control = _driver_control()
    with _stop_on_signals(control):
        with pytest.raises(StepInterrupted, match="SIGTERM"):
            with control.phase("step 2's rollout collection"):
                _SignalledWhileFinalized()  # dropped at once: __del__ runs
                assert control.stop_requested  # the handler ran, and its exception went nowhere
    assert "Traceback" not in capfd.readouterr().err
