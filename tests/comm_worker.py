"""One rank of a comm test (run under torchrun, or with exported RANK/WORLD_SIZE for the peer tests).

``grads OUT``: for the reference (DDP with torch's own all-reduce) and every ``--comm`` option,
the gradients after backward passes on this rank's batch, saved to ``OUT/rank<r>.pt`` together
with this rank's local (unsynchronised) gradients.
``die OUT`` / ``stall OUT``: rank 1 exits / sleeps instead of joining a shared-memory all-reduce;
rank 0 writes what happened to ``OUT/rank0.json``.
``accumulate OUT``: under ``--comm shm``, a second backward pass without clearing the gradients;
each rank writes the error it got to ``OUT/rank<r>.json``.
``cuda OUT``: over nccl, one GPU per rank: this rank's local gradients and, for each option that
runs on CUDA, the synchronised gradients and the sync time read, saved to ``OUT/rank<r>.pt``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from trainer import shm
from trainer.comm import COMM_OPTIONS, wrap_model
from trainer.config import TrainConfig
from trainer.model import build_model

WARMUP = 2  # exact steps before PowerSGD / local SGD change the arithmetic
PASSES = WARMUP + 1


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(32, 784, generator=generator), torch.randint(0, 10, (32,), generator=generator)


def grads_after(model: torch.nn.Module, forward: torch.nn.Module, rank: int) -> list[list[torch.Tensor]]:
    """Gradients after each of PASSES backward passes on the same batch and the same weights."""
    inputs, targets = batch(rank)
    passes = []
    for _ in range(PASSES):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(forward(inputs), targets).backward()
        passes.append([p.grad.detach().clone() for p in model.parameters()])
    return passes


def grads(out: Path) -> None:
    rank = dist.get_rank()
    cfg = TrainConfig()
    cpu = torch.device("cpu")
    local_model = build_model(cfg)
    results: dict[str, object] = {"local": grads_after(local_model, local_model, rank)}
    reference = build_model(cfg)
    results["reference"] = grads_after(reference, DistributedDataParallel(reference), rank)
    for option in COMM_OPTIONS:
        model = build_model(cfg)
        ddp, comm = wrap_model(model, cpu, True, option, timeout_s=60, warmup_steps=WARMUP)
        assert comm is not None
        results[option] = grads_after(model, ddp, rank)
        results[f"{option}:resolved"] = comm.option
        if comm.shm_sync is not None:
            results[f"{option}:shm_file_left"] = comm.shm_sync.reducer.path.exists()
        if option == "localsgd":
            comm.sync_replicas(model)
            results["localsgd:synced_params"] = [p.detach().clone() for p in model.parameters()]
        comm.close()
    torch.save(results, out / f"rank{rank}.pt")


def peer_fails(out: Path, mode: str) -> None:
    """Rank 1 dies (``die``) or stalls (``stall``) where it should join the all-reduce."""
    rank = dist.get_rank()
    timeout_s = 2.0 if mode == "stall" else 60.0
    reducer = shm.ShmAllreduce(dist.group.WORLD, capacity=1024, timeout_s=timeout_s)
    reducer.allreduce_(torch.ones(1024))  # one good round first
    if rank == 1:
        if mode == "die":
            os._exit(3)
        time.sleep(4)  # longer than rank 0's 2 s timeout
        os._exit(0)
    started = time.monotonic()
    try:
        reducer.allreduce_(torch.ones(1024))
        outcome = {"error": None}
    except shm.PeerGone as exc:
        outcome = {"error": str(exc)}
    outcome["seconds"] = time.monotonic() - started
    outcome["shm_file_left"] = reducer.path.exists()
    (out / "rank0.json").write_text(json.dumps(outcome))
    os._exit(0)  # the group has a dead or stalled member: skip a teardown that would wait for it


def accumulate(out: Path) -> None:
    """Gradients left in shared memory must not be accumulated into (peers may still read them)."""
    model = build_model(TrainConfig())
    forward, comm = wrap_model(model, torch.device("cpu"), True, "shm", timeout_s=60)
    assert comm is not None and comm.option == "shm"
    inputs, targets = batch(dist.get_rank())
    F.cross_entropy(forward(inputs), targets).backward()
    try:
        F.cross_entropy(forward(inputs), targets).backward()
        error = None
    except RuntimeError as exc:
        error = str(exc)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps({"error": error}))
    comm.close()


def cuda(out: Path) -> None:
    rank = dist.get_rank()
    device = torch.device("cuda", rank)
    inputs, targets = (t.to(device) for t in batch(rank))
    local = build_model(TrainConfig()).to(device)
    F.cross_entropy(local(inputs), targets).backward()
    results: dict[str, object] = {"local": [p.grad.cpu() for p in local.parameters()]}
    for option in ("auto", "gloo", "bf16", "fp16", "powersgd", "localsgd"):
        model = build_model(TrainConfig()).to(device)
        ddp, comm = wrap_model(model, device, True, option, timeout_s=60)
        assert comm is not None
        F.cross_entropy(ddp(inputs), targets).backward()
        grads = [p.grad.cpu() for p in model.parameters()]
        results[option] = {"resolved": comm.option, "sync_ms": comm.take_ms(), "grads": grads}
    torch.save(results, out / f"rank{rank}.pt")


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    if mode == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if mode == "cuda" else "gloo", timeout=timedelta(seconds=60))
    try:
        if mode == "grads":
            grads(out)
        elif mode == "cuda":
            cuda(out)
        elif mode == "accumulate":
            accumulate(out)
        else:
            peer_fails(out, mode)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
