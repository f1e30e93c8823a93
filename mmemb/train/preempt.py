"""Signals during `mmemb train`, in every phase.

- SIGTERM / SIGUSR1 (what SLURM and Kubernetes send before killing a job): exit status
  `PREEMPTED_EXIT_CODE` (75, "requeue me").
- SIGINT (Ctrl-C): exit status `INTERRUPTED_EXIT_CODE` (130, as a shell reports it).

While steps run, a signal is only recorded: the current step finishes, a checkpoint is written and
then `Preempted` / `Interrupted` is raised (a second Ctrl-C stops at once, keeping the previous
checkpoint). In every other phase (preparing data, building the model, evaluating, saving the
model) the signal raises at once: those phases have nothing worth finishing, and whatever they
write is staged and renamed, so an interrupted phase is redone by the rerun.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

PREEMPTED_EXIT_CODE = 75
"""After SIGTERM/SIGUSR1 (75 is EX_TEMPFAIL: "try again later")."""
INTERRUPTED_EXIT_CODE = 130
"""After SIGINT (Ctrl-C): 128 + 2, what a shell reports for a process ended by SIGINT."""

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
SIGNALS = (*PREEMPT_SIGNALS, signal.SIGINT)


class Stopped(BaseException):  # noqa: N818 - a requested stop, not an error
    """A signal stopped the run. A BaseException (like KeyboardInterrupt), so no library's
    ``except Exception`` swallows it. `checkpoint` is the newest checkpoint of the run (written
    on the way out when steps were running), or None when there is none yet."""

    exit_code = 1

    def __init__(self, signum: int, *, phase: str, step: int | None = None,
                 checkpoint: str | None = None) -> None:
        self.signum = signum
        self.phase = phase
        self.step = step
        self.checkpoint = checkpoint
        name = signal.Signals(signum).name
        where = f"after step {step}" if phase == "training" else f"while {phase}"
        kept = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint yet"
        super().__init__(f"stopped by {name} {where}; {kept}.")


class Preempted(Stopped):
    """SIGTERM/SIGUSR1: exit 75 so that a wrapper requeues the job (`--resume auto`)."""

    exit_code = PREEMPTED_EXIT_CODE


class Interrupted(Stopped):
    """SIGINT (Ctrl-C): exit 130."""

    exit_code = INTERRUPTED_EXIT_CODE


def stop_for(signum: int, **kwargs: object) -> Stopped:
    cls = Interrupted if signum == signal.SIGINT else Preempted
    return cls(signum, **kwargs)  # type: ignore[arg-type]


class SignalGuard:
    """Owns SIGTERM, SIGUSR1 and SIGINT for the length of a run (main thread only; elsewhere a
    no-op). `phase(name)` names what is running for messages; `steps()` switches to recording
    signals instead of raising, for the training loop to stop at a step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.phase_name = "starting"
        self.deferred = False
        self.last_checkpoint: str | None = None
        self._old: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.deferred:
            if signum == signal.SIGINT and self.signum == signal.SIGINT:
                # Ctrl-C twice: the user does not want to wait for the step to finish.
                raise Interrupted(signum, phase="finishing a step (second Ctrl-C)",
                                  checkpoint=self.last_checkpoint)
            if self.signum is None or signum == signal.SIGINT:
                self.signum = signum
            return
        raise stop_for(signum, phase=self.phase_name, checkpoint=self.last_checkpoint)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Run a block that a signal ends at once, named `name` in the message."""
        old = self.phase_name
        self.phase_name = name
        try:
            yield
        finally:
            self.phase_name = old

    @contextmanager
    def interruptible(self, name: str) -> Iterator[None]:
        """Inside the loop, run a block that a signal ends at once (raising `Stopped`): the
        caller catches it and stops at the step boundary as for a recorded signal."""
        old = (self.phase_name, self.deferred)
        self.phase_name, self.deferred = name, False
        try:
            yield
        finally:
            self.phase_name, self.deferred = old

    @contextmanager
    def steps(self) -> Iterator[SignalGuard]:
        """Run the training loop: signals are recorded, the loop checks `requested`."""
        old = (self.phase_name, self.deferred)
        self.phase_name, self.deferred = "training", True
        try:
            yield self
        finally:
            self.phase_name, self.deferred = old
        if self.signum is not None:  # arrived after the last step's check: stop now
            pending, self.signum = self.signum, None
            raise stop_for(pending, phase="finishing training", checkpoint=self.last_checkpoint)

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        self._old.clear()
