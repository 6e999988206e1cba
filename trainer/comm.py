"""Gradient synchronisation: DDP wrapping and a communication hook that times the all-reduce.

Sync time is measured where it happens: the hook notes when each bucket's all-reduce is
launched and when its future completes, so the figure is communication, not inferred
from wall time.
"""

# No `from __future__ import annotations` here: DDP checks the hook's annotations at runtime.
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class SyncTimer:
    """DDP communication hook wrapper recording the all-reduce window of each backward pass."""

    def __init__(self) -> None:
        self._first_launch: float | None = None
        self._last_done = 0.0

    def hook(
        self, process_group: dist.ProcessGroup | None, bucket: dist.GradBucket
    ) -> torch.futures.Future[torch.Tensor]:
        launched = time.perf_counter()
        if self._first_launch is None:
            self._first_launch = launched
        group = process_group if process_group is not None else dist.group.WORLD
        # Same arithmetic as DDP's default hook: pre-divide, then sum.
        tensor = bucket.buffer().div_(dist.get_world_size(group))
        future = dist.all_reduce(tensor, group=group, async_op=True).get_future()

        def finished(done: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
            self._last_done = time.perf_counter()
            return done.value()[0]

        return future.then(finished)

    def take_ms(self) -> float:
        """Milliseconds from the first launch to the last completion since the previous call."""
        if self._first_launch is None:
            return 0.0
        elapsed = max(0.0, self._last_done - self._first_launch) * 1000.0
        self._first_launch = None
        return elapsed


def wrap_model(model: nn.Module, device: torch.device, distributed: bool) -> tuple[nn.Module, SyncTimer | None]:
    """DDP with the timing hook when distributed; the bare model (and no timer) otherwise."""
    if not distributed:
        return model, None
    ddp = DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        # Gradients live in the communication buckets: no copy in or out each step.
        gradient_as_bucket_view=True,
    )
    timer = SyncTimer()
    ddp.register_comm_hook(None, timer.hook)
    return ddp, timer
