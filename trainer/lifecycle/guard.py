"""No divergence goes unnoticed: a non-finite loss or gradient on any rank stops (or skips) the step on all ranks.

The check costs no collective of its own under the exact gradient syncs:

- At world size 1 the loss joins the one read of every gradient (``grads_finite``).
- Under the shared-memory sync on one host (``--comm shm``/``auto``), the sync itself finds out:
  each rank checks the chunk of the averaged gradient it reduced, and its own loss, and the ranks
  read each other's verdicts off the shared memory (``trainer.sync.shm``). No gradient is read again.
- Under the other syncs every rank multiplies its loss by 1 before the backward pass, or by NaN
  when the loss is not finite (``poison_nonfinite``): then its gradients are NaN, and the averaged
  gradient that each rank receives is non-finite on every rank when any rank's contribution was
  (NaN + x = NaN, Inf + finite = Inf, Inf + -Inf = NaN; a sum that overflows is Inf); each rank
  then reads it (``grads_finite``). Multiplying by 1 changes no bit of the gradients.

All ranks see the same averaged gradient and the same verdict, so all take the same branch at the
same step. Local SGD (``--comm localsgd``) stops averaging gradients after its warm-up, so there
the ranks vote with one small all-reduce per step.

``--on-nonfinite stop`` (default) ends the run with ``DIVERGED_EXIT_CODE``; ``skip`` drops the
update (no optimiser step, so momentum does not move either) and counts it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from trainer.lifecycle.checkpoint import list_checkpoints

# The process's exit status after divergence: neither success nor bad input (2), nor a signal (128+N).
DIVERGED_EXIT_CODE = 3


class Diverged(Exception):
    """Raised on every rank at the step whose loss or gradient was not finite; the message is one line."""

    def __init__(self, step: int, checkpoint_dir: Path) -> None:
        newest = next((p for p in list_checkpoints(checkpoint_dir) if p.with_suffix(".json").exists()), None)
        good = f"newest good checkpoint {newest}" if newest else "no checkpoint was written yet"
        super().__init__(
            f"loss or gradient not finite at step {step} (on at least one rank); the update was not applied and "
            f"no checkpoint of it written; {good}. Lower --lr, or add --on-nonfinite skip to skip such steps"
        )
        self.step = step


def poison_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` times 1, or times NaN when it is not finite, so its gradients carry the verdict into the sync."""
    return loss * torch.where(torch.isfinite(loss), 1.0, float("nan"))


def grads_finite(params: Iterable[torch.Tensor], loss: torch.Tensor | None = None) -> bool:
    """Whether every gradient (and ``loss``, if given) is finite (read-only). The host reads one value
    per step; on CUDA the step's clock synchronises anyway (a captured step uses ``grads_finite_tensor``
    and reads none)."""
    return bool(grads_finite_tensor(params, loss))


def grads_finite_tensor(params: Iterable[torch.Tensor], loss: torch.Tensor | None = None) -> torch.Tensor:
    """``grads_finite`` as a 0-dim bool tensor on the gradients' device: one sum per tensor, which NaN
    and Inf propagate through."""
    sums = [p.grad.sum() for p in params if p.grad is not None]
    if loss is not None:
        sums.append(loss.detach().reshape(()))
    if not sums:
        return torch.tensor(True)
    return torch.isfinite(torch.stack(sums).sum())


def all_finite(tree: Any) -> bool:
    """Whether every floating-point tensor in a nested dict/list (a model or optimiser state) is finite."""
    if isinstance(tree, torch.Tensor):
        return not tree.is_floating_point() or bool(torch.isfinite(tree).all())
    if isinstance(tree, dict):
        return all(all_finite(value) for value in tree.values())
    if isinstance(tree, list | tuple):
        return all(all_finite(value) for value in tree)
    return True
