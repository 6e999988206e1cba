"""A task's loss and metrics over a split: one computation for training, export and ``trainer evaluate``.

Sharing it is what makes ``trainer evaluate`` reproduce ``summary.json``: the same positions in
the same chunks give the same outputs, so the same sums.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trainer.core.errors import UsageError
from trainer.core.task import Split, Task


@torch.no_grad()
def evaluate_split(task: Task, model: nn.Module, split: Split, begin: int = 0, end: int | None = None) -> list[float]:
    """Sums over positions ``[begin, end)`` of the loss and of each of ``task.metrics``, weighted by
    each chunk's size (``task.eval_batch_size`` positions a chunk).

    The model is in eval mode meanwhile and gets its previous mode back.
    """
    end = len(split) if end is None else end
    was_training = model.training
    model.eval()
    sums = [0.0] * (1 + len(task.metrics))
    device = next(model.parameters()).device
    for chunk in range(begin, end, task.eval_batch_size):
        stop = min(end, chunk + task.eval_batch_size)
        loss, metrics = task.loss(model, split.batch(torch.arange(chunk, stop, device=device)))
        for index, value in enumerate((loss, *(metrics[name] for name in task.metrics))):
            sums[index] += float(value) * (stop - chunk)
    model.train(was_training)
    return sums


def split_figures(task: Task, model: nn.Module, split: Split, prefix: str) -> dict[str, float]:
    """``{prefix}_loss`` and ``{prefix}_{metric}`` over a whole split in one process (what a
    one-process run's evaluation returns)."""
    sums = evaluate_split(task, model, split)
    names = ("loss", *task.metrics)
    return {f"{prefix}_{name}": total / len(split) for name, total in zip(names, sums, strict=True)}


def step_figures(task: Task, loss: torch.Tensor, metrics: Any) -> torch.Tensor:
    """The step's loss and the task's metrics, in ``task.metrics`` order, as one float64 tensor."""
    if set(metrics) != set(task.metrics):
        raise UsageError(
            f"{type(task).__name__}.loss returned metrics {sorted(metrics)}, but {type(task).__name__}.metrics "
            f"names {sorted(task.metrics)}; make the two agree"
        )
    return torch.stack([loss.detach().double(), *(metrics[name].detach().double() for name in task.metrics)])
