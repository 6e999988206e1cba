"""The CUDA path, where a GPU is visible: nccl, exact resume, checkpoints that move to the CPU.

The rest of the suite hides GPUs from the processes it starts, so it tests the CPU path on any
host; these tests show them, and are skipped where there is none.
"""

from __future__ import annotations

import csv
import json
import re
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    Launched,
    assert_ok,
    clean_env,
    read_summary,
    run_process,
    run_torchrun,
    run_trainer,
    wait_until,
)
from faults import latest_step, metrics_rows
from test_comm import run_worker
from test_inputs import assert_one_line_error

from trainer.lifecycle.guard import DIVERGED_EXIT_CODE

GPUS = torch.cuda.device_count()
pytestmark = pytest.mark.skipif(GPUS == 0, reason="no CUDA GPU visible")

# 1,500 steps an epoch at batch 32: long enough on a GPU to be signalled mid-run.
ARGS = ("--hidden", "256", "--epochs", "2", "--log-every", "5", "--checkpoint-every", "100")
STEPS = 3_000


def trainer_args(run_dir: Path, *extra: str) -> list[str]:
    return [*ARGS, "--run-dir", str(run_dir), *extra]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted plain process on the first GPU (its step captured in a CUDA graph: ``--cuda-graph auto``)."""
    run_dir = tmp_path_factory.mktemp("gpu-baseline") / "run"
    result = run_trainer(trainer_args(run_dir), timeout=300, gpu=True)
    assert_ok(result)
    assert "training step captured in a CUDA graph after 3 eager steps" in result.stderr
    return {"summary": read_summary(run_dir), "metrics": metrics_rows(run_dir), "run_dir": run_dir}


def stop_mid_run(tmp_path: Path, run_dir: Path) -> int:
    """Start a plain GPU process, SIGTERM it once it has trained a while; the step it stopped at."""
    job = Launched([sys.executable, "-m", "trainer", *trainer_args(run_dir)], clean_env(gpu=True), tmp_path / "p.log")
    wait_until(lambda: latest_step(run_dir) >= 100, 180, "step 100", job)
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait(120) == 128 + signal.SIGTERM, job.output()[-4000:]
    stopped = int(job.output().split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert 100 <= stopped < STEPS
    return stopped


def test_plain_process_trains_on_the_gpu_and_reports_its_memory(baseline: dict[str, Any]) -> None:
    summary = baseline["summary"]
    assert summary["device"] == "cuda:0" and summary["backend"] == "none"
    assert summary["global_step"] == STEPS
    assert summary["test_accuracy"] > 0.95
    assert summary["peak_gpu_mb"] > 0
    assert summary["compute_ms"] > 0 and summary["sync_ms_per_batch"] == 0


def test_torchrun_with_one_process_trains_the_same_model_on_the_gpu(tmp_path: Path, baseline: dict[str, Any]) -> None:
    run_dir = tmp_path / "run"
    result = run_torchrun(1, trainer_args(run_dir), timeout=300, gpu=True)
    assert_ok(result)
    assert "device cuda:0, backend none (one process)" in result.stderr
    assert read_summary(run_dir)["params_sha256"] == baseline["summary"]["params_sha256"]


def test_nccl_sync_is_exact_and_timed_on_the_gpu(tmp_path: Path) -> None:
    """Every rank on its own GPU, one process group over nccl, DDP with each option that runs on CUDA."""
    nproc = min(GPUS, 2)
    run_worker("cuda", tmp_path, nproc, gpu=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(nproc)]
    # The exact average of the ranks' gradients, pre-divided then summed as nccl does at world size <= 2.
    exact = [sum(g / nproc for g in grads) for grads in zip(*(r["local"] for r in ranks), strict=True)]
    for rank in ranks:
        assert rank["auto"]["resolved"] == "gloo"  # shared memory needs host tensors: the process group's all-reduce
        # PowerSGD and local SGD start with exact steps (100 of them): the first pass is an all-reduce.
        for option in ("auto", "gloo", "powersgd", "localsgd"):
            assert all(torch.equal(a, b) for a, b in zip(rank[option]["grads"], exact, strict=True)), option
        for option, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            # Each rank's pre-divided gradient rounded to 16 bits, summed in 16 bits: within a few ulps.
            for got, want in zip(rank[option]["grads"], exact, strict=True):
                assert torch.allclose(got, want, rtol=2 * torch.finfo(dtype).eps, atol=1e-6), option
        # Read off CUDA events around the all-reduce: a real duration, not the time to queue it.
        timed = {option: result["sync_ms"] for option, result in rank.items() if option != "local"}
        print(f"\nsync ms of one backward pass over nccl: {timed}")
        assert all(ms > 0 for ms in timed.values())


def test_sigterm_then_resume_on_the_gpu_matches_the_uninterrupted_run(tmp_path: Path, baseline: dict[str, Any]) -> None:
    run_dir = tmp_path / "run"
    stopped = stop_mid_run(tmp_path, run_dir)
    resumed = run_trainer(trainer_args(run_dir), timeout=300, gpu=True)
    assert_ok(resumed)
    assert f"step-{stopped:08d}.pt: step {stopped}" in resumed.stderr
    summary = read_summary(run_dir)
    assert summary["resumed_from_step"] == stopped
    assert summary["params_sha256"] == baseline["summary"]["params_sha256"]
    assert metrics_rows(run_dir) == baseline["metrics"]


def test_a_gpu_checkpoint_resumes_on_the_cpu(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    stopped = stop_mid_run(tmp_path, run_dir)
    resumed = run_trainer(trainer_args(run_dir, "--device", "cpu"), timeout=300)
    assert_ok(resumed)
    summary = read_summary(run_dir)
    assert summary["device"] == "cpu" and summary["resumed_from_step"] == stopped
    assert summary["global_step"] == STEPS and summary["test_accuracy"] > 0.95


def test_more_processes_than_gpus_is_refused_in_one_line(tmp_path: Path) -> None:
    env = {"RANK": str(GPUS), "WORLD_SIZE": str(GPUS + 1), "LOCAL_RANK": str(GPUS), "LOCAL_WORLD_SIZE": str(GPUS + 1)}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    result = run_trainer(trainer_args(tmp_path / "run"), timeout=120, gpu=True, **env)
    visible = f"only {GPUS} GPU{'' if GPUS == 1 else 's'} visible"
    assert_one_line_error(result, f"LOCAL_RANK={GPUS}", visible, "one process per GPU", "--device cpu")


def test_cuda_graph_trains_the_same_weights_as_eager_steps(tmp_path: Path, baseline: dict[str, Any]) -> None:
    """The captured step replays the eager step's kernels: the same weights, bit for bit, after 3,000 steps."""
    run_dir = tmp_path / "eager"
    result = run_trainer(trainer_args(run_dir, "--cuda-graph", "off"), timeout=300, gpu=True)
    assert_ok(result)
    assert "CUDA graph" not in result.stderr
    eager = read_summary(run_dir)
    graphed = baseline["summary"]
    assert graphed["params_sha256"] == eager["params_sha256"]
    assert graphed["test_accuracy"] == eager["test_accuracy"]
    columns = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy")
    assert [[row[c] for c in columns] for row in baseline["metrics"]] == [
        [row[c] for c in columns] for row in metrics_rows(run_dir)
    ]


# --lr 100 makes the loss non-finite after a few dozen steps: well after the graph is captured.
DIVERGING = ("--hidden", "256", "--epochs", "1", "--max-steps", "200", "--lr", "100", "--log-every", "50")


@pytest.mark.parametrize("on_nonfinite", ["stop", "skip"])
def test_cuda_graph_guard_acts_as_eager_steps_do(tmp_path: Path, on_nonfinite: str) -> None:
    """The graph reads its verdict once a window, yet stops at the same step, or skips the same steps, as eager."""
    outcomes = {}
    for mode in ("off", "on"):
        run_dir = tmp_path / mode
        args = [*DIVERGING, "--on-nonfinite", on_nonfinite, "--cuda-graph", mode, "--run-dir", str(run_dir)]
        result = run_trainer(args, timeout=300, gpu=True)
        stopped = re.findall(r"not finite at step (\d+)", result.stderr)
        outcomes[mode] = (result.returncode, stopped)
        if on_nonfinite == "stop":
            assert result.returncode == DIVERGED_EXIT_CODE, result.stderr[-3000:]
            assert len(stopped) == 1 and int(stopped[0]) > 3, result.stderr[-3000:]  # after the eager warm-up
        else:
            assert_ok(result)
            summary = read_summary(run_dir)
            assert summary["skipped_nonfinite_steps"] > 0
            outcomes[mode] += (summary["skipped_nonfinite_steps"], summary["params_sha256"])
    assert outcomes["on"] == outcomes["off"]


def test_cuda_graph_with_clipping_and_adam_matches_eager(tmp_path: Path) -> None:
    """Clipping and fused Adam inside the graph: the same weights as eager steps."""
    shas = []
    for mode in ("off", "on"):
        run_dir = tmp_path / mode
        extra = ("--optimizer", "adam", "--lr", "0.001", "--clip-grad-norm", "0.5", "--cuda-graph", mode)
        args = ["--hidden", "256", "--epochs", "1", "--max-steps", "300", *extra, "--run-dir", str(run_dir)]
        assert_ok(run_trainer(args, timeout=300, gpu=True))
        shas.append(read_summary(run_dir)["params_sha256"])
    assert shas[0] == shas[1]


def test_cuda_graph_benchmark_runs_quick(tmp_path: Path) -> None:
    result = run_process(
        [sys.executable, "-m", "benchmarks.cuda_graph", "--quick", "--out", str(tmp_path)], clean_env(gpu=True), 600
    )
    assert_ok(result)
    report = json.loads((tmp_path / "cuda_graph.json").read_text())
    assert [row["cuda_graph"] for row in report["rows"]] == ["off", "on"]
    assert report["same_weights"] is True
    assert (tmp_path / "raw.csv").exists() and (tmp_path / "cuda_graph.md").exists()


def test_nanogpt_gpu_benchmark_runs_quick(tmp_path: Path) -> None:
    """nanoGPT compiled and eager, and the trainer, on nanoGPT's GPU recipe for a few iterations."""
    cmd = [sys.executable, "-m", "benchmarks.nanogpt", "--gpu", "--iters", "60", "--eager-iters", "30"]
    result = run_process([*cmd, "--out", str(tmp_path)], clean_env(gpu=True), 600)
    assert_ok(result)
    with (tmp_path / "nanogpt-gpu.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["who"] for r in rows] == [
        "nanoGPT train.py, torch.compile",
        "nanoGPT train.py, eager",
        "trainer --precision bf16, eager",
    ]
    for row in rows:
        assert float(row["ms_per_iter"]) > 0
        assert 2.0 < float(row["val_loss"]) < 4.3, row  # below a uniform guess (ln 65 = 4.17), or close
