"""RunControl: when a run stops, and what it saves first. The training loop asks it; nothing else in the
trainer handles signals or failures.

What stops a run:
  - the plan: `steps`, or `checkpoint.exit_interval` steps after this launch started (a Slurm time slice);
  - a stop signal: SIGTERM (preemption, scancel, the launchers) or Ctrl-C. It ends a phase that only waits on
    servers (the driver's rollout collection or evaluation) at once, anything else at the end of the step,
    which then skips its weight sync (the servers are stopping too; the resumed run syncs when it starts).
    Ctrl-C again stops at once, without saving. A SIGINT ignored on entry stays ignored: the launchers run
    the trainer so, and turn Ctrl-C into one SIGTERM;
  - a failed step (an unreachable server, a broken reward pool...) on any rank.
Every rank agrees on the stop, saves the last finished step unless it is saved, and ends together: a failed
phase raises `StepFailed` on every rank (`phase`) instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from typing import Callable, Iterator, Optional

from megatron_s2l import platform

logger = logging.getLogger(__name__)


class StepFailed(RuntimeError):
    """A step failed on some rank. Every rank raises it, so that all of them save the last finished step and
    stop together instead of waiting in a collective."""


class StepInterrupted(StepFailed):
    """A stop signal ended a phase that only waits on servers: a requested stop, not an error. The resumed run
    redoes the step."""


class _StopNow(KeyboardInterrupt):
    """What the signal handler raises inside an interruptible phase; `RunControl.phase` turns it into
    StepInterrupted. A KeyboardInterrupt, as Ctrl-C's own is, because code in those phases catches Exception:
    math-verify would score it as a wrong answer and asyncio would log it, and the step would go on."""


class RunControl:
    """Stop signals, the stop every rank agrees on, interruptible phases and save-on-failure for one run."""

    # config
    exit_interval: int  # stop this many steps after the launch (0: never)
    is_driver: bool  # only the driver waits on servers, so only its phases end at once on a signal
    # state
    stop_requested: bool
    stop_signal: Optional[str]  # "SIGTERM", "SIGINT" (Ctrl-C), or None (no signal, or the plan)
    finished_step: int  # the last step the learner finished
    saved_step: int
    interruptible: Optional[str]  # the phase in progress, while it only waits on servers

    def __init__(self, exit_interval: int = 0, is_driver: Optional[bool] = None):
        self.exit_interval = exit_interval
        self.is_driver = platform.is_rank0() if is_driver is None else is_driver
        self.stop_requested, self.stop_signal, self.interruptible = False, None, None
        self.finished_step = self.saved_step = self._start_step = 0

    # ---------------------------------------------------------------------------------- the run

    @contextlib.contextmanager
    def running(self, save: Callable[[], None]) -> Iterator[None]:
        """Around the whole run: stop signals are handled, and a failed or interrupted step loses no finished
        step: `save()` runs unless that step is saved, then a failure propagates and an interruption ends the
        run normally. The failed step's prompts and pool draws are not consumed, so a resume repeats it."""
        with _stop_on_signals(self):
            try:
                yield
            except StepFailed as failure:
                interrupted, unsaved = isinstance(failure, StepInterrupted), self.finished_step > self.saved_step
                logger.log(logging.WARNING if interrupted else logging.ERROR, "%s; stopping after step %d, the "
                           "last finished one (%s; resume with checkpoint.resume=auto)", failure, self.finished_step,
                           "saving it" if unsaved else "saved already")
                if unsaved:
                    save()
                if not interrupted:
                    raise

    def resumed(self, step: int) -> None:
        """The run continues from checkpoint `step`; exit_interval counts from here."""
        self.finished_step = self.saved_step = self._start_step = step

    def finished(self, step: int) -> None:
        """The learner has finished `step`: a checkpoint from here on saves it."""
        self.finished_step = step

    def saved(self, step: int) -> None:
        self.saved_step = step

    def stop_before_sync(self) -> bool:
        """Collective: whether a stop signal reached any rank before the weight sync. Then the step skips its
        sync and evaluation: under a scheduler the rollout servers got the SIGTERM too (a sync into a server
        that is going away fails, or hangs in a broadcast), and the resumed run syncs when it starts."""
        self.stop_requested = platform.any_rank(self.stop_requested)
        if self.stop_requested:
            logger.warning("%s: step %d has trained; skipping its weight sync and evaluation (the resumed run "
                           "syncs the weights when it starts)", self.stop_signal or "stop (on another rank)",
                           self.finished_step)
        return self.stop_requested

    def stop_after(self, step: int) -> bool:
        """Collective: every rank goes on after `step`, or none does (a signal may reach the ranks at different
        moments; one that comes after this is seen in the next step). True at the exit interval too."""
        exit_now = bool(self.exit_interval) and step == self._start_step + self.exit_interval
        return platform.any_rank(self.stop_requested) or exit_now

    # ---------------------------------------------------------------------------------- phases

    @contextlib.contextmanager
    def phase(self, what: str) -> Iterator[None]:
        """A phase that may fail on one rank (collective at its end): if it raised anywhere, every rank raises
        StepFailed, or StepInterrupted if it was only interrupted. On the driver a stop signal ends the phase
        at once, since it only waits on servers (a rollout step can outlast the grace period before SIGKILL)."""
        with fail_together(what):
            if not self.is_driver:
                yield
                return
            with self._interruptible(what):
                yield

    @contextlib.contextmanager
    def _interruptible(self, what: str) -> Iterator[None]:
        self.interruptible = what
        try:
            if self.stop_requested:  # a stop signal came just before
                raise StepInterrupted(self.stop_signal or "stop")
            yield
            self.interruptible = None  # here, not only in `finally`: a signal there would escape the `except`
            if self.stop_requested:  # came during the phase, but its exception was lost (see _stop_on_signals)
                raise StepInterrupted(self.stop_signal or "stop")
        except _StopNow as stop:
            raise StepInterrupted(str(stop)) from None
        finally:
            self.interruptible = None

    @contextlib.contextmanager
    def log_on_failure(self, log: Callable[[str], None]) -> Iterator[None]:
        """A step that trained but then failed or was interrupted (sync, eval) still writes its row:
        `log("step/failed")` or `log("step/interrupted")`."""
        try:
            yield
        except StepFailed as failure:
            log("step/interrupted" if isinstance(failure, StepInterrupted) else "step/failed")
            raise


@contextlib.contextmanager
def fail_together(what: str) -> Iterator[None]:
    """Collective, at the end of the block: if it raised on any rank, raise StepFailed (StepInterrupted if it
    was only interrupted) on every rank, chained to the error on the rank where it happened. Ranks may wait
    here for the driver as long as `parallel.driver_wait_minutes`."""
    error = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - the other ranks must hear of it
        error = exc
    # 0: fine, 1: interrupted, 2: failed (a failure anywhere outranks an interruption)
    status = 0 if error is None else 1 if isinstance(error, StepInterrupted) else 2
    status = platform.max_over_ranks([status], platform.driver_wait_group())[0]
    if status == 0:
        return
    kind, outcome = (StepInterrupted, "interrupted") if status == 1 else (StepFailed, "failed")
    if error is not None:
        raise kind(f"{what} {outcome}: {type(error).__name__}: {error}") from error
    raise kind(f"{what} {outcome} on another rank; the reason is in that rank's output")



@contextlib.contextmanager
def _stop_on_signals(control: RunControl) -> Iterator[None]:
    """Installs the handlers for SIGTERM and (unless ignored) SIGINT for the life of the run."""
    passed_on_by_torchrun = os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE", "").split(",")

    def request_stop(signum, frame):
        name = signal.Signals(signum).name
        if control.stop_signal:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # Ctrl-C twice: the user means now
            return  # the same stop again: torchrun and the launchers pass it on; it must not interrupt the save
        control.stop_requested, control.stop_signal = True, name
        again = " (Ctrl-C again: stop now, without saving)" if signum == signal.SIGINT else ""
        if control.interruptible:
            logger.warning("%s: stopping now, in %s (a wait on servers)%s", name, control.interruptible, again)
        else:
            logger.warning("%s: stopping after the step in progress, with a checkpoint (the last finished step is "
                           "%d)%s", name, control.finished_step, again)
        if name in passed_on_by_torchrun:  # a bare torchrun (the launchers leave stop signals to the trainer)
            logger.warning("if torchrun passed this %s on, it kills its workers %s s later "
                           "(TORCH_ELASTIC_SHUTDOWN_TIMEOUT): raise that if a checkpoint takes longer", name,
                           os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"))
        if control.interruptible:
            raise _StopNow(name)

    def drop_lost_stops(unraisable):
        # Python runs a signal handler wherever the main thread is, also in a finalizer or a weakref callback,
        # which cannot raise: the interpreter reports the exception there and goes on. The phase then ends
        # when its work does (RunControl._interruptible), without this traceback.
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
