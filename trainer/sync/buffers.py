"""Module buffers (BatchNorm's running statistics) kept as DDP keeps them, without DDP.

DDP (``broadcast_buffers=True``, its default) broadcasts rank 0's buffers at the start of a forward
pass when the previous forward pass through it was a synchronising one (grad enabled, outside
``no_sync``), and at the first. So every rank normalises a training batch with rank 0's running
statistics, then updates its own copy with its own batch; under gradient accumulation the
broadcast happens at the first micro-step of each optimiser step only. (``_pre_forward`` and
``_post_forward`` of ``torch/nn/parallel/distributed.py``: ``require_forward_param_sync``.)

The shared-memory syncs do the same at the same moments. In a training loop the gradient
exchange at the end of a synchronising backward pass falls between that forward pass and the
next one, so:

- ``BufferMirror`` (one host): at each exchange rank 0 copies its buffers into one of two
  snapshots in the shared memory before it publishes phase 1; at its next forward pass with grad
  enabled each peer copies the newest snapshot into its own buffers. A snapshot is rewritten two
  exchanges later, after every peer has entered the exchange in between (phase 1), and so after
  its copy. Costs rank 0 one write and each peer one read of the buffers per optimiser step.
- ``BufferBroadcast`` (across hosts): the same moment, through the process group's broadcast.

A model without buffers gets neither (``for_model`` returns None): nothing runs per step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.sync import shm


def named_buffers(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, name) of every buffer, read through its module each time, as DDP re-reads them (a
    module may assign a new tensor to a buffer)."""
    entries = []
    for full_name, _ in model.named_buffers():
        owner_name, _, name = full_name.rpartition(".")
        entries.append((model.get_submodule(owner_name), name))
    return entries


def _aligned(nbytes: int) -> int:
    return -(-nbytes // 64) * 64


def snapshot_bytes(model: nn.Module) -> int:
    """Shared bytes ``BufferMirror`` needs for ``model``: two snapshots of every buffer, each on a cache line."""
    return 2 * sum(_aligned(b.numel() * b.element_size()) for b in model.buffers())


class _AtSyncingForward:
    """Runs ``_refresh`` at the first forward pass with grad enabled after each gradient exchange."""

    def __init__(self, model: nn.Module) -> None:
        self.entries = named_buffers(model)
        self.exchanges = 0  # gradient exchanges so far (``exchanged``)
        self._refreshed = 0
        self._handle = model.register_forward_pre_hook(self._before_forward)

    def exchanged(self) -> None:
        """The sync calls this at each gradient exchange, before it publishes phase 1."""
        self.exchanges += 1

    def buffers(self) -> list[torch.Tensor]:
        return [module._buffers[name] for module, name in self.entries]  # type: ignore[misc]

    def _before_forward(self, _module: nn.Module, _args: Any) -> None:
        if torch.is_grad_enabled() and self._refreshed < self.exchanges:
            self._refreshed = self.exchanges
            with torch.no_grad():
                self._refresh()

    def _refresh(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._handle.remove()


class BufferMirror(_AtSyncingForward):
    """Rank 0's buffers through shared memory (module docstring), in ``region`` (``snapshot_bytes``)."""

    def __init__(self, model: nn.Module, region: torch.Tensor, rank: int) -> None:
        super().__init__(model)
        self.rank = rank
        self._snapshots: list[list[torch.Tensor]] = [[], []]
        offset = 0
        for which in (0, 1):
            for buffer in self.buffers():
                nbytes = buffer.numel() * buffer.element_size()
                view = region[offset : offset + nbytes].view(buffer.dtype).view_as(buffer)
                self._snapshots[which].append(view)
                offset += _aligned(nbytes)

    def exchanged(self) -> None:
        super().exchanged()
        if self.rank == 0:  # before phase 1, which tells the peers the snapshot is there
            with torch.no_grad():
                for snapshot, buffer in zip(self._snapshots[self.exchanges % 2], self.buffers(), strict=True):
                    snapshot.copy_(buffer)

    def _refresh(self) -> None:
        if self.rank != 0:
            for buffer, snapshot in zip(self.buffers(), self._snapshots[self.exchanges % 2], strict=True):
                buffer.copy_(snapshot)

    def close(self) -> None:
        super().close()
        self._snapshots = [[], []]  # no view may outlive the mapping


class BufferBroadcast(_AtSyncingForward):
    """Rank 0's buffers through the process group's broadcast, as DDP does (the hierarchical sync).

    Hazard: a collective inside a forward hook. Every rank runs it at the same forward pass, since
    every rank exchanges gradients at the same steps and runs its forward passes alike.
    """

    def _refresh(self) -> None:
        for buffer in self.buffers():
            dist.broadcast(buffer, src=0)


def for_model(
    model: nn.Module, reducer: shm.ShmAllreduce | None, region: torch.Tensor | None, rank: int
) -> _AtSyncingForward | None:
    """The keeper of ``model``'s buffers: a ``BufferMirror`` in ``region`` on one host (``reducer`` given),
    else a ``BufferBroadcast``; None for a model without buffers."""
    if not any(True for _ in model.buffers()):
        return None
    if reducer is not None and region is not None:
        return BufferMirror(model, region, rank)
    return BufferBroadcast(model)
