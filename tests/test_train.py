"""End to end: real torchrun, real processes started by hand, real files."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import (
    QUICK,
    REPO,
    assert_ok,
    clean_env,
    free_port,
    read_jsonl,
    read_summary,
    run_torchrun,
    run_trainer,
)

STEPS = ("--max-steps", "60")
SUMMARY_KEYS = {
    "world_size",
    "epochs",
    "global_step",
    "test_accuracy",
    "test_loss",
    "train_seconds",
    "samples_per_second",
    "sync_ms_per_batch",
    "peak_rss_mb",
    "peak_uss_mb",
    "peak_pss_mb",
    "peak_pss_mb_total",
    "params_sha256",
}


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    result = run_torchrun(2, [*QUICK, *STEPS, "--run-dir", str(run_dir)])
    assert_ok(result)
    return run_dir, result


def test_torchrun_writes_every_output(torchrun_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    run_dir, _ = torchrun_run
    config = json.loads((run_dir / "config.json").read_text())
    assert config["max_steps"] == 60 and config["task"] == "mnist-mlp"
    assert config["task_options"]["hidden"] == [512, 256]
    summary = read_summary(run_dir)
    assert set(summary) >= SUMMARY_KEYS
    assert summary["world_size"] == 2 and summary["global_step"] == 60
    assert 0 <= summary["test_accuracy"] <= 1
    assert summary["sync_ms_per_batch"] > 0, "two ranks must measure a real all-reduce"
    assert summary["samples_per_second"] > 0
    # The MLP's FLOPs: 6 per Linear weight; no tokens (its samples are images, not sequences).
    assert summary["model_flops_per_sample"] == 6 * (784 * 512 + 512 * 256 + 256 * 10)
    assert summary["tokens_per_second"] is None and 0 < summary["mfu"] < 1
    # Each rank maps torch's libraries and the shared step's memory, which RSS counts in every rank:
    # what a rank holds alone (USS) is less than its share of all it maps (PSS), which is less than
    # RSS; the ranks' PSS together are less than their RSS together.
    assert 0 < summary["peak_uss_mb"] < summary["peak_pss_mb"] < summary["peak_rss_mb"]
    assert summary["peak_pss_mb_total"] < summary["peak_rss_mb_total"]
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics["epoch"]) == [1]
    for column in ("train_loss", "val_loss", "val_accuracy", "epoch_seconds", "samples_per_second"):
        assert metrics[column].notna().all(), column
    assert (metrics["uss_mb_total"] > 0).all() and (metrics["uss_mb_total"] < metrics["pss_mb_total"]).all()
    assert (metrics["pss_mb_total"] < metrics["rss_mb_total"]).all()
    for rank in (0, 1):
        samples = read_jsonl(run_dir / f"rank{rank}.jsonl")
        steps = [s for s in samples if "event" not in s]
        assert [s["step"] for s in steps] == [20, 40, 60]
        assert {"loss", "step_ms", "compute_ms", "sync_ms", "cpu_percent", "rss_mb", "uss_mb", "pss_mb"} <= set(
            steps[0]
        )
        assert all(0 < s["uss_mb"] < s["pss_mb"] < s["rss_mb"] for s in steps), steps


def final_hashes(run_dir: Path) -> list[str]:
    """Each rank's hash of its final weights, from the last line of its rank log."""
    ends = [read_jsonl(run_dir / f"rank{rank}.jsonl")[-1] for rank in (0, 1)]
    assert all(end["event"] == "end" for end in ends)
    return [end["params_sha256"] for end in ends]


def test_all_ranks_end_with_identical_parameters(
    torchrun_run: tuple[Path, subprocess.CompletedProcess[str]], by_hand_gloo_run: Path
) -> None:
    """Under the default shared step the ranks' weights are views of one shared copy, so their own
    hashes agree by construction; what they must also agree with is the same job over gloo, where
    each rank steps a private copy of its own: both ranks there end with one hash, and it is the
    shared step's."""
    run_dir, _ = torchrun_run
    private = final_hashes(by_hand_gloo_run)
    assert private[0] == private[1], "two private copies of the weights drifted apart"
    assert final_hashes(run_dir) == private == [read_summary(run_dir)["params_sha256"]] * 2


def run_by_hand(args: list[str], omp_threads: str | None) -> list[str]:
    """Two processes started with exported RANK/WORLD_SIZE/... (no launcher); returns their stderr.

    ``omp_threads`` None leaves OMP_NUM_THREADS unset, as no launcher sets it here.
    """
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = clean_env(
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        env.pop("OMP_NUM_THREADS", None)
        if omp_threads is not None:
            env["OMP_NUM_THREADS"] = omp_threads
        cmd = [sys.executable, "-m", "trainer", *args]
        procs.append(
            subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outputs = [proc.communicate(timeout=180) for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    return [err for _, err in outputs]


def test_threads_are_split_between_local_ranks(
    tmp_path: Path, torchrun_run: tuple[Path, subprocess.CompletedProcess[str]]
) -> None:
    """torchrun sets OMP_NUM_THREADS=1 for several local processes; without it the trainer splits the CPUs."""
    _, result = torchrun_run
    assert re.search(
        r"rank 0 of 2 \(local 0 of 2\), device cpu, backend gloo, 1 threads \(OMP_NUM_THREADS\)", result.stderr
    )

    cpus = len(os.sched_getaffinity(0))
    args = ["--max-steps", "2", "--hidden", "64", "--log-all-ranks", "--run-dir", str(tmp_path / "run")]
    for rank, err in enumerate(run_by_hand(args, omp_threads=None)):
        split = f"{max(1, cpus // 2)} threads ({cpus} cpus // 2 local processes)"
        assert f"[rank {rank}] INFO rank {rank} of 2 (local {rank} of 2), device cpu, backend gloo, {split}" in err


@pytest.fixture(scope="module")
def by_hand_gloo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The torchrun job's twin, started by hand with exported RANK/WORLD_SIZE/... and ``--comm gloo``:
    every rank holds and steps a private copy of the weights."""
    run_dir = tmp_path_factory.mktemp("by-hand") / "run"
    run_by_hand([*QUICK, *STEPS, "--comm", "gloo", "--run-dir", str(run_dir)], omp_threads="1")
    return run_dir


def test_exported_variables_match_torchrun(
    by_hand_gloo_run: Path, torchrun_run: tuple[Path, subprocess.CompletedProcess[str]]
) -> None:
    """Two processes started by hand with RANK/WORLD_SIZE/... train the same model as torchrun."""
    assert read_summary(by_hand_gloo_run)["params_sha256"] == read_summary(torchrun_run[0])["params_sha256"]


def test_single_process_learns(tmp_path: Path) -> None:
    run_dir = tmp_path / "single"
    result = run_trainer([*QUICK, "--max-steps", "300", "--run-dir", str(run_dir)])
    assert_ok(result)
    summary = read_summary(run_dir)
    assert summary["world_size"] == 1 and summary["sync_ms_per_batch"] == 0
    assert summary["test_accuracy"] > 0.85, "300 steps of SGD reach well above chance (0.1)"
    assert "backend none (one process)" in result.stderr


def test_adam_and_other_widths_train(tmp_path: Path) -> None:
    run_dir = tmp_path / "adam"
    adam = ["--optimizer", "adam", "--lr", "0.001", "--hidden", "64"]
    result = run_trainer([*QUICK, "--max-steps", "100", *adam, "--run-dir", str(run_dir)])
    assert_ok(result)
    summary = read_summary(run_dir)
    assert summary["parameters"] == 784 * 64 + 64 + 64 * 10 + 10
    assert summary["test_accuracy"] > 0.8


def test_second_invocation_refuses_a_finished_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert_ok(run_trainer([*QUICK, "--max-steps", "5", "--run-dir", str(run_dir)]))
    first = read_summary(run_dir)
    again = run_trainer([*QUICK, "--max-steps", "5", "--run-dir", str(run_dir)])
    assert again.returncode == 0 and "Traceback" not in again.stderr
    assert "already holds a finished run" in again.stderr and "--overwrite" in again.stderr
    assert "nothing to do" in again.stderr
    assert read_summary(run_dir) == first, "the finished run must be left untouched"
    replaced = run_trainer([*QUICK, "--max-steps", "7", "--run-dir", str(run_dir), "--overwrite"])
    assert_ok(replaced)
    assert read_summary(run_dir)["global_step"] == 7


def test_finished_run_under_torchrun_is_a_quiet_no_op(
    torchrun_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    run_dir, _ = torchrun_run
    before = {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()}
    result = run_torchrun(2, [*QUICK, *STEPS, "--run-dir", str(run_dir)], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("already holds a finished run") == 1, "said once, by rank 0"
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    assert {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()} == before


def run_on_terminal(args: list[str], timeout: float = 120) -> str:
    """Run the trainer with a pseudo-terminal (80 columns) as stdout and stderr; return what it drew."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer", *args], env=clean_env(), cwd=REPO, stdout=follower, stderr=follower
    )
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        elif proc.poll() is not None:
            break
    os.close(leader)
    assert proc.wait(timeout=10) == 0
    return b"".join(chunks).decode(errors="replace").replace("\r", "\n")


def test_progress_bar_on_a_terminal_and_plain_lines_otherwise(tmp_path: Path) -> None:
    args = ["--epochs", "1", "--max-steps", "200", "--log-every", "50"]
    drawn = run_on_terminal([*args, "--run-dir", str(tmp_path / "tty")])
    assert re.search(r"epoch 1/1: .*\| 200/1500 ", drawn), drawn[-2000:]
    assert "INFO epoch 1 step 50 loss" not in drawn, "the bar replaces the periodic lines"
    piped = run_trainer([*args, "--run-dir", str(tmp_path / "pipe")])
    assert_ok(piped)
    assert "INFO epoch 1 step 50 loss" in piped.stderr
    assert "/1500" not in piped.stdout + piped.stderr
