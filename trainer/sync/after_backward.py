"""A callback run once at the end of every backward pass, after every gradient has been accumulated."""

from __future__ import annotations

from collections.abc import Callable

import torch


class AfterBackward:
    """Runs ``callback`` once at the end of each backward pass that accumulates a gradient into any of
    ``params``: where DDP's reducer would all-reduce, with every ``.grad`` final.

    The first parameter whose gradient is accumulated queues the callback with the autograd
    engine, which runs it when the whole pass has finished (so it sees every gradient of the pass,
    and parameters the pass did not reach keep ``.grad`` as it was).
    """

    def __init__(self, params: list[torch.Tensor], callback: Callable[[], None]) -> None:
        self._callback = callback
        self._queued = False
        self._handles = [p.register_post_accumulate_grad_hook(self._grad_ready) for p in params]

    def _grad_ready(self, _param: torch.Tensor) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._run)

    def _run(self) -> None:
        self._queued = False
        self._callback()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
