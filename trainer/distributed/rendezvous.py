"""Joining the job's process group through its TCP store, and saying what went wrong when that fails.

torch's own errors for a wrong address, a port in use or ranks that disagree on WORLD_SIZE are
a timeout or a traceback that names neither cause nor fix; these functions keep to
``--timeout`` and turn each failure into a one-line ``UsageError``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from trainer.core.errors import UsageError
from trainer.distributed.env import DistEnv


def join_store(dist_env: DistEnv, timeout: timedelta) -> dist.Store:
    """Host (rank 0, unless torchrun's agent does) or reach (the others) the job's TCP store.

    Rank 0 does not wait for the others here: ``check_world_size`` does, with a clearer error.
    """
    host, port = str(dist_env.master_addr), int(dist_env.master_port or 0)
    if dist_env.rank == 0 and not dist_env.agent_store:
        try:
            return dist.TCPStore(
                host, port, dist_env.world_size, is_master=True, timeout=timeout, wait_for_workers=False
            )
        except dist.DistError as exc:
            raise UsageError(describe_store_error(exc, dist_env, timeout)) from None
    deadline = time.monotonic() + timeout.total_seconds()
    wait_for_listener(dist_env, deadline, timeout)
    # Hazard: a client that reached a port held by some other program waits forever for the
    # store's handshake, so the client is made in a daemon thread abandoned at the deadline.
    outcome: dict[str, object] = {}

    def connect() -> None:
        try:
            outcome["store"] = dist.TCPStore(host, port, dist_env.world_size, is_master=False, timeout=timeout)
        except Exception as exc:  # handed to the main thread below
            outcome["error"] = exc

    thread = threading.Thread(target=connect, name="join-store", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if thread.is_alive():
        raise UsageError(describe_store_error("no reply from the store", dist_env, timeout))
    if "error" in outcome:
        raise UsageError(describe_store_error(outcome["error"], dist_env, timeout))
    store = outcome["store"]
    assert isinstance(store, dist.Store)
    return store


def wait_for_listener(dist_env: DistEnv, deadline: float, timeout: timedelta) -> None:
    """Retry a plain TCP connection to MASTER_ADDR:MASTER_PORT until something listens there.

    torch's own client retries past its deadline and reports only a timeout; this keeps to
    the deadline and reports what the network said (refused, unreachable, unknown host).
    """
    address = (str(dist_env.master_addr), int(dist_env.master_port or 0))
    while True:
        try:
            with socket.create_connection(address, timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise UsageError(describe_store_error(exc.strerror or exc, dist_env, timeout)) from None
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def describe_store_error(error: object, dist_env: DistEnv, timeout: timedelta) -> str:
    """A failure to host or reach the store -> what went wrong, and the fix, on one line."""
    text = str(error).strip()
    detail = f" ({text.splitlines()[0]})" if text else ""
    where = f"MASTER_ADDR={dist_env.master_addr} MASTER_PORT={dist_env.master_port}"
    within = f"within --timeout {timeout.total_seconds():g}s"
    if "EADDRINUSE" in text or "address already in use" in text:
        return (
            f"MASTER_PORT={dist_env.master_port} is already in use on rank 0's host, so rank 0 cannot host the "
            "rendezvous store there; pick a free port for MASTER_PORT (the same on every rank)"
        )
    if dist_env.rank == 0 and not dist_env.agent_store:
        return f"rank 0 cannot host the rendezvous store at {where}{detail}; check MASTER_ADDR and MASTER_PORT"
    return (
        f"cannot reach the rendezvous store at {where} {within}{detail}; check that rank 0 is running, "
        "that MASTER_ADDR and MASTER_PORT are its address and port, reachable from this host, "
        "and that no other program holds that port"
    )


def check_world_size(store: dist.Store, dist_env: DistEnv, timeout: timedelta) -> None:
    """Stop with a clear error when hand-exported WORLD_SIZE differs between ranks.

    Without this the process group waits for ranks that never come, then fails with a
    timeout that names neither the cause nor the fix. Rank 0 publishes its WORLD_SIZE and
    compares everyone's with it; every other rank compares rank 0's with its own.
    """
    mine, rank = dist_env.world_size, dist_env.rank
    peers = [str(r) for r in range(1, mine)] if rank == 0 else ["0"]
    seen: dict[str, int] = {}
    try:
        if rank == 0:
            store.set("0", str(mine))
            with contextlib.suppress(dist.DistStoreError):  # a timeout: who is missing is reported below
                store.wait(peers, timeout)
            seen = {peer: int(store.get(peer)) for peer in peers if store.check([peer])}
        else:
            # Read rank 0's value before publishing ours: rank 0 stops as soon as it sees a mismatch.
            with contextlib.suppress(dist.DistStoreError):
                seen["0"] = int(store.get("0"))
            store.set(str(rank), str(mine))
    except dist.DistError as exc:
        raise UsageError(
            f"rank {rank} lost the rendezvous store at MASTER_ADDR={dist_env.master_addr} "
            f"MASTER_PORT={dist_env.master_port} ({str(exc).strip().splitlines()[0]}); see rank 0's error"
        ) from None
    for peer, theirs in seen.items():
        if theirs != mine:
            raise UsageError(
                f"WORLD_SIZE differs between ranks: rank {rank} has WORLD_SIZE={mine}, rank {peer} has "
                f"WORLD_SIZE={theirs}; export the same WORLD_SIZE (the total number of processes) for every rank"
            )
    missing = [peer for peer in peers if peer not in seen]
    if missing:
        raise UsageError(
            f"rank {rank} (WORLD_SIZE={mine}) did not hear from rank(s) {', '.join(missing)} within "
            f"--timeout {timeout.total_seconds():g}s; start all {mine} ranks, "
            "with the same WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
        )


def init_process_group(dist_env: DistEnv, backend: str, device: torch.device, timeout_s: float) -> None:
    """Join the job's process group through rank 0's TCP store at MASTER_ADDR:MASTER_PORT.

    Hazard: every rank blocks here until all WORLD_SIZE ranks arrive or ``timeout_s`` passes.
    A port in use, an unreachable address or ranks that disagree on WORLD_SIZE end in a
    one-line ``UsageError`` within that time instead of a traceback or a hang.
    """
    if not dist_env.distributed:
        return
    os.environ.setdefault("MASTER_ADDR", str(dist_env.master_addr))
    os.environ.setdefault("MASTER_PORT", str(dist_env.master_port))
    timeout = timedelta(seconds=timeout_s)
    store = join_store(dist_env, timeout)
    if dist_env.agent_store:
        # torchrun serves one store for all restarts and adds no per-attempt prefix, so a
        # restarted group could read the dead group's gloo addresses ("Connection refused" at init).
        # Failures raise the restart count and membership changes the world size: together they
        # name each attempt. torchrun gives every worker the same WORLD_SIZE.
        prefix = f"trainer/restart-{dist_env.restart_count}/world-{dist_env.world_size}"
    else:
        check_world_size(dist.PrefixStore("trainer/world_size", store), dist_env, timeout)
        prefix = "default_pg"  # the prefix torch uses for env:// itself
    dist.init_process_group(
        backend=backend,
        store=dist.PrefixStore(prefix, store),
        rank=dist_env.rank,
        world_size=dist_env.world_size,
        timeout=timeout,
        device_id=device if device.type == "cuda" else None,
    )


def destroy_process_group() -> None:
    """Safe to call on every exit path, whether or not a group was made."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
