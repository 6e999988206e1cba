"""Gradient synchronisation: DDP wrapping, the ``--comm`` options, and timing of whichever runs.

Sync time is measured where it happens: the DDP options run as communication hooks, and a
wrapper notes when each bucket's hook is entered and when its future completes; ``shm`` and
``hierarchical`` time their own call. The figure is communication (plus any wait for a slower
peer), not inferred from wall time.

Options (``--comm``):

- ``gloo``: the process group's own all-reduce (gloo on CPU, nccl on CUDA): pre-divide, sum.
- ``shm``: the same arithmetic through shared memory between the ranks of one host
  (``trainer.sync.shm``); exact, and faster than gloo on loopback (docs/performance.md). It does
  DDP's job itself, without DDP (see ``ShmGradientSync``); where the recipe allows, the ranks
  also share one copy of the weights and each runs the optimiser on its chunk of them
  (``trainer.sync.shared_step``, the same numbers).
- ``hierarchical``: ranks on several hosts sum within each host through shared memory, the hosts'
  leaders all-reduce the host sums over gloo, and each host's ranks copy the result
  (``trainer.sync.hierarchy``); exact (a fixed summation order, the same bits on every rank), and the
  link carries one copy per host instead of one per rank.
- ``auto`` (default): ``shm`` when all ranks share a host; ``hierarchical`` when they span hosts
  with two or more on each; else ``gloo``. The log says which and why.
- ``bf16`` / ``fp16``: gradients cast to 16 bits for the all-reduce (half the bytes; lossy).
- ``powersgd``: rank-``POWERSGD_RANK`` PowerSGD with error feedback after ``POWERSGD_START_ITER``
  exact steps (lossy per step; error feedback carries the residual to later steps).
- ``localsgd``: exact steps until ``LOCALSGD_START_ITER``, then each rank steps on its own
  gradients and the parameters are averaged every ``LOCALSGD_PERIOD`` steps and at the end of
  every epoch (replicas differ between averages).
"""

# No `from __future__ import annotations` here: DDP checks the hook's annotations at runtime.
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, post_localSGD_hook, powerSGD_hook
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.nn.parallel import DistributedDataParallel

from trainer.core.clock import device_clock
from trainer.core.config import COMM_OPTIONS
from trainer.core.rng import numpy_rng_from_plain, numpy_rng_to_plain
from trainer.sync import buffers, hierarchy, shm
from trainer.sync.after_backward import AfterBackward
from trainer.sync.powersgd_state import PowerSGDMemory
from trainer.sync.shared_step import SharedStep, open_shared_step, shared_reason
from trainer.sync.timer import Hook, SyncTimer

log = logging.getLogger(__name__)

POWERSGD_RANK = 4
POWERSGD_START_ITER = 100
LOCALSGD_START_ITER = 100
LOCALSGD_PERIOD = 8


def _allreduce_hook(group: dist.ProcessGroup, bucket: dist.GradBucket) -> torch.futures.Future:
    # Same arithmetic as DDP's default hook: pre-divide, then sum.
    tensor = bucket.buffer().div_(group.size())
    return dist.all_reduce(tensor, group=group, async_op=True).get_future().then(lambda fut: fut.value()[0])


class ShmGradientSync:
    """Averages a model's gradients through shared memory at the end of every backward pass (on one
    host, ``shm``; across hosts, ``hierarchical``, whose reducer also goes through the leaders).

    What DDP does for the other options, done without DDP, whose per-step bookkeeping is a large
    share of so small a step (see docs/shm.md). As with DDP's ``gradient_as_bucket_view``, each
    parameter's ``.grad`` is a view of one flat buffer that this rank owns; the all-reduce copies
    the shared result into it. So user code may do anything to ``.grad`` after the sync (clip it,
    zero it, unscale it, accumulate into it over several backward passes) without touching a
    peer's gradients. Construction is local; ``start_shm_sync`` agrees on it and broadcasts the weights.

    As DDP with ``find_unused_parameters`` leaves them: a parameter without a gradient on this
    rank contributes zeros, and gets the average where some rank had one; where no rank had one,
    its ``.grad`` stays None (so the optimiser skips it). One number per parameter rides along at
    the end of the vector (1 where the rank's ``.grad`` is set) to tell. Buffers follow rank 0's as
    under DDP (``trainer.sync.buffers``).
    """

    def __init__(
        self,
        model: nn.Module,
        reducer: shm.ShmAllreduce | hierarchy.HierarchicalAllreduce,
        timer: "SyncTimer",
        buffer_keeper: "buffers.BufferMirror | buffers.BufferBroadcast | None" = None,
    ) -> None:
        self.reducer, self.timer, self.buffers = reducer, timer, buffer_keeper
        self.params = [p for p in model.parameters() if p.requires_grad]
        numel = sum(p.numel() for p in self.params)
        self.flat = torch.zeros(numel + len(self.params))
        sizes = [p.numel() for p in self.params]
        self.views = [view.view_as(p) for view, p in zip(self.flat[:numel].split(sizes), self.params, strict=True)]
        self._present = self.flat[numel:]  # after a sync: > 0 where some rank had the gradient
        self._local = torch.zeros(len(self.params))  # 1 where this rank has it, at each sync
        self._local_np = self._local.numpy()
        # Whether the reducer can tell if a sync's result is finite (one host's shared memory can; the
        # hierarchical sync cannot); then ``finite`` is the last sync's verdict, which also covers every
        # rank's ``loss_finite`` (set before the backward pass). The guard reads it: trainer/lifecycle/guard.py.
        self.tells_finite = isinstance(reducer, shm.ShmAllreduce)
        self.loss_finite = True
        self.finite: bool | None = None
        self.accumulating = False  # ``Comm.no_sync``: the backward passes only accumulate locally
        self._after_backward = AfterBackward(self.params, self._sync)

    def _sync(self) -> None:
        if self.accumulating:
            return  # ``.grad`` keeps accumulating; the backward pass after ``no_sync`` sends the sum
        self.timer.exchanges += 1
        started = time.perf_counter()
        grads, missing = [], False
        for i, (p, view) in enumerate(zip(self.params, self.views, strict=True)):
            if p.grad is None:
                grads.append(view.zero_())  # no gradient on this rank: contributes zero, as in DDP
                self._local_np[i], missing = 0.0, True
            else:
                grads.append(p.grad.contiguous())  # a fresh tensor, or ``view`` accumulated into
                self._local_np[i] = 1.0
        grads.append(self._local)
        if self.buffers is not None:
            self.buffers.exchanged()  # rank 0's buffers, before phase 1 announces them
        if isinstance(self.reducer, shm.ShmAllreduce):  # ``tells_finite``, narrowed for the type checker
            self.finite = self.reducer.allreduce(
                grads, self.flat, self.reducer.world_size, check_finite=True, local_finite=self.loss_finite
            )
            self.loss_finite = True  # until the trainer says otherwise before the next backward pass
        else:
            self.reducer.allreduce(grads, self.flat, divide_by=self.reducer.world_size)
        present = (self._present > 0).tolist() if missing else None
        for i, (p, view) in enumerate(zip(self.params, self.views, strict=True)):
            # A parameter no rank had a gradient for keeps .grad None, as DDP leaves it.
            if p.grad is not view and (present is None or p.grad is not None or present[i]):
                p.grad = view
        self.timer.add_ms((time.perf_counter() - started) * 1e3)

    def close(self) -> None:
        self._after_backward.remove()
        if self.buffers is not None:
            self.buffers.close()
        self.reducer.close()


class Comm:
    """The sync option chosen for a model: its timer, and what it does besides syncing gradients.

    Under ``shm`` and ``hierarchical`` it owns the shared-memory sync (``shm_sync``); under the DDP
    options the sync runs as DDP's communication hook, and local SGD also averages parameters
    (``averager``).
    """

    def __init__(
        self,
        option: str,
        timer: SyncTimer,
        clock: Callable[[], float] = time.perf_counter,
        model: nn.Module | None = None,
    ) -> None:
        self.option = option
        self.model = model  # the bare model whose gradients this syncs
        self.ddp: DistributedDataParallel | None = None  # the DDP options' wrapper
        self.timer = timer
        self.clock = clock  # trainer.core.clock.device_clock: on CUDA it waits for the averaging to run
        # The shared-memory sync; a ``SharedStep`` also runs the optimiser step (``step``).
        self.shm_sync: ShmGradientSync | SharedStep | None = None
        self.averager: PeriodicModelAverager | None = None
        self.powersgd: powerSGD_hook.PowerSGDState | None = None
        self.powersgd_memory: PowerSGDMemory | None = None  # its per-bucket memories, checkpointed per parameter
        self.localsgd: post_localSGD_hook.PostLocalSGDState | None = None

    def take_ms(self) -> float:
        return self.timer.take_ms()

    def synced_finite(self) -> bool | None:
        """Whether the gradients of the last sync are all finite, where the sync found out on its way
        (shared memory on one host: each rank checks the chunk it reduced); None where it did not."""
        return self.shm_sync.finite if self.shm_sync is not None else None

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside exchange no gradients: each rank's ``.grad`` accumulates locally, and
        the first backward pass after the block exchanges the accumulated sum (gradient accumulation:
        every micro-step but the last inside it). DDP's ``no_sync`` under the DDP options; under
        shared memory the sync skips its exchange. The same numbers as DDP accumulating."""
        if self.ddp is not None:
            with self.ddp.no_sync():
                yield
            return
        sync = self.shm_sync
        if sync is None:
            yield
            return
        sync.accumulating = True
        try:
            yield
        finally:
            sync.accumulating = False

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the synced gradients' global L2 norm to ``max_norm``; returns the norm before clipping,
        the same on every rank. Call on every rank after the backward pass that synced, before ``step``.

        ``torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)`` where each rank holds the
        whole average; under the shared step, the same arithmetic on the chunks (each parameter's norm
        computed once, exchanged through the shared memory), with the same bits."""
        if isinstance(self.shm_sync, SharedStep):
            return self.shm_sync.clip_grad_norm_(max_norm)
        assert self.model is not None
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimiser step on the synced gradients: under a ``SharedStep`` each rank updates its own
        chunk of the weights the host's ranks share; else ``optimizer.step()``."""
        if isinstance(self.shm_sync, SharedStep):
            self.shm_sync.update(optimizer)
        else:
            optimizer.step()
        self.after_step(p for group in optimizer.param_groups for p in group["params"])

    def after_step(self, params: Iterable[torch.Tensor]) -> None:
        """Call after every optimiser step (local SGD averages the parameters here)."""
        if self.averager is not None:
            started = self.clock()
            self.averager.average_parameters(params)
            self.timer.add_ms((self.clock() - started) * 1e3)

    @torch.no_grad()
    def sync_replicas(self, model: nn.Module) -> None:
        """Make every rank's parameters equal (a no-op for options that keep them equal anyway)."""
        if self.averager is None:
            return
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).div_(dist.get_world_size())
        dist.all_reduce(flat)
        offset = 0
        for p in model.parameters():
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    @property
    def per_rank_state(self) -> bool:
        """Whether this option keeps state that differs between ranks, so that exact resume needs every rank's.

        PowerSGD's error feedback is each rank's own residual; under local SGD each rank's
        parameters and momentum drift apart between averages.
        """
        return self.powersgd is not None or self.averager is not None

    @property
    def replicas_differ(self) -> bool:
        """Whether ranks' parameters and optimiser state may differ at a checkpoint (local SGD)."""
        return self.averager is not None

    def state_dict(self) -> dict[str, Any]:
        """This rank's state of the option, as tensors and plain values (``weights_only`` loading takes it).

        PowerSGD: its step count, its RNG (the seeds of new projections), the warm-start P and Q
        of each bucket and this rank's error feedback. Local SGD: the hook's and the averager's
        step counts (the model and optimiser are the trainer's to save).
        """
        state: dict[str, Any] = {"option": self.option}
        if self.powersgd is not None and self.powersgd_memory is not None:
            ps = self.powersgd
            state["powersgd"] = {
                "iter": ps.iter,
                "rng": numpy_rng_to_plain(ps.rng.get_state()),
                "memory": self.powersgd_memory.state_dict(),
                "numel_before": ps.total_numel_before_compression,
                "numel_after": ps.total_numel_after_compression,
                "next_stats_report": ps.next_stats_report,
            }
        if self.localsgd is not None and self.averager is not None:
            state["localsgd"] = {"iter": self.localsgd.iter, "averager_step": self.averager.step}
        return state

    def load_state_dict(self, state: dict[str, Any], own: bool, device: torch.device) -> list[str]:
        """Restore ``state``: this rank's own when ``own``, else another rank's (the world size changed).

        Returns what could not be restored, for the log: state that is per rank is reset when
        ``own`` is false, since no rank of another world size continues a saved rank's residual.
        """
        reset = []
        if self.powersgd is not None and self.powersgd_memory is not None and "powersgd" in state:
            ps, saved = self.powersgd, state["powersgd"]
            ps.iter = saved["iter"]
            ps.rng.set_state(numpy_rng_from_plain(saved["rng"]))
            ps.total_numel_before_compression = saved["numel_before"]
            ps.total_numel_after_compression = saved["numel_after"]
            ps.next_stats_report = saved["next_stats_report"]
            self.powersgd_memory.load_state_dict(saved["memory"], device, keep_error=own)
            if not own:
                reset.append("PowerSGD's error feedback (each rank's residual) starts again from zero")
        if self.localsgd is not None and self.averager is not None and "localsgd" in state:
            self.localsgd.iter = state["localsgd"]["iter"]
            self.averager.step = state["localsgd"]["averager_step"]
        return reset

    def close(self) -> None:
        if self.shm_sync is not None:
            self.shm_sync.close()
            self.shm_sync = None


SHARED_MEMORY = ("auto", "shm", "hierarchical")  # the options that may run on shared memory


def resolve_comm(
    requested: str, model: nn.Module, device: torch.device, group: dist.ProcessGroup
) -> tuple[str, str, list[list[int]]]:
    """``requested`` -> the option that will run, why, and each host's ranks (``hierarchy.host_groups``).
    Collective over ``group``, which is the whole job: every rank must call it.

    Each rank's own verdict on the shared-memory path (host, device, dtypes, architecture,
    memfd and /proc) is gathered, and the decision is made on all of them, so every rank
    decides the same. A rank whose check raises counts as unable.
    """
    rank = dist.get_rank()
    reason: str | None = None
    if requested in SHARED_MEMORY:
        try:
            dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
            reason = shm.local_reason(device, dtypes, rank=rank) or sparse_reason(model)
            removed = shm.remove_leftovers()
            if removed:
                log.info("removed shared memory left by dead processes: %s", ", ".join(removed))
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
    verdicts: list[tuple[str, str | None]] = [("", None)] * dist.get_world_size(group)
    dist.all_gather_object(verdicts, (shm.host_key(), reason), group=group)
    hosts = hierarchy.host_groups([key for key, _ in verdicts])
    option, why = choose_comm(requested, verdicts, hosts)
    return option, why, hosts


def sparse_reason(model: nn.Module) -> str | None:
    """Sparse gradients (``nn.Embedding(sparse=True)``) do not lay end to end in a float32 vector; DDP handles them."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.sparse:
            return f"{name or 'the model'} makes sparse gradients"
    return None


def choose_comm(requested: str, verdicts: list[tuple[str, str | None]], hosts: list[list[int]]) -> tuple[str, str]:
    """``resolve_comm``'s decision: a pure function of what every rank gathered, so all decide alike."""
    fallback = "falling back to the process group's all-reduce"
    why_not = shm.group_reason(verdicts)
    if requested == "auto":
        if not why_not:
            return "shm", "auto: all ranks on one host"
        unable = shm.rank_reason(verdicts)
        spread = hierarchy.auto_reason(hosts)
        if unable or spread:
            return "gloo", f"auto: shared memory unavailable ({unable or f'{why_not}; {spread}'})"
        return "hierarchical", f"auto: {hierarchy.describe(hosts)}: shared memory within each host, gloo between hosts"
    if requested == "shm" and why_not:
        return "gloo", f"--comm shm unavailable ({why_not}); {fallback}"
    if requested == "hierarchical":
        unable = shm.rank_reason(verdicts)
        if unable:
            return "gloo", f"--comm hierarchical unavailable ({unable}); {fallback}"
        return "hierarchical", f"--comm hierarchical: {hierarchy.describe(hosts)}"
    return requested, f"--comm {requested}"


def start_shm_sync(
    model: nn.Module,
    group: dist.ProcessGroup,
    timeout_s: float,
    timer: SyncTimer,
    hosts: list[list[int]] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[ShmGradientSync | SharedStep | None, str]:
    """The shared-memory sync for ``model``, or None and why not; collective over ``group`` (the whole
    job), and agreed. With ``hosts`` (each host's global ranks), the hierarchical sync across them;
    else, with ``optimizer`` (one ``shared_step.shared_reason`` found nothing against), the sync and
    optimiser step on shared weights (``trainer.sync.shared_step``).

    Every rank runs the same collectives whatever fails locally, then the ranks exchange their
    errors: if any rank failed at any point (any exception, on any host), all of them get None together.
    """
    rank = dist.get_rank()
    trainable = [p for p in model.parameters() if p.requires_grad]
    # The gradients, and one number per parameter riding along (ShmGradientSync).
    capacity = sum(p.numel() for p in trainable) + len(trainable)
    sync: ShmGradientSync | SharedStep | None = None
    reducer: shm.ShmAllreduce | hierarchy.HierarchicalAllreduce | None = None
    if hosts is None and optimizer is not None:
        sync, error = open_shared_step(model, optimizer, group, timeout_s, timer)
    else:
        if hosts is None:
            reducer, error = shm.open_reducer(group, capacity, timeout_s, extra_bytes=buffers.snapshot_bytes(model))
        else:
            reducer, error = hierarchy.open_reducer(hosts, capacity, timeout_s)
        if reducer is not None:
            try:
                local = reducer if isinstance(reducer, shm.ShmAllreduce) else None
                keeper = buffers.for_model(model, local, local.extra if local is not None else None, rank)
                sync = ShmGradientSync(model, reducer, timer, keeper)
            except Exception as exc:
                error = shm.describe(rank, "setting up the gradient sync", exc)
    if sync is not None:
        try:
            shm.fail_for_tests("sync", rank)
        except Exception as exc:
            error = shm.describe(rank, "setting up the gradient sync", exc)
    failures = shm.agree(group, error)
    if failures:
        if sync is not None:
            sync.close()
        elif reducer is not None:
            reducer.close()
        return None, failures
    with torch.no_grad():  # start from rank 0's weights and buffers, as DDP does
        if isinstance(sync, SharedStep):
            sync.share_weights(group)  # one copy of the trained weights, rank 0's
            tensors = [*(p for p in model.parameters() if not p.requires_grad), *model.buffers()]
        else:
            tensors = [*model.parameters(), *model.buffers()]
        for tensor in tensors:
            dist.broadcast(tensor, src=dist.get_global_rank(group, 0), group=group)
    return sync, ""


def wrap_model(
    model: nn.Module,
    device: torch.device,
    distributed: bool,
    comm: str = "auto",
    timeout_s: float = 120.0,
    bucket_cap_mb: float | None = None,
    warmup_steps: int | None = None,
    share_step: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
    find_unused_parameters: bool = False,
) -> tuple[nn.Module, Comm | None]:
    """The model to train through, and its timed sync option, when distributed; the bare model (and
    no Comm) otherwise.

    Under ``shm`` and ``hierarchical`` that is the model itself, whose backward pass ends with the
    shared-memory average; under the other options, DDP with the option's communication hook.
    ``bucket_cap_mb`` is DDP's (its default lets gloo overlap the first bucket's all-reduce with
    the rest of the backward pass). ``warmup_steps`` overrides the exact steps before PowerSGD or
    local SGD start. ``share_step``: under ``shm``, the ranks share one copy of the weights and of
    ``optimizer``'s state, and each runs the optimiser on its chunk (``trainer.sync.shared_step``;
    the caller then steps through ``Comm.step`` and clips through ``Comm.clip_grad_norm_``), where
    ``shared_step.shared_reason`` finds nothing against the model and optimiser; else it says why
    in the log and every rank steps on its own.

    ``find_unused_parameters``: DDP's, for models where some parameters get no gradient in some
    steps (without it DDP fails at the step after one). The shared-memory options always behave as
    DDP does with it, at no cost worth naming; DDP's graph traversal costs each forward pass, and DDP
    warns when it finds no unused parameter, so it is off unless asked for.
    """
    if not distributed:
        return model, None
    if comm not in COMM_OPTIONS:
        raise ValueError(f"unknown comm option {comm!r}; choose from {', '.join(COMM_OPTIONS)}")
    group = dist.group.WORLD
    option, why, hosts = resolve_comm(comm, model, device, group)
    result = Comm(option, SyncTimer(), device_clock(device), model)
    if option in ("shm", "hierarchical"):
        layout = hosts if option == "hierarchical" else None
        shared = None
        if share_step and option == "shm":
            not_shared = shared_reason(model, optimizer)
            if not_shared is None:
                shared = optimizer
            else:
                _log(logging.INFO, "optimiser step not shared between ranks: %s", not_shared)
        result.shm_sync, failures = start_shm_sync(model, group, timeout_s, result.timer, layout, shared)
        if result.shm_sync is not None:
            if isinstance(result.shm_sync, SharedStep):
                why += f"; one shared copy of the weights, each rank steps 1/{dist.get_world_size()} of them"
            _log_choice(comm, option, why)
            return model, result
        option = result.option = "gloo"
        why = f"shared memory set-up failed ({failures}); falling back to the process group's all-reduce"
    ddp = DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        bucket_cap_mb=bucket_cap_mb,
        # Gradients live in the communication buckets: no copy in or out each step.
        gradient_as_bucket_view=True,
        find_unused_parameters=find_unused_parameters,
    )
    result.ddp = ddp
    hook: Hook
    if option == "gloo":
        hook = functools.partial(_allreduce_hook, group)
    elif option in ("bf16", "fp16"):
        compress = default_hooks.bf16_compress_hook if option == "bf16" else default_hooks.fp16_compress_hook
        hook = functools.partial(compress, group)
    elif option == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=group,
            matrix_approximation_rank=POWERSGD_RANK,
            start_powerSGD_iter=POWERSGD_START_ITER if warmup_steps is None else warmup_steps,
        )
        result.powersgd = state
        result.powersgd_memory = PowerSGDMemory(state, model)
        hook = functools.partial(result.powersgd_memory.hook, state)
    else:  # localsgd
        # No subgroup all-reduce after the switch: on one host the "local" subgroup would be the
        # whole world, and its default (new_subgroups) needs CUDA. Averaging does the syncing.
        start = LOCALSGD_START_ITER if warmup_steps is None else warmup_steps
        localsgd = post_localSGD_hook.PostLocalSGDState(
            process_group=group,
            subgroup=None,
            start_localSGD_iter=start,
            post_local_gradient_allreduce=False,
        )
        hook = functools.partial(post_localSGD_hook.post_localSGD_hook, localsgd)
        result.localsgd = localsgd
        result.averager = PeriodicModelAverager(period=LOCALSGD_PERIOD, warmup_steps=start)
    ddp.register_comm_hook(None, result.timer.timed(hook))
    _log_choice(comm, option, why)
    return ddp, result


def _log(level: int, message: str, *args: object) -> None:
    """Rank 0 logs at ``level``; the other ranks, which decided the same, at INFO (shown under --log-all-ranks)."""
    log.log(level if dist.get_rank() == 0 else logging.INFO, message, *args)


def _log_choice(requested: str, option: str, why: str) -> None:
    """Rank 0 says which sync runs and why (a fallback from an explicit request as a warning; auto's
    choice is routine); the other ranks, which decided the same, say it only under --log-all-ranks."""
    level = logging.WARNING if requested not in ("auto", option) and dist.get_rank() == 0 else logging.INFO
    log.log(level, "gradient sync: %s (%s)", option, why)
