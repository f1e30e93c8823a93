"""Preemption: SIGTERM / SIGUSR1 (what SLURM and Kubernetes send before killing a job) ask the
trainer to finish the current step, write a checkpoint and exit with `PREEMPTED_EXIT_CODE`, so a
wrapper can requeue the job and resume it with `--resume latest`."""

from __future__ import annotations

import signal
import threading
from types import FrameType

PREEMPTED_EXIT_CODE = 75
"""Exit status after a preemption checkpoint (75 is EX_TEMPFAIL: "try again later")."""

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):  # noqa: N818 - not an error: a requested, clean stop
    """Raised by `train` after the preemption checkpoint is written."""

    def __init__(self, step: int, checkpoint: str, signum: int) -> None:
        self.step = step
        self.checkpoint = checkpoint
        self.signum = signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint "
            f"{checkpoint}. Resume with `mmemb train RECIPE --resume latest`."
        )


class PreemptionFlag:
    """Installs the handlers on enter (main thread only) and restores the old ones on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> PreemptionFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        self._old.clear()
