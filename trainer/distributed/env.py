"""The distributed contract: read the launcher's environment once, set up and tear down.

The same code serves a plain ``python -m trainer`` (no variables: world size 1, no
process group), ``torchrun`` and shell scripts that export the variables themselves.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from trainer.core.errors import UsageError

log = logging.getLogger(__name__)

CONTRACT_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Everything torchrun sets for a worker: a process started from inside a launched one must drop
# these, or it would believe it is that worker.
LAUNCHER_VARS = (
    *CONTRACT_VARS,
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_ERROR_FILE",
)


def without_launcher_vars(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``env`` for starting a fresh job: no launcher variable leaks into it."""
    return {k: v for k, v in env.items() if k not in LAUNCHER_VARS}


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job, as the launcher described it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    restart_count: int = 0
    run_id: str | None = None  # TORCHELASTIC_RUN_ID: the same for every restart of one launch
    agent_store: bool = False  # TORCHELASTIC_USE_AGENT_STORE: MASTER_PORT is torchrun's store, shared by restarts

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_var(env: Mapping[str, str], name: str, fix: str) -> int:
    text = env[name]
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{name}={text!r} is not an integer; {fix}") from None


def read_dist_env(env: Mapping[str, str] | None = None) -> DistEnv:
    """Validate the launcher's variables; a bad or partial set raises a one-line ``UsageError``."""
    env = os.environ if env is None else env
    if not any(name in env for name in CONTRACT_VARS):
        return DistEnv()
    for present, missing in (("WORLD_SIZE", "RANK"), ("RANK", "WORLD_SIZE")):
        if present in env and missing not in env:
            raise UsageError(f"{present} is set but {missing} is not; export both (or neither, for one process)")
    if "RANK" not in env:
        set_vars = ", ".join(n for n in CONTRACT_VARS if n in env)
        raise UsageError(f"{set_vars} set without RANK and WORLD_SIZE; export all of {', '.join(CONTRACT_VARS)}")

    world_size = _int_var(env, "WORLD_SIZE", "export the number of processes, e.g. WORLD_SIZE=2")
    rank = _int_var(env, "RANK", "export this process's index, 0..WORLD_SIZE-1")
    if world_size < 1:
        raise UsageError(f"WORLD_SIZE={world_size} must be at least 1")
    if not 0 <= rank < world_size:
        raise UsageError(
            f"RANK={rank} is outside 0..{world_size - 1} for WORLD_SIZE={world_size}; "
            "give each process a distinct RANK below WORLD_SIZE"
        )

    local_rank = _int_var(env, "LOCAL_RANK", "export this process's index on its node") if "LOCAL_RANK" in env else rank
    local_world_size = (
        _int_var(env, "LOCAL_WORLD_SIZE", "export the number of processes on this node")
        if "LOCAL_WORLD_SIZE" in env
        else world_size
    )
    if local_world_size < 1 or not 0 <= local_rank < local_world_size:
        raise UsageError(
            f"LOCAL_RANK={local_rank} is outside 0..{local_world_size - 1} (LOCAL_WORLD_SIZE={local_world_size}); "
            "give each process on a node a distinct LOCAL_RANK"
        )

    master_addr = env.get("MASTER_ADDR") or None
    master_port: int | None = None
    if "MASTER_PORT" in env:
        master_port = _int_var(env, "MASTER_PORT", "export a TCP port number such as 29500")
        if not 1 <= master_port <= 65535:
            raise UsageError(f"MASTER_PORT={master_port} is not a TCP port; use one in 1..65535, e.g. 29500")
    if world_size > 1:
        if master_addr is None:
            raise UsageError(
                "MASTER_ADDR is not set but WORLD_SIZE>1; export the address of rank 0, e.g. MASTER_ADDR=127.0.0.1"
            )
        if master_port is None:
            raise UsageError(
                "MASTER_PORT is not set but WORLD_SIZE>1; "
                "export a free TCP port on rank 0's host, e.g. MASTER_PORT=29500"
            )

    restarts = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    return DistEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        master_addr=master_addr,
        master_port=master_port,
        restart_count=int(restarts) if restarts.isdigit() else 0,
        run_id=env.get("TORCHELASTIC_RUN_ID") or None,
        agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
    )


def available_cpus() -> int:
    """CPUs this process may run on (respects taskset/cgroup affinity, unlike ``os.cpu_count``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def configure_threads(dist_env: DistEnv) -> tuple[int, str]:
    """Set intra-op threads so the ranks on one node share its cores instead of fighting for them.

    Returns the thread count and where it came from, for the log.
    """
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) >= 1:
        threads, source = int(omp), "OMP_NUM_THREADS"
    else:
        threads = max(1, available_cpus() // dist_env.local_world_size)
        source = f"{available_cpus()} cpus // {dist_env.local_world_size} local processes"
    torch.set_num_threads(threads)
    return threads, source


def resolve_device(requested: str, dist_env: DistEnv) -> torch.device:
    """``auto`` -> CUDA (one GPU per local rank) when available, else CPU."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but CUDA is not available; use --device cpu or auto")
        gpus = torch.cuda.device_count()
        if dist_env.local_rank >= gpus:
            raise UsageError(
                f"LOCAL_RANK={dist_env.local_rank} but only {gpus} GPU{'' if gpus == 1 else 's'} visible; "
                "start at most one process per GPU (--nproc_per_node), or train on the CPU with --device cpu"
            )
        torch.cuda.set_device(dist_env.local_rank)
        return torch.device("cuda", dist_env.local_rank)
    return torch.device("cpu")


def resolve_backend(requested: str, device: torch.device) -> str:
    """``auto`` -> nccl for CUDA tensors, gloo for CPU tensors."""
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise UsageError("--backend nccl needs CUDA tensors; use --backend gloo (or auto) on the CPU")
    return requested
