"""Gradient synchronisation: DDP wrapping, the ``--comm`` options, and timing of whichever runs.

Sync time is measured where it happens: the DDP options run as communication hooks, and a
wrapper notes when each bucket's hook is entered and when its future completes; ``shm`` times
its own call. The figure is communication (plus any wait for a slower peer), not inferred
from wall time.

Options (``--comm``):

- ``gloo``: the process group's own all-reduce (gloo on CPU, nccl on CUDA): pre-divide, sum.
- ``shm``: the same arithmetic through shared memory between the ranks of one host
  (``trainer.shm``); exact, and faster than gloo on loopback (docs/performance.md). It does
  DDP's job itself, without DDP (see ``ShmGradientSync``).
- ``auto`` (default): ``shm`` where it can run, else ``gloo``; the log says which and why.
- ``bf16`` / ``fp16``: gradients cast to 16 bits for the all-reduce (half the bytes; lossy).
- ``powersgd``: rank-``POWERSGD_RANK`` PowerSGD with error feedback after ``POWERSGD_START_ITER``
  exact steps (lossy per step; error feedback carries the residual to later steps).
- ``localsgd``: exact steps until ``LOCALSGD_START_ITER``, then each rank steps on its own
  gradients and the parameters are averaged every ``LOCALSGD_PERIOD`` steps and at the end of
  every epoch (replicas differ between averages).
"""

# No `from __future__ import annotations` here: DDP checks the hook's annotations at runtime.
import functools
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, post_localSGD_hook, powerSGD_hook
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.nn.parallel import DistributedDataParallel

from trainer import shm
from trainer.checkpoint import numpy_rng_from_plain, numpy_rng_to_plain
from trainer.config import COMM_OPTIONS
from trainer.metrics import device_clock
from trainer.powersgd_state import PowerSGDMemory

log = logging.getLogger(__name__)

POWERSGD_RANK = 4
POWERSGD_START_ITER = 100
LOCALSGD_START_ITER = 100
LOCALSGD_PERIOD = 8

Hook = Callable[[dist.GradBucket], torch.futures.Future]


Mark = float | torch.cuda.Event


class SyncTimer:
    """Records the sync window of each backward pass: first hook entry to last hook completion.

    On CUDA the window is read off CUDA events: nccl's futures complete once the all-reduce is
    queued, so a host clock would time the queueing, not the communication.
    """

    def __init__(self) -> None:
        self._first_launch: Mark | None = None
        self._last_done: Mark = 0.0
        self._extra_ms = 0.0

    def timed(self, hook: Hook) -> Callable:
        """A DDP communication hook that runs ``hook(bucket)`` and times it."""

        def timed_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
            on_cuda = bucket.buffer().is_cuda
            if self._first_launch is None:
                self._first_launch = _mark(on_cuda)
            return hook(bucket).then(functools.partial(self._finished, on_cuda))

        return timed_hook

    def _finished(self, on_cuda: bool, done: torch.futures.Future) -> torch.Tensor:
        # On CUDA this runs on a stream that waits for the all-reduce, so the event marks its end.
        self._last_done = _mark(on_cuda)
        return done.value()

    def add_ms(self, ms: float) -> None:
        """Count communication done outside the hooks (parameter averaging) in this step's sync."""
        self._extra_ms += ms

    def take_ms(self) -> float:
        """Milliseconds of sync since the previous call (on CUDA, waits for the last all-reduce)."""
        elapsed = self._extra_ms
        self._extra_ms = 0.0
        first, last = self._first_launch, self._last_done
        if isinstance(first, torch.cuda.Event) and isinstance(last, torch.cuda.Event):
            last.synchronize()
            elapsed += max(0.0, first.elapsed_time(last))
        elif isinstance(first, float) and isinstance(last, float):
            elapsed += max(0.0, last - first) * 1000.0
        self._first_launch = None
        return elapsed


def _mark(on_cuda: bool) -> Mark:
    """Now: a host clock reading, or a CUDA event queued on the current stream."""
    if not on_cuda:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _allreduce_hook(group: dist.ProcessGroup, bucket: dist.GradBucket) -> torch.futures.Future:
    # Same arithmetic as DDP's default hook: pre-divide, then sum.
    tensor = bucket.buffer().div_(group.size())
    return dist.all_reduce(tensor, group=group, async_op=True).get_future().then(lambda fut: fut.value()[0])


class ShmGradientSync:
    """Averages a model's gradients through shared memory at the end of every backward pass.

    What DDP does for the other options, done without DDP, whose per-step bookkeeping and copy of
    the result back into its buckets are a large share of so small a step (see docs/performance.md).
    Here each parameter's ``.grad`` becomes a view of the shared result (``ShmAllreduce.allreduce``),
    which the optimiser reads in place. The price: the
    gradients must be cleared with ``zero_grad(set_to_none=True)`` (torch's default) before the
    next backward pass, because peers may still read them; accumulating into them is refused.
    """

    def __init__(self, model: nn.Module, reducer: shm.ShmAllreduce, timer: "SyncTimer") -> None:
        self.reducer, self.timer = reducer, timer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._queued = False
        self._handles = [p.register_post_accumulate_grad_hook(self._grad_ready) for p in self.params]
        with torch.no_grad():  # start from rank 0's weights, as DDP does
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor, src=dist.get_global_rank(reducer.group, 0), group=reducer.group)

    def _grad_ready(self, _param: torch.Tensor) -> None:
        if not self._queued:  # first gradient of this backward pass: sync once it has finished
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._sync)

    def _sync(self) -> None:
        self._queued = False
        started = time.perf_counter()
        grads = []
        for p in self.params:
            if p.grad is None:
                grads.append(torch.zeros_like(p))  # not used this pass: contributes zero, as in DDP
            elif self.reducer.owns(p.grad):
                raise RuntimeError(
                    "--comm shm: a gradient still lives in shared memory at the next backward pass; clear "
                    "gradients with zero_grad(set_to_none=True) first, or use --comm gloo to accumulate them"
                )
            else:
                grads.append(p.grad.contiguous())
        averaged = self.reducer.allreduce(grads, divide_by=self.reducer.world_size)
        for p, grad in zip(self.params, averaged, strict=True):
            p.grad = grad
        self.timer.add_ms((time.perf_counter() - started) * 1e3)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        for p in self.params:
            if p.grad is not None and self.reducer.owns(p.grad):
                p.grad = p.grad.clone()  # the mapping goes away
        self.reducer.close()


class Comm:
    """The sync option chosen for a model: its timer, and what it does besides syncing gradients.

    Under ``shm`` it owns the shared-memory sync (``shm_sync``); under the DDP options the sync
    runs as DDP's communication hook, and local SGD also averages parameters (``averager``).
    """

    def __init__(self, option: str, timer: SyncTimer, clock: Callable[[], float] = time.perf_counter) -> None:
        self.option = option
        self.timer = timer
        self.clock = clock  # trainer.metrics.device_clock: on CUDA it waits for the averaging to run
        self.shm_sync: ShmGradientSync | None = None
        self.averager: PeriodicModelAverager | None = None
        self.powersgd: powerSGD_hook.PowerSGDState | None = None
        self.powersgd_memory: PowerSGDMemory | None = None  # its per-bucket memories, checkpointed per parameter
        self.localsgd: post_localSGD_hook.PostLocalSGDState | None = None

    def take_ms(self) -> float:
        return self.timer.take_ms()

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


def resolve_comm(requested: str, model: nn.Module, device: torch.device, group: dist.ProcessGroup) -> tuple[str, str]:
    """``requested`` -> the option that will run, and why. Collective: every rank must call it."""
    keys: list[str] = [""] * dist.get_world_size(group)
    dist.all_gather_object(keys, shm.host_key(), group=group)
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    reason = shm.unsupported_reason(device, keys, dtypes=dtypes)
    if requested == "auto":
        if reason:
            return "gloo", f"auto: shared memory unavailable ({reason})"
        return "shm", "auto: all ranks on one host"
    if requested == "shm" and reason:
        return "gloo", f"--comm shm unavailable ({reason}); falling back to the process group's all-reduce"
    return requested, f"--comm {requested}"


def wrap_model(
    model: nn.Module,
    device: torch.device,
    distributed: bool,
    comm: str = "auto",
    timeout_s: float = 120.0,
    bucket_cap_mb: float | None = None,
    warmup_steps: int | None = None,
) -> tuple[nn.Module, Comm | None]:
    """The model to train through, and its timed sync option, when distributed; the bare model (and
    no Comm) otherwise.

    Under ``shm`` that is the model itself, whose backward pass ends with the shared-memory
    average; under the other options, DDP with the option's communication hook.
    ``bucket_cap_mb`` is DDP's (its default lets gloo overlap the first bucket's all-reduce with
    the rest of the backward pass). ``warmup_steps`` overrides the exact steps before PowerSGD or
    local SGD start.
    """
    if not distributed:
        return model, None
    if comm not in COMM_OPTIONS:
        raise ValueError(f"unknown comm option {comm!r}; choose from {', '.join(COMM_OPTIONS)}")
    group = dist.group.WORLD
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    option, why = resolve_comm(comm, model, device, group)
    reducer = None
    if option == "shm":
        try:
            reducer = shm.ShmAllreduce(group, numel, timeout_s)
        except OSError as exc:  # raised on every rank alike, so all fall back together
            option, why = "gloo", f"{exc}; falling back to the process group's all-reduce"
    result = Comm(option, SyncTimer(), device_clock(device))
    if reducer is not None:
        result.shm_sync = ShmGradientSync(model, reducer, result.timer)
        log.log(_level(comm, option), "gradient sync: %s (%s)", option, why)
        return model, result
    ddp = DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        bucket_cap_mb=bucket_cap_mb,
        # Gradients live in the communication buckets: no copy in or out each step.
        gradient_as_bucket_view=True,
    )
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
    log.log(_level(comm, option), "gradient sync: %s (%s)", option, why)
    return ddp, result


def _level(requested: str, option: str) -> int:
    """A fallback from an explicit request is worth a warning; auto's choice is routine."""
    return logging.WARNING if requested not in ("auto", option) else logging.INFO
