"""One rank of a comm test (run under torchrun, or with exported RANK/WORLD_SIZE for the peer tests).

``grads OUT``: for the reference (DDP with torch's own all-reduce) and every ``--comm`` option
but ``shm`` and ``auto`` (``hierarchical`` runs on one host here), the gradients after backward
passes on this rank's batch, saved to ``OUT/rank<r>.pt`` together with this rank's local
(unsynchronised) gradients.
``steps OUT``: ``--comm shm`` and ``auto`` over several optimiser steps, a new batch each step and
two intra-op threads, each step's synced gradients beside the reference (DDP over gloo) and the
local gradients on the same weights and batch; whether a peer's in-place writes into its own
``.grad`` left this rank's untouched; gradients accumulated over two backward passes, both
ways; the sync's finiteness verdicts (``finite_verdicts``); and known terms
(``known_terms``) through the plain shared-memory all-reduce. Saved to ``OUT/rank<r>.pt``.
``die OUT`` / ``stall OUT`` / ``shared-die OUT`` / ``leader-die OUT``: a peer exits or stops where
the other waits for it (``peer_fails``); the survivor writes what happened to ``OUT/survivor.json``.
``wait OUT``: rank 1 is busy for ``BUSY_S`` before joining an all-reduce; rank 0 writes the CPU
and wall time its own wait took to ``OUT/rank0.json``.
``hierarchical OUT``: known terms per rank (``known_terms``) through the hierarchical all-reduce,
in three calls; each rank saves its results and the host layout to ``OUT/rank<r>.pt``. Run on
several test hosts (tests/test_multinode.py), where the test recomputes the sums.
``shared OUT``: ``wrap_model(share_step=True)`` (``trainer.sync.shared_step``) over ``STEPS`` optimiser
steps through ``Comm.step`` beside DDP over gloo with its own SGD, same batches; whether a write
by rank 1 into a weight or a momentum reaches rank 0 (the one shared copy) before and after
``Comm.close``; the weights and momentum before and after closing; the sync's verdicts.
``adversarial OUT``: the model and recipes of ``tests/adversarial.py`` (frozen, unused, partly used and
tied parameters, a BatchNorm buffer, two parameter groups, dropout; SGD, AdamW with clipping and
accumulation through ``Comm.no_sync``, fused Adam with AMSGrad) under ``shm`` with and without the
shared step, ``hierarchical`` and ``gloo``, each beside DDP over gloo with the same optimiser; and
the model with two Parameters on one storage, where the shared step is asked for and declines.
``cuda OUT``: over nccl, one GPU per rank: this rank's local gradients and, for each option that
runs on CUDA, the synchronised gradients and the sync time read, saved to ``OUT/rank<r>.pt``.
``MODE,MODE,... OUT``: those modes in turn in one job, each into ``OUT/MODE``.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from tests import adversarial as adv
from trainer.core.config import COMM_OPTIONS, TrainConfig
from trainer.core.optim import build_optimizer
from trainer.sync import hierarchy, shm
from trainer.sync.comm import Comm, wrap_model
from trainer.sync.shared_step import SharedStep, shared_reason
from trainer.tasks.mnist_mlp import default_model

WARMUP = 2  # exact steps before PowerSGD / local SGD change the arithmetic
PASSES = WARMUP + 1


STEPS = 6  # optimiser steps of the ``steps`` mode
BUSY_S = 1.5  # how long rank 1 is busy in the ``wait`` mode


def batch(rank: int, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + 100 * step + rank)
    return torch.randn(32, 784, generator=generator), torch.randint(0, 10, (32,), generator=generator)


def grads_after(model: torch.nn.Module, forward: torch.nn.Module, rank: int) -> list[list[torch.Tensor]]:
    """Gradients after each of PASSES backward passes on the same batch and the same weights."""
    inputs, targets = batch(rank)
    passes = []
    for _ in range(PASSES):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(forward(inputs), targets).backward()
        passes.append(cloned_grads(model))
    return passes


def cloned_grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def grads(out: Path) -> None:
    rank = dist.get_rank()
    cfg = TrainConfig()
    cpu = torch.device("cpu")
    local_model = default_model(cfg.seed)
    results: dict[str, object] = {"local": grads_after(local_model, local_model, rank)}
    reference = default_model(cfg.seed)
    results["reference"] = grads_after(reference, DistributedDataParallel(reference), rank)
    for option in COMM_OPTIONS:
        if option in SHARED_MEMORY_OPTIONS:
            continue  # the ``steps`` mode, on changing weights
        model = default_model(cfg.seed)
        ddp, comm = wrap_model(model, cpu, True, option, timeout_s=60, warmup_steps=WARMUP)
        assert comm is not None
        results[option] = grads_after(model, ddp, rank)
        results[f"{option}:resolved"] = comm.option
        if option == "localsgd":
            comm.sync_replicas(model)
            results["localsgd:synced_params"] = [p.detach().clone() for p in model.parameters()]
        comm.close()
    torch.save(results, out / f"rank{rank}.pt")


SHARED_MEMORY_OPTIONS = ("shm", "auto")


def copy_weights(model: torch.nn.Module, weights: torch.nn.Module) -> None:
    with torch.no_grad():
        for mine, theirs in zip(model.parameters(), weights.parameters(), strict=True):
            mine.copy_(theirs)


def grads_on(model: torch.nn.Module, forward: torch.nn.Module, weights: torch.nn.Module, step: int) -> list:
    """``model``'s gradients through ``forward`` on ``weights``' parameters and this rank's batch of ``step``."""
    copy_weights(model, weights)
    model.zero_grad(set_to_none=True)
    inputs, targets = batch(dist.get_rank(), step)
    F.cross_entropy(forward(inputs), targets).backward()
    return cloned_grads(model)


def steps(out: Path) -> None:
    """The shared-memory options on weights that change every step, against DDP over gloo."""
    torch.set_num_threads(2)  # intra-op worker threads write the shared memory too
    rank = dist.get_rank()
    cfg, cpu = TrainConfig(), torch.device("cpu")
    reference, local = default_model(cfg.seed), default_model(cfg.seed)
    reference_ddp = DistributedDataParallel(reference)
    results: dict[str, object] = {}
    for option in SHARED_MEMORY_OPTIONS:
        model = default_model(cfg.seed)
        forward, comm = wrap_model(model, cpu, True, option, timeout_s=60)
        assert comm is not None
        results[f"{option}:resolved"] = comm.option
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        got, want, mine, untouched = [], [], [], []
        for step in range(STEPS):
            want.append(grads_on(reference, reference_ddp, model, step))
            mine.append(grads_on(local, local, model, step))
            # Odd steps zero the gradients in place, so the backward pass writes into the old ones.
            model.zero_grad(set_to_none=step % 2 == 0)
            inputs, targets = batch(rank, step)
            F.cross_entropy(forward(inputs), targets).backward()
            got.append(cloned_grads(model))
            untouched.append(peer_writes_leave_mine(model, got[-1]))
            optimizer.step()
        results[option], results[f"{option}:reference"], results[f"{option}:local"] = got, want, mine
        results[f"{option}:untouched"] = untouched
        results[f"{option}:accumulated"] = accumulated(model, forward)
        results[f"{option}:accumulated_reference"] = accumulated(reference, reference_ddp, weights=model)
        # Each pass's local gradients on the same weights: the magnitudes the summation bound scales with.
        results[f"{option}:accumulated_local"] = [grads_on(local, local, model, step) for step in (0, 1)]
        results[f"{option}:verdicts"] = finite_verdicts(model, forward, comm)
        comm.close()
    results["shm:known"] = known_sums(rank, dist.get_world_size())
    torch.save(results, out / f"rank{rank}.pt")


def known_sums(rank: int, world: int) -> list[torch.Tensor]:
    """``known_terms`` through the plain shared-memory all-reduce (``shm.open_agreed``), averaged,
    in ``SUM_CALLS`` calls: the test recomputes the documented summation order."""
    return sums_through(shm.open_agreed(dist.group.WORLD, sum(SUM_SIZES), 60), rank, world)


def sums_through(
    reducer: shm.ShmAllreduce | hierarchy.HierarchicalAllreduce, rank: int, world: int
) -> list[torch.Tensor]:
    """This rank's results of ``SUM_CALLS`` averaging all-reduces of ``known_terms`` through ``reducer``,
    which is closed after."""
    results = []
    for call in range(SUM_CALLS):
        result = torch.full((sum(SUM_SIZES),), float("nan"))
        reducer.allreduce(known_terms(rank, call), result, divide_by=world)
        results.append(result)
    reducer.close()
    return results


def with_one_inf(grad: torch.Tensor) -> torch.Tensor:
    return grad.flatten().index_fill(0, torch.tensor([0]), math.inf).view_as(grad)


def finite_verdicts(model: torch.nn.Module, forward: torch.nn.Module, comm: Comm) -> list[bool | None]:
    """The sync's finiteness verdict after: a clean pass; a pass where the last rank's gradient holds one
    Inf (its first element: in the chunk rank 0 reduces); a clean pass; a pass where the last rank
    reports a non-finite loss (as the trainer does before its backward pass); a clean pass."""
    verdicts = []
    first = next(model.parameters())
    last = dist.get_rank() == dist.get_world_size() - 1
    assert comm.shm_sync is not None
    for poison in (None, "grad", None, "loss", None):
        handle = first.register_hook(with_one_inf) if poison == "grad" and last else None
        if poison == "loss" and last:
            comm.shm_sync.loss_finite = False
        model.zero_grad(set_to_none=True)
        inputs, targets = batch(dist.get_rank(), 0)
        F.cross_entropy(forward(inputs), targets).backward()
        verdicts.append(comm.synced_finite())
        if handle is not None:
            handle.remove()
    return verdicts


def peer_writes_leave_mine(model: torch.nn.Module, synced: list[torch.Tensor]) -> bool:
    """Rank 1 writes into its own ``.grad`` in place (as clipping would); whether this rank's stayed as synced
    (on rank 1 itself: whether the write happened)."""
    dist.barrier()
    if dist.get_rank() == 1:
        for p in model.parameters():
            p.grad.mul_(3.0)
    dist.barrier()
    unchanged = all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), synced, strict=True))
    dist.barrier()  # every rank has looked before rank 1 undoes its write
    if dist.get_rank() == 1:
        for p, g in zip(model.parameters(), synced, strict=True):
            p.grad.copy_(g)
    return unchanged


def accumulated(
    model: torch.nn.Module, forward: torch.nn.Module, weights: torch.nn.Module | None = None
) -> list[torch.Tensor]:
    """Gradients after two backward passes (batches of steps 0 and 1) without clearing in between."""
    if weights is not None:
        copy_weights(model, weights)
    model.zero_grad(set_to_none=True)
    for step in (0, 1):
        inputs, targets = batch(dist.get_rank(), step)
        F.cross_entropy(forward(inputs), targets).backward()
    return cloned_grads(model)


def peer_fails(out: Path, mode: str) -> None:
    """A peer dies or stops where the survivor waits for it; the survivor writes what happened.

    ``die`` / ``stall``: rank 1 exits / stops instead of joining a shared-memory all-reduce.
    ``shared-die``: under the shared optimiser step, rank 1 exits after phases 1 and 2, in its
    optimiser update, so rank 0 waits for it at phase 3 (no rank reads a weight a peer writes).
    ``leader-die``: under the hierarchical sync on one host, the leader (rank 0) exits instead of
    joining, so rank 1 waits for its leader's result."""
    rank = dist.get_rank()
    timeout_s = 2.0 if mode == "stall" else 60.0
    victim = 0 if mode == "leader-die" else 1
    outcome_file = out / "survivor.json"
    model = optimizer = comm = forward = reducer = None
    if mode == "shared-die":
        model = default_model(0)
        optimizer = build_optimizer(TrainConfig(), model)
        forward, comm = wrap_model(
            model, torch.device("cpu"), True, "auto", timeout_s, share_step=True, optimizer=optimizer
        )
        assert comm is not None and isinstance(comm.shm_sync, SharedStep)
    elif mode == "leader-die":
        reducer = hierarchy.open_agreed(1024, timeout_s)
    else:
        reducer = shm.open_agreed(dist.group.WORLD, 1024, timeout_s)

    def one_round() -> None:
        if comm is not None:
            inputs, targets = batch(rank)
            model.zero_grad(set_to_none=True)
            F.cross_entropy(forward(inputs), targets).backward()
            comm.step(optimizer)
        elif mode == "leader-die":
            reducer.allreduce([torch.ones(1024)], torch.empty(1024))
        else:
            reducer.allreduce_(torch.ones(1024))

    one_round()  # one good round first
    if rank == victim:
        if mode == "stall":
            deadline = time.monotonic() + 60
            while not outcome_file.exists() and time.monotonic() < deadline:
                time.sleep(0.05)  # stopped until rank 0 has given up and said so
            os._exit(0)
        if mode == "shared-die":
            comm.shm_sync._sgd = lambda *args: os._exit(3)  # dies in its update, after phases 1 and 2
            one_round()
        os._exit(3)
    started = time.monotonic()
    try:
        one_round()
        outcome = {"error": None}
    except shm.PeerGone as exc:
        outcome = {"error": str(exc)}
    outcome["seconds"] = time.monotonic() - started
    outcome_file.write_text(json.dumps(outcome))
    os._exit(0)  # the group has a dead or stalled member: skip a teardown that would wait for it


def wait(out: Path) -> None:
    """Rank 0's CPU time while it waits in an all-reduce for a rank 1 that is busy for ``BUSY_S``."""
    reducer = shm.open_agreed(dist.group.WORLD, 1024, 60)
    reducer.allreduce_(torch.ones(1024))
    dist.barrier()
    if dist.get_rank() == 1:
        time.sleep(BUSY_S)  # the busy peer: a checkpoint write or a slow step, say
        reducer.allreduce_(torch.ones(1024))
    else:
        wall, cpu = time.monotonic(), time.process_time()
        reducer.allreduce_(torch.ones(1024))
        wall, cpu = time.monotonic() - wall, time.process_time() - cpu
        (out / "rank0.json").write_text(json.dumps({"wall_s": wall, "cpu_s": cpu}))
    reducer.close()


SUM_SIZES = (1000, 37)  # two tensors, as the gradient sync passes one per parameter
SUM_CALLS = 3  # both slot sets, and one of them again


def known_terms(rank: int, call: int) -> list[torch.Tensor]:
    """Rank ``rank``'s terms in call ``call``. Their magnitudes differ by rank (x1, x10, x100), so a
    sum in another order rounds differently and the test can tell the orders apart."""
    generator = torch.Generator().manual_seed(100 * call + rank)
    return [torch.randn(n, generator=generator) * 10.0 ** (rank % 3) for n in SUM_SIZES]


def hierarchical(out: Path) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    keys: list[str] = [""] * world
    dist.all_gather_object(keys, shm.host_key())
    results = sums_through(hierarchy.open_agreed(sum(SUM_SIZES), 60), rank, world)
    torch.save({"hosts": hierarchy.host_groups(keys), "results": results}, out / f"rank{rank}.pt")


def seen_by_rank0(write: torch.Tensor) -> bool:
    """Rank 1 adds 1 to ``write``'s first element; whether rank 0's same tensor changed (rank 1 then puts the
    old value back)."""
    first = write.view(-1)[:1]
    before = first.clone()
    dist.barrier()
    if dist.get_rank() == 1:
        first.add_(1.0)
    dist.barrier()
    seen = not torch.equal(first, before)
    dist.barrier()
    if dist.get_rank() == 1:
        first.copy_(before)
    dist.barrier()
    return seen


@torch.no_grad()
def probes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, bool]:
    weight = next(model.parameters())
    return {
        "weight": seen_by_rank0(weight),
        "momentum": seen_by_rank0(optimizer.state[weight]["momentum_buffer"]),
    }


def shared(out: Path) -> None:
    rank, cfg, cpu = dist.get_rank(), TrainConfig(), torch.device("cpu")
    model, reference = default_model(cfg.seed), default_model(cfg.seed)
    optimizer, reference_optimizer = build_optimizer(cfg, model), build_optimizer(cfg, reference)
    forward, comm = wrap_model(model, cpu, True, "auto", timeout_s=60, share_step=True, optimizer=optimizer)
    assert comm is not None and isinstance(comm.shm_sync, SharedStep)
    reference_ddp = DistributedDataParallel(reference)
    for step in range(STEPS):
        inputs, targets = batch(rank, step)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(forward(inputs), targets).backward()
        comm.step(optimizer)
        reference_optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(reference_ddp(inputs), targets).backward()
        reference_optimizer.step()
    results: dict[str, object] = {
        "weights": [p.detach().clone() for p in model.parameters()],
        "reference": [p.detach().clone() for p in reference.parameters()],
        "momentum": [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()],
        "reference_momentum": [reference_optimizer.state[p]["momentum_buffer"].clone() for p in reference.parameters()],
        "shared": probes(model, optimizer),
        "verdicts": finite_verdicts(model, forward, comm),
    }
    comm.close()
    results["private"] = probes(model, optimizer)
    results["closed_weights"] = [p.detach().clone() for p in model.parameters()]
    results["closed_momentum"] = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    torch.save(results, out / f"rank{rank}.pt")


ADVERSARIAL_OPTIONS = {  # name: (--comm option, share the step)
    "shm": ("shm", False),
    "shared": ("shm", True),
    "hierarchical": ("hierarchical", False),
    "gloo": ("gloo", False),
}


def adversarial(out: Path) -> None:
    """Every exact option and recipe of ``tests/adversarial.py`` against DDP over gloo (with
    ``find_unused_parameters``, as the model needs) and the recipe's own optimiser, clipping and
    ``no_sync``; then the storage-tied model, for which the shared step is asked and declined."""
    torch.set_num_threads(2)  # intra-op worker threads write the shared memory too
    rank, cpu = dist.get_rank(), torch.device("cpu")
    initial = adv.Adversarial(seed=rank)
    results: dict[str, object] = {"initial": adv.snapshot(initial, adv.sgd(initial))}
    for recipe, make_optimizer, max_norm, micro_steps in adv.RECIPES:
        reference = adv.Adversarial(seed=rank)
        ddp = DistributedDataParallel(reference, find_unused_parameters=True, gradient_as_bucket_view=True)
        ref_optimizer = make_optimizer(reference)
        norms = adv.train(
            reference,
            ddp,
            ref_optimizer,
            rank,
            lambda m, model=reference: torch.nn.utils.clip_grad_norm_(model.parameters(), m),
            max_norm,
            micro_steps,
            ddp.no_sync,
            ref_optimizer.step,
        )
        results[f"{recipe}:reference"] = {**adv.snapshot(reference, ref_optimizer), "norms": norms}
        for name, (option, share) in ADVERSARIAL_OPTIONS.items():
            model = adv.Adversarial(seed=rank)
            optimizer = make_optimizer(model)
            forward, comm = wrap_model(
                model,
                cpu,
                True,
                option,
                timeout_s=60,
                share_step=share,
                optimizer=optimizer,
                find_unused_parameters=True,
            )
            assert comm is not None
            norms = adv.train(
                model,
                forward,
                optimizer,
                rank,
                comm.clip_grad_norm_,
                max_norm,
                micro_steps,
                comm.no_sync,
                lambda comm=comm, optimizer=optimizer: comm.step(optimizer),
            )
            results[f"{recipe}:{name}"] = {
                **adv.snapshot(model, optimizer),
                "norms": norms,
                "resolved": comm.option,
                "shared": isinstance(comm.shm_sync, SharedStep),
            }
            comm.close()
    results["tied"] = storage_tied(rank)
    torch.save(results, out / f"rank{rank}.pt")


def storage_tied(rank: int) -> dict[str, object]:
    """The model with two Parameters on one storage, the shared step asked for: the reason it declines,
    and the run beside DDP's."""
    runs: dict[str, object] = {}
    for name in ("reference", "auto"):
        model = adv.Adversarial(seed=rank, storage_tie=True)
        optimizer = adv.sgd(model)
        if name == "reference":
            forward = DistributedDataParallel(model, find_unused_parameters=True, gradient_as_bucket_view=True)
            no_sync, step = forward.no_sync, optimizer.step
            comm = None
        else:
            runs["reason"] = shared_reason(model, optimizer)
            forward, comm = wrap_model(
                model, torch.device("cpu"), True, "auto", timeout_s=60, share_step=True, optimizer=optimizer
            )
            assert comm is not None
            no_sync, step = comm.no_sync, (lambda comm=comm, optimizer=optimizer: comm.step(optimizer))
            runs["shared"] = isinstance(comm.shm_sync, SharedStep)
            runs["resolved"] = comm.option
        adv.train(model, forward, optimizer, rank, None, None, 1, no_sync, step)
        runs[name] = adv.snapshot(model, optimizer)
        if comm is not None:
            comm.close()
    return runs


def cuda(out: Path) -> None:
    rank = dist.get_rank()
    device = torch.device("cuda", rank)
    inputs, targets = (t.to(device) for t in batch(rank))
    local = default_model().to(device)
    F.cross_entropy(local(inputs), targets).backward()
    results: dict[str, object] = {"local": [p.grad.cpu() for p in local.parameters()]}
    for option in ("auto", "gloo", "bf16", "fp16", "powersgd", "localsgd"):
        model = default_model().to(device)
        ddp, comm = wrap_model(model, device, True, option, timeout_s=60)
        assert comm is not None
        F.cross_entropy(ddp(inputs), targets).backward()
        grads = [p.grad.cpu() for p in model.parameters()]
        results[option] = {"resolved": comm.option, "sync_ms": comm.take_ms(), "grads": grads}
    torch.save(results, out / f"rank{rank}.pt")


MODES: dict[str, Callable[[Path], None]] = {
    "grads": grads,
    "cuda": cuda,
    "steps": steps,
    "shared": shared,
    "adversarial": adversarial,
    "wait": wait,
    "hierarchical": hierarchical,
}


def mode_dir(out: Path, modes: Sequence[str], mode: str) -> Path:
    """Where ``mode`` writes in a job of ``modes``: ``OUT`` itself when it runs alone, else ``OUT/MODE``."""
    return out if len(modes) == 1 else out / mode


def main() -> None:
    """``MODE OUT``, or ``MODE,MODE,... OUT``: several modes in turn in one job, each into ``OUT/MODE``
    and each from one intra-op thread, as a fresh process would be (the ranks start torch once for all)."""
    modes, out = sys.argv[1].split(","), Path(sys.argv[2])
    if "cuda" in modes:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if "cuda" in modes else "gloo", timeout=timedelta(seconds=60))
    try:
        for mode in modes:
            torch.set_num_threads(1)
            where = mode_dir(out, modes, mode)
            where.mkdir(parents=True, exist_ok=True)
            if mode in MODES:
                MODES[mode](where)
            else:
                peer_fails(where, mode)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    gc.freeze()  # a short-lived test process: no cyclic collection at all (trainer/core/collector.py)
    gc.disable()
    main()
