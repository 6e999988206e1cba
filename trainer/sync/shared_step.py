"""One copy of the weights and the optimiser state per host, each rank updating its own share.

Under ``ShmGradientSync`` every rank receives the whole averaged gradient and then runs the same
optimiser step on the same numbers as its peers: N copies of one update, and about 2.75 copies
of the gradients through memory per rank each step (docs/performance.md). On one host the ranks
can instead share the weights themselves (ZeRO's split of the optimiser step; with one shared
copy of the weights, no all-gather of them is needed):

1. the parameters and the optimiser's state (SGD's momentum; Adam's two moments, and AMSGrad's
   maximum) live in one shared mapping; each parameter's ``.data`` is a view of it, so every
   rank's forward pass reads the same weights;
2. at the end of the backward pass each rank writes its terms of the average (``g / N``) for the
   chunks its peers own into its slot (phase 1), sums its own chunk of the average into the shared
   result, in the order the gradient sync uses (its own term first, then rank order), and
   publishes the chunk's sum beside its flag (phase 2). Every rank reads every chunk's sum: the
   divergence guard's verdict, the same on every rank (trainer/lifecycle/guard.py). A vector of
   one number per parameter rides along at the end (1 where the rank's ``.grad`` is set), so
   every rank knows which parameters some rank produced a gradient for;
3. optionally (``clip_grad_norm_``), gradient clipping: each parameter's norm is computed by the
   rank that owns its first element, over the whole parameter in the shared result (torch's own
   ``vector_norm``), the norms are exchanged through the shared memory (one auxiliary phase), and
   every rank computes the same total norm from them as ``torch.nn.utils.clip_grad_norm_`` does
   and scales its chunk;
4. ``update`` runs the optimiser's own functional kernel (``torch.optim.sgd.sgd`` or
   ``torch.optim.adam.adam``), with each parameter group's hyper-parameters, on this rank's chunk
   of the weights, the average and the state, publishes phase 3 and returns once every rank has,
   so nothing reads a weight while a peer still writes it.

The numbers are those of ``ShmGradientSync`` followed by ``optimizer.step()``: the averaged
gradient has the same bits (so, at world size 2, gloo's), clipping computes the same norms (the
same kernel on the same numbers, and torch's arithmetic after it), and the optimisers' kernels
are element-wise, so an element gets the same update whichever rank computes it. Each parameter
starts on a cache line and chunks are cut at multiples of 16 of its elements, so no element
moves between a kernel's vectorised body and its scalar tail.

As under DDP (with ``find_unused_parameters``): a parameter no rank produced a gradient for is
not stepped (no momentum, no weight decay, no Adam step); one some ranks did gets zeros from the
others. Frozen parameters (``requires_grad=False``) stay private, get rank 0's values at set-up
and are never stepped. Buffers follow rank 0's as under DDP (``trainer.sync.buffers``).

What code around it sees differently: a parameter's ``.grad`` holds this rank's own gradient, not
the average (no rank ever holds the whole average). ``shared_reason`` names what it cannot share
(optimisers other than SGD, Adam and AdamW, step hooks, weights tied through one storage), and
the caller then uses ``ShmGradientSync``. The flag protocol, its memory-order argument and the
peer-death checks are ``trainer.sync.shm``'s: phases 1 and 2 are ``ShmAllreduce.reduce_scatter``
on a reducer of its own, and this module adds the norms' phase and phase 3.
"""

from __future__ import annotations

import mmap
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.adam import adam
from torch.optim.optimizer import _get_scalar_dtype, _global_optimizer_post_hooks, _global_optimizer_pre_hooks
from torch.optim.sgd import sgd

from trainer.core.config import TrainConfig
from trainer.sync import buffers, shm
from trainer.sync.after_backward import AfterBackward
from trainer.sync.timer import SyncTimer

SHARED_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def recipe_reason(cfg: TrainConfig) -> str | None:
    """Why the run's options rule out the shared step, or None. What the optimiser or the model rule
    out is ``shared_reason``'s, decided where the sync is set up."""
    if cfg.shared_step == "off":
        return "--shared-step off"
    return None


def shared_reason(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> str | None:
    """Why the shared step cannot run ``optimizer`` on ``model``, or None. A pure function of their
    structure, so every rank (which built them alike) decides the same."""
    if optimizer is None:
        return "no optimiser was given to set it up for"
    kind = type(optimizer)
    if kind not in SHARED_OPTIMIZERS:
        return f"it runs torch.optim.SGD, Adam and AdamW, not {kind.__module__}.{kind.__qualname__}"
    for index, group in enumerate(optimizer.param_groups):
        for flag in ("differentiable", "capturable"):
            if group.get(flag):
                return f"parameter group {index} is {flag}"
    hooks = optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
    if hooks or _global_optimizer_pre_hooks or _global_optimizer_post_hooks:
        return "the optimiser has step hooks, which only optimizer.step() runs"
    mine = {id(p) for p in model.parameters()}
    if any(id(p) not in mine for group in optimizer.param_groups for p in group["params"]):
        return "the optimiser holds parameters that are not the model's"
    return tied_reason(model)


def tied_reason(model: nn.Module) -> str | None:
    """Two parameters that view one storage would be untied by giving each its own shared copy."""
    seen: dict[int, str] = {}
    for name, p in model.named_parameters():  # one Parameter used twice is listed once: that is fine
        if p.numel() == 0:
            continue
        key = p.untyped_storage().data_ptr()
        if key in seen:
            return f"parameters {seen[key]} and {name} share one storage (tied weights); a copy each would untie them"
        seen[key] = name
    return None


def state_names(optimizer: torch.optim.Optimizer) -> tuple[str, ...]:
    """The per-element state tensors ``optimizer`` keeps, which live in the shared mapping."""
    groups = optimizer.param_groups
    if isinstance(optimizer, torch.optim.Adam):  # AdamW is an Adam
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if any(g["amsgrad"] for g in groups) else ())
    return ("momentum_buffer",) if any(g["momentum"] != 0 for g in groups) else ()


def aligned_offsets(sizes: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """Where each tensor of ``sizes`` starts in a flat vector where each starts on a cache line, and its length."""
    offsets, at = [], 0
    for size in sizes:
        offsets.append(at)
        at += -(-size // shm.CHUNK_ALIGN) * shm.CHUNK_ALIGN
    return tuple(offsets), at


def _layout(params: list[torch.Tensor]) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """Sizes (the parameters, then one number per parameter: whether a rank has its gradient), offsets, total."""
    sizes = (*(p.numel() for p in params), len(params))
    offsets, total = aligned_offsets(sizes)
    return sizes, offsets, total


def _norms_bytes(count: int) -> int:
    return 2 * (-(-count * 4 // 64) * 64)


def open_shared_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, group: dist.ProcessGroup, timeout_s: float, timer: SyncTimer
) -> tuple[SharedStep | None, str]:
    """This rank's ``SharedStep`` for ``model`` and ``optimizer`` (``shared_reason`` found nothing
    against them), or None and why; collective over ``group``, not yet agreed (the caller passes
    the error to ``shm.agree``, then calls ``share_weights``)."""
    rank = dist.get_rank()
    params = [p for p in model.parameters() if p.requires_grad]
    _, _, total = _layout(params)
    extra = buffers.snapshot_bytes(model) + _norms_bytes(len(params))
    reducer, error = shm.open_reducer(group, total, timeout_s, extra_bytes=extra)
    # The weights and each state tensor, one float32 vector each; every rank reaches this collective.
    mapping, fd, mapping_error, _ = shm.open_shared_mapping(group, (1 + len(state_names(optimizer))) * total * 4, rank)
    error = error or mapping_error
    step = None
    if reducer is not None and mapping is not None and not error:
        try:
            step = SharedStep(model, optimizer, reducer, mapping, fd, timer)
        except Exception as exc:
            error = shm.describe(rank, "setting up the shared optimiser step", exc)
    if step is None:
        if reducer is not None:
            reducer.close()
        shm.release(mapping, fd)
    return step, error


@dataclass
class OwnSpan:
    """This rank's elements ``[begin, end)`` of parameter ``index``: its views of the shared weights,
    of the average in either result set, and of each state tensor."""

    index: int
    begin: int
    end: int
    weight: torch.Tensor
    average: tuple[torch.Tensor, torch.Tensor]
    state: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class GroupPlan:
    """One parameter group: its trainable parameters (indices into ``SharedStep.params``), this rank's spans of them."""

    indices: list[int]
    own: list[OwnSpan]


class SharedStep:
    """The gradient sync and the optimiser step of one host's ranks, on weights they share (module
    docstring). Made by ``open_shared_step``; offers what the trainer reads of ``ShmGradientSync``
    (``tells_finite``, ``loss_finite``, ``finite``, ``accumulating``, ``close``), ``clip_grad_norm_``
    and ``update``, which replaces ``optimizer.step()``.
    """

    tells_finite = True  # each rank checks the chunk it reduced: the verdict covers every gradient

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        reducer: shm.ShmAllreduce,
        mapping: mmap.mmap,
        fd: int,
        timer: SyncTimer,
    ) -> None:
        self.reducer, self.timer, self.optimizer = reducer, timer, optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        count = len(self.params)
        sizes, offsets, total = _layout(self.params)
        rank, world = reducer.rank, reducer.world_size
        bounds = shm.chunk_bounds(total, world)
        spans = shm.plan_spans(sizes, bounds, offsets)
        lo, hi = bounds[rank]
        self._map, self._fd = mapping, fd
        # One storage per tensor (not views of one big one), so a checkpoint saves just its bytes.
        placed = list(zip(offsets[:count], self.params, strict=True))
        self.weights = [self._shared(o, p) for o, p in placed]
        self.state = {
            name: [self._shared((1 + k) * total + o, p) for o, p in placed]
            for k, name in enumerate(state_names(optimizer))
        }
        # This rank's chunk of the average is summed into the shared result (either set, by the
        # sync's number), where the rank that owns a parameter's first element reads all of it
        # for the norm; padding between tensors stays zero (the slots' is too).
        self._plans = reducer.plan(spans, (lo, hi), total)
        results = [plan.result for plan in self._plans]
        self._averages = [[r[o : o + p.numel()].view_as(p) for o, p in placed] for r in results]
        self._presence = [r[offsets[-1] : offsets[-1] + count] for r in results]
        self._own: dict[int, OwnSpan] = {}
        for s in spans:
            if s.owner != rank or s.index == count:
                continue
            length = s.end - s.begin
            self._own[s.index] = OwnSpan(
                s.index,
                s.begin,
                s.end,
                self.weights[s.index].view(-1)[s.begin : s.end],
                (results[0][s.offset : s.offset + length], results[1][s.offset : s.offset + length]),
                {name: tensors[s.index].view(-1)[s.begin : s.end] for name, tensors in self.state.items()},
            )
        # The parameters whose norm this rank computes: those whose first element it owns.
        self._norm_indices = [s.index for s in spans if s.owner == rank and s.begin == 0 and s.index < count]
        index = {id(p): i for i, p in enumerate(self.params)}
        self._groups = []
        for group in optimizer.param_groups:
            indices = [index[id(p)] for p in group["params"] if id(p) in index]  # frozen ones are never stepped
            self._groups.append(GroupPlan(indices, [self._own[i] for i in indices if i in self._own]))
        extra = reducer.extra
        assert extra is not None
        snapshot = buffers.snapshot_bytes(model)
        self.buffers = buffers.for_model(model, reducer, extra[:snapshot], rank)
        norms = extra[snapshot : snapshot + _norms_bytes(count)].view(torch.float32)
        self._norms = (norms[:count], norms[len(norms) // 2 : len(norms) // 2 + count])
        self._local = torch.zeros(count)  # 1 where this rank's ``.grad`` is set, at each sync
        self._local_np = self._local.numpy()
        self._present: list[bool] = [False] * count  # whether some rank's is, after the last sync
        self._generation = 0  # the number of the last sync, whose phase 3 ``update`` publishes
        self.accumulating = False  # ``Comm.no_sync``: the backward passes only accumulate locally
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
        if self.accumulating:
            return  # ``.grad`` keeps accumulating; the backward pass after ``no_sync`` sends the sum
        self.timer.exchanges += 1
        started = time.perf_counter()
        grads = []
        for i, p in enumerate(self.params):
            if p.grad is None:  # no gradient this pass: contributes zero, as in DDP
                self._local_np[i] = 0.0
                grads.append(torch.zeros_like(p.data))
            else:
                self._local_np[i] = 1.0
                grads.append(p.grad.contiguous())
        grads.append(self._local)
        if self.buffers is not None:
            self.buffers.exchanged()  # rank 0's buffers, before phase 1 announces them
        world = self.reducer.world_size
        self._generation = self.reducer.reduce_scatter(grads, self._plans, world, self.loss_finite)
        self.loss_finite = True  # until the trainer says otherwise before the next backward pass
        self.finite = self.reducer.chunk_sums_finite()
        self._present = (self._presence[self._generation % 2] > 0).tolist()
        self.timer.add_ms((time.perf_counter() - started) * 1e3)

    # -- between phases 2 and 3: gradient clipping -----------------------------------------
    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)`` on the averaged gradient of
        the last sync, this rank scaling its chunk; returns the total norm, the same on every rank.
        Collective: every rank calls it after the same sync, at most once per sync."""
        which, present = self._generation % 2, self._present
        norms = self._norms[which]
        for i in self._norm_indices:
            if present[i]:
                norms[i] = torch.linalg.vector_norm(self._averages[which][i], 2.0)
        started = time.perf_counter()
        self.reducer.publish_aux(self._generation)
        self.reducer.wait_aux(self._generation, "share its gradient norms")
        self.timer.add_ms((time.perf_counter() - started) * 1e3)
        stepped = [norms[i] for i in range(len(self.params)) if present[i]]
        if not stepped:
            return torch.tensor(0.0)
        # torch.nn.utils.clip_grad_norm_'s arithmetic (_get_total_norm, _clip_grads_with_norm_) on CPU.
        total_norm = torch.linalg.vector_norm(torch.stack(stepped), 2.0)
        clip_coef = float(max_norm) / (total_norm + 1e-6)
        clip_coef_clamped = torch.clamp(clip_coef, max=1.0)
        for i, own in self._own.items():
            if present[i]:
                own.average[which].mul_(clip_coef_clamped)
        return total_norm

    # -- phase 3: this rank's share of the optimiser step ------------------------------------
    @torch.no_grad()
    def update(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()`` on this rank's chunk of the shared weights, with the averaged gradient
        of the last sync; returns once every rank has updated its chunk. Its state becomes (or stays)
        the shared copy, so ``optimizer.state_dict()`` holds the whole of it."""
        if optimizer is not self.optimizer or len(optimizer.param_groups) != len(self._groups):
            raise ValueError("the shared optimiser step runs the optimiser (and parameter groups) it was set up for")
        which = self._generation % 2
        for group, plan in zip(optimizer.param_groups, self._groups, strict=True):
            if isinstance(optimizer, torch.optim.Adam):
                self._adam(group, plan, which)
            else:
                self._sgd(group, plan, which)
        # LR schedulers check that optimizer.step() ran before them (it sets this flag); it did not, this did.
        optimizer._opt_called = True  # type: ignore[attr-defined]
        started = time.perf_counter()
        self.reducer.publish(3 * self._generation)
        self.reducer.wait_for_peers(3 * self._generation, doing="finish its share of the optimiser step")
        self.timer.add_ms((time.perf_counter() - started) * 1e3)

    def _stepped(self, plan: GroupPlan) -> tuple[list[int], list[OwnSpan]]:
        """The group's parameters some rank has a gradient for (what ``optimizer.step()`` steps), and my spans."""
        present = self._present
        return [i for i in plan.indices if present[i]], [own for own in plan.own if present[own.index]]

    def _adopt(self, indices: list[int], names: tuple[str, ...]) -> None:
        """State the optimiser got elsewhere (a checkpoint) joins the shared copy, this rank's chunk by
        this rank (each rank only ever writes its own chunk)."""
        states = self.optimizer.state
        for i in indices:
            state = states[self.params[i]]
            for name in names:
                held, shared = state.get(name), self.state[name][i]
                if held is not None and held is not shared:
                    own = self._own.get(i)
                    if own is not None:
                        own.state[name].copy_(held.reshape(-1)[own.begin : own.end])
                    state[name] = shared

    def _sgd(self, group: dict[str, Any], plan: GroupPlan, which: int) -> None:
        indices, own = self._stepped(plan)
        momentum = group["momentum"]
        states = self.optimizer.state
        buffers_: list[torch.Tensor | None] = [None] * len(own)
        if momentum != 0:
            self._adopt(indices, ("momentum_buffer",))
            # None where SGD has no buffer yet: its first momentum is the gradient itself.
            buffers_ = [
                o.state["momentum_buffer"] if states[self.params[o.index]].get("momentum_buffer") is not None else None
                for o in own
            ]
        fresh = [k for k, buffer in enumerate(buffers_) if buffer is None]
        if own:
            sgd(
                [o.weight for o in own],
                [o.average[which] for o in own],
                buffers_,
                foreach=group["foreach"],
                fused=group["fused"],
                weight_decay=group["weight_decay"],
                momentum=momentum,
                lr=group["lr"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                maximize=group["maximize"],
            )
        if momentum != 0:
            for k in fresh:  # SGD made these buffers (the gradient): they join the shared copy
                made = buffers_[k]
                assert made is not None
                own[k].state["momentum_buffer"].copy_(made)
            for i in indices:
                states[self.params[i]]["momentum_buffer"] = self.state["momentum_buffer"][i]

    def _adam(self, group: dict[str, Any], plan: GroupPlan, which: int) -> None:
        indices, own = self._stepped(plan)
        names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())
        states = self.optimizer.state
        for i in indices:
            state = states[self.params[i]]
            if len(state) == 0:  # Adam._init_group's lazy initialisation, the moments in the shared copy
                state["step"] = (
                    torch.zeros((), dtype=_get_scalar_dtype(is_fused=group["fused"]), device=self.params[i].device)
                    if group["fused"]
                    else torch.tensor(0.0, dtype=_get_scalar_dtype())
                )
                for name in names:
                    if i in self._own:
                        self._own[i].state[name].zero_()
                    state[name] = self.state[name][i]
        self._adopt(indices, names)
        if own:
            # A copy of each step count: the kernel adds 1 to it, and every rank adds 1 to every
            # stepped parameter's own count below (it is not shared).
            steps = [states[self.params[o.index]]["step"].clone() for o in own]
            adam(
                [o.weight for o in own],
                [o.average[which] for o in own],
                [o.state["exp_avg"] for o in own],
                [o.state["exp_avg_sq"] for o in own],
                [o.state["max_exp_avg_sq"] for o in own] if group["amsgrad"] else [],
                steps,
                foreach=group["foreach"],
                capturable=False,
                differentiable=False,
                fused=group["fused"],
                has_complex=False,
                decoupled_weight_decay=group["decoupled_weight_decay"],
                amsgrad=group["amsgrad"],
                beta1=group["betas"][0],
                beta2=group["betas"][1],
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
            )
        for i in indices:
            states[self.params[i]]["step"] += 1

    def close(self) -> None:
        """Give every parameter (and state tensor) a private copy again, then release the shared memory."""
        self._after_backward.remove()
        if self.buffers is not None:
            self.buffers.close()
        with torch.no_grad():
            for p, shared in zip(self.params, self.weights, strict=True):
                if p.data.data_ptr() == shared.data_ptr():
                    p.data = shared.clone()
            for i, p in enumerate(self.params):
                state = self.optimizer.state.get(p, {})
                for name, tensors in self.state.items():
                    if state.get(name) is tensors[i]:
                        state[name] = tensors[i].clone()
        del self.weights, self.state, self._own, self._groups, self._averages, self._presence, self._norms
        self.buffers = None
        shm.release(self._map, self._fd)
        self._fd = -1
        self.reducer.close()
