"""One copy of the weights and the optimiser state per host, each rank updating its own share.

Under ``ShmGradientSync`` every rank receives the whole averaged gradient and then runs the same
optimiser step on the same numbers as its peers: N copies of one update, and about 2.75 copies
of the gradients through memory per rank each step (docs/performance.md). On one host the ranks
can instead share the weights themselves (ZeRO's split of the optimiser step; with one shared
copy of the weights, no all-gather of them is needed):

1. the parameters and the optimiser's state live in one shared mapping; each parameter's
   ``.data`` is a view of it, so every rank's forward pass reads the same weights;
2. at the end of the backward pass each rank writes its terms of the average (``g / N``) for the
   chunks its peers own into its slot (phase 1), sums its own chunk of the average into memory of
   its own, in the order the gradient sync uses (its own term first, then rank order), and
   publishes the chunk's sum beside its flag (phase 2). Every rank reads every chunk's sum: the
   divergence guard's verdict, the same on every rank (trainer/lifecycle/guard.py);
3. ``update`` runs the optimiser's own arithmetic, with its hyper-parameters, on this rank's
   chunk of the weights and of the momentum, publishes phase 3 and returns once every rank has,
   so nothing reads a weight while a peer still writes it.

The numbers are those of ``ShmGradientSync``: the averaged gradient has the same bits (so, at
world size 2, gloo's), and the optimiser's kernels are element-wise, so an element gets the same
update whichever rank computes it. Each parameter starts on a cache line and chunks are cut at
multiples of 16 of its elements, so no element moves between a kernel's vectorised body and its
scalar tail.

What code around it sees differently: a parameter's ``.grad`` holds this rank's own gradient, not
the average (no rank ever holds the whole average), so ``supported`` sends what needs the whole
average on every rank (gradient clipping) and optimisers other than ``torch.optim.SGD`` to
``ShmGradientSync``. The flag protocol, its memory-order argument and the peer-death checks are
``trainer.sync.shm``'s: phases 1 and 2 are ``ShmAllreduce.reduce_scatter`` on a reducer of its own, and
this module adds phase 3.
"""

from __future__ import annotations

import mmap
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.sgd import sgd

from trainer.core.config import TrainConfig
from trainer.sync import shm
from trainer.sync.after_backward import AfterBackward
from trainer.sync.timer import SyncTimer


def recipe_reason(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> str | None:
    """Why the run's recipe needs the whole averaged gradient on every rank (so no shared step), or None."""
    if cfg.shared_step == "off":
        return "--shared-step off"
    if cfg.clip_grad_norm is not None:
        return "--clip-grad-norm needs the whole averaged gradient on every rank"
    if type(optimizer) is not torch.optim.SGD:
        return f"the task's optimiser {type(optimizer).__name__} runs its own step on every rank (only SGD is shared)"
    if len(optimizer.param_groups) != 1:
        return "the optimiser has several parameter groups (the shared step runs one)"
    return None


def aligned_offsets(sizes: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """Where each tensor of ``sizes`` starts in a flat vector where each starts on a cache line, and its length."""
    offsets, at = [], 0
    for size in sizes:
        offsets.append(at)
        at += -(-size // shm.CHUNK_ALIGN) * shm.CHUNK_ALIGN
    return tuple(offsets), at


def open_shared_step(
    model: nn.Module, group: dist.ProcessGroup, timeout_s: float, timer: SyncTimer
) -> tuple[SharedStep | None, str]:
    """This rank's ``SharedStep`` for ``model``, or None and why; collective over ``group``, not yet
    agreed (the caller passes the error to ``shm.agree``, then calls ``share_weights``)."""
    rank = dist.get_rank()
    sizes = tuple(p.numel() for p in model.parameters() if p.requires_grad)
    _, total = aligned_offsets(sizes)
    reducer, error = shm.open_reducer(group, total, timeout_s)
    # The weights and the momentum, one float32 vector each; every rank reaches this collective.
    mapping, fd, mapping_error, _ = shm.open_shared_mapping(group, 2 * total * 4, rank)
    error = error or mapping_error
    step = None
    if reducer is not None and mapping is not None and not error:
        try:
            step = SharedStep(model, reducer, mapping, fd, timer)
        except Exception as exc:
            error = shm.describe(rank, "setting up the shared optimiser step", exc)
    if step is None:
        if reducer is not None:
            reducer.close()
        shm.release(mapping, fd)
    return step, error


class SharedStep:
    """The gradient sync and the optimiser step of one host's ranks, on weights they share (module
    docstring). Made by ``open_shared_step``; offers what the trainer reads of ``ShmGradientSync``
    (``tells_finite``, ``loss_finite``, ``finite``, ``close``) and ``update``, which replaces
    ``optimizer.step()``.
    """

    tells_finite = True  # each rank checks the chunk it reduced: the verdict covers every gradient

    def __init__(
        self, model: nn.Module, reducer: shm.ShmAllreduce, mapping: mmap.mmap, fd: int, timer: SyncTimer
    ) -> None:
        self.reducer, self.timer = reducer, timer
        self.params = [p for p in model.parameters() if p.requires_grad]
        sizes = tuple(p.numel() for p in self.params)
        offsets, total = aligned_offsets(sizes)
        rank, world = reducer.rank, reducer.world_size
        bounds = shm.chunk_bounds(total, world)
        spans = shm.plan_spans(sizes, bounds, offsets)
        lo, hi = bounds[rank]
        self._map, self._fd = mapping, fd
        # One storage per tensor (not views of one big one), so a checkpoint saves just its bytes.
        self.weights = [self._shared(o, p) for o, p in zip(offsets, self.params, strict=True)]
        self.momentum = [self._shared(total + o, p) for o, p in zip(offsets, self.params, strict=True)]
        # This rank's chunk of the average; padding between tensors stays zero (the slots' is too).
        self.average = torch.zeros(hi - lo)
        self._plans = reducer.plan(spans, (lo, hi), total, own=self.average)
        self._own = [s for s in spans if s.owner == rank]
        self._own_average = [self.average[s.offset - lo : s.offset - lo + s.end - s.begin] for s in self._own]
        self._own_weights = [self.weights[s.index].view(-1)[s.begin : s.end] for s in self._own]
        self._own_momentum = [self.momentum[s.index].view(-1)[s.begin : s.end] for s in self._own]
        self._generation = 0  # the number of the last sync, whose phase 3 ``update`` publishes
        self._optimizer: torch.optim.Optimizer | None = None  # the one ``update`` has checked
        self.loss_finite = True  # the trainer's verdict on its loss, set before each backward pass
        self.finite: bool | None = None  # the last sync's verdict, the same on every rank
        self._after_backward = AfterBackward(self.params, self._sync)

    def _shared(self, offset: int, like: torch.Tensor) -> torch.Tensor:
        return torch.frombuffer(self._map, dtype=torch.float32, offset=offset * 4, count=like.numel()).view_as(like)

    @torch.no_grad()
    def share_weights(self, group: dist.ProcessGroup) -> None:
        """Rank 0's weights go into the shared copy, and every rank's parameters become views of it
        (DDP's broadcast of rank 0's weights, done once for all). Collective over ``group``."""
        if self.reducer.rank == 0:
            for shared, p in zip(self.weights, self.params, strict=True):
                shared.copy_(p)
        dist.barrier(group=group)
        for shared, p in zip(self.weights, self.params, strict=True):
            p.data = shared

    # -- phases 1 and 2: the average of this rank's chunk, and the verdict -----------------
    def _sync(self) -> None:
        started = time.perf_counter()
        # A parameter not used this pass contributes zero, as in DDP.
        grads = [torch.zeros_like(p.data) if p.grad is None else p.grad.contiguous() for p in self.params]
        world = self.reducer.world_size
        self._generation = self.reducer.reduce_scatter(grads, self._plans, world, self.loss_finite)
        self.loss_finite = True  # until the trainer says otherwise before the next backward pass
        self.finite = self.reducer.chunk_sums_finite()
        self.timer.add_ms((time.perf_counter() - started) * 1e3)

    # -- phase 3: this rank's share of the optimiser step ------------------------------------
    @torch.no_grad()
    def update(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()`` on this rank's chunk of the shared weights, with the averaged gradient
        of the last sync; returns once every rank has updated its chunk. Its momentum becomes (or
        stays) the shared copy, so ``optimizer.state_dict()`` holds the whole of it."""
        group = self._group_of(optimizer)
        momentum = group["momentum"]
        # The first step makes the buffers (SGD's first momentum is the gradient itself).
        first = momentum != 0 and all(optimizer.state[p].get("momentum_buffer") is None for p in self.params)
        buffers = self._momentum_buffers(optimizer) if momentum != 0 and not first else [None] * len(self._own)
        sgd(
            self._own_weights,
            self._own_average,
            buffers,
            foreach=group["foreach"],
            fused=group["fused"],
            weight_decay=group["weight_decay"],
            momentum=momentum,
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )
        if first:  # SGD made this rank's first buffers (the gradient): they join the shared copy
            for shared, made in zip(self._own_momentum, buffers, strict=True):
                shared.copy_(made)
            for p, shared in zip(self.params, self.momentum, strict=True):
                optimizer.state[p]["momentum_buffer"] = shared
        started = time.perf_counter()
        self.reducer.publish(3 * self._generation)
        self.reducer.wait_for_peers(3 * self._generation, doing="finish its share of the optimiser step")
        self.timer.add_ms((time.perf_counter() - started) * 1e3)

    def _group_of(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimiser's one parameter group, once it is checked to be SGD's over these parameters
        (the first time ``update`` sees this optimiser)."""
        if optimizer is not self._optimizer:
            if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
                raise ValueError("the shared optimiser step runs torch.optim.SGD with one parameter group")
            if [id(p) for p in optimizer.param_groups[0]["params"]] != [id(p) for p in self.params]:
                raise ValueError("the optimiser's parameters are not the model's the shared step was made for")
            self._optimizer = optimizer
        return optimizer.param_groups[0]

    def _momentum_buffers(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor | None]:
        """This rank's chunk of the shared momentum, after the first step. A momentum the optimiser
        got elsewhere (a checkpoint) is taken into the shared copy, this rank's chunk by this rank
        (each rank only ever touches its own chunk)."""
        held = [optimizer.state[p].get("momentum_buffer") for p in self.params]
        for index, (p, buffer, shared) in enumerate(zip(self.params, held, self.momentum, strict=True)):
            if buffer is None:
                raise ValueError("the optimiser holds momentum for some parameters but not all")
            if buffer is not shared:
                for span, target in zip(self._own, self._own_momentum, strict=True):
                    if span.index == index:
                        target.copy_(buffer.reshape(-1)[span.begin : span.end])
                optimizer.state[p]["momentum_buffer"] = shared
        return list(self._own_momentum)

    def close(self) -> None:
        """Give every parameter (and momentum) a private copy again, then release the shared memory."""
        self._after_backward.remove()
        with torch.no_grad():
            for p, shared in zip(self.params, self.weights, strict=True):
                if p.data.data_ptr() == shared.data_ptr():
                    p.data = shared.clone()
            if self._optimizer is not None:
                for p, shared in zip(self.params, self.momentum, strict=True):
                    state = self._optimizer.state[p]
                    if state.get("momentum_buffer") is shared:
                        state["momentum_buffer"] = shared.clone()
        del self.weights, self.momentum, self._own_weights, self._own_momentum
        shm.release(self._map, self._fd)
        self._fd = -1
        self.reducer.close()
