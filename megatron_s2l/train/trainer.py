"""The S2L-PO training loop (the paper's Algorithm 1); plain GRPO is the same loop with explorer.mode=off.

Every rank of the torchrun job runs `Trainer.run()`. The driver (global rank 0) draws prompts, collects
and scores rollouts and builds the token batch; the batch is broadcast so that all ranks run the
learner's log-prob passes and update together; then the new weights go to the learner replica.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist

from megatron_s2l import platform
from megatron_s2l.algo.advantages import advantages_for_groups
from megatron_s2l.config import RunConfig
from megatron_s2l.metrics import perf
from megatron_s2l.metrics.logger import MetricsLogger
from megatron_s2l.metrics.profiler import StepProfiler, phase_range
from megatron_s2l.train.batch import TrainBatch
from megatron_s2l.train.checkpoint import Checkpointer
from megatron_s2l.train.learner import Learner
from megatron_s2l.train.weight_sync import WeightSync

if TYPE_CHECKING:
    from megatron_s2l.train.driver import RolloutSide

logger = logging.getLogger(__name__)


class Trainer:
    # config
    cfg: RunConfig
    # components (driver-only ones are None on other ranks)
    learner: Learner
    rollout: Optional["RolloutSide"]
    weight_sync: WeightSync
    checkpointer: Checkpointer
    metrics: MetricsLogger
    profiler: StepProfiler
    # state
    step: int  # the last finished step
    saved_step: int
    stop_requested: bool
    stop_signal: Optional[str]  # what asked for the stop: "SIGTERM", "SIGINT" (Ctrl-C), None (none, or the plan)
    interruptible: Optional[str]  # the driver's phase now, if it only waits on servers: a stop signal ends it at once

    def __init__(self, cfg, learner, rollout, weight_sync, checkpointer, metrics, step=0):
        self.cfg, self.learner, self.rollout = cfg, learner, rollout
        self.weight_sync, self.checkpointer, self.metrics = weight_sync, checkpointer, metrics
        self.profiler = StepProfiler(cfg.logging, dist.get_rank() if dist.is_initialized() else 0)
        self.step = step
        self.saved_step = step  # a resumed run's checkpoint holds it
        self.stop_requested, self.stop_signal, self.interruptible = False, None, None

    def run(self) -> None:
        """for i = 1..T: split G -> collect -> score -> advantages -> old/ref log-probs -> update -> sync."""
        exit_at = self.step + self.cfg.checkpoint.exit_interval if self.cfg.checkpoint.exit_interval else None
        stop = False  # agreed by every rank (a stop signal may reach them at different moments)
        with _stop_on_signals(self), self._save_on_failure():
            if self.step == 0 and self.cfg.eval.every_steps and self.cfg.eval.before_training:
                self.metrics.log(0, self.evaluate(0))  # where RL starts from
            while self.step < self.cfg.steps and not stop:
                step = self.step + 1
                self.profiler.step_begins(step)
                timer = _StepTimer()
                with timer("rollout"):
                    batch, metrics = self.rollout_batch(step)
                with timer("logprob"):
                    plan = self.learner.plan(batch)
                    num_tokens, flops = batch.num_response_tokens, self.learner.update_flops(batch)
                    batch = None  # the plan holds this rank's rows
                    self.learner.compute_logprobs(plan)
                    if self.learner.ref_model is not None:
                        self.learner.compute_logprobs(plan, reference=True)
                with timer("train"):
                    metrics |= self.learner.train_step(plan)
                self.step = step  # the learner has finished step i: a checkpoint from here on saves it
                if self._stopping_before_sync(step):
                    metrics["step/interrupted"] = 1.0
                else:
                    with self._log_on_failure(step, metrics):
                        with timer("sync"):
                            metrics |= self.weight_sync.sync(self.learner, version=str(step))
                        with timer("eval"):
                            metrics |= self.evaluate(step)
                metrics |= timer.metrics(num_tokens, flops, self.learner.device)
                metrics |= perf.memory_metrics(self.learner.device)  # peaks of this step, reset for the next
                self.metrics.log(step, metrics)
                self.profiler.step_ends(step)
                # every rank goes on, or none does; a signal that comes after this is seen in the next step
                stop = platform.any_rank(self.stop_requested) or step == exit_at
                every = self.cfg.checkpoint.every_steps
                if stop or step == self.cfg.steps or (every and step % every == 0):
                    self.save()

    def rollout_batch(self, step: int) -> tuple[TrainBatch, dict[str, float]]:
        """Driver: prompts -> groups (G_w explorer + G_s learner) -> rewards -> advantages -> batch;
        every rank: the broadcast batch."""
        metrics: dict[str, float] = {}
        batch = TrainBatch.placeholder()
        with platform.fail_together(f"step {step}: collecting rollouts"):  # see _save_on_failure
            if self.rollout is not None:
                with self._interruptible(f"step {step}'s rollout collection (a resume redoes the step)"):
                    groups, metrics = self.rollout.collect(step)
                advantages, adv_metrics = advantages_for_groups(
                    groups, self.cfg.algorithm.group_mode, self.cfg.algorithm.norm_adv_by_std,
                    self.cfg.algorithm.adv_eps)
                batch = TrainBatch.from_groups(groups, advantages, pad_id=self.rollout.pad_id)
                metrics |= adv_metrics | self.rollout.ledger.record(groups)
        return batch.broadcast(src=0, device=self.learner.device), metrics  # NCCL on GPU: the batch is large

    def evaluate(self, step: int) -> dict[str, float]:
        with platform.fail_together(f"step {step}: evaluation"):
            if self.rollout is not None and self.rollout.eval_due(step, self.cfg.steps):
                with self._interruptible(f"step {step}'s evaluation"):
                    return self.rollout.evaluate()
        return {}

    def save(self) -> None:
        state = self.rollout.state_dict() if self.rollout is not None else {}
        state = _broadcast_object(state)
        self.checkpointer.save(self.step, self.learner, state)
        self.saved_step = self.step

    def _stopping_before_sync(self, step: int) -> bool:
        """Collective: whether a stop signal reached any rank before the weight sync. Then the step skips its
        sync and evaluation: under a scheduler the rollout servers got the SIGTERM too (a sync into a server that is
        going away fails, or hangs in a broadcast), and the resumed run syncs the weights when it starts."""
        self.stop_requested = platform.any_rank(self.stop_requested)
        if self.stop_requested:
            logger.warning("%s: step %d has trained; skipping its weight sync and evaluation (the resumed run "
                           "syncs the weights when it starts)", self.stop_signal or "stop (on another rank)", step)
        return self.stop_requested

    @contextlib.contextmanager
    def _interruptible(self, phase: str):
        """On the driver, around phases that only wait on servers: a stop signal ends them at once (a rollout
        step can take longer than the grace period before SIGKILL) instead of at the end of the step."""
        self.interruptible = phase
        try:
            if self.stop_requested:  # a stop signal came just before
                raise platform.StepInterrupted(self.stop_signal or "stop")
            yield
            self.interruptible = None  # here, not only in `finally`: a signal there would escape the `except`
            if self.stop_requested:  # came during the phase, but its exception was lost (see _stop_on_signals)
                raise platform.StepInterrupted(self.stop_signal or "stop")
        except _StopNow as stop:
            raise platform.StepInterrupted(str(stop)) from None
        finally:
            self.interruptible = None

    @contextlib.contextmanager
    def _save_on_failure(self):
        """A failed or interrupted step loses no finished step: every rank hears of it, saves the last
        finished step unless it is saved already, and stops. The failed step's prompts and pool draws are not
        consumed, so a resume repeats it. An interruption (a stop signal) ends the run normally."""
        try:
            yield
        except platform.StepFailed as failure:
            interrupted, unsaved = isinstance(failure, platform.StepInterrupted), self.step > self.saved_step
            logger.log(logging.WARNING if interrupted else logging.ERROR, "%s; stopping after step %d, the last "
                       "finished one (%s; resume with checkpoint.resume=auto)", failure, self.step,
                       "saving it" if unsaved else "saved already")
            if unsaved:
                self.save()
            if not interrupted:
                raise

    @contextlib.contextmanager
    def _log_on_failure(self, step: int, metrics: dict[str, float]):
        """A step that trained but then failed or was interrupted (sync, eval) still writes its row: rollout
        and update metrics."""
        try:
            yield
        except platform.StepFailed as failure:
            outcome = "interrupted" if isinstance(failure, platform.StepInterrupted) else "failed"
            self.metrics.log(step, metrics | {f"step/{outcome}": 1.0})
            raise

    def close(self) -> None:
        self.profiler.close()
        self.metrics.close()
        if self.rollout is not None:
            self.rollout.close()


class _StepTimer:
    """Wall time per phase of one step (a named range in profiles), as timing/<phase>_s metrics, plus
    tokens/s and the learner's TFLOP/s and MFU per GPU."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        begin = time.perf_counter()
        with phase_range(phase):
            yield
        self.seconds[phase] = time.perf_counter() - begin

    def metrics(self, num_response_tokens: int, learner_flops: float, device: torch.device) -> dict[str, float]:
        total = time.perf_counter() - self.start
        out = {f"timing/{phase}_s": s for phase, s in self.seconds.items()}
        out["timing/step_s"] = total
        # response tokens sampled and trained on per second of the whole step
        out["throughput/tokens_per_s"] = num_response_tokens / total if total > 0 else 0.0
        learner_seconds = self.seconds.get("logprob", 0.0) + self.seconds.get("train", 0.0)
        return out | perf.throughput_metrics(learner_flops, learner_seconds, device)


class _StopNow(KeyboardInterrupt):
    """What the stop-signal handler raises in a phase that only waits on servers; Trainer._interruptible turns
    it into StepInterrupted. A KeyboardInterrupt, as Ctrl-C's own is, because code in those phases catches
    Exception: math-verify would score it as a wrong answer and asyncio would log it, and the step would go on."""


@contextlib.contextmanager
def _stop_on_signals(trainer: Trainer):
    """SIGTERM (preemption, scancel, the launchers) or Ctrl-C stops the driver's rollout collection or
    evaluation at once, and otherwise finishes the current step; then every rank saves and exits. Ctrl-C
    again stops at once, without saving. A SIGINT ignored on entry stays ignored: the launchers run the
    trainer so, and turn Ctrl-C into one SIGTERM."""
    passed_on_by_torchrun = os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE", "").split(",")

    def request_stop(signum, frame):
        name = signal.Signals(signum).name
        if trainer.stop_signal:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # Ctrl-C twice: the user means now
            return  # the same stop again: torchrun and the launchers pass it on; it must not interrupt the save
        trainer.stop_requested, trainer.stop_signal = True, name
        again = " (Ctrl-C again: stop now, without saving)" if signum == signal.SIGINT else ""
        if trainer.interruptible:
            logger.warning("%s: stopping %s now%s", name, trainer.interruptible, again)
        else:
            logger.warning("%s: stopping after the step in progress, with a checkpoint (the last finished step is "
                           "%d)%s", name, trainer.step, again)
        if name in passed_on_by_torchrun:  # a bare torchrun (the launchers leave stop signals to the trainer)
            logger.warning("if torchrun passed this %s on, it kills its workers %s s later "
                           "(TORCH_ELASTIC_SHUTDOWN_TIMEOUT): raise that if a checkpoint takes longer", name,
                           os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"))
        if trainer.interruptible:
            raise _StopNow(name)

    def drop_lost_stops(unraisable):
        # Python runs a signal handler wherever the main thread is, also in a finalizer or a weakref callback,
        # which cannot raise: the interpreter reports the exception there and goes on. The phase then ends
        # when its work does (Trainer._interruptible), without this traceback.
        if not isinstance(unraisable.exc_value, _StopNow):
            previous_hook(unraisable)

    handled = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        handled.append(signal.SIGINT)
    previous = {signum: signal.signal(signum, request_stop) for signum in handled}
    previous_hook, sys.unraisablehook = sys.unraisablehook, drop_lost_stops
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _broadcast_object(obj):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
