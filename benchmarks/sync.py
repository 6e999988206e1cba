"""Gradient sync cost: one all-reduce across message sizes, and a training step under each ``--comm`` option.

    python -m benchmarks.sync                  # world size 2
    python -m benchmarks.sync --world-sizes 2,4 --quick

Part 1 times one all-reduce of a float32 tensor of each size through gloo, through the
shared-memory path, and through gloo with the tensor cast to fp16/bf16 and back (what the
compression options send); the shared-memory figure includes copying the result back into the
tensor. Part 2 runs the MLP's forward and backward under each ``--comm`` option, as the trainer
wraps the model for it (DDP with the option's hook, or for ``shm`` the model with its own
end-of-backward sync), plus gloo in one DDP bucket, and reports the sync time the option
measures per step and the whole step time. Each figure: warm-up calls, then the median and 95th
percentile of timed calls on rank 0, with the methods interleaved round by round.

Part 3 (world size 2) measures the floor under any shared-memory exchange on this host: rank 0
writing, or reading, a shared buffer of the gradient's size, when the lines were last touched by
itself and when they were last touched by rank 1 (on another core). The shared-memory all-reduce
moves every gradient across cores once each way per step, so these figures bound what it can
reach.

This file is both the driver (no RANK in the environment: launches torchrun per world size)
and the worker (under torchrun).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from benchmarks.common import (
    child_env,
    machine,
    machine_line,
    markdown_table,
    publish,
    results_dir,
    run_checked,
    write_csv,
    write_json,
)
from trainer.distributed.jobs import torchrun_command

SIZES_BYTES = (4 * 2**10, 64 * 2**10, 512 * 2**10, 2_143_272, 8 * 2**20)  # 2,143,272 B = this MLP's gradients
DDP_OPTIONS = ("gloo (one bucket)", "gloo", "shm", "bf16", "fp16", "powersgd", "localsgd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", default="2", help="Comma-separated world sizes (each > 1).")
    parser.add_argument("--calls", type=int, default=200, help="Timed calls per figure (after warm-up).")
    parser.add_argument("--rounds", type=int, default=5, help="Interleaved rounds the calls are split into.")
    parser.add_argument("--quick", action="store_true", help="20 calls in 2 rounds (CI).")
    parser.add_argument("--out", default=None, help="Results folder.")
    args = parser.parse_args(argv)
    if args.quick:
        args.calls, args.rounds = 20, 2
    return args


def stats(ms: list[float]) -> dict[str, float]:
    ordered = sorted(ms)
    return {"median_ms": statistics.median(ordered), "p95_ms": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]}


def interleave(methods: dict[str, Callable[[], float]], calls: int, rounds: int) -> dict[str, list[float]]:
    """Each method's per-call ms; ``rounds`` rounds of ``calls / rounds`` calls, methods alternating."""
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for method in methods.values():
        for _ in range(5):
            method()
    per_round = max(1, calls // rounds)
    for _ in range(rounds):
        for name, method in methods.items():
            dist.barrier()
            samples[name] += [method() for _ in range(per_round)]
    return samples


def timed(body: Callable[[], object]) -> Callable[[], float]:
    """``body`` as a call that returns its own milliseconds."""

    def call() -> float:
        started = time.perf_counter()
        body()
        return (time.perf_counter() - started) * 1e3

    return call


def allreduce_methods(numel: int) -> dict[str, Callable[[], float]]:
    from trainer.sync import shm

    world = dist.get_world_size()
    tensor = torch.randn(numel)
    reducer = shm.open_agreed(dist.group.WORLD, numel, timeout_s=60)

    def cast(dtype: torch.dtype) -> None:
        half = tensor.to(dtype).div_(world)
        dist.all_reduce(half)
        tensor.copy_(half)

    return {
        "gloo": timed(lambda: dist.all_reduce(tensor.div_(world))),
        "shm": timed(lambda: reducer.allreduce_(tensor, divide_by=world)),
        "gloo fp16": timed(functools.partial(cast, torch.float16)),
        "gloo bf16": timed(functools.partial(cast, torch.bfloat16)),
    }


def _shared_buffers(count: int, numel: int) -> list[torch.Tensor]:
    """``count`` float32 buffers of ``numel`` elements that both ranks map, set up as the trainer's
    are (the tensors keep the mapping alive)."""
    from trainer.sync import shm

    mapping, fd, error, _ = shm.open_shared_mapping(dist.group.WORLD, count * numel * 4, dist.get_rank())
    failures = shm.agree(dist.group.WORLD, error)
    if fd >= 0:
        os.close(fd)  # every rank has mapped it
    if mapping is None or failures:
        raise OSError(f"shared memory could not be set up: {failures}")
    return list(torch.frombuffer(mapping, dtype=torch.float32).view(count, numel))


def cross_core_methods(numel: int) -> dict[str, Callable[[], float]]:
    """Rank 0's ms for one pass from private memory into a shared buffer (``torch.div``, as the
    all-reduce writes a gradient) or back (``torch.add``), by which core touched the shared lines
    last; rank 1 does its part of each case and reports 0."""
    own, peer_read, peer_written = _shared_buffers(3, numel)
    source, scratch = torch.randn(numel), torch.empty(numel)
    rank = dist.get_rank()

    def rank0_times(body: Callable[[], object]) -> float:
        if rank != 0:
            return 0.0
        started = time.perf_counter()
        body()
        return (time.perf_counter() - started) * 1e3

    def write_own() -> float:
        dist.barrier()
        return rank0_times(lambda: torch.div(source, 2, out=own))

    def write_after_peer_read() -> float:
        if rank == 1:
            torch.add(peer_read, 1, out=scratch)
        dist.barrier()
        return rank0_times(lambda: torch.div(source, 2, out=peer_read))

    def read_after_peer_write() -> float:
        if rank == 1:
            torch.div(source, 2, out=peer_written)
        dist.barrier()
        return rank0_times(lambda: torch.add(peer_written, 1, out=scratch))

    return {
        "private -> shared, lines this core wrote last": write_own,
        "private -> shared, lines the other core read last": write_after_peer_read,
        "shared -> private, lines the other core wrote last": read_after_peer_write,
    }


def ddp_methods() -> tuple[dict[str, Callable[[], float]], dict[str, list[float]]]:
    """One forward+backward per call under each option: each call returns the hook-measured sync ms,
    and appends the whole call's ms to the second dict."""
    from trainer.sync.comm import wrap_model
    from trainer.tasks.mnist_mlp import default_model

    generator = torch.Generator().manual_seed(dist.get_rank())
    inputs, targets = torch.randn(32, 784, generator=generator), torch.randint(0, 10, (32,), generator=generator)
    methods: dict[str, Callable[[], float]] = {}
    step_ms: dict[str, list[float]] = {}
    for option in DDP_OPTIONS:
        model = default_model()
        if option == "gloo (one bucket)":
            one_bucket_mb = sum(p.numel() for p in model.parameters()) * 4 / 2**20 + 1
            ddp, comm = wrap_model(model, torch.device("cpu"), True, "gloo", timeout_s=60, bucket_cap_mb=one_bucket_mb)
            assert comm is not None
            take = comm.take_ms
        else:
            # warmup_steps: the lossy options start sending less after the warm-up calls.
            ddp, comm = wrap_model(model, torch.device("cpu"), True, option, timeout_s=60, warmup_steps=2)
            assert comm is not None
            take = comm.take_ms
        step_ms[option] = []

        def call(ddp: torch.nn.Module = ddp, take: Callable[[], float] = take, option: str = option) -> float:
            started = time.perf_counter()
            ddp.zero_grad(set_to_none=True)
            F.cross_entropy(ddp(inputs), targets).backward()
            step_ms[option].append((time.perf_counter() - started) * 1e3)
            return take()

        methods[option] = call
    return methods, step_ms


def worker(out: Path, calls: int, rounds: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes, steps, lines = [], [], []
    try:
        if world == 2:
            numel = SIZES_BYTES[3] // 4
            samples = interleave(cross_core_methods(numel), calls, rounds)
            for case, ms in samples.items():
                row = {"case": case, "bytes": numel * 4, **stats(ms)}
                lines.append({**row, "gb_per_s": row["bytes"] / max(row["median_ms"], 1e-9) / 1e6})
        for size in SIZES_BYTES:
            samples = interleave(allreduce_methods(size // 4), calls, rounds)
            sizes += [{"world_size": world, "bytes": size, "method": m, **stats(ms)} for m, ms in samples.items()]
        methods, step_ms = ddp_methods()
        samples = interleave(methods, calls, rounds)
        for option, ms in samples.items():
            whole = stats(step_ms[option][5:])  # past the warm-up calls
            row = {"world_size": world, "comm": option, **stats(ms)}
            row.update({"step_median_ms": whole["median_ms"], "step_p95_ms": whole["p95_ms"]})
            steps.append(row)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        (out / f"worker-{world}.json").write_text(json.dumps({"sizes": sizes, "ddp": steps, "lines": lines}))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if "RANK" in os.environ:
        worker(Path(args.out), args.calls, args.rounds)
        return
    out = results_dir("sync", args.out)
    info = machine()
    write_json(out / "machine.json", info)
    sizes: list[dict[str, Any]] = []
    ddp: list[dict[str, Any]] = []
    lines: list[dict[str, Any]] = []
    for world in (int(w) for w in args.world_sizes.split(",")):
        cmd = torchrun_command(
            world, "benchmarks.sync", ["--calls", str(args.calls), "--rounds", str(args.rounds), "--out", str(out)]
        )
        run_checked(cmd, child_env(), timeout=600)
        result = json.loads((out / f"worker-{world}.json").read_text())
        sizes += result["sizes"]
        ddp += result["ddp"]
        lines += result["lines"]
    write_csv(out / "sync-sizes.csv", sizes)
    write_csv(out / "sync-ddp.csv", ddp)
    write_csv(out / "sync-cross-core.csv", lines)
    for row in sizes:
        row["size"] = f"{row['bytes'] / 2**10:,.0f} KiB"
    text = (
        f"All-reduce of one float32 tensor, rank 0, median (p95) of {args.calls} calls, 1 thread per rank.\n"
        f"Machine: {machine_line(info)}\n\n"
        + markdown_table(
            sizes,
            (
                ("world_size", "world"),
                ("size", "size"),
                ("method", "method"),
                ("median_ms", "ms"),
                ("p95_ms", "p95 ms"),
            ),
        )
        + "\n\nForward+backward of the MLP (batch 32 per rank) under each --comm option; "
        "sync as the option measures it.\n\n"
        + markdown_table(
            ddp,
            (
                ("world_size", "world"),
                ("comm", "comm"),
                ("median_ms", "sync ms"),
                ("p95_ms", "sync p95"),
                ("step_median_ms", "fwd+bwd ms"),
                ("step_p95_ms", "fwd+bwd p95"),
            ),
        )
        + "\n"
    )
    if lines:
        text += (
            f"\nThe floor under a shared-memory exchange: one pass of {lines[0]['bytes']:,} bytes between private "
            "and shared memory on rank 0, by which core touched the shared lines last.\n\n"
            + markdown_table(lines, (("case", "case"), ("median_ms", "ms"), ("p95_ms", "p95 ms"), ("gb_per_s", "GB/s")))
            + "\n"
        )
    publish(out, "sync", text)


if __name__ == "__main__":
    main()
