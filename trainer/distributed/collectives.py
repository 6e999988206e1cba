"""Small collectives that keep every rank on the same branch: sums, maxima, agreements, barriers.

Each is the identity at world size 1 (no process group), so callers need no special case.
Hazard: every one of them is a collective, so every rank must call it at the same point, or
the ranks that did wait until ``--timeout``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from trainer.core.errors import UsageError


def _all_reduce(values: list[float], device: torch.device, op: dist.ReduceOp.RedOpType) -> list[float]:
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum across ranks."""
    return _all_reduce(values, device, dist.ReduceOp.SUM)


def reduce_max(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum across ranks."""
    return _all_reduce(values, device, dist.ReduceOp.MAX)


def gather_floats(values: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's ``values`` (the same length on all), indexed by rank, on every rank."""
    if not dist.is_initialized():
        return [values]
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return [t.tolist() for t in gathered]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any rank (so all ranks take the same branch)."""
    return reduce_max([float(flag)], device)[0] > 0


def agree_to_start(reason: str | None, device: torch.device) -> None:
    """Every rank stops if any rank found a reason to; no rank is left waiting in a collective."""
    if any_rank(reason is not None, device):
        raise UsageError(reason or "another rank refused to start; see rank 0's error")


def agree_on_step(step: int, device: torch.device) -> None:
    """Every rank must resume from the same step (else the checkpoint directory is not shared)."""
    highest, negated_lowest = reduce_max([float(step), -float(step)], device)
    if highest != -negated_lowest:
        raise UsageError(
            "the ranks found different checkpoints to resume from; --checkpoint-dir must be one directory that "
            "every node can read (shared storage)"
        )


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
