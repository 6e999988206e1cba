"""The platform a run ran on, recorded and measured: ``RUN_DIR/platform.json`` and ``trainer platform``.

Every run writes ``platform.json`` (rank 0, with each rank's host): CPU, usable cores, memory, OS
and kernel, Python, torch and its BLAS/oneDNN/OpenMP build, the process-group backend, threads
per rank, GPU. ``trainer platform`` prints that as the hardware and software document to attach to
results, with figures measured on this machine at the time:

    trainer platform                      # this machine, at torch's default thread count
    trainer platform --run-dir RUN_DIR    # a run's platform.json, measured at the run's threads
    trainer platform --json               # the same as JSON

Each figure is the median of timed repeats after warm-up, and says so: fp32 matrix multiply
(GFLOP/s), memory bandwidth (a large tensor copy: bytes read plus written per second), and the
all-reduce latency of the model's gradients (535,818 float32 at the default widths) at world
size 2 through gloo and through shared memory (a 2-process torchrun job, a few seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist

from trainer.core.errors import UsageError
from trainer.core.fileio import write_json
from trainer.distributed.env import DistEnv, available_cpus
from trainer.distributed.jobs import fresh_job_env, torchrun_command

PLATFORM_FILE = "platform.json"
# The all-reduce measured by default: as many float32 elements as the default MNIST MLP has parameters
# (2,143,272 bytes); --elements measures another model's size.
GRADIENT_ELEMENTS = 535_818
RESULT_MARK = "platform-allreduce: "


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torch_build() -> dict[str, Any]:
    """How this torch was built: its BLAS, oneDNN and OpenMP, and the CPU capability it uses."""
    lines = [line.strip()[2:] for line in torch.__config__.show().splitlines() if line.strip().startswith("- ")]
    settings = next((line for line in lines if line.startswith("Build settings:")), "")
    parts = settings.removeprefix("Build settings:").strip().split(", ")
    blas = next((part.split("=", 1)[1] for part in parts if part.startswith("BLAS_INFO=")), "unknown")
    parallel = torch.__config__.parallel_info()
    backend = next((line.split(":", 1)[1].strip() for line in parallel.splitlines() if "parallel backend" in line), "")
    return {
        "version": torch.__version__,
        "blas": blas,
        "onednn_available": torch.backends.mkldnn.is_available(),
        "onednn_enabled": bool(torch.backends.mkldnn.enabled),
        "parallel_backend": backend,
        "built_with": [line for line in lines if not line.startswith("Build settings:")],
        "parallel_info": parallel.strip(),
    }


def gpu() -> dict[str, Any] | None:
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count()}


def describe() -> dict[str, Any]:
    """This process's machine and software, as plain JSON values."""
    return {
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "cpus_usable": available_cpus(),
        "cpus_total": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch_build(),
        "threads_per_rank": torch.get_num_threads(),
        "gpu": gpu(),
    }


def record_platform(run_dir: Path, dist_env: DistEnv, comm: str) -> None:
    """Write ``RUN_DIR/platform.json`` on rank 0 with every rank's host. Collective (gathers host names)."""
    info = describe()
    hosts = [info["host"]]
    if dist.is_initialized():
        hosts = [""] * dist_env.world_size
        dist.all_gather_object(hosts, info["host"])
    if not dist_env.is_main:
        return
    info.update(
        world_size=dist_env.world_size,
        hosts_by_rank=hosts,
        backend=dist.get_backend() if dist.is_initialized() else "none",
        comm=comm,
        recorded_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    write_json(run_dir / PLATFORM_FILE, info)


# -- measurements --------------------------------------------------------------------------------
def timed_median(work: Callable[[], None], repeats: int, warmup: int) -> dict[str, float]:
    """Seconds per call of ``work``: median, min and max of ``repeats`` timed calls after ``warmup``."""
    for _ in range(warmup):
        work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def measure_matmul(threads: int, size: int = 1024, repeats: int = 10) -> dict[str, Any]:
    """fp32 ``size`` x ``size`` matrix multiply at ``threads`` intra-op threads: 2 n^3 flops a call."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        out = torch.empty(size, size)
        timing = timed_median(lambda: torch.mm(a, b, out=out), repeats, warmup=2)
    finally:
        torch.set_num_threads(previous)
    flops = 2 * size**3
    return {
        "what": f"fp32 matmul {size}x{size} at {threads} thread{'s' if threads > 1 else ''}",
        "gflops": flops / timing["median_s"] / 1e9,
        "how": f"2n^3 flops / median of {repeats} calls after 2 warm-up calls (torch.mm)",
        **timing,
    }


def measure_memory(mib: int = 128, repeats: int = 10) -> dict[str, Any]:
    """Bandwidth of one large tensor copy: ``mib`` MiB read plus ``mib`` MiB written per call."""
    source = torch.ones(mib * 2**20 // 4)
    target = torch.empty_like(source)
    timing = timed_median(lambda: target.copy_(source), repeats, warmup=2)
    moved = 2 * source.numel() * 4
    return {
        "what": f"memory copy of {mib} MiB (float32 tensor copy_)",
        "gb_per_s": moved / timing["median_s"] / 1e9,
        "how": f"bytes read + written / median of {repeats} copies after 2 warm-up copies",
        **timing,
    }


def measure_allreduce(elements: int, repeats: int, timeout_s: float = 120) -> dict[str, Any]:
    """All-reduce latency at world size 2 (gloo and shm), from a 2-process torchrun job of this module."""
    args = ["--allreduce-worker", "--elements", str(elements), "--repeats", str(repeats)]
    cmd = torchrun_command(2, "trainer.watch.machine", args)
    env = fresh_job_env()  # hides GPUs: the CPU path, gloo and shared memory between host processes
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"the 2-process all-reduce job did not finish in {timeout_s:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"the 2-process all-reduce job failed (exit {done.returncode}): {tail}"}


def allreduce_worker(elements: int, repeats: int) -> None:
    """Under torchrun: time gloo's and the shared-memory all-reduce on rank 0, rounds interleaved."""
    from trainer.sync.shm import open_agreed

    dist.init_process_group("gloo")
    try:
        tensor = torch.ones(elements)
        reducer = open_agreed(dist.group.WORLD, elements, timeout_s=60)
        methods: dict[str, Callable[[], object]] = {
            "gloo": lambda: dist.all_reduce(tensor),
            "shm": lambda: reducer.allreduce_(tensor),
        }
        samples: dict[str, list[float]] = {name: [] for name in methods}
        for round_ in range(10 + repeats):  # 10 warm-up rounds
            for name, call in methods.items():
                dist.barrier()
                started = time.perf_counter()
                call()
                if round_ >= 10:
                    samples[name].append((time.perf_counter() - started) * 1e3)
        reducer.close()
        if dist.get_rank() == 0:
            result = {
                name: {
                    "median_ms": statistics.median(ms),
                    "min_ms": min(ms),
                    "max_ms": max(ms),
                    "repeats": repeats,
                }
                for name, ms in samples.items()
            }
            result["bytes"] = elements * 4
            result["world_size"] = dist.get_world_size()
            result["threads_per_rank"] = torch.get_num_threads()
            result["how"] = (
                f"rank 0's time per call, median of {repeats} calls after 10 warm-up calls, each after a barrier; "
                "gloo and shm interleaved"
            )
            print(RESULT_MARK + json.dumps(result), flush=True)
    finally:
        dist.destroy_process_group()


def measure(threads: int, repeats: int, allreduce: bool, elements: int = GRADIENT_ELEMENTS) -> dict[str, Any]:
    result = {
        "measured_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_1m": os.getloadavg()[0],
        "matmul": measure_matmul(threads, repeats=repeats),
        "memory": measure_memory(repeats=repeats),
    }
    if allreduce:
        result["allreduce"] = measure_allreduce(elements, repeats=5 * repeats)
    return result


# -- the document ---------------------------------------------------------------------------------
def render(info: dict[str, Any], measured: dict[str, Any] | None, source: str) -> str:
    """The platform as a plain-text document: what it is, then what was measured and how."""
    build = info["torch"]
    onednn = "enabled" if build["onednn_enabled"] else ("available, disabled" if build["onednn_available"] else "no")
    gpu_info = info.get("gpu")
    rows = [
        ("CPU", info["cpu"]),
        ("cores usable", f"{info['cpus_usable']} of {info['cpus_total']}"),
        ("memory", f"{info['memory_gb']} GiB"),
        ("GPU", f"{gpu_info['count']} x {gpu_info['name']}, {gpu_info['memory_gb']} GiB" if gpu_info else "none"),
        ("OS", f"{info['os']} (kernel {info['kernel']})"),
        ("Python", info["python"]),
        ("torch", f"{build['version']}: BLAS {build['blas']}, oneDNN {onednn}, {build['parallel_backend']} threads"),
        ("threads per rank", str(info["threads_per_rank"])),
    ]
    if "hosts_by_rank" in info:
        hosts = info["hosts_by_rank"]
        rows += [
            ("backend", f"{info['backend']} (--comm {info['comm']})"),
            ("ranks", f"{info['world_size']}: " + ", ".join(f"{r} on {h}" for r, h in enumerate(hosts))),
        ]
    width = max(len(name) for name, _ in rows)
    lines = [f"Platform ({source})", ""]
    lines += [f"  {name.ljust(width)}  {value}" for name, value in rows]
    lines += ["", "  torch build:"] + [f"    {line}" for line in build["built_with"]]
    if measured is not None:
        lines += [
            "",
            f"Measured on {socket.gethostname()} at {measured['measured_utc']} "
            f"(load average {measured['load_average_1m']:.2f}):",
        ]
        mm, mem = measured["matmul"], measured["memory"]
        lines.append(f"  {mm['what']}: {mm['gflops']:.1f} GFLOP/s ({mm['how']}; spread {_spread(mm)})")
        lines.append(f"  {mem['what']}: {mem['gb_per_s']:.2f} GB/s ({mem['how']}; spread {_spread(mem)})")
        reduce = measured.get("allreduce")
        if reduce is not None and "error" in reduce:
            lines.append(f"  all-reduce: not measured: {reduce['error']}")
        elif reduce is not None:
            for name in ("gloo", "shm"):
                r = reduce[name]
                lines.append(
                    f"  all-reduce of {reduce['bytes']:,} bytes at world size {reduce['world_size']}, {name}: "
                    f"{r['median_ms']:.3f} ms (min {r['min_ms']:.3f}, max {r['max_ms']:.3f})"
                )
            lines.append(f"    ({reduce['how']}; {reduce['threads_per_rank']} thread(s) per rank)")
    return "\n".join(lines) + "\n"


def _spread(timing: dict[str, Any]) -> str:
    return f"{timing['min_s'] * 1e3:.2f}..{timing['max_s'] * 1e3:.2f} ms a call"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trainer platform", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", help="Print this run's platform.json (and measure at its thread count).")
    parser.add_argument("--threads", type=int, help="Threads for the matrix multiply (default: the run's, or torch's).")
    parser.add_argument("--repeats", type=int, default=10, help="Timed repeats per figure (all-reduce: 5x this).")
    parser.add_argument("--no-measure", action="store_true", help="Print the description only, measure nothing.")
    parser.add_argument("--no-allreduce", action="store_true", help="Skip the 2-process all-reduce job.")
    parser.add_argument("--json", action="store_true", help="Print JSON instead of the document.")
    parser.add_argument("--allreduce-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--elements",
        type=int,
        default=GRADIENT_ELEMENTS,
        help="float32 elements in the measured all-reduce: your model's parameter count (default: the MNIST MLP's).",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.allreduce_worker:
        allreduce_worker(args.elements, args.repeats)
        return
    try:
        if args.repeats < 1 or args.elements < 1 or (args.threads is not None and args.threads < 1):
            raise UsageError("--repeats, --elements and --threads must be at least 1")
        if args.run_dir:
            path = Path(args.run_dir) / PLATFORM_FILE
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise UsageError(f"cannot read {path} ({exc}); pass the --run-dir of a run that has started") from None
            source = f"recorded by the run in {args.run_dir} at {info.get('recorded_utc', '?')}"
        else:
            info = describe()
            source = f"this machine, {info['host']}"
    except UsageError as exc:
        print(f"trainer platform: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    threads = args.threads or info["threads_per_rank"]
    measured = None if args.no_measure else measure(threads, args.repeats, not args.no_allreduce, args.elements)
    if args.json:
        print(json.dumps({"platform": info, "measured": measured}, indent=2, sort_keys=True))
    else:
        sys.stdout.write(render(info, measured, source))


if __name__ == "__main__":
    main()
