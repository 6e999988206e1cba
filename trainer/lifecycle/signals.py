"""Graceful stop on SIGTERM/SIGINT: finish the step, checkpoint, exit non-zero; a second signal exits at once.

Schedulers (Slurm ``--signal``, Kubernetes, torchrun's own shutdown) send SIGTERM and wait a grace
period before SIGKILL. The handler only records the request; the loop honours it at its next
agreement point, where all ranks learn of it together (a signal may reach only one of them).
"""

from __future__ import annotations

import os
import signal
import time
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A repeat this soon after the first signal is the same stop delivered twice, not a second request.
REPEAT_WINDOW_S = 1.0


class StopRequested(Exception):
    """Raised on every rank once a stop was agreed and the checkpoint is written."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for "ended by signal N"


class StopSignal:
    """Records the first SIGTERM/SIGINT; a second one (a second or more later) gets the default action: exit now."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.signum is not None and now - self._first_at < REPEAT_WINDOW_S:
            return  # the same request arriving twice, e.g. from the scheduler and again through torchrun
        if self.signum is not None:
            os.write(2, f"trainer: second {name}, exiting now without a checkpoint\n".encode())
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum, self._first_at = signum, now
        # os.write, not logging: a handler may interrupt a logging call that holds the handler's lock.
        os.write(2, f"trainer: {name} received; stopping at the next checkpoint point (again to exit now)\n".encode())
