"""What an earlier run left in the run directory, and whether this run may start there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from trainer.errors import UsageError


def describe_finished(summary_path: Path) -> str:
    try:
        summary = json.loads(summary_path.read_text())
        return f"test accuracy {summary['test_accuracy']:.4f} after {summary['global_step']} steps"
    except (OSError, ValueError, KeyError, TypeError):
        return "its summary.json is unreadable"


def check_run_dir(run_dir: Path, overwrite: bool) -> str | None:
    """Why this run must not start in ``run_dir``, or None when it may (never deletes anything)."""
    if overwrite or not run_dir.exists():
        return None
    summary = run_dir / "summary.json"
    if summary.exists():
        return (
            f"{run_dir} already holds a finished run ({describe_finished(summary)}); "
            "pick a new --run-dir, or add --overwrite to replace it"
        )
    if (run_dir / "config.json").exists():
        return f"{run_dir} holds an unfinished earlier run; pick a new --run-dir, or add --overwrite to start over"
    return None


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Create the run directory; with ``overwrite`` clear what an earlier run left (rank 0 only)."""
    if overwrite and run_dir.exists():
        if not run_dir.is_dir():
            raise UsageError(f"--run-dir {run_dir} is a file; pass a directory path")
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create --run-dir {run_dir} ({exc.strerror}); pass a writable directory") from None
