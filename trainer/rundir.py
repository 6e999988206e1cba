"""What an earlier run left in the run directory, and whether this run may start or resume there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from trainer.checkpoint import list_checkpoints, remove_all
from trainer.config import TrainConfig
from trainer.distributed import DistEnv
from trainer.errors import UsageError

LAUNCH_FILE = "launch.json"


def describe_finished(summary_path: Path) -> str:
    try:
        summary = json.loads(summary_path.read_text())
        return f"test accuracy {summary['test_accuracy']:.4f} after {summary['global_step']} steps"
    except (OSError, ValueError, KeyError, TypeError):
        return "its summary.json is unreadable"


def starts_fresh(cfg: TrainConfig, dist_env: DistEnv) -> bool:
    """Whether ``--overwrite`` clears earlier outputs now.

    It applies once per launch: workers that torchrun restarts (same TORCHELASTIC_RUN_ID, or a
    restart count above 0) must resume, not wipe the checkpoints the first start wrote.
    """
    if not cfg.overwrite:
        return False
    if dist_env.restart_count > 0:
        return False
    if dist_env.run_id in (None, "none"):  # "none" is torchrun's default id, shared by unrelated launches
        return True
    try:
        recorded = json.loads((Path(cfg.run_dir) / LAUNCH_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return True
    return recorded != dist_env.run_id


def finished_run(cfg: TrainConfig, fresh: bool) -> str | None:
    """What to tell the user when ``--run-dir`` already holds a finished run (there is nothing to do)."""
    summary = Path(cfg.run_dir) / "summary.json"
    if fresh or not summary.exists():
        return None
    return (
        f"{cfg.run_dir} already holds a finished run ({describe_finished(summary)}), so there is nothing to do; "
        "pick a new --run-dir, or add --overwrite to train it again from scratch"
    )


def check_run_dir(cfg: TrainConfig, fresh: bool) -> str | None:
    """Why this run must not start in ``--run-dir``, or None when it may (never deletes anything).

    An unfinished run is resumed under ``--resume auto`` (from its newest checkpoint, or from
    step 0 if it has none) and refused under ``--resume never``. (A finished one is never
    continued: see ``finished_run``.)
    """
    run_dir = Path(cfg.run_dir)
    if fresh:
        return None
    if cfg.resume != "never":
        return None
    if list_checkpoints(cfg.checkpoint_root):
        return (
            f"--resume never, but {cfg.checkpoint_root} holds checkpoints of an earlier run; use --resume auto to "
            "continue it, or add --overwrite to delete them and start over"
        )
    if (run_dir / "config.json").exists():
        return (
            f"{run_dir} holds an unfinished earlier run; use --resume auto to continue it, pick a new --run-dir, "
            "or add --overwrite to start over"
        )
    return None


def prepare_run_dir(cfg: TrainConfig, fresh: bool, run_id: str | None) -> None:
    """Create the run directory; when ``fresh``, clear what an earlier run left (rank 0 only)."""
    run_dir = Path(cfg.run_dir)
    if fresh and run_dir.exists():
        if not run_dir.is_dir():
            raise UsageError(f"--run-dir {run_dir} is a file; pass a directory path")
        shutil.rmtree(run_dir)
    if fresh:
        remove_all(cfg.checkpoint_root)  # only checkpoint files: --checkpoint-dir may hold other things
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / LAUNCH_FILE).write_text(json.dumps({"run_id": run_id}) + "\n")
    except OSError as exc:
        raise UsageError(f"cannot create --run-dir {run_dir} ({exc.strerror}); pass a writable directory") from None
