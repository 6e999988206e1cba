"""``--tensorboard``: the run's curves as TensorBoard event files in ``RUN_DIR/tensorboard`` (rank 0).

Every window of steps (the points where ``rank<r>.jsonl`` gets a record) adds, at its global step:

- ``train/loss``: the window's loss, averaged over the ranks;
- ``throughput/samples_per_second``: global samples trained per second of training time;
- ``step_time/{step,data,compute,sync}_ms_{p50,p95}``: rank 0's percentiles over the window's steps;
- ``cpu_percent/rank<r>`` and ``rss_mb/rank<r>``: each rank's latest process sample.

Every epoch row adds ``epoch/{train_loss,val_loss,train_<metric>,val_<metric>,epoch_seconds}`` at the row's global step.

A resumed or restarted run opens the writer with ``purge_step`` one past the step it resumed from:
TensorBoard then drops what an earlier attempt wrote after that step (work that is redone), so the
curves continue at the right step with no duplicate points.

Hazard: ``window`` gathers every rank's figures, so every rank calls it at the same window.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trainer.core.errors import UsageError
from trainer.distributed.collectives import gather_floats
from trainer.distributed.env import DistEnv

TIMINGS = ("step_ms", "data_ms", "compute_ms", "sync_ms")


def require_tensorboard() -> None:
    """Fail with a one-line fix when ``--tensorboard`` is asked for but the package is missing."""
    try:
        import torch.utils.tensorboard  # noqa: F401  (it imports the tensorboard package and checks it)
    except ImportError:
        raise UsageError(
            "--tensorboard needs the tensorboard package; install it with pip install 'trainer[tensorboard]' "
            "(or pip install tensorboard), or leave out --tensorboard"
        ) from None


class TensorBoardLog:
    """Gathers each window's per-rank figures and, on rank 0, writes them as scalars."""

    def __init__(self, run_dir: Path, dist_env: DistEnv, device: torch.device, resumed_from_step: int | None) -> None:
        self.device = device
        self.writer = None
        if dist_env.is_main:
            from torch.utils.tensorboard import SummaryWriter  # imported late: an optional extra

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=(resumed_from_step or 0) + 1)

    def window(self, record: dict[str, Any]) -> None:
        """Add a window's record (as written to ``rank<r>.jsonl``). Collective."""
        per_rank = gather_floats([record["loss"], record["cpu_percent"], record["rss_mb"]], self.device)
        if self.writer is None:
            return
        step, add = record["step"], self.writer.add_scalar
        add("train/loss", sum(r[0] for r in per_rank) / len(per_rank), step)
        add("throughput/samples_per_second", record["samples_per_second"], step)
        for name in TIMINGS:
            for q in (50, 95):
                add(f"step_time/{name}_p{q}", record[f"{name}_p{q}"], step)
        for rank, (_, cpu, rss) in enumerate(per_rank):
            add(f"cpu_percent/rank{rank}", cpu, step)
            add(f"rss_mb/rank{rank}", rss, step)
        # Flushed at every window: a killed process then loses at most the window in progress.
        self.writer.flush()

    def epoch(self, row: dict[str, Any]) -> None:
        """Add an epoch's metrics row (as written to ``metrics.csv``)."""
        if self.writer is None:
            return
        for name, value in row.items():
            if name.startswith(("train_", "val_")) or name == "epoch_seconds":
                self.writer.add_scalar(f"epoch/{name}", value, row["global_step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
