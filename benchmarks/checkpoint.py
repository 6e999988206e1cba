"""Checkpoint save and load time for this model and its optimiser.

    python -m benchmarks.checkpoint            # 20 saves and 20 loads, interleaved
    python -m benchmarks.checkpoint --quick

Saves what a resume needs of the arithmetic (model and optimiser state, with momentum
buffers filled by a few real steps) the safe way: serialise, then write a temporary file,
fsync, rename and fsync the directory (``trainer.core.fileio.atomic_write_bytes``); loads with
``torch.load(weights_only=True)`` and restores both states. ``save`` and ``load`` below are
the only two functions that know the format: point them at the package's checkpoint module
to time that instead. The figures split serialisation from the durable write, since fsync
on the run directory's filesystem often dominates.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import (
    machine,
    machine_line,
    markdown_table,
    median_spread,
    publish,
    results_dir,
    write_csv,
    write_json,
)
from trainer.core.config import TrainConfig
from trainer.core.fileio import atomic_write_bytes
from trainer.core.optim import build_optimizer
from trainer.tasks.mnist_mlp import default_model


def save(path: Path, state: dict[str, Any]) -> tuple[float, int]:
    """Write ``state`` durably; returns the serialisation ms and the file's bytes."""
    started = time.perf_counter()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    serialise_ms = (time.perf_counter() - started) * 1e3
    atomic_write_bytes(path, data)
    return serialise_ms, len(data)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dir", default=None, help="Where to write (default a temporary folder; pick the run disk).")
    parser.add_argument("--quick", action="store_true", help="3 repeats (CI).")
    parser.add_argument("--out", default=None, help="Results folder.")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    torch.set_num_threads(1)
    out = results_dir("checkpoint", args.out)
    info = machine()
    write_json(out / "machine.json", info)

    cfg = TrainConfig()
    model = default_model(cfg.seed)
    optimizer = build_optimizer(cfg, model)
    for _ in range(3):  # fill the momentum buffers, as in a real checkpoint
        optimizer.zero_grad()
        F.cross_entropy(model(torch.randn(32, 784)), torch.randint(0, 10, (32,))).backward()
        optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 3}

    raw = []
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = Path(folder) / "checkpoint.pt"
        save(path, state)  # warm-up
        load(path)
        for repeat in range(repeats):
            started = time.perf_counter()
            serialise_ms, size = save(path, state)
            save_ms = (time.perf_counter() - started) * 1e3
            started = time.perf_counter()
            loaded = load(path)
            model.load_state_dict(loaded["model"])
            optimizer.load_state_dict(loaded["optimizer"])
            load_ms = (time.perf_counter() - started) * 1e3
            raw.append(
                {
                    "repeat": repeat,
                    "bytes": size,
                    "save_ms": save_ms,
                    "serialise_ms": serialise_ms,
                    "write_fsync_rename_ms": save_ms - serialise_ms,
                    "load_restore_ms": load_ms,
                }
            )
    write_csv(out / "raw.csv", raw)
    rows = []
    for key in ("save_ms", "serialise_ms", "write_fsync_rename_ms", "load_restore_ms"):
        median, low, high = median_spread([r[key] for r in raw])
        rows.append({"what": key.removesuffix("_ms").replace("_", " "), "median_ms": median, "min": low, "max": high})
    write_csv(out / "checkpoint.csv", rows)
    text = (
        f"Checkpoint of model + SGD state ({raw[0]['bytes'] / 2**20:.1f} MiB), {repeats} repeats, "
        f"written under {args.dir or tempfile.gettempdir()}.\nMachine: {machine_line(info)}\n\n"
        + markdown_table(rows, (("what", "step"), ("median_ms", "ms (median)"), ("min", "min"), ("max", "max")))
        + "\n"
    )
    publish(out, "checkpoint", text)


if __name__ == "__main__":
    main()
