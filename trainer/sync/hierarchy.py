"""Hierarchical all-reduce across hosts: shared memory within each host, gloo among the hosts' leaders.

When a job's ranks span several hosts, a flat gloo all-reduce sends every rank's share over TCP,
between ranks of one host (loopback) as well as between hosts. Like NCCL, which splits intra-
and inter-node work, the hierarchical sync (``--comm hierarchical``, and ``--comm auto`` when
every host has two or more ranks) does three steps:

1. the ranks of each host sum their gradients through shared memory (``trainer.sync.shm``): each
   element is added in one fixed order (its owner's term, then the others in local rank order;
   with two ranks on a host that is ``g_a + g_b``, which commutes);
2. each host's leader (its lowest global rank) all-reduces the host's sum, in place in the shared
   memory, with the other leaders over gloo (a ring over the leaders in rank order);
3. each rank of the host copies the leader's result out of the shared memory, divided by the
   world size, into its own buffer (the others do not add anything a second time).

So the result is the sum of the host sums, divided once: with two hosts of two ranks,
``((g0 + g1) + (g2 + g3)) / 4``. It is identical on every rank bit for bit (every rank reads the
same bits and divides them alike), and the same from run to run (each order above is fixed by
the ranks' layout). Against flat gloo (pre-divided terms summed in its ring's order) it differs
by float32 summation order only.

Groups: every rank creates every host's group and then the leaders' group, in the same order
(``dist.new_group`` is collective over the whole job), from ``host_groups``, a pure function of
the host keys every rank gathered, so that all ranks agree on the layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from trainer.sync import shm


def host_groups(keys: Sequence[str]) -> list[list[int]]:
    """Global ranks grouped by host (``keys[r]`` is rank ``r``'s ``shm.host_key()``): each host's
    ranks in order, hosts in the order of their lowest rank, so element 0 of each is its leader."""
    hosts: dict[str, list[int]] = {}
    for rank, key in enumerate(keys):
        hosts.setdefault(key, []).append(rank)
    return list(hosts.values())


def describe(hosts: list[list[int]]) -> str:
    """``2 hosts x 2 ranks``, or ``3 hosts of 2, 2, 1 ranks``, for the log."""
    sizes = [len(ranks) for ranks in hosts]
    noun = "host" if len(hosts) == 1 else "hosts"
    if len(set(sizes)) == 1:
        return f"{len(hosts)} {noun} x {sizes[0]} rank{'s' if sizes[0] > 1 else ''}"
    return f"{len(hosts)} {noun} of {', '.join(map(str, sizes))} ranks"


def auto_reason(hosts: list[list[int]]) -> str | None:
    """Why ``--comm auto`` does not choose the hierarchical sync for this layout; None if it does.

    It pays where each host has ranks to combine before the link: with one rank on a host the
    leaders' ring is flat gloo with more steps around it.
    """
    if len(hosts) < 2:
        return "the ranks share one host"
    single = sum(len(ranks) == 1 for ranks in hosts)
    if single:
        return f"a hierarchical sync needs two or more ranks on every host, and {single} of {len(hosts)} have one"
    return None


def new_groups(hosts: list[list[int]], timeout_s: float) -> tuple[dist.ProcessGroup, dist.ProcessGroup | None]:
    """This rank's host group, and the leaders' group on a leader (None elsewhere). Collective.

    Hazard: ``dist.new_group`` must be called by every rank of the job for every group, in the
    same order, members or not; ``hosts`` is the same list on every rank, so they do.
    """
    rank = dist.get_rank()
    timeout = timedelta(seconds=timeout_s)
    mine: dist.ProcessGroup | None = None
    for ranks in hosts:
        group = dist.new_group(ranks, timeout=timeout, backend="gloo")
        if rank in ranks:
            mine = group
    leaders = [ranks[0] for ranks in hosts]
    leaders_group = dist.new_group(leaders, timeout=timeout, backend="gloo")
    assert mine is not None, f"rank {rank} is on no host of {hosts}"
    return mine, leaders_group if rank in leaders else None


class HierarchicalAllreduce:
    """Sum over the whole job of float32 tensors, through shared memory within each host and gloo
    among the hosts' leaders, into memory the caller owns. Made by ``open_reducer``.

    Offers the calls of ``shm.ShmAllreduce`` that ``comm.ShmGradientSync`` uses, with
    ``world_size`` the job's.
    """

    def __init__(self, local: shm.ShmAllreduce, leaders: dist.ProcessGroup | None) -> None:
        self.local, self.leaders = local, leaders
        self.world_size = dist.get_world_size()

    def allreduce(self, tensors: list[torch.Tensor], out: torch.Tensor, divide_by: int = 1) -> None:
        """Write the job's sums of ``tensors`` divided by ``divide_by`` (the division after the sum),
        laid end to end, into ``out`` (flat, contiguous, this rank's own); collective.

        No finiteness verdict, unlike ``ShmAllreduce.allreduce``: the shared-memory step sees only its
        host's sum, not the job's, so the divergence guard reads the gradients itself.
        """
        self.local.allreduce_through_leader(tensors, out, self._across_hosts, divide_by)

    def allreduce_(self, tensor: torch.Tensor, divide_by: int = 1) -> torch.Tensor:
        """Replace ``tensor`` (contiguous float32) by the job's sum of it divided by ``divide_by``."""
        self.allreduce([tensor], tensor.view(-1), divide_by)
        return tensor

    def _across_hosts(self, host_sum: torch.Tensor) -> None:
        # Only leaders run this; the shared result is plain CPU memory to gloo.
        dist.all_reduce(host_sum, group=self.leaders)

    def close(self) -> None:
        self.local.close()


def open_reducer(hosts: list[list[int]], capacity: int, timeout_s: float) -> tuple[HierarchicalAllreduce | None, str]:
    """This rank's ``HierarchicalAllreduce`` for tensors of up to ``capacity`` elements, or None and why;
    collective over the job, not yet agreed (pass the error to ``shm.agree`` on the whole job)."""
    host_group, leaders = new_groups(hosts, timeout_s)
    local, error = shm.open_reducer(host_group, capacity, timeout_s)
    if local is None:
        return None, error
    return HierarchicalAllreduce(local, leaders), ""


def open_agreed(capacity: int, timeout_s: float) -> HierarchicalAllreduce:
    """``open_reducer`` for the job's layout, agreed, for callers with no set-up of their own (tests,
    benchmarks); collective. Raises ``OSError`` on every rank if any rank failed."""
    keys: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(keys, shm.host_key())
    reducer, error = open_reducer(host_groups(keys), capacity, timeout_s)
    return shm.agreed_or_raise(dist.group.WORLD, reducer, error, "the hierarchical all-reduce")
