"""Exact all-reduce of float32 gradients between the processes of one host, through shared memory.

Gloo on loopback pays for socket traffic on every call, however small the message; processes on
one host can instead write their gradients into a shared mapping and add them. Each call is a
reduce-scatter into one shared result, then every rank copies that result out into memory of its
own (``out``), so what a caller gets is private: writing into it cannot touch a peer's numbers.

1. the vector is cut into ``world_size`` chunks (cache-line aligned); rank ``r`` owns chunk ``r``;
2. every rank writes ``x / divide_by`` of the chunks it does not own into its slot and publishes
   phase 1, then writes its own chunk's term straight into the shared result (no peer reads
   that before phase 2);
3. when all ranks have published phase 1, each owner adds the other ranks' slots of its chunk
   into the result, in rank order, and publishes phase 2;
4. when all have published phase 2, each rank copies the whole result into ``out``.

``allreduce_through_leader`` (the hierarchical sync across hosts, ``trainer.sync.hierarchy``) sums
without dividing, and at step 4 the group's rank 0 (the leader) waits for phase 2, runs its step
on the shared result in place (an all-reduce with the other hosts' leaders) and then stores the
call's number in a share flag of its own; the other ranks wait for that flag instead, and every
rank writes ``result / divide_by`` into ``out``.

The arithmetic is gloo's sum of pre-divided gradients:

- world size 2: ``g0/2 + g1/2``, and IEEE addition is commutative, so it is bit for bit the
  value gloo computes (in whichever order it adds);
- larger worlds: each element is summed in one fixed order (its owner's term first, then rank
  order), and all ranks read the same result, so replicas agree exactly; gloo's ring adds in
  another order, so against gloo the values agree up to float summation order (relative error
  of a few float32 ulps of the summed magnitudes).

Call ``g`` publishes flag value ``3g - 2`` for phase 1 and ``3g - 1`` for phase 2; ``3g`` is left for
a third phase of ``trainer.sync.shared_step``, which calls ``reduce_scatter`` on a reducer of its own
and uses each rank's auxiliary flag (``publish_aux``) and the mapping's extra bytes (``extra``) for
the exchange of gradient norms between phases 2 and 3.

Two slot sets (``generation % 2``) let a rank start the next call while a peer still copies the
previous result: a set is rewritten two calls later, after every rank has entered the call in
between, and so has finished copying.

What the protocol relies on. A rank publishes a phase by storing an int64 flag after the data
stores it announces, and a peer reads the data only after it has loaded that flag's new value.
No fence is issued: x86-64's memory model (TSO) keeps stores in program order and loads in
program order, and makes stores visible to all cores in one order (so data written by torch's
intra-op worker threads, which the calling thread joins before a kernel returns, is visible before
the calling thread's flag). The data moves through torch kernels and the flags through numpy
element accesses on the mapping: opaque C calls that the Python interpreter runs in program
order and that really load or store memory (nothing is cached in a register across calls), and
an aligned int64 store is atomic. Architectures with weaker ordering (Arm, POWER) would need
fences that these calls do not issue, so they use gloo instead (``local_reason``).

Waiting (``wait_for_peers``): a rank whose peers have not published polls their flags back to
back ``SPIN_POLLS`` times (a peer in the same step arrives within microseconds), then yields the
CPU before each poll until it has waited ``YIELD_FOR_S`` (at once when there are more ranks than
CPUs), then sleeps between polls, ``SLEEP_MIN_S`` doubling up to ``SLEEP_MAX_S``: a peer busy
for longer (a checkpoint write, a slow step) costs the waiting rank a few percent of a core, and
its arrival is noticed within ``SLEEP_MAX_S``. Every ``LIVENESS_EVERY_S`` it checks that the peers
it waits for are alive, so a dead peer raises an error instead of hanging, and a stuck one raises
after the timeout.

The memory has no name: rank 0 makes it with ``memfd_create`` and the peers open it through
``/proc/<rank 0's pid>/fd/<fd>`` (the host key guarantees one host and one PID namespace). Nothing
is ever created in ``/dev/shm``, and the kernel frees the memory when the last process mapping it
exits, however it exits. Earlier versions named the file ``/dev/shm/trainer-allreduce-<pid>-*``;
``remove_leftovers`` deletes such files whose creator is gone.

Set-up is collective and agreed (``open_reducer`` then ``agree``): any exception on any rank
makes every rank fall back together, so no rank is left in a collective its peers skipped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import platform
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from trainer.distributed.env import available_cpus

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
LEGACY_PREFIX = "trainer-allreduce-"  # files of earlier versions, named ``<prefix><creator pid>-<random>``
FLAG_STRIDE = 8  # int64s per flag: one 64-byte cache line each, so ranks don't contend on a line
CHUNK_ALIGN = 16  # float32s per 64-byte cache line
X86_64 = ("x86_64", "amd64", "AMD64")
SPIN_POLLS = 64  # back-to-back polls before the waiting rank starts yielding
YIELD_FOR_S = 0.002  # then yield before each poll for this long ...
SLEEP_MIN_S = 0.00005  # ... then sleep between polls, from this ...
SLEEP_MAX_S = 0.001  # ... doubling up to this
LIVENESS_EVERY_S = 0.05
TEST_FAIL_ENV = "TRAINER_TEST_SHM_FAIL"  # test-only, see ``fail_for_tests``
STAGES = ("verdict", "create", "size", "map", "sync")  # set-up stages ``fail_for_tests`` knows


Peer = tuple[int, int, int | None, int]  # (group rank, pid, start time, index of the flag it publishes)


class PeerGone(RuntimeError):
    """A peer process died, or did not arrive within the timeout, during a shared-memory all-reduce."""


def fail_for_tests(stage: str, rank: int) -> None:
    """Test-only: raise at set-up ``stage`` (one of ``STAGES``) if ``TRAINER_TEST_SHM_FAIL`` is ``"<rank>:<stage>"``.

    The tests set it to show that a failure on one rank makes every rank fall back to gloo
    together; nothing else should. A ``RuntimeError``, not an ``OSError``: any exception must do.
    """
    if os.environ.get(TEST_FAIL_ENV) == f"{rank}:{stage}":
        raise RuntimeError(f"{TEST_FAIL_ENV} made rank {rank} fail at {stage}")


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


def local_reason(
    tensor_device: torch.device, dtypes: set[torch.dtype], machine: str | None = None, rank: int = 0
) -> str | None:
    """Why this process cannot take part in the shared-memory path, or None when it can.

    Each rank's verdict is gathered and the group decides on all of them (``group_reason``).
    """
    fail_for_tests("verdict", rank)
    machine = platform.machine() if machine is None else machine
    if tensor_device.type != "cpu":
        return f"gradients live on {tensor_device.type}, not in host memory"
    if dtypes and dtypes != {torch.float32}:
        return f"it sums float32 only, and the parameters are {', '.join(sorted(map(str, dtypes)))}"
    if machine not in X86_64:
        return f"{machine} may reorder stores; the flag protocol relies on x86-64's store order"
    if not hasattr(os, "memfd_create"):
        return "this system has no memfd_create"
    if not Path("/proc/self/fd").is_dir():
        return "/proc is not mounted"
    return None


def rank_reason(verdicts: list[tuple[str, str | None]]) -> str | None:
    """The first rank's reason it cannot use shared memory on its own host, or None if every rank can."""
    for rank, (_, reason) in enumerate(verdicts):
        if reason:
            return f"rank {rank}: {reason}"
    return None


def group_reason(verdicts: list[tuple[str, str | None]]) -> str | None:
    """Why the group cannot use shared memory, from every rank's ``(host_key(), local_reason())``; None if it can.

    A pure function of the gathered list, so every rank reaches the same decision.
    """
    unable = rank_reason(verdicts)
    if unable:
        return unable
    hosts = {key for key, _ in verdicts}
    if len(hosts) != 1:
        return f"the group spans {len(hosts)} hosts (or PID namespaces)"
    return None


def remove_leftovers(directory: Path = SHM_DIR) -> list[str]:
    """Delete the named shared files earlier versions left in ``directory`` when their creator died.

    A file is kept while a process with its creator's pid lives (in this PID namespace) and
    started before the file was made (a later start means the pid was reused). Returns the names
    removed. A live job's memory is never among them: current versions create no named file.
    """
    removed = []
    boot = _boot_time()
    ticks = os.sysconf("SC_CLK_TCK")
    for path in directory.glob(f"{LEGACY_PREFIX}*"):
        try:
            pid = int(path.name[len(LEGACY_PREFIX) :].split("-")[0])
            made = path.stat().st_mtime
        except (ValueError, OSError):
            continue
        started = _start_time(pid)
        # btime has one-second resolution: a process started up to 1 s after the file may be its creator.
        if started is not None and (boot is None or boot + started / ticks <= made + 1.0):
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path.name)
    return removed


def _boot_time() -> float | None:
    """Seconds since the epoch at boot (``btime`` in /proc/stat), or None if unreadable."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    return None


def create_memory(size: int, rank: int = 0) -> int:
    """A file descriptor for ``size`` bytes of anonymous shared memory (no name anywhere), reserved up front."""
    fail_for_tests("create", rank)
    fd = os.memfd_create("trainer-allreduce", os.MFD_CLOEXEC)
    try:
        fail_for_tests("size", rank)
        # Reserve now: a full tmpfs then fails here (and all ranks fall back) instead of SIGBUS mid-training.
        os.posix_fallocate(fd, 0, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_memory(owner_pid: int, fd: int, size: int, rank: int = 0) -> mmap.mmap:
    """Map ``size`` bytes of the memory that process ``owner_pid`` holds as ``fd`` (its own, if it is us)."""
    fail_for_tests("map", rank)
    if owner_pid == os.getpid():
        return mmap.mmap(fd, size)
    # Reopening through /proc needs the same user (ptrace read access); hardened kernels refuse it,
    # and then every rank falls back together.
    peer_fd = os.open(f"/proc/{owner_pid}/fd/{fd}", os.O_RDWR)
    try:
        return mmap.mmap(peer_fd, size)
    finally:
        os.close(peer_fd)


def open_shared_mapping(group: dist.ProcessGroup, size: int, rank: int) -> tuple[mmap.mmap | None, int, str, list]:
    """One shared mapping of ``size`` bytes for every rank of ``group``; collective, not yet agreed.

    Every rank reaches the same single collective whatever fails locally. Returns this rank's
    mapping (None on failure), rank 0's descriptor (-1 elsewhere; the peers open it through
    /proc, so rank 0 keeps it open until the mapping is closed), this rank's error ("" if none),
    and every rank's ``[pid, start time, fd]``.
    """
    fd, error = -1, ""
    me = [os.getpid(), None, fd]
    try:
        me[1] = _start_time(os.getpid())
        if dist.get_rank(group) == 0:
            me[2] = fd = create_memory(size, rank)
    except Exception as exc:
        error = describe(rank, "creating shared memory", exc)
    identities: list[list] = [[] for _ in range(dist.get_world_size(group))]
    dist.all_gather_object(identities, me, group=group)
    mapping = None
    owner_pid, _, owner_fd = identities[0]
    if owner_fd >= 0 and not error:
        try:
            mapping = map_memory(owner_pid, owner_fd, size, rank)
        except Exception as exc:
            error = describe(rank, "mapping shared memory", exc)
    return mapping, fd, error, identities


def describe(rank: int, doing: str, exc: BaseException) -> str:
    """One line naming the rank, what it was doing and the exception."""
    return f"rank {rank} failed {doing}: {type(exc).__name__}: {exc}"


def agree(group: dist.ProcessGroup, error: str) -> str:
    """Every rank's set-up error, joined ("" if none failed); collective, the same on every rank."""
    errors: list[str] = [""] * dist.get_world_size(group)
    dist.all_gather_object(errors, error, group=group)
    return "; ".join(e for e in errors if e)


def header_bytes(world_size: int) -> int:
    """A flag line per rank, the leader's share flag, and an auxiliary flag line per rank (``publish_aux``)."""
    return (2 * world_size + 1) * FLAG_STRIDE * 8


def data_bytes(world_size: int, capacity: int) -> int:
    """Two slot sets of one slot per rank, and two result vectors, rounded up to a cache line."""
    return -(-2 * (world_size + 1) * capacity * 4 // 64) * 64


def open_reducer(
    group: dist.ProcessGroup, capacity: int, timeout_s: float, extra_bytes: int = 0
) -> tuple[ShmAllreduce | None, str]:
    """This rank's ``ShmAllreduce`` over ``group``, or None and why; collective, not yet agreed.

    ``extra_bytes``: room after the vectors for the caller's own shared data (``ShmAllreduce.extra``).
    The caller finishes its own set-up, then passes this rank's error (or its own) to ``agree``
    and closes the reducer if any rank failed.
    """
    rank = dist.get_rank()
    world_size = dist.get_world_size(group)
    size = header_bytes(world_size) + data_bytes(world_size, capacity) + extra_bytes
    mapping, fd, error, identities = open_shared_mapping(group, size, rank)
    if mapping is None:
        release(None, fd)
        return None, error
    try:
        return ShmAllreduce(group, mapping, fd, identities, capacity, timeout_s, extra_bytes), ""
    except Exception as exc:
        release(mapping, fd)
        return None, describe(rank, "setting up the shared-memory all-reduce", exc)


def release(mapping: mmap.mmap | None, fd: int) -> None:
    """Unmap ``mapping`` (a stray view of it keeps it until the view goes) and close ``fd``: rank 0's
    descriptor, which the peers opened it through (-1 elsewhere)."""
    if mapping is not None:
        with contextlib.suppress(BufferError):
            mapping.close()
    if fd >= 0:
        os.close(fd)


def open_agreed(group: dist.ProcessGroup, capacity: int, timeout_s: float) -> ShmAllreduce:
    """``open_reducer`` and ``agree`` in one, for callers with no set-up of their own (benchmarks,
    tests); collective. Raises ``OSError`` on every rank if any rank failed."""
    reducer, error = open_reducer(group, capacity, timeout_s)
    return agreed_or_raise(group, reducer, error, "shared memory")


class Closable(Protocol):
    def close(self) -> None: ...


Reducer = TypeVar("Reducer", bound=Closable)  # ShmAllreduce, or the hierarchical one built on it


def agreed_or_raise(group: dist.ProcessGroup, reducer: Reducer | None, error: str, what: str) -> Reducer:
    """``reducer`` once every rank of ``group`` has set its own up (``agree``); else each rank closes
    its own and raises ``OSError`` naming ``what`` and the failures. Collective."""
    failures = agree(group, error)
    if failures:
        if reducer is not None:
            reducer.close()
        raise OSError(f"{what} could not be set up: {failures}")
    assert reducer is not None
    return reducer


def divide_into(tensor: torch.Tensor, divide_by: int, out: torch.Tensor) -> None:
    """``out = tensor / divide_by``, as a multiplication where ``divide_by`` is a power of two.

    Both are correctly rounded results of the same real number when the divisor is a power of two
    (even where the result is subnormal), so the bits are the same; the multiplication runs about
    twice as fast on gradients still in the cache.
    """
    if divide_by & (divide_by - 1) == 0:
        torch.mul(tensor, 1.0 / divide_by, out=out)
    else:
        torch.div(tensor, divide_by, out=out)


@dataclass(frozen=True)
class Span:
    """Elements ``[begin, end)`` of input tensor ``index``, at ``offset`` in the flat vector; summed by ``owner``."""

    index: int
    begin: int
    end: int
    offset: int
    owner: int


def plan_spans(
    sizes: tuple[int, ...], bounds: list[tuple[int, int]], offsets: tuple[int, ...] | None = None
) -> list[Span]:
    """Cut tensors of ``sizes``, laid end to end (or each at its ``offsets`` in the flat vector), at
    the owners' chunk ``bounds``: each element in one span."""
    spans, start = [], 0
    for index, size in enumerate(sizes):
        if offsets is not None:
            start = offsets[index]
        for owner, (lo, hi) in enumerate(bounds):
            a, b = max(start, lo), min(start + size, hi)
            if a < b:
                spans.append(Span(index, a - start, b - start, a, owner))
        start += size
    return spans


@dataclass(frozen=True)
class CallPlan:
    """One slot set's views for a list of tensors of given sizes, made once (slicing costs time per step)."""

    to_peers: list[tuple[int, slice, torch.Tensor]]  # (tensor, its elements, where in this rank's slot)
    to_own: list[tuple[int, slice, torch.Tensor]]  # (tensor, its elements, where in the own chunk's sum)
    own_result: torch.Tensor  # the chunk this rank sums: in the shared result, or in memory of its own
    own_from_peers: list[torch.Tensor]  # the same chunk in each peer's slot, in rank order
    result: torch.Tensor  # the whole shared result, the inputs laid end to end


def chunk_bounds(total: int, world_size: int) -> list[tuple[int, int]]:
    """[start, end) of the chunk each rank sums, cut at cache-line boundaries so owners never share a line."""
    per_rank = -(-total // world_size)
    per_rank = -(-per_rank // CHUNK_ALIGN) * CHUNK_ALIGN
    return [(min(k * per_rank, total), min((k + 1) * per_rank, total)) for k in range(world_size)]


class ShmAllreduce:
    """Sum of float32 tensors of up to ``capacity`` elements over ``group``, all on one host, into
    memory the caller owns. Made by ``open_reducer``.

    ``allreduce`` is the whole all-reduce; ``allreduce_through_leader`` lets the group's rank 0 act
    on the summed result before the others copy it (the hierarchical sync across hosts);
    ``reduce_scatter`` leaves each rank its chunk of the sum (the shared optimiser step).
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        mapping: mmap.mmap,
        fd: int,
        identities: list[list],
        capacity: int,
        timeout_s: float,
        extra_bytes: int = 0,
    ) -> None:
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.capacity, self.timeout_s = capacity, timeout_s
        self._generation = 0
        # More ranks than CPUs: a spinning rank would steal the core its peer needs to arrive.
        self._yield_always = available_cpus() < self.world_size
        # (group rank, pid, start time, index of the flag it publishes): each rank's own, and the
        # leader's share flag after the ranks' (``allreduce_through_leader``).
        self._peers = [
            (r, int(pid), start, r * FLAG_STRIDE) for r, (pid, start, _) in enumerate(identities) if r != self.rank
        ]
        self._share_flag = self.world_size * FLAG_STRIDE
        self._leader = [(0, int(identities[0][0]), identities[0][1], self._share_flag)]
        # Each rank's auxiliary flag, after the share flag: a phase of the caller's own (``publish_aux``).
        self._aux_flag = (self.world_size + 1 + self.rank) * FLAG_STRIDE
        self._aux_peers = [(r, pid, start, (self.world_size + 1 + r) * FLAG_STRIDE) for r, pid, start, _ in self._peers]
        self._map, self._fd = mapping, fd
        header = header_bytes(self.world_size)
        self._flags = np.frombuffer(self._map, dtype=np.int64, count=header // 8)
        # Each rank's flag line also carries the sum of the chunk it reduced (``check_finite``).
        self._chunk_sums = np.frombuffer(self._map, dtype=np.float64, count=self.world_size * FLAG_STRIDE)
        data = torch.frombuffer(
            self._map, dtype=torch.float32, offset=header, count=(self.world_size + 1) * 2 * capacity
        )
        self._slots = data[: 2 * self.world_size * capacity].view(2, self.world_size, capacity)
        self._results = data[2 * self.world_size * capacity :].view(2, capacity)
        self._plans: dict[tuple[int, ...], tuple[CallPlan, CallPlan]] = {}
        # The caller's own shared bytes (rank 0's buffers: trainer.sync.buffers; the shared step's norms).
        offset = header + data_bytes(self.world_size, capacity)
        self.extra = (
            torch.frombuffer(self._map, dtype=torch.uint8, offset=offset, count=extra_bytes) if extra_bytes else None
        )

    def allreduce_(self, tensor: torch.Tensor, divide_by: int = 1) -> torch.Tensor:
        """Replace ``tensor`` (contiguous float32, at most ``capacity`` elements) by the group's sum of
        ``tensor / divide_by`` (``divide_by`` = world size gives DDP's average, divided before summing)."""
        if self.world_size == 1:
            return tensor.div_(divide_by)
        self.allreduce([tensor], tensor.view(-1), divide_by)
        return tensor

    def allreduce(
        self,
        tensors: list[torch.Tensor],
        out: torch.Tensor,
        divide_by: int = 1,
        check_finite: bool = False,
        local_finite: bool = True,
    ) -> bool:
        """Write the group's sums of ``tensor / divide_by`` for ``tensors`` (contiguous float32, at most
        ``capacity`` elements in all), laid end to end, into ``out`` (flat, contiguous, private).

        ``out`` may alias the inputs: they are read before the result is written. It is this
        rank's own memory, so anything may be done to it afterwards.

        ``check_finite``: return whether every element of the result is finite, the same verdict on
        every rank. Each rank sums the chunk it has just reduced, while it is still in its cache, and
        publishes the sum beside its flag; NaN and Inf propagate through a sum (as in
        ``trainer.lifecycle.guard.grads_finite``, a sum of finite values that overflows also reads as not
        finite). ``local_finite`` False makes the verdict False on every rank (the divergence guard
        passes its loss's). Without ``check_finite``, returns True.
        """
        plans = self._plan(tuple(t.numel() for t in tensors))
        generation, result = self._sum_chunks(tensors, plans, divide_by, check_finite, local_finite)
        self.wait_for_peers(3 * generation - 1)
        finite = not check_finite or self.chunk_sums_finite()
        # Before this rank calls again (and so before any peer can rewrite this slot set).
        out.copy_(result)
        self._generation = generation
        return finite

    def allreduce_through_leader(
        self,
        tensors: list[torch.Tensor],
        out: torch.Tensor,
        leader_step: Callable[[torch.Tensor], object],
        divide_by: int = 1,
    ) -> None:
        """As ``allreduce``, but the group's plain sum goes through its rank 0 (the leader) first:
        the leader runs ``leader_step`` on the sum in the shared result, in place (an all-reduce
        with other hosts' leaders), while the others wait; then every rank writes ``result /
        divide_by`` into ``out``. Only the leader calls ``leader_step``; the others only wait.

        Every rank reads the bits the leader left there and divides them alike, so all ranks hold
        the same result; the others add nothing a second time.
        """
        generation, result = self._sum_chunks(tensors, self._plan(tuple(t.numel() for t in tensors)), 1)
        if self.rank == 0:
            self.wait_for_peers(3 * generation - 1)
            leader_step(result)
            self._flags[self._share_flag] = generation
        else:
            # Twice the leader's own limit: a leader that waits on a stopped host times out first and
            # names it (trainer/watch/hang.py), instead of its host's ranks blaming the live leader.
            self.wait_for_peers(generation, self._leader, "finish its step across hosts", 2 * self.timeout_s)
        divide_into(result, divide_by, out)
        self._generation = generation

    def reduce_scatter(
        self, tensors: list[torch.Tensor], plans: tuple[CallPlan, CallPlan], divide_by: int, local_finite: bool = True
    ) -> int:
        """Phases 1 and 2 of the next call, with this rank's chunk of the sum of ``tensors / divide_by``
        going into its own memory (``plan`` with ``own``), and the wait for every rank's phase 2; then
        ``chunk_sums_finite`` is the verdict of ``allreduce``'s ``check_finite``. Returns the call's
        number ``g``; flag value ``3g`` is the caller's (``trainer.sync.shared_step``)."""
        generation, _ = self._sum_chunks(tensors, plans, divide_by, True, local_finite)
        self.wait_for_peers(3 * generation - 1)
        self._generation = generation
        return generation

    def _sum_chunks(
        self,
        tensors: list[torch.Tensor],
        plans: tuple[CallPlan, CallPlan],
        divide_by: int,
        check_finite: bool = False,
        local_finite: bool = True,
    ) -> tuple[int, torch.Tensor]:
        """Phases 1 and 2 of the next call: this rank's chunk of the sum of ``tensors / divide_by`` is
        in ``plan``'s own chunk when this returns (the peers' in the shared result once they publish
        phase 2)."""
        generation = self._generation + 1
        plan = plans[generation % 2]
        for index, elements, target in plan.to_peers:
            divide_into(tensors[index].view(-1)[elements], divide_by, target)
        self.publish(3 * generation - 2)
        # Only this rank reads its own term before the add: write it while the peers catch up.
        for index, elements, target in plan.to_own:
            divide_into(tensors[index].view(-1)[elements], divide_by, target)
        self.wait_for_peers(3 * generation - 2)
        for slot in plan.own_from_peers:
            plan.own_result.add_(slot)
        if check_finite:
            self.publish_chunk_sum(plan.own_result, local_finite)
        self.publish(3 * generation - 1)
        return generation, plan.result

    def _plan(self, sizes: tuple[int, ...]) -> tuple[CallPlan, CallPlan]:
        """``plan`` for tensors of ``sizes`` laid end to end, summed into the shared result; cached."""
        if sizes not in self._plans:
            total = sum(sizes)
            bounds = chunk_bounds(total, self.world_size)
            self._plans[sizes] = self.plan(plan_spans(sizes, bounds), bounds[self.rank], total)
        return self._plans[sizes]

    def plan(
        self, spans: list[Span], chunk: tuple[int, int], total: int, own: torch.Tensor | None = None
    ) -> tuple[CallPlan, CallPlan]:
        """Both slot sets' views for calls on tensors cut into ``spans`` (``plan_spans``) of a flat
        vector of ``total`` elements, this rank summing elements ``chunk`` = [lo, hi): into the shared
        result, or into ``own`` (this rank's memory, hi - lo elements; ``reduce_scatter``). Made once:
        slicing costs time per step."""
        if total > self.capacity:
            raise ValueError(f"{total} elements exceed the shared-memory capacity of {self.capacity}")
        lo, hi = chunk
        plans = []
        for slots, result in zip(self._slots, self._results, strict=True):
            own_chunk = result[lo:hi] if own is None else own
            # This rank's own terms go straight into its chunk of the sum, the others into its slot.
            to_peers = [
                (s.index, slice(s.begin, s.end), slots[self.rank][s.offset : s.offset + s.end - s.begin])
                for s in spans
                if s.owner != self.rank
            ]
            to_own = [
                (s.index, slice(s.begin, s.end), own_chunk[s.offset - lo : s.offset - lo + s.end - s.begin])
                for s in spans
                if s.owner == self.rank
            ]
            peers = [slots[peer][lo:hi] for peer in range(self.world_size) if peer != self.rank]
            plans.append(CallPlan(to_peers, to_own, own_chunk, peers, result[:total]))
        return plans[0], plans[1]

    # -- the flag protocol, also used by ``trainer.sync.shared_step`` ------------------------------
    def publish(self, phase: int) -> None:
        """Tell the peers this rank has reached ``phase`` (after the stores it announces; module docstring)."""
        self._flags[self.rank * FLAG_STRIDE] = phase

    def publish_chunk_sum(self, chunk: torch.Tensor, local_finite: bool = True) -> None:
        """Publish the sum of ``chunk`` (NaN if not ``local_finite``) beside this rank's flag, before
        publishing the phase that announces it; ``chunk_sums_finite`` reads every rank's."""
        self._chunk_sums[self.rank * FLAG_STRIDE + 1] = float(chunk.sum()) if local_finite else math.nan

    def publish_aux(self, phase: int) -> None:
        """Publish ``phase`` in this rank's auxiliary flag: a phase of the caller's own between phases 2
        and 3 (the shared step's exchange of gradient norms), after the stores it announces."""
        self._flags[self._aux_flag] = phase

    def wait_aux(self, phase: int, doing: str) -> None:
        """Return once every peer has published ``phase`` in its auxiliary flag."""
        self.wait_for_peers(phase, self._aux_peers, doing)

    def chunk_sums_finite(self) -> bool:
        """Whether every rank's published chunk sum is finite (NaN and Inf propagate through a sum)."""
        return bool(np.isfinite(self._chunk_sums[1::FLAG_STRIDE]).all())

    def wait_for_peers(
        self, phase: int, peers: list[Peer] | None = None, doing: str = "", timeout_s: float | None = None
    ) -> None:
        """Return once each of ``peers`` (default: every peer) has published ``phase`` in its flag:
        spin, then yield, then sleep (module docstring). ``doing``: what a stuck peer failed to do;
        ``timeout_s``: how long a live peer may take (default: the reducer's timeout)."""
        flags = self._flags
        waiting = [peer for peer in (self._peers if peers is None else peers) if flags[peer[3]] < phase]
        polls = 0
        started = next_check = 0.0
        sleep_s = SLEEP_MIN_S
        while waiting:
            polls += 1
            if self._yield_always or polls > SPIN_POLLS:
                now = time.monotonic()
                if not started:
                    started, next_check = now, now + LIVENESS_EVERY_S
                if now - started < YIELD_FOR_S:
                    os.sched_yield()
                else:
                    time.sleep(sleep_s)
                    sleep_s = min(2 * sleep_s, SLEEP_MAX_S)
                if now >= next_check:
                    next_check = now + LIVENESS_EVERY_S
                    limit = self.timeout_s if timeout_s is None else timeout_s
                    self._check_peers(waiting, now - started, doing or "reach the shared-memory all-reduce", limit)
            waiting = [peer for peer in waiting if flags[peer[3]] < phase]

    def _check_peers(self, waiting: list[Peer], waited_s: float, doing: str, timeout_s: float) -> None:
        # Messages name global ranks: in a host's group of a hierarchical sync they differ from group ranks.
        for rank, pid, start, _ in waiting:
            if _start_time(pid) != start:
                raise PeerGone(f"rank {self._global(rank)} (pid {pid}) exited during a shared-memory all-reduce")
        if waited_s > timeout_s:
            ranks = ", ".join(str(self._global(rank)) for rank, _, _, _ in waiting)
            raise PeerGone(f"rank(s) {ranks} did not {doing} within {timeout_s:.0f} s")

    def _global(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank)

    def close(self) -> None:
        """Release the mapping (and, on rank 0, the descriptor the peers opened it through)."""
        del self._slots, self._results, self._flags, self._plans, self.extra
        release(self._map, self._fd)
        self._fd = -1
