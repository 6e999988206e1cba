"""The MNIST task, except that rank 1 blocks forever inside a native call at its fifth step.

``os.read`` on a pipe that nobody writes to: the training thread never returns to Python (it
releases the GIL, so the watchdog thread runs), as a rank stuck in a driver, a collective or a
file system would be."""

from __future__ import annotations

import os

import torch.distributed as dist
from torch import nn

from trainer.core.task import Batch, StepResult
from trainer.tasks.mnist_mlp import MnistMLP

BLOCK_AT = 5


class Task(MnistMLP):
    name = "mnist-blocking"
    calls = 0  # training losses computed by this rank

    def loss(self, model: nn.Module, batch: Batch) -> StepResult:
        if not model.training:
            return super().loss(model, batch)
        self.calls += 1
        if self.calls == BLOCK_AT and dist.is_initialized() and dist.get_rank() == 1:
            never_written, _ = os.pipe()
            os.read(never_written, 1)
        return super().loss(model, batch)
