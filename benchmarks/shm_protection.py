"""What owning its gradients costs the shared-memory sync: the reducer before and after, side by side.

    python -m benchmarks.shm_protection            # world size 2
    python -m benchmarks.shm_protection --world-size 3

Before (commit ``BEFORE``): ``ShmAllreduce.allreduce`` handed out views of the shared result, and
each ``.grad`` pointed into memory the peers were reading. After: the result is copied into a flat
buffer the rank owns. Both reducers run in the same processes on this MLP's gradient tensors,
alternating round by round, so machine load hits both alike; rank 0's median and 95th percentile
per call are reported. The earlier reducer is read from git (``git show BEFORE:trainer/sync/shm.py``).

This file is both the driver (no RANK in the environment) and the worker (under torchrun).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.common import REPO, child_env, machine, machine_line, publish, results_dir, run_checked, torchrun
from benchmarks.sync import interleave, stats, timed

BEFORE = "2b38be0"  # the last commit whose gradients were views of the shared result


def earlier_shm(directory: Path) -> object:
    """``trainer/sync/shm.py`` as of ``BEFORE``, imported as a module of its own."""
    source = subprocess.run(["git", "show", f"{BEFORE}:trainer/sync/shm.py"], cwd=REPO, capture_output=True, check=True)
    path = directory / "shm_before.py"
    path.write_bytes(source.stdout)
    spec = importlib.util.spec_from_file_location("shm_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def worker(out: Path, calls: int, rounds: int) -> None:
    from trainer.sync import shm
    from trainer.tasks.mnist_mlp import default_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    grads = [torch.randn_like(p) for p in default_model().parameters()]
    numel = sum(g.numel() for g in grads)
    flat = torch.empty(numel)
    with tempfile.TemporaryDirectory() as tmp:
        before = earlier_shm(Path(tmp)).ShmAllreduce(dist.group.WORLD, numel, 60.0)
    after = shm.open_agreed(dist.group.WORLD, numel, 60.0)

    methods = {
        "before: .grad views of the shared result": timed(lambda: before.allreduce(grads, divide_by=world)),
        "after: copied into the rank's own buffer": timed(lambda: after.allreduce(grads, flat, divide_by=world)),
    }
    samples = interleave(methods, calls, rounds)
    dist.destroy_process_group()
    if rank == 0:
        rows = [{"world_size": world, "reducer": name, **stats(ms)} for name, ms in samples.items()]
        (out / "protection.json").write_text(json.dumps(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--calls", type=int, default=400, help="Timed calls per reducer (after warm-up).")
    parser.add_argument("--rounds", type=int, default=20, help="Alternating rounds the calls are split into.")
    parser.add_argument("--out", default=None, help="Results folder.")
    args = parser.parse_args(argv)
    if "RANK" in os.environ:
        worker(Path(args.out), args.calls, args.rounds)
        return
    out = results_dir("shm-protection", args.out)
    info = machine()
    forwarded = ["--calls", str(args.calls), "--rounds", str(args.rounds), "--out", str(out)]
    run_checked(torchrun(args.world_size, "benchmarks.shm_protection", forwarded), child_env(), timeout=600)
    rows = json.loads((out / "protection.json").read_text())
    lines = [
        f"Shared-memory all-reduce of this MLP's gradients (2,143,272 bytes), rank 0, ms per call, median (p95) "
        f"of {args.calls} calls in {args.rounds} alternating rounds, 1 thread per rank.",
        f"Machine: {machine_line(info)}",
        "",
        "| world | reducer | ms | p95 ms |",
        "|---|---|---|---|",
        *(f"| {r['world_size']} | {r['reducer']} | {r['median_ms']:.3f} | {r['p95_ms']:.3f} |" for r in rows),
    ]
    publish(out, "shm-protection", "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
