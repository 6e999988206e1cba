"""Which samples each rank trains on, expressed through one number: samples consumed.

Each epoch has one global permutation derived from (seed, epoch). Step ``k`` of the epoch
covers the global positions ``[start + k*G, start + (k+1)*G)`` of that permutation, where
``G`` is the global batch; rank ``r`` takes its contiguous slice of ``B = G / world_size``.
Because the position is global, an epoch can resume at any sample position with any world
size and no sample is skipped or seen twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

# Keeps the split's and the epochs' random streams apart for any seed.
_SPLIT_STREAM = 0x5EED
_EPOCH_STREAM = 0xE90C


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic train/validation split of ``range(n)`` (48k/12k for MNIST by default)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + _SPLIT_STREAM)
    order = torch.randperm(n, generator=generator)
    n_val = round(n * val_fraction)
    return order[n_val:].sort().values, order[:n_val].sort().values


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The global order of the ``n`` training positions in ``epoch`` (same on every rank)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + _EPOCH_STREAM) * 1_000 + epoch)
    return torch.randperm(n, generator=generator)


@dataclass(frozen=True)
class EpochPlan:
    """One rank's batches for the rest of an epoch, starting at global position ``start``."""

    permutation: torch.Tensor
    start: int
    batch_size: int
    world_size: int
    rank: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps(self) -> int:
        """Steps left; every rank gets the same count, the ragged tail is dropped."""
        return max(0, (len(self.permutation) - self.start) // self.global_batch)

    def consumed_after(self, step: int) -> int:
        """Global samples consumed in the epoch once ``step`` steps of this plan are done."""
        return self.start + step * self.global_batch

    def batches(self) -> Iterator[torch.Tensor]:
        """Positions (into the training split) of this rank's batch at each step."""
        for step in range(self.steps):
            begin = self.consumed_after(step) + self.rank * self.batch_size
            yield self.permutation[begin : begin + self.batch_size]
