"""Exact all-reduce of float32 gradients between the processes of one host, through shared memory.

Gloo on loopback pays for socket traffic on every call, however small the message; two
processes on one host can instead write their gradients into a shared mapping and add them.
Each call is a reduce-scatter into one shared result followed by reading that result, so every
element is added once, by one rank, and nobody copies the sum back out:

1. the vector is cut into ``world_size`` chunks (cache-line aligned); rank ``r`` owns chunk ``r``;
2. every rank writes ``x / divide_by`` of the chunks it does not own into its slot and publishes
   phase 1, then writes its own chunk's term straight into the shared result (no peer reads
   that before phase 2);
3. when all ranks have published phase 1, each owner adds the other ranks' slots of its chunk
   into the result, in rank order, and publishes phase 2;
4. when all have published phase 2, the whole result is the sum on every rank (one shared copy).

The arithmetic is gloo's sum of pre-divided gradients:

- world size 2: ``g0/2 + g1/2``, and IEEE addition is commutative, so it is bit for bit the
  value gloo computes (in whichever order it adds);
- larger worlds: each element is summed in one fixed order (its owner's term first, then rank
  order), and all ranks read the same result, so replicas agree exactly; gloo's ring adds in
  another order, so against gloo the values agree up to float summation order (relative error
  of a few float32 ulps of the summed magnitudes).

Two slot sets (``generation % 2``) mean a rank can start the next call while a peer still reads
the previous result: a set is rewritten two calls later, after every rank has entered the call
in between, and a rank is done with a result when it calls again.

Hazards handled here: x86-64 keeps stores in program order (TSO), which the flag-after-data
publication relies on, so other architectures fall back to gloo. A waiting rank polls its peers'
flags: it spins for ``SPIN_BEFORE_YIELD`` polls, then yields the CPU before every poll (at once
when there are more ranks than CPUs), and once it has waited ``SLEEP_AFTER_S`` it also sleeps
``SLEEP_S`` every ``SPIN_BEFORE_YIELD`` polls. Every ``LIVENESS_EVERY_S`` it checks that the peers
it waits for are alive, so a dead peer raises an error instead of hanging, and a stuck one raises
after the timeout. The shared file is unlinked as soon as every rank has mapped it, so a crash
later leaves nothing in ``/dev/shm``.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import platform
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from trainer.distributed import available_cpus

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
NAME_PREFIX = "trainer-allreduce-"
FLAG_STRIDE = 8  # int64s per flag: one 64-byte cache line each, so ranks don't contend on a line
CHUNK_ALIGN = 16  # float32s per 64-byte cache line
X86_64 = ("x86_64", "amd64", "AMD64")
SPIN_BEFORE_YIELD = 64  # polls before yielding the CPU on each further poll
SLEEP_AFTER_S = 0.005  # a peer this late is not about to arrive: poll every SLEEP_S instead
SLEEP_S = 0.0001
LIVENESS_EVERY_S = 0.05


class PeerGone(RuntimeError):
    """A peer process died, or did not arrive within the timeout, during a shared-memory all-reduce."""


def host_key() -> str:
    """Equal on two processes only if they share a host, a boot and a PID namespace (so PIDs mean the same)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pid_ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return f"unknown:{os.getpid()}"  # unique: never matches another process
    return f"{socket.gethostname()}:{boot}:{pid_ns}"


def _start_time(pid: int) -> int | None:
    """Kernel start time of ``pid`` (clock ticks since boot), or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def unsupported_reason(
    tensor_device: torch.device,
    host_keys: list[str],
    machine: str | None = None,
    dtypes: set[torch.dtype] | None = None,
) -> str | None:
    """Why the shared-memory path cannot serve this group, or None when it can."""
    machine = platform.machine() if machine is None else machine
    if tensor_device.type != "cpu":
        return f"gradients live on {tensor_device.type}, not in host memory"
    if dtypes and dtypes != {torch.float32}:
        return f"it sums float32 only, and the parameters are {', '.join(sorted(map(str, dtypes)))}"
    if machine not in X86_64:
        return f"{machine} may reorder stores; the flag protocol relies on x86-64's store order"
    if not SHM_DIR.is_dir():
        return f"{SHM_DIR} does not exist"
    if len(set(host_keys)) != 1:
        return f"the group spans {len(set(host_keys))} hosts (or PID namespaces)"
    return None


def create_shared_file(size: int) -> Path:
    """A new, uniquely named file of ``size`` bytes in ``SHM_DIR``, its memory reserved up front."""
    path = SHM_DIR / f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        # Reserve now: a full tmpfs then fails here (and we fall back) instead of SIGBUS mid-training.
        os.posix_fallocate(fd, 0, size)
    except OSError:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return path


def map_shared_file(path: Path, size: int) -> mmap.mmap:
    """``path`` mapped read-write and shared (the descriptor is closed; the mapping keeps the file)."""
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def open_shared_mapping(group: dist.ProcessGroup, size: int) -> tuple[mmap.mmap, Path]:
    """One shared file of ``size`` bytes, mapped by every rank of ``group``; collective.

    Rank 0 creates the file and broadcasts its name; every rank maps it; the file is unlinked
    once all have (the mappings keep the memory), so a crash later leaves nothing in ``SHM_DIR``.
    Returns the mapping and the file's (already unlinked) path. Raises ``OSError`` on every rank
    if any rank failed, so callers can fall back together.
    """
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    name = [""]
    path: Path | None = None
    mapping: mmap.mmap | None = None
    error = ""
    try:
        if rank == 0:
            try:
                path = create_shared_file(size)
                name[0] = path.name
            except OSError as exc:
                error = f"rank 0 could not create it: {exc}"
        # Every rank reaches this broadcast and the gather below, failure or not, so no rank is
        # left waiting in a collective and all of them fall back together.
        dist.broadcast_object_list(name, src=dist.get_global_rank(group, 0), group=group)
        if name[0]:
            try:
                mapping = map_shared_file(SHM_DIR / name[0], size)
            except OSError as exc:
                error = f"rank {rank}: {exc}"
        errors: list[str] = [""] * world_size
        # Doubles as the barrier after which nobody needs the name any more.
        dist.all_gather_object(errors, error, group=group)
    finally:
        if path is not None:
            path.unlink(missing_ok=True)
    failures = [e for e in errors if e]
    if failures or mapping is None:
        if mapping is not None:
            mapping.close()
        raise OSError(f"shared memory could not be mapped: {'; '.join(failures)}")
    return mapping, SHM_DIR / name[0]


@dataclass(frozen=True)
class Span:
    """Elements ``[begin, end)`` of input tensor ``index``, at ``offset`` in the flat vector; summed by ``owner``."""

    index: int
    begin: int
    end: int
    offset: int
    owner: int


def plan_spans(sizes: tuple[int, ...], bounds: list[tuple[int, int]]) -> list[Span]:
    """Cut tensors of ``sizes``, laid end to end, at the owners' chunk ``bounds``: each element in one span."""
    spans, start = [], 0
    for index, size in enumerate(sizes):
        for owner, (lo, hi) in enumerate(bounds):
            a, b = max(start, lo), min(start + size, hi)
            if a < b:
                spans.append(Span(index, a - start, b - start, a, owner))
        start += size
    return spans


@dataclass(frozen=True)
class _Plan:
    """One slot set's views for a list of tensors of given sizes, made once (slicing costs time per step)."""

    to_peers: list[tuple[int, slice, torch.Tensor]]  # (tensor, its elements, where in this rank's slot)
    to_own: list[tuple[int, slice, torch.Tensor]]  # (tensor, its elements, where in the own chunk's result)
    own_result: torch.Tensor  # the chunk this rank sums, in the shared result
    own_from_peers: list[torch.Tensor]  # the same chunk in each peer's slot, in rank order
    results: list[torch.Tensor]  # each tensor's span of the shared result


def chunk_bounds(total: int, world_size: int) -> list[tuple[int, int]]:
    """[start, end) of the chunk each rank sums, cut at cache-line boundaries so owners never share a line."""
    per_rank = -(-total // world_size)
    per_rank = -(-per_rank // CHUNK_ALIGN) * CHUNK_ALIGN
    return [(min(k * per_rank, total), min((k + 1) * per_rank, total)) for k in range(world_size)]


class ShmAllreduce:
    """Sum of float32 tensors of up to ``capacity`` elements over ``group``, all on one host: ``allreduce``
    hands out views of the shared result, ``allreduce_`` copies it back into the tensor.

    Collective to construct: every rank of ``group`` must call it. Raises ``OSError`` (on every
    rank) if any rank could not map the shared file, so callers can fall back together.
    """

    def __init__(self, group: dist.ProcessGroup, capacity: int, timeout_s: float) -> None:
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.capacity, self.timeout_s = capacity, timeout_s
        self._generation = 0
        # More ranks than CPUs: a spinning rank would steal the core its peer needs to arrive.
        self._yield_always = available_cpus() < self.world_size
        identity = [os.getpid(), _start_time(os.getpid())]
        peers: list[list[int | None]] = [[] for _ in range(self.world_size)]
        dist.all_gather_object(peers, identity, group=group)
        self._peers = [(r, int(pid), start) for r, (pid, start) in enumerate(peers) if r != self.rank]

        header = self.world_size * FLAG_STRIDE * 8
        # Two slot sets of one slot per rank, and two result vectors.
        self._map, self.path = open_shared_mapping(group, header + 2 * (self.world_size + 1) * capacity * 4)
        self._flags = np.frombuffer(self._map, dtype=np.int64, count=self.world_size * FLAG_STRIDE)
        data = torch.frombuffer(
            self._map, dtype=torch.float32, offset=header, count=(self.world_size + 1) * 2 * capacity
        )
        self._slots = data[: 2 * self.world_size * capacity].view(2, self.world_size, capacity)
        self._results = data[2 * self.world_size * capacity :].view(2, capacity)
        self._plans: dict[tuple[int, ...], tuple[_Plan, _Plan]] = {}

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``'s memory lies in this reducer's shared mapping (a result handed out)."""
        start = self._slots.data_ptr()
        end = self._results.data_ptr() + self._results.numel() * 4
        return start <= tensor.data_ptr() < end

    def allreduce_(self, tensor: torch.Tensor, divide_by: int = 1) -> torch.Tensor:
        """Replace ``tensor`` (contiguous float32, at most ``capacity`` elements) by the group's sum of
        ``tensor / divide_by`` (``divide_by`` = world size gives DDP's average, divided before summing)."""
        if self.world_size == 1:
            return tensor.div_(divide_by)
        (result,) = self.allreduce([tensor], divide_by)
        return tensor.copy_(result)

    def allreduce(self, tensors: list[torch.Tensor], divide_by: int = 1) -> list[torch.Tensor]:
        """The group's sums of ``tensor / divide_by`` for each of ``tensors`` (contiguous float32, at
        most ``capacity`` elements in all), as views of the shared result shaped like the inputs.

        The views hold the result until this rank calls again (a peer may overwrite them once every
        rank has entered the next call), and peers read them meanwhile: read or copy, never write.
        """
        generation = self._generation + 1
        plan = self._plan(tuple(t.numel() for t in tensors))[generation % 2]
        for index, elements, target in plan.to_peers:
            torch.div(tensors[index].view(-1)[elements], divide_by, out=target)
        self._flags[self.rank * FLAG_STRIDE] = 2 * generation - 1
        # Only this rank reads its own term before the add: write it while the peers catch up.
        for index, elements, target in plan.to_own:
            torch.div(tensors[index].view(-1)[elements], divide_by, out=target)
        self._wait_for_peers(2 * generation - 1)
        for slot in plan.own_from_peers:
            plan.own_result.add_(slot)
        self._flags[self.rank * FLAG_STRIDE] = 2 * generation
        self._wait_for_peers(2 * generation)
        self._generation = generation
        return [result.view(t.shape) for t, result in zip(tensors, plan.results, strict=True)]

    def _plan(self, sizes: tuple[int, ...]) -> tuple[_Plan, _Plan]:
        if sizes not in self._plans:
            total = sum(sizes)
            if total > self.capacity:
                raise ValueError(f"{total} elements exceed the shared-memory capacity of {self.capacity}")
            bounds = chunk_bounds(total, self.world_size)
            spans = plan_spans(sizes, bounds)
            lo, hi = bounds[self.rank]
            plans = []
            for slots, result in zip(self._slots, self._results, strict=True):
                # This rank's own chunk goes straight into the result, the others into its slot.
                to_peers = [
                    (s.index, slice(s.begin, s.end), slots[self.rank][s.offset : s.offset + s.end - s.begin])
                    for s in spans
                    if s.owner != self.rank
                ]
                to_own = [
                    (s.index, slice(s.begin, s.end), result[s.offset : s.offset + s.end - s.begin])
                    for s in spans
                    if s.owner == self.rank
                ]
                starts = [sum(sizes[:i]) for i in range(len(sizes))]
                results = [result[start : start + size] for start, size in zip(starts, sizes, strict=True)]
                peers = [slots[peer][lo:hi] for peer in range(self.world_size) if peer != self.rank]
                plans.append(_Plan(to_peers, to_own, result[lo:hi], peers, results))
            self._plans[sizes] = (plans[0], plans[1])
        return self._plans[sizes]

    def _wait_for_peers(self, phase: int) -> None:
        flags = self._flags
        waiting = [peer for peer in self._peers if flags[peer[0] * FLAG_STRIDE] < phase]
        polls = 0
        started = next_check = 0.0
        while waiting:
            polls += 1
            if self._yield_always or polls > SPIN_BEFORE_YIELD:
                os.sched_yield()
            if polls % SPIN_BEFORE_YIELD == 0:
                now = time.monotonic()
                if not started:
                    started, next_check = now, now + LIVENESS_EVERY_S
                if now - started > SLEEP_AFTER_S:
                    time.sleep(SLEEP_S)
                if now >= next_check:
                    next_check = now + LIVENESS_EVERY_S
                    self._check_peers(waiting, now - started)
            waiting = [peer for peer in waiting if flags[peer[0] * FLAG_STRIDE] < phase]

    def _check_peers(self, waiting: list[tuple[int, int, int | None]], waited_s: float) -> None:
        for rank, pid, start in waiting:
            if _start_time(pid) != start:
                raise PeerGone(f"rank {rank} (pid {pid}) exited during a shared-memory all-reduce")
        if waited_s > self.timeout_s:
            ranks = ", ".join(str(rank) for rank, _, _ in waiting)
            raise PeerGone(f"rank(s) {ranks} did not reach the shared-memory all-reduce within {self.timeout_s:.0f} s")

    def close(self) -> None:
        """Release the mapping (the file itself was unlinked when every rank had mapped it)."""
        del self._slots, self._results, self._flags, self._plans
        # A caller may still hold a view; the mapping then goes with the last reference.
        with contextlib.suppress(BufferError):
            self._map.close()
