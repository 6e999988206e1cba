"""A run's life: continued when the budget grows, one job per run directory, divergence never trained on."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
from conftest import (
    Launched,
    assert_ok,
    clean_env,
    read_jsonl,
    read_summary,
    run_torchrun,
    run_trainer,
    wait_until,
)
from faults import has_trained, metrics_rows, workers

from trainer.distributed.jobs import torchrun_command
from trainer.lifecycle.guard import DIVERGED_EXIT_CODE

# 1,024 samples a step at any world size: 46 steps an epoch. Windows end every 10 steps and
# checkpoints every 20, so --max-steps 27 cuts an epoch between both.
ARGS = ("--hidden", "16", "--global-batch-size", "1024", "--log-every", "10", "--checkpoint-every", "20")
STEPS_PER_EPOCH = 46


def launch(nproc: int, run_dir: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The trainer with ARGS: one plain process at world size 1, torchrun otherwise."""
    args = [*ARGS, "--run-dir", str(run_dir), *extra]
    return run_trainer(args, timeout=timeout) if nproc == 1 else run_torchrun(nproc, args, timeout=timeout)


def launch_cmd(nproc: int, run_dir: Path, *extra: str) -> list[str]:
    args = [*ARGS, "--run-dir", str(run_dir), *extra]
    return [sys.executable, "-m", "trainer", *args] if nproc == 1 else torchrun_command(nproc, "trainer", args)


def files(run_dir: Path) -> dict[str, bytes]:
    """Every file under ``run_dir`` by relative path, with its bytes."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("trainer: error:")]


# -- 1. continue when the budget grows ------------------------------------------------------
@pytest.mark.timeout(900)  # five launches, four epochs of training
@pytest.mark.parametrize("nproc", [1, 2])
def test_a_finished_run_continues_when_the_budget_grows_and_equals_the_larger_run(tmp_path: Path, nproc: int) -> None:
    baseline = tmp_path / "baseline"
    assert_ok(launch(nproc, baseline, "--epochs", "2"))

    run_dir = tmp_path / "run"
    assert_ok(launch(nproc, run_dir, "--epochs", "1", "--max-steps", "27"))  # cut mid-epoch
    assert_ok(launch(nproc, run_dir, "--epochs", "1"))  # --max-steps dropped: finishes epoch 1
    assert [r["global_step"] for r in metrics_rows(run_dir)] == [str(STEPS_PER_EPOCH)], "the cut row is replaced"
    grown = launch(nproc, run_dir, "--epochs", "2")  # one epoch more
    assert_ok(grown)
    assert f"resuming from {run_dir / 'checkpoints'}/step-{STEPS_PER_EPOCH:08d}.pt" in grown.stderr

    summary, expected = read_summary(run_dir), read_summary(baseline)
    assert summary["params_sha256"] == expected["params_sha256"]
    assert summary["global_step"] == expected["global_step"] == 2 * STEPS_PER_EPOCH
    assert metrics_rows(run_dir) == metrics_rows(baseline)
    assert summary["continued_from_step"] == STEPS_PER_EPOCH and expected["continued_from_step"] is None
    assert [(s["from_step"], s["to_step"], s["max_steps"]) for s in summary["segments"]] == [
        (0, 27, 27),
        (27, STEPS_PER_EPOCH, None),
        (STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH, None),
    ]
    earlier = json.loads((run_dir / "summary-step-00000027.json").read_text())  # the first segment's summary
    assert earlier["global_step"] == 27 and earlier["continued_from_step"] is None


def test_the_same_budget_is_a_no_op_and_a_smaller_one_changes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert_ok(launch(1, run_dir, "--epochs", "1", "--max-steps", "12"))
    before = files(run_dir)

    again = launch(1, run_dir, "--epochs", "1", "--max-steps", "12")
    assert again.returncode == 0 and "Traceback" not in again.stderr
    assert [line for line in again.stderr.splitlines() if "already holds a finished run" in line] != []
    assert "raise --epochs or --max-steps to continue it" in again.stderr
    assert files(run_dir) == before

    smaller = launch(1, run_dir, "--epochs", "1", "--max-steps", "8")
    assert smaller.returncode == 2
    assert error_lines(smaller.stderr) == [
        f"trainer: error: {run_dir} holds a finished run that trained 12 steps (0 complete epochs, 12288 samples "
        "into epoch 1), more than --epochs 1 --max-steps 8 asks for; nothing was changed. Ask for at least that "
        "much to continue it, or use a new --run-dir or --overwrite"
    ]
    assert files(run_dir) == before


# -- 2. one job per run directory -----------------------------------------------------------
@contextlib.contextmanager
def frozen(processes: list[psutil.Process]) -> Iterator[None]:
    """SIGSTOP ``processes`` (they keep their locks and files open, and change nothing) until the block ends."""
    for process in processes:
        process.suspend()
    try:
        yield
    finally:
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.resume()


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_second_launch_into_a_live_run_dir_is_refused_and_changes_nothing(tmp_path: Path, nproc: int) -> None:
    run_dir = tmp_path / "run"
    first = Launched(launch_cmd(nproc, run_dir, "--epochs", "1"), clean_env(), tmp_path / "first.log")
    wait_until(lambda: has_trained(run_dir, 0), 180, "the first job's first step", first)
    ranks = {0: psutil.Process(first.pid)} if nproc == 1 else workers(first.pid)
    with frozen(list(ranks.values())):
        before = files(run_dir)
        started = time.monotonic()
        second = launch(nproc, run_dir, "--epochs", "1", timeout=120)
        print(f"\nsecond launch refused after {time.monotonic() - started:.1f} s")
        assert second.returncode != 0
        lines = [line for line in error_lines(second.stderr) if "is in use by another job" in line]
        assert lines, second.stderr[-3000:]
        assert f"--run-dir {run_dir} is in use by another job (host " in lines[0]
        assert f", pid {ranks[0].pid}, started " in lines[0]
        if nproc > 1:
            assert ", torchrun run id " in lines[0]
        assert files(run_dir) == before, "the refused launch wrote, renamed or deleted something"
    assert first.wait(300) == 0, first.output()[-4000:]
    assert not list(run_dir.rglob("*.stale"))
    assert read_summary(run_dir)["global_step"] == STEPS_PER_EPOCH
    assert [r["global_step"] for r in metrics_rows(run_dir)] == [str(STEPS_PER_EPOCH)]
    for rank in range(nproc):
        starts = [r for r in read_jsonl(run_dir / f"rank{rank}.jsonl") if r.get("event") == "first_step"]
        assert len(starts) == 1, f"rank {rank}: another job trained here too"
    assert (run_dir / "run.lock").read_bytes() == b"", "a clean exit leaves the lock file empty"


def test_a_new_job_takes_over_at_once_after_kill_9_of_every_process(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job = Launched(launch_cmd(2, run_dir, "--epochs", "1"), clean_env(), tmp_path / "killed.log")
    wait_until(lambda: list((run_dir / "checkpoints").glob("step-*.json")), 180, "a checkpoint", job)
    job.kill()  # the agent and both workers, as if the host died
    assert b'"pid"' in (run_dir / "run.lock").read_bytes(), "the dead holder's details stay behind"

    again = launch(2, run_dir, "--epochs", "1")
    assert_ok(again)
    assert "resuming from" in again.stderr and "in use" not in again.stderr
    assert read_summary(run_dir)["global_step"] == STEPS_PER_EPOCH


# -- 3. no divergence goes unnoticed --------------------------------------------------------
DIVERGE = ("--epochs", "1", "--max-steps", "20", "--lr", "1e6", "--optimizer", "sgd", "--checkpoint-every", "2")


def assert_checkpoints_finite(run_dir: Path) -> list[Path]:
    """Every checkpoint on disk loads safely and holds only finite weights and optimiser state."""
    paths = sorted((run_dir / "checkpoints").glob("step-*.pt"))
    for path in paths:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        for part in ("model", "optimizer"):
            tensors = [t for t in _tensors(payload[part]) if t.is_floating_point()]
            assert tensors and all(bool(torch.isfinite(t).all()) for t in tensors), f"{path.name}: {part}"
    return paths


def _tensors(tree: object) -> Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, list | tuple):
        for value in tree:
            yield from _tensors(value)


@pytest.mark.parametrize("nproc", [1, 2])
def test_divergence_stops_with_the_step_and_the_newest_good_checkpoint(tmp_path: Path, nproc: int) -> None:
    run_dir = tmp_path / "run"
    result = launch(nproc, run_dir, *DIVERGE)
    assert result.returncode != 0
    if nproc == 1:
        assert result.returncode == DIVERGED_EXIT_CODE
    else:
        assert f"exitcode  : {DIVERGED_EXIT_CODE}" in result.stderr
    lines = error_lines(result.stderr)
    assert len(set(lines)) == 1, result.stderr[-3000:]  # every rank says the same, about the same step
    step = int(lines[0].split("not finite at step ")[1].split(" ")[0])
    newest = assert_checkpoints_finite(run_dir)[-1]
    assert f"newest good checkpoint {newest}." in lines[0]
    assert int(newest.stem.split("-")[1]) < step
    assert not (run_dir / "summary.json").exists()


@pytest.mark.parametrize("nproc", [1, 2])
def test_skip_drops_non_finite_updates_and_the_run_finishes_with_finite_weights(tmp_path: Path, nproc: int) -> None:
    run_dir = tmp_path / "run"
    assert_ok(launch(nproc, run_dir, *DIVERGE, "--on-nonfinite", "skip"))
    summary = read_summary(run_dir)
    assert summary["global_step"] == 20 and summary["skipped_nonfinite_steps"] > 0
    for rank in range(nproc):
        skipped = [r for r in read_jsonl(run_dir / f"rank{rank}.jsonl") if r.get("event") == "skipped_nonfinite"]
        assert len(skipped) == summary["skipped_nonfinite_steps"], f"rank {rank} skipped other steps"
    paths = assert_checkpoints_finite(run_dir)
    assert paths[-1].name == "step-00000020.pt"  # the final weights, checked finite above
