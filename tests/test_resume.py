"""Exact resume: killed, stopped or resized runs finish with the uninterrupted run's model and metrics."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Launched,
    assert_ok,
    clean_env,
    read_summary,
    run_torchrun,
    run_trainer,
    wait_until,
)
from faults import first_steps, latest_step, metrics_rows, trained_positions, workers

from trainer.config import TrainConfig
from trainer.distributed import DistEnv
from trainer.jobs import torchrun_command
from trainer.rundir import prepare_run_dir, starts_fresh

# 2 ranks x 250 = 500 samples a step: 96 steps an epoch, 192 in all; checkpoints every 15 steps
# and at step 96, so a kill lands mid-epoch with steps to redo. A narrower model keeps it quick.
ARGS = ("--hidden", "256", "--batch-size", "250", "--epochs", "2", "--log-every", "5", "--checkpoint-every", "15")
ARGS += ("--record-samples",)
TRAIN_SPLIT = 48_000


def trainer_args(run_dir: Path, *extra: str) -> list[str]:
    return [*ARGS, "--run-dir", str(run_dir), *extra]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted two-process run every interrupted one must reproduce."""
    run_dir = tmp_path_factory.mktemp("baseline") / "run"
    assert_ok(run_torchrun(2, trainer_args(run_dir), timeout=300))
    return {"dir": run_dir, "summary": read_summary(run_dir), "metrics": metrics_rows(run_dir)}


def assert_every_sample_once(run_dir: Path, epochs: int = 2) -> None:
    positions = trained_positions(run_dir)
    assert sorted(positions) == list(range(1, epochs + 1))
    for epoch, seen in positions.items():
        assert len(seen) == len(set(seen)), f"epoch {epoch}: {len(seen) - len(set(seen))} samples trained twice"
        assert set(seen) == set(range(TRAIN_SPLIT)), f"epoch {epoch}: {TRAIN_SPLIT - len(set(seen))} samples skipped"


def assert_same_as_baseline(run_dir: Path, baseline: dict[str, Any]) -> None:
    summary = read_summary(run_dir)
    assert summary["params_sha256"] == baseline["summary"]["params_sha256"]
    assert summary["global_step"] == baseline["summary"]["global_step"] == 192
    assert metrics_rows(run_dir) == baseline["metrics"]


def test_baseline_saw_every_sample_once(baseline: dict[str, Any]) -> None:
    assert_every_sample_once(baseline["dir"])
    summary = baseline["summary"]
    assert summary["restarts"] == 0 and summary["resumed_from_step"] is None
    manifests = sorted((baseline["dir"] / "checkpoints").glob("step-*.json"))
    # --keep-checkpoints 3: the newest three of 15, 30, ..., 180, 96 (epoch end), 192 (end).
    assert [p.name for p in manifests] == ["step-00000165.json", "step-00000180.json", "step-00000192.json"]


def test_sigkill_of_a_worker_restarts_and_finishes_with_the_same_model(
    tmp_path: Path, baseline: dict[str, Any]
) -> None:
    run_dir = tmp_path / "run"
    # --overwrite as well: it must clear the run directory once, not again when torchrun restarts the workers.
    args = trainer_args(run_dir, "--overwrite")
    job = Launched(torchrun_command(2, "trainer", args, ["--max-restarts=3"]), clean_env(), tmp_path / "torchrun.log")
    wait_until(lambda: latest_step(run_dir) >= 40, 120, "step 40", job)
    victim = workers(job.pid)[0]  # rank 0: the checkpoint writer
    killed_at = time.time()
    victim.send_signal(signal.SIGKILL)
    assert job.wait(300) == 0, job.output()[-6000:]

    summary = read_summary(run_dir)
    assert summary["restarts"] == 1
    assert summary["resumed_from_step"] in (*range(30, 192, 15), 96)  # a checkpoint after the first kill point
    assert_same_as_baseline(run_dir, baseline)
    assert_every_sample_once(run_dir)  # steps after the checkpoint were trained twice, counted once
    recovery = min(e["time"] for e in first_steps(run_dir) if e["restarts"] == 1) - killed_at
    print(f"\nrecovery: SIGKILL to first completed step after resume: {recovery:.2f} s")
    assert 0 < recovery < 90


def test_sigterm_to_one_worker_checkpoints_and_exits_then_resume_matches(
    tmp_path: Path, baseline: dict[str, Any]
) -> None:
    run_dir = tmp_path / "run"
    job = Launched(torchrun_command(2, "trainer", trainer_args(run_dir)), clean_env(), tmp_path / "stopped.log")
    wait_until(lambda: latest_step(run_dir) >= 20, 120, "step 20", job)
    workers(job.pid)[1].send_signal(signal.SIGTERM)  # reaches rank 1 only; rank 0 writes
    assert job.wait(120) != 0
    out = job.output()
    stopped = int(out.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert "exitcode  : 143" in out or "exitcode: 143" in out.replace(" ", "")
    manifest = json.loads((run_dir / "checkpoints" / f"step-{stopped:08d}.json").read_text())
    assert manifest["step"] == stopped and stopped % 5 == 0  # a log point: within 5 steps of the signal
    assert not (run_dir / "summary.json").exists()

    resumed = run_torchrun(2, trainer_args(run_dir), timeout=300)
    assert_ok(resumed)
    assert f"resuming from {run_dir / 'checkpoints'}/step-{stopped:08d}.pt: step {stopped}" in resumed.stderr
    assert "written at world size 2 (now 2)" in resumed.stderr
    assert read_summary(run_dir)["resumed_from_step"] == stopped
    assert_same_as_baseline(run_dir, baseline)
    assert_every_sample_once(run_dir)


def test_resume_at_another_world_size_skips_and_repeats_no_sample(tmp_path: Path) -> None:
    """2 processes -> 1 -> 2, stopped by SIGTERM mid-epoch each time, global batch fixed at 500."""
    run_dir = tmp_path / "run"
    args = [*trainer_args(run_dir), "--global-batch-size", "500", "--epochs", "1"]
    two = Launched(torchrun_command(2, "trainer", args), clean_env(), tmp_path / "two.log")
    wait_until(lambda: latest_step(run_dir) >= 20, 120, "step 20", two)
    workers(two.pid)[0].send_signal(signal.SIGTERM)
    assert two.wait(120) != 0

    one = Launched([sys.executable, "-m", "trainer", *args], clean_env(), tmp_path / "one.log")
    wait_until(lambda: latest_step(run_dir) >= 50, 120, "step 50", one)
    one.proc.send_signal(signal.SIGTERM)
    assert one.wait(120) == 128 + signal.SIGTERM
    assert "written at world size 2 (now 1), batch per rank 250 (now 500)" in one.output()

    again = run_torchrun(2, args, timeout=300)
    assert_ok(again)
    assert "written at world size 1 (now 2), batch per rank 500 (now 250)" in again.stderr
    assert read_summary(run_dir)["global_step"] == 96
    assert_every_sample_once(run_dir, epochs=1)


def test_overwrite_applies_once_per_launch(tmp_path: Path) -> None:
    cfg = TrainConfig(run_dir=str(tmp_path), overwrite=True)
    prepare_run_dir(cfg, fresh=True, run_id="launch-1")
    assert starts_fresh(cfg, DistEnv(world_size=2, run_id="launch-2"))  # a new launch starts over
    assert not starts_fresh(cfg, DistEnv(world_size=2, run_id="launch-1"))  # a restart of this one resumes
    assert not starts_fresh(cfg, DistEnv(world_size=2, run_id="launch-2", restart_count=1))
    assert starts_fresh(cfg, DistEnv(run_id=None))  # a plain process: every start is a new launch
    assert not starts_fresh(TrainConfig(run_dir=str(tmp_path)), DistEnv())


def test_global_batch_that_does_not_divide_is_refused(tmp_path: Path) -> None:
    result = run_torchrun(2, ["--run-dir", str(tmp_path / "run"), "--global-batch-size", "501"], timeout=120)
    assert result.returncode != 0
    assert "--global-batch-size 501 does not divide over 2 processes; pick a multiple of 2 (e.g. 500 or 502)" in (
        result.stderr
    )


def test_resume_never_refuses_existing_checkpoints_and_finished_runs_stay_finished(
    tmp_path: Path, baseline: dict[str, Any]
) -> None:
    run_dir = tmp_path / "run"
    checkpoints = baseline["dir"] / "checkpoints"
    never = run_trainer([*trainer_args(run_dir), "--checkpoint-dir", str(checkpoints), "--resume", "never"])
    assert never.returncode == 2
    assert f"--resume never, but {checkpoints} holds checkpoints of an earlier run" in never.stderr
    finished = run_trainer(trainer_args(baseline["dir"]))
    assert finished.returncode == 0 and "already holds a finished run" in finished.stderr
