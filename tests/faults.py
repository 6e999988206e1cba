"""Helpers for fault tests: start the real trainer, watch its progress, find and signal its workers."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import psutil

# Columns of metrics.csv that an interrupted run must reproduce exactly (the rest are timings).
EXACT_COLUMNS = ("epoch", "global_step", "train_loss", "train_accuracy", "val_loss", "val_accuracy")


def records(path: Path) -> list[dict[str, Any]]:
    """JSON lines of a file that may still be written (a torn last line is skipped)."""
    out = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def latest_step(run_dir: Path) -> int:
    """The highest step any rank has logged so far (0 before the first window)."""
    steps = [r.get("step", 0) for path in run_dir.glob("rank*.jsonl") for r in records(path) if "event" not in r]
    return max(steps, default=0)


def workers(root: int) -> dict[int, psutil.Process]:
    """The trainer processes anywhere under ``root`` (torchrun, or a launch script), by their RANK variable."""
    found = {}
    for child in psutil.Process(root).children(recursive=True):
        try:
            cmdline, env = child.cmdline(), child.environ()
        except psutil.Error:  # gone, or not ours to read, since it was listed
            continue
        if "trainer" in cmdline and "RANK" in env:
            found[int(env["RANK"])] = child
    return found


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as handle:
        return [{k: row[k] for k in EXACT_COLUMNS} for row in csv.DictReader(handle)]


def first_steps(run_dir: Path, ranks: str = "*") -> list[dict[str, Any]]:
    """The ``first_step`` events of every process that trained in ``run_dir`` (as rank ``ranks``, a glob)."""
    return [r for path in run_dir.glob(f"rank{ranks}.jsonl") for r in records(path) if r.get("event") == "first_step"]


def has_trained(run_dir: Path, rank: int) -> bool:
    """Whether ``rank`` has finished a step (its log file exists from start-up, before it handles signals)."""
    return bool(first_steps(run_dir, str(rank)))


def trained_positions(run_dir: Path, by_restarts: bool = True) -> dict[int, list[int]]:
    """Epoch -> the training positions of every step that counts, from ``--record-samples`` files.

    A process that was killed may have trained past the checkpoint that the next attempt resumed
    from; those steps were redone, so a step counts only from the latest attempt that trained it.
    An attempt is one start of the worker group: its run id, restart count and resumed step (a
    requeued Slurm job starts torchrun again with the same run id and restart count 0).

    ``by_restarts=False`` tells attempts apart by world size instead of restart count: after a node
    is lost, torchrun's agents may count the restart differently (one restarted its failed
    worker, another only followed the membership change), yet their ranks form one attempt. Two
    attempts that this merges by mistake would show their common samples twice, never hide one.
    """
    attempts: dict[tuple[Any, ...], dict[str, Any]] = {}
    for path in sorted((run_dir / "samples").glob("*.jsonl")):
        lines = records(path)
        start = lines[0]
        count = start["restarts"] if by_restarts else start["world_size"]
        key = (start["run_id"], count, start["resumed_from_step"]) if start["run_id"] else (path.name,)
        attempt = attempts.setdefault(key, {"time": start["time"], "resumed": start["resumed_from_step"], "steps": []})
        attempt["time"] = min(attempt["time"], start["time"])
        attempt["steps"] += [r for r in lines[1:] if "positions" in r]
    ordered = sorted(attempts.values(), key=lambda a: a["time"])
    by_epoch: dict[int, list[int]] = {}
    for index, attempt in enumerate(ordered):
        redone_after = min((later["resumed"] for later in ordered[index + 1 :]), default=None)
        for record in attempt["steps"]:
            if redone_after is None or record["step"] <= redone_after:
                by_epoch.setdefault(record["epoch"], []).extend(record["positions"])
    return by_epoch


def assert_one_epoch_trained_once(run_dir: Path, samples: int, noun: str = "samples") -> None:
    """The run's one epoch trained each of its ``samples`` positions exactly once (``--record-samples``)."""
    positions = trained_positions(run_dir)
    assert list(positions) == [1]
    seen = positions[1]
    assert len(seen) == len(set(seen)), f"{len(seen) - len(set(seen))} {noun} trained twice"
    assert set(seen) == set(range(samples)), f"{samples - len(set(seen))} {noun} skipped"
