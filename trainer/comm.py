"""Gradient synchronisation: DDP wrapping, the ``--comm`` options, and timing of whichever runs.

Sync time is measured where it happens: every option runs as a DDP communication hook, and
a wrapper notes when each bucket's hook is entered and when its future completes, so the
figure is communication (plus any wait for a slower peer), not inferred from wall time.

Options (``--comm``):

- ``gloo``: the process group's own all-reduce (gloo on CPU, nccl on CUDA): pre-divide, sum.
- ``shm``: the same arithmetic through shared memory between the ranks of one host
  (``trainer.shm``); exact, several times faster than gloo on loopback.
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

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, post_localSGD_hook, powerSGD_hook
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.nn.parallel import DistributedDataParallel

from trainer import shm

log = logging.getLogger(__name__)

COMM_OPTIONS = ("auto", "gloo", "shm", "bf16", "fp16", "powersgd", "localsgd")
POWERSGD_RANK = 4
POWERSGD_START_ITER = 100
LOCALSGD_START_ITER = 100
LOCALSGD_PERIOD = 8

Hook = Callable[[dist.GradBucket], torch.futures.Future]


class SyncTimer:
    """Records the sync window of each backward pass: first hook entry to last hook completion."""

    def __init__(self) -> None:
        self._first_launch: float | None = None
        self._last_done = 0.0
        self._extra_ms = 0.0

    def timed(self, hook: Hook) -> Callable:
        """A DDP communication hook that runs ``hook(bucket)`` and times it."""

        def timed_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
            launched = time.perf_counter()
            if self._first_launch is None:
                self._first_launch = launched
            return hook(bucket).then(self._finished)

        return timed_hook

    def _finished(self, done: torch.futures.Future) -> torch.Tensor:
        self._last_done = time.perf_counter()
        return done.value()

    def add_ms(self, ms: float) -> None:
        """Count communication done outside the hooks (parameter averaging) in this step's sync."""
        self._extra_ms += ms

    def take_ms(self) -> float:
        """Milliseconds of sync since the previous call."""
        elapsed = self._extra_ms
        self._extra_ms = 0.0
        if self._first_launch is not None:
            elapsed += max(0.0, self._last_done - self._first_launch) * 1000.0
            self._first_launch = None
        return elapsed


def _allreduce_hook(group: dist.ProcessGroup, bucket: dist.GradBucket) -> torch.futures.Future:
    # Same arithmetic as DDP's default hook: pre-divide, then sum.
    tensor = bucket.buffer().div_(group.size())
    return dist.all_reduce(tensor, group=group, async_op=True).get_future().then(lambda fut: fut.value()[0])


def _shm_hook(reducer: shm.ShmAllreduce, group: dist.ProcessGroup, bucket: dist.GradBucket) -> torch.futures.Future:
    tensor = bucket.buffer()
    if tensor.dtype != torch.float32 or tensor.numel() > reducer.capacity:
        return _allreduce_hook(group, bucket)  # the same decision on every rank: buckets are alike
    reducer.allreduce_(tensor, divide_by=reducer.world_size)
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(tensor)
    return future


class Comm:
    """The chosen sync option of one DDP model: its timer, and what it must do besides the hook."""

    def __init__(self, option: str, timer: SyncTimer) -> None:
        self.option = option
        self.timer = timer
        self.reducer: shm.ShmAllreduce | None = None
        self.averager: PeriodicModelAverager | None = None

    def take_ms(self) -> float:
        return self.timer.take_ms()

    def after_step(self, params: Iterable[torch.Tensor]) -> None:
        """Call after every optimiser step (local SGD averages the parameters here)."""
        if self.averager is not None:
            started = time.perf_counter()
            self.averager.average_parameters(params)
            self.timer.add_ms((time.perf_counter() - started) * 1e3)

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

    def close(self) -> None:
        if self.reducer is not None:
            self.reducer.close()
            self.reducer = None


def resolve_comm(requested: str, device: torch.device, group: dist.ProcessGroup) -> tuple[str, str]:
    """``requested`` -> the option that will run, and why. Collective: every rank must call it."""
    keys: list[str] = [""] * dist.get_world_size(group)
    dist.all_gather_object(keys, shm.host_key(), group=group)
    reason = shm.unsupported_reason(device, keys)
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
    """DDP with the chosen sync option, timed, when distributed; the bare model (and no Comm) otherwise.

    ``bucket_cap_mb`` defaults to one bucket for all gradients under ``shm`` (one rendezvous per
    step instead of one per bucket) and to DDP's own default otherwise (gloo then overlaps the
    first bucket's all-reduce with the rest of the backward pass).
    ``warmup_steps`` overrides the exact steps before PowerSGD or local SGD start.
    """
    if not distributed:
        return model, None
    if comm not in COMM_OPTIONS:
        raise ValueError(f"unknown comm option {comm!r}; choose from {', '.join(COMM_OPTIONS)}")
    group = dist.group.WORLD
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    option, why = resolve_comm(comm, device, group)
    if option == "shm":
        try:
            reducer = shm.ShmAllreduce(group, capacity=numel, timeout_s=timeout_s)
        except OSError as exc:  # raised on every rank alike, so all fall back together
            option, why = "gloo", f"{exc}; falling back to the process group's all-reduce"
    if bucket_cap_mb is None and option == "shm":
        bucket_cap_mb = numel * 4 / 2**20 + 1
    ddp = DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        bucket_cap_mb=bucket_cap_mb,
        # Gradients live in the communication buckets: no copy in or out each step.
        gradient_as_bucket_view=True,
    )
    result = Comm(option, SyncTimer())
    hook: Hook
    if option == "shm":
        result.reducer = reducer
        hook = functools.partial(_shm_hook, reducer, group)
    elif option == "gloo":
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
        hook = functools.partial(powerSGD_hook.powerSGD_hook, state)
    else:  # localsgd
        # No subgroup all-reduce after the switch: on one host the "local" subgroup would be the
        # whole world, and its default (new_subgroups) needs CUDA. Averaging does the syncing.
        start = LOCALSGD_START_ITER if warmup_steps is None else warmup_steps
        state = post_localSGD_hook.PostLocalSGDState(
            process_group=group,
            subgroup=None,
            start_localSGD_iter=start,
            post_local_gradient_allreduce=False,
        )
        hook = functools.partial(post_localSGD_hook.post_localSGD_hook, state)
        result.averager = PeriodicModelAverager(period=LOCALSGD_PERIOD, warmup_steps=start)
    ddp.register_comm_hook(None, result.timer.timed(hook))
    # A fallback from an explicit request is worth a warning; auto's choice is routine.
    level = logging.WARNING if comm not in ("auto", option) else logging.INFO
    log.log(level, "gradient sync: %s (%s)", option, why)
    return ddp, result
