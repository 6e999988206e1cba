"""A host clock that is honest about asynchronous devices."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def device_clock(device: torch.device) -> Callable[[], float]:
    """``time.perf_counter``, read once the device has run the work queued on it.

    CUDA kernels run asynchronously, so on CUDA a bare host clock would time their launch, not
    their run; waiting for the device at each reading keeps the step split honest.
    """
    if device.type != "cuda":
        return time.perf_counter

    def clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return clock
