"""Measurement that is cheap enough to leave on: step timings and psutil process samples."""

from __future__ import annotations

import csv
import io
import json
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from trainer.core.fileio import atomic_write_text


class ResourceSampler:
    """Samples this process's CPU % and RSS on a background thread (default every 0.5 s), and the
    memory it alone holds (USS) and its proportional share (PSS) less often (default every 5 s).

    psutil's CPU % is the share of one core since the previous sample, so a process using
    two cores fully reads 200.

    RSS counts every page the process maps, so each rank's RSS counts the shared libraries (torch
    alone is hundreds of MB) and the shared-memory sync's mapping in full, and the ranks' RSS summed
    counts them once per rank. USS counts only the pages no other process maps; PSS divides each
    shared page between the processes that map it, so the ranks' PSS sum to what the job holds.
    Both come from the kernel's ``smaps_rollup`` (psutil's ``memory_full_info``), which walks the
    page tables: tens of ms for a trainer, hence the longer interval, off the training thread.
    """

    def __init__(self, interval_s: float = 0.5, memory_interval_s: float = 5.0) -> None:
        self._process = psutil.Process()
        self._interval_s, self._memory_interval_s = interval_s, memory_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resource-sampler", daemon=True)
        self._lock = threading.Lock()
        self._cpu_samples: list[float] = []
        self.last_cpu_percent = 0.0
        self.last_rss_mb = self._process.memory_info().rss / 2**20
        # Latest and highest USS and PSS sampled (the peaks are sampled, not the kernel's exact mark).
        self.last_uss_mb = self.last_pss_mb = self.peak_uss_mb = self.peak_pss_mb = 0.0

    def start(self) -> None:
        self._process.cpu_percent(None)  # primes the counter; the first real sample follows
        self.sample_memory()
        self._thread.start()

    def sample_memory(self) -> None:
        """Sample USS and PSS now (tens of ms). Left at the last values where smaps is unreadable."""
        try:
            full = self._process.memory_full_info()
        except (psutil.Error, OSError):
            return
        uss, pss = full.uss / 2**20, full.pss / 2**20
        with self._lock:
            self.last_uss_mb, self.last_pss_mb = uss, pss
            self.peak_uss_mb, self.peak_pss_mb = max(self.peak_uss_mb, uss), max(self.peak_pss_mb, pss)

    def _run(self) -> None:
        memory_due = time.monotonic() + self._memory_interval_s
        while not self._stop.wait(self._interval_s):
            cpu = self._process.cpu_percent(None)
            rss = self._process.memory_info().rss / 2**20
            with self._lock:
                self._cpu_samples.append(cpu)
                self.last_cpu_percent, self.last_rss_mb = cpu, rss
            if time.monotonic() >= memory_due:
                self.sample_memory()
                memory_due = time.monotonic() + self._memory_interval_s

    def take_mean_cpu(self) -> float:
        """Mean CPU % of the samples since the previous call (0 when none were taken)."""
        with self._lock:
            samples, self._cpu_samples = self._cpu_samples, []
        return sum(samples) / len(samples) if samples else self.last_cpu_percent

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)


def peak_rss_mb() -> float:
    """The kernel's high-water mark of this process's resident memory (exact, not sampled)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


@dataclass
class StepTimes:
    """Sums of per-step timings (milliseconds) over a window, plus the per-step samples.

    ``merge`` carries the sums and the sync samples (the run's sync percentiles) but not the data
    and compute samples, which serve the window's own percentiles only.
    """

    steps: int = 0
    data_ms: float = 0.0
    compute_ms: float = 0.0
    sync_ms: float = 0.0
    step_ms: float = 0.0
    sync_samples: list[float] = field(default_factory=list)
    data_samples: list[float] = field(default_factory=list)
    compute_samples: list[float] = field(default_factory=list)

    def add(self, data_ms: float, compute_ms: float, sync_ms: float) -> None:
        self.steps += 1
        self.data_samples.append(data_ms)
        self.compute_samples.append(compute_ms)
        self.data_ms += data_ms
        self.compute_ms += compute_ms
        self.sync_ms += sync_ms
        self.step_ms += data_ms + compute_ms + sync_ms
        self.sync_samples.append(sync_ms)

    def add_even(self, steps: int, data_ms: float, compute_ms: float) -> None:
        """``steps`` steps timed together (a CUDA graph's window): each is recorded as their mean."""
        for _ in range(steps):
            self.add(data_ms / steps, compute_ms / steps, 0.0)

    def mean(self, name: str) -> float:
        return getattr(self, name) / self.steps if self.steps else 0.0

    def percentiles(self) -> dict[str, float]:
        """p50 and p95 of each timing over the window's steps, e.g. ``{"sync_ms_p95": ...}``."""
        step = [d + c + s for d, c, s in zip(self.data_samples, self.compute_samples, self.sync_samples, strict=True)]
        samples = {"step_ms": step, "data_ms": self.data_samples, "compute_ms": self.compute_samples}
        samples["sync_ms"] = self.sync_samples
        return {f"{name}_p{q}": percentile(values, q) for name, values in samples.items() for q in (50, 95)}

    def merge(self, other: StepTimes) -> None:
        """Add another window's steps to these."""
        self.steps += other.steps
        self.data_ms += other.data_ms
        self.compute_ms += other.compute_ms
        self.sync_ms += other.sync_ms
        self.step_ms += other.step_ms
        self.sync_samples.extend(other.sync_samples)


class RankLog:
    """``rank<r>.jsonl``: periodic step samples of one rank, line-buffered so a crash keeps them."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = path.open("a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, sort_keys=True) + "\n")

    def close(self) -> None:
        self._handle.close()


def write_metrics_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite the whole per-epoch table atomically (it is small, and resume rewrites history)."""
    if not rows:
        return
    buffer = io.StringIO()
    # Every column any row has, in first-seen order: rows resumed from a checkpoint written by an
    # earlier version may lack a newer column (left empty there).
    fieldnames = list(dict.fromkeys(key for row in rows for key in row))
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]
