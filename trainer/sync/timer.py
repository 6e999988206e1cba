"""Timing of the gradient sync where it happens (see trainer/sync/comm.py)."""

# No `from __future__ import annotations` here: DDP checks the hook's annotations at runtime.
import functools
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

Hook = Callable[[dist.GradBucket], torch.futures.Future]


Mark = float | torch.cuda.Event


class SyncTimer:
    """Records the sync window of each backward pass: first hook entry to last hook completion.

    On CUDA the window is read off CUDA events: nccl's futures complete once the all-reduce is
    queued, so a host clock would time the queueing, not the communication.
    """

    def __init__(self) -> None:
        self._first_launch: Mark | None = None
        self._last_done: Mark = 0.0
        self._extra_ms = 0.0
        self.exchanges = 0  # gradient exchanges so far (one per synced backward pass, not per bucket)

    def timed(self, hook: Hook) -> Callable:
        """A DDP communication hook that runs ``hook(bucket)`` and times it."""

        def timed_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
            on_cuda = bucket.buffer().is_cuda
            if bucket.index() == 0:
                self.exchanges += 1
            if self._first_launch is None:
                self._first_launch = _mark(on_cuda)
            return hook(bucket).then(functools.partial(self._finished, on_cuda))

        return timed_hook

    def _finished(self, on_cuda: bool, done: torch.futures.Future) -> torch.Tensor:
        # On CUDA this runs on a stream that waits for the all-reduce, so the event marks its end.
        self._last_done = _mark(on_cuda)
        return done.value()

    def add_ms(self, ms: float) -> None:
        """Count communication done outside the hooks (parameter averaging) in this step's sync."""
        self._extra_ms += ms

    def take_ms(self) -> float:
        """Milliseconds of sync since the previous call (on CUDA, waits for the last all-reduce)."""
        elapsed = self._extra_ms
        self._extra_ms = 0.0
        first, last = self._first_launch, self._last_done
        if isinstance(first, torch.cuda.Event) and isinstance(last, torch.cuda.Event):
            last.synchronize()
            elapsed += max(0.0, first.elapsed_time(last))
        elif isinstance(first, float) and isinstance(last, float):
            elapsed += max(0.0, last - first) * 1000.0
        self._first_launch = None
        return elapsed


def _mark(on_cuda: bool) -> Mark:
    """Now: a host clock reading, or a CUDA event queued on the current stream."""
    if not on_cuda:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event
