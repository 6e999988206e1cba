"""The CUDA path, where a GPU is visible: nccl, exact resume, checkpoints that move to the CPU.

The rest of the suite hides GPUs from the processes it starts, so it tests the CPU path on any
host; these tests show them, and are skipped where there is none.
"""

from __future__ import annotations

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
    run_torchrun,
    run_trainer,
    wait_until,
)
from faults import latest_step, metrics_rows
from test_comm import run_worker
from test_inputs import assert_one_line_error

GPUS = torch.cuda.device_count()
pytestmark = pytest.mark.skipif(GPUS == 0, reason="no CUDA GPU visible")

# 1,500 steps an epoch at batch 32: long enough on a GPU to be signalled mid-run.
ARGS = ("--hidden", "256", "--epochs", "2", "--log-every", "5", "--checkpoint-every", "100")
STEPS = 3_000


def trainer_args(run_dir: Path, *extra: str) -> list[str]:
    return [*ARGS, "--run-dir", str(run_dir), *extra]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One uninterrupted plain process on the first GPU."""
    run_dir = tmp_path_factory.mktemp("gpu-baseline") / "run"
    assert_ok(run_trainer(trainer_args(run_dir), timeout=300, gpu=True))
    return {"summary": read_summary(run_dir), "metrics": metrics_rows(run_dir)}


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
