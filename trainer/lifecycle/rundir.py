"""What an earlier run left in the run directory, and whether this run may start or resume there."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.core.config import TrainConfig
from trainer.core.errors import UsageError
from trainer.distributed.env import DistEnv
from trainer.lifecycle.checkpoint import list_checkpoints, remove_all
from trainer.lifecycle.runlock import LOCK_FILE

log = logging.getLogger(__name__)

LAUNCH_FILE = "launch.json"
# A continued run's earlier summaries, one per segment, named by the step where each ended.
SEGMENT_SUMMARY = "summary-step-{step:08d}.json"


def headline_figures(summary: dict) -> str:
    """The run's final figures in words: its test figures, else its last validation ones."""
    for prefix in ("test_", "val_"):
        found = [(k, v) for k, v in summary.items() if k.startswith(prefix) and isinstance(v, (int, float))]
        if found:  # the task's metrics before its loss: for a classifier, accuracy leads
            found.sort(key=lambda item: item[0].endswith("_loss"))
            return ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in found)
    return "no test or validation figures"


def describe_finished(summary_path: Path) -> str:
    try:
        summary = json.loads(summary_path.read_text())
        return f"{headline_figures(summary)} after {summary['global_step']} steps"
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


@dataclass(frozen=True)
class Position:
    """Where the newest checkpoint stands: the state a resume (or a continuation) starts from."""

    step: int
    epoch: int  # zero-based epoch in progress (the number of complete epochs)
    consumed: int  # samples of that epoch already trained on

    def describe(self) -> str:
        within = f", {self.consumed} samples into epoch {self.epoch + 1}" if self.consumed else ""
        return f"{self.step} steps ({self.epoch} complete epochs{within})"


def final_position(directory: Path) -> Position | None:
    """The position of the newest checkpoint whose manifest reads (a finished run's final state)."""
    for path in list_checkpoints(directory):
        try:
            manifest = json.loads(path.with_suffix(".json").read_text())
            epoch, consumed = int(manifest["epoch"]) - 1, int(manifest["samples_consumed_in_epoch"])
            return Position(int(manifest["step"]), epoch, consumed)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def compare_budget(cfg: TrainConfig, trained: Position) -> int:
    """Whether ``--epochs``/``--max-steps`` ask for more (1), the same (0) or less (-1) than was trained.

    It mirrors the loop's own test (``Trainer.train``): training goes on while the epoch in
    progress is below ``--epochs`` and the step below ``--max-steps``.
    """
    over_epochs = trained.epoch > cfg.epochs or (trained.epoch == cfg.epochs and trained.consumed > 0)
    over_steps = cfg.max_steps is not None and trained.step > cfg.max_steps
    if over_epochs or over_steps:
        return -1
    done = trained.epoch >= cfg.epochs or (cfg.max_steps is not None and trained.step >= cfg.max_steps)
    return 0 if done else 1


def finished_run(cfg: TrainConfig, fresh: bool) -> str | None:
    """What to tell the user when ``--run-dir`` holds a finished run that this budget leaves nothing to do for.

    None when there is no finished run, or when ``--epochs``/``--max-steps`` now ask for more than
    it trained (it is continued from its final checkpoint) or less (``check_run_dir`` refuses that).
    """
    summary = Path(cfg.run_dir) / "summary.json"
    if fresh or not summary.exists():
        return None
    trained = final_position(cfg.checkpoint_root)
    if trained is not None and compare_budget(cfg, trained) != 0:
        return None
    left = "raise --epochs or --max-steps to continue it" if trained else "no checkpoint is left to continue it from"
    return (
        f"{cfg.run_dir} already holds a finished run ({describe_finished(summary)}), so there is nothing to do; "
        f"{left}, pick a new --run-dir, or add --overwrite to train it again from scratch"
    )


def smaller_budget(cfg: TrainConfig) -> str | None:
    """Why a finished run cannot be made to have trained less, or None."""
    trained = final_position(cfg.checkpoint_root)
    if trained is None or compare_budget(cfg, trained) >= 0:
        return None
    asked = f"--epochs {cfg.epochs}" + (f" --max-steps {cfg.max_steps}" if cfg.max_steps is not None else "")
    return (
        f"{cfg.run_dir} holds a finished run that trained {trained.describe()}, more than {asked} asks for; "
        "nothing was changed. Ask for at least that much to continue it, or use a new --run-dir or --overwrite"
    )


def check_run_dir(cfg: TrainConfig, fresh: bool) -> str | None:
    """Why this run must not start in ``--run-dir``, or None when it may (never deletes anything).

    An unfinished run is resumed under ``--resume auto`` (from its newest checkpoint, or from
    step 0 if it has none) and refused under ``--resume never``. A finished one is continued when
    the budget grows (see ``finished_run``) and refused when it shrinks.
    """
    run_dir = Path(cfg.run_dir)
    if fresh:
        return None
    if (run_dir / "summary.json").exists() and cfg.resume == "auto":
        return smaller_budget(cfg)
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
    """Create the run directory; when ``fresh``, clear what an earlier run left (rank 0 only).

    The lock file stays: this job holds it (trainer/lifecycle/runlock.py). When a finished run is continued,
    its ``summary.json`` is set aside as ``summary-step-N.json`` (the new one lists it in its segments).
    """
    run_dir = Path(cfg.run_dir)
    if fresh and run_dir.exists():
        if not run_dir.is_dir():
            raise UsageError(f"--run-dir {run_dir} is a file; pass a directory path")
        for path in run_dir.iterdir():
            if path.name == LOCK_FILE:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    if fresh:
        remove_all(cfg.checkpoint_root)  # only checkpoint files: --checkpoint-dir may hold other things
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / LAUNCH_FILE).write_text(json.dumps({"run_id": run_id}) + "\n")
    except OSError as exc:
        raise UsageError(f"cannot create --run-dir {run_dir} ({exc.strerror}); pass a writable directory") from None
    summary = run_dir / "summary.json"
    if not fresh and summary.exists():
        trained = final_position(cfg.checkpoint_root)
        step = trained.step if trained else 0
        summary.rename(run_dir / SEGMENT_SUMMARY.format(step=step))
        log.info("continuing the finished run from step %d: --epochs/--max-steps now ask for more", step)


def earlier_segments(run_dir: Path) -> list[dict[str, Any]]:
    """The segments a continued run trained before this one (oldest first; empty for a run never continued)."""
    found = sorted(run_dir.glob(SEGMENT_SUMMARY.replace("{step:08d}", "*")))
    if not found:
        return []
    try:
        newest = json.loads(found[-1].read_text())
    except (OSError, ValueError):
        return []
    segments = newest.get("segments")
    if segments:
        return list(segments)
    # Written before summaries listed segments: one segment from step 0.
    return [
        {
            "from_step": 0,
            "to_step": newest.get("global_step"),
            "epochs_requested": newest.get("epochs_requested"),
            "max_steps": None,
        }
    ]
