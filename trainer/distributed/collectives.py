"""Small collectives that keep every rank on the same branch: sums, maxima, agreements, barriers.

Each is the identity at world size 1 (no process group), so callers need no special case.
Hazard: every one of them is a collective, so every rank must call it at the same point, or
the ranks that did wait until ``--timeout``.
"""

from __future__ import annotations

from datetime import timedelta

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


class WriterWait:
    """Where the other ranks wait for rank 0 to finish writing (a checkpoint, the exported model).

    Rank 0 writes alone; without a meeting point the others would run ahead into the next
    gradient exchange and wait there, under ``--timeout``, failing a healthy job whenever a write
    takes longer than a gradient may. Here they meet in a monitored barrier of a gloo group of its
    own: the others wait for rank 0 up to ``--checkpoint-timeout``, and a wait that runs out says
    it was rank 0's write they waited for; rank 0, which arrives last, waits for them only
    ``--timeout``, and names those that did not come. Made on every rank at the same point
    (``new_group`` is a collective).
    """

    def __init__(self, timeout_s: float, peer_timeout_s: float) -> None:
        self.timeout_s, self.peer_timeout_s = timeout_s, peer_timeout_s
        # The group's own timeout bounds the others' wait for rank 0's answer.
        self.group = (
            dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if dist.is_initialized() else None
        )

    def wait(self, what: str) -> None:
        """Every rank, once rank 0 has finished writing ``what`` (or given up on it)."""
        if self.group is None:
            return
        writer = dist.get_rank() == 0
        limit = timedelta(seconds=self.peer_timeout_s if writer else self.timeout_s)
        try:
            dist.monitored_barrier(group=self.group, timeout=limit, wait_all_ranks=True)
        except (RuntimeError, dist.DistError) as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if writer:
                raise dist.DistError(f"after writing {what}, the other ranks did not all arrive: {detail}") from exc
            raise dist.DistError(
                f"rank 0 did not finish writing {what} within --checkpoint-timeout {self.timeout_s:g} s, "
                f"or is gone ({detail})"
            ) from exc
