"""Loss and accuracy of a model over a split: one computation for training, export and ``trainer evaluate``.

Sharing it is what makes ``trainer evaluate`` reproduce ``summary.json``: the same rows in the
same chunks give the same logits, so the same predictions and the same sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Rows per forward pass: large enough to be quick, small enough to bound the memory of the logits.
EVAL_BATCH = 4096


@torch.no_grad()
def loss_and_correct(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, begin: int = 0, end: int | None = None
) -> tuple[float, float]:
    """Summed cross-entropy and number of correct predictions over rows ``[begin, end)``, ``EVAL_BATCH`` at a time.

    The model is in eval mode meanwhile and gets its previous mode back.
    """
    end = len(inputs) if end is None else end
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0.0
    for chunk in range(begin, end, EVAL_BATCH):
        stop = min(end, chunk + EVAL_BATCH)
        logits = model(inputs[chunk:stop])
        loss_sum += float(F.cross_entropy(logits, targets[chunk:stop], reduction="sum"))
        correct += float((logits.argmax(dim=1) == targets[chunk:stop]).sum())
    model.train(was_training)
    return loss_sum, correct


def split_metrics(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(mean loss, accuracy) over a whole split in one process; what a one-process run's ``evaluate`` returns."""
    loss_sum, correct = loss_and_correct(model, inputs, targets)
    return loss_sum / len(inputs), correct / len(inputs)
