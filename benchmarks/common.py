"""What every benchmark shares: the machine and versions, launching, process sampling, statistics, output."""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
import torch

from trainer.distributed.jobs import fresh_job_env
from trainer.watch.machine import cpu_model

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def machine() -> dict[str, Any]:
    """The hardware and software a figure was measured on (saved beside every result)."""
    return {
        "cpu": cpu_model(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_1m": os.getloadavg()[0],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "when_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"{info['cpu']}, {info['cpus_usable']} usable CPUs, {info['memory_gb']} GB; Python {info['python']}, "
        f"torch {info['torch']}; load average {info['load_average_1m']:.2f} at start; {info['when_utc']}"
    )


def results_dir(name: str, out: str | None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def child_env(hide_gpus: bool = True, **extra: str) -> dict[str, str]:
    """A fresh job's environment for a benchmark, plus ``extra``: this checkout importable, GPUs hidden.

    The benchmarks measure the CPU path (several processes per host, gloo or shared memory), so
    the processes they start see no GPU even on a host that has one; those that measure a GPU
    pass ``hide_gpus=False``.
    """
    return fresh_job_env(pythonpath=REPO, hide_gpus=hide_gpus, **extra)


@dataclass
class ProcessSamples:
    """psutil samples of one worker process: (wall time, CPU seconds, RSS MB, threads)."""

    pid: int
    rank: int
    samples: list[tuple[float, float, float, int]] = field(default_factory=list)

    def window(self, start: float, end: float) -> dict[str, float]:
        """CPU % (of one core) between the samples that bracket [start, end]; peak RSS and threads over the life."""
        before = [s for s in self.samples if s[0] <= start]
        after = [s for s in self.samples if s[0] >= end]
        first = before[-1] if before else self.samples[0] if self.samples else None
        last = after[0] if after else self.samples[-1] if self.samples else None
        cpu = 0.0
        if first is not None and last is not None and last[0] > first[0]:
            cpu = 100.0 * (last[1] - first[1]) / (last[0] - first[0])
        return {
            "cpu_percent": cpu,
            "rss_mb": max((s[2] for s in self.samples), default=0.0),
            "threads": max((s[3] for s in self.samples), default=0),
        }


class Monitor:
    """Samples the worker processes under a launcher every ``interval_s`` from outside them.

    Outside, so the figures include everything a worker does (gloo's threads, the trainer's own
    sampler) and cost the workers nothing. A worker's rank is read from its environment.
    """

    def __init__(self, root_pid: int, interval_s: float = 0.2) -> None:
        self._root = psutil.Process(root_pid)
        self._interval_s = interval_s
        self.workers: dict[int, ProcessSamples] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                children = self._root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            now = time.time()
            for proc in children:
                try:
                    if proc.pid not in self.workers:
                        rank = proc.environ().get("RANK")
                        if rank is None:
                            continue
                        self.workers[proc.pid] = ProcessSamples(proc.pid, int(rank))
                    with proc.oneshot():
                        times = proc.cpu_times()
                        sample = (now, times.user + times.system, proc.memory_info().rss / 2**20, proc.num_threads())
                    self.workers[proc.pid].samples.append(sample)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            self._stop.wait(self._interval_s)


def run_checked(
    cmd: Sequence[str], env: dict[str, str], timeout: float, monitor: bool = False
) -> tuple[str, Monitor | None]:
    """Run ``cmd`` (optionally sampled by a ``Monitor``); a failure raises with the output's tail."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watcher = Monitor(proc.pid) if monitor else None
    try:
        if watcher:
            with watcher:
                output, _ = proc.communicate(timeout=timeout)
        else:
            output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise RuntimeError(f"{' '.join(cmd)} did not finish in {timeout:.0f} s:\n{output[-3000:]}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{output[-3000:]}")
    return output, watcher


def median_spread(values: Sequence[float]) -> tuple[float, float, float]:
    """Median, minimum and maximum (the spread reported beside every median)."""
    return statistics.median(values), min(values), max(values)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    names: list[str] = []
    for row in rows:
        names += [k for k in row if k not in names]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """``columns``: (key, header). Floats get a sensible number of digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 10 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(k, "")) for k, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def publish(out: Path, name: str, text: str, note: str = "") -> None:
    """Write the Markdown table as ``out/name.md`` and print it with where the results are."""
    (out / f"{name}.md").write_text(text)
    print(text)
    print(f"results in {out}{note}")
