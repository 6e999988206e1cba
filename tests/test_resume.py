"""Exact resume: killed, stopped or resized runs finish with the uninterrupted run's model and metrics."""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
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
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

from trainer.core.config import TrainConfig
from trainer.core.optim import build_optimizer
from trainer.distributed.env import DistEnv
from trainer.distributed.jobs import torchrun_command
from trainer.engine.sampling import epoch_permutation
from trainer.lifecycle.checkpoint import read_checkpoint, step_of
from trainer.lifecycle.rundir import prepare_run_dir, starts_fresh
from trainer.sync.powersgd_state import PowerSGDMemory
from trainer.tasks.mnist_mlp import default_data, default_model

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
    signalled_after = latest_step(run_dir)  # the signal lands at this step or inside the next window
    workers(job.pid)[1].send_signal(signal.SIGTERM)  # reaches rank 1 only; rank 0 writes
    assert job.wait(120) != 0
    out = job.output()
    stopped = int(out.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert re.search(r"exitcode\s*:\s*143\b", out), out[-3000:]  # torchrun's report: 128 + SIGTERM
    manifest = json.loads((run_dir / "checkpoints" / f"step-{stopped:08d}.json").read_text())
    # The stop comes at the first log point (every 5 steps) after the signal arrives: no more
    # than 5 steps after it, so at most 10 after the step last logged before it was sent.
    assert manifest["step"] == stopped and stopped % 5 == 0
    assert signalled_after < stopped <= signalled_after + 10, (signalled_after, stopped)
    assert not (run_dir / "summary.json").exists()

    resumed = run_torchrun(2, trainer_args(run_dir), timeout=300)
    assert_ok(resumed)
    assert f"resuming from {run_dir / 'checkpoints'}/step-{stopped:08d}.pt: step {stopped}" in resumed.stderr
    assert "written at world size 2 (now 2)" in resumed.stderr
    assert read_summary(run_dir)["resumed_from_step"] == stopped
    assert_same_as_baseline(run_dir, baseline)
    assert_every_sample_once(run_dir)


def replay_one_process(payload: dict[str, Any], steps: int, batch: int) -> dict[str, Any]:
    """Model and optimiser state after ``steps`` steps of one process from checkpoint ``payload``, computed here.

    The trainer's step, written out: the batch at the checkpoint's position in the epoch's
    order, mean cross-entropy, backward, the optimiser's step; one intra-op thread.
    """
    cfg = TrainConfig.from_dict(payload["config"])
    model = default_model(cfg.seed, tuple(cfg.task_options["hidden"]))
    threads = torch.get_num_threads()
    model.load_state_dict(payload["model"])
    optimizer = build_optimizer(cfg, model)
    optimizer.load_state_dict(payload["optimizer"])
    assert cfg.task_options["val_fraction"] == 0.2  # the split default_data makes
    data = default_data(cfg.seed, torch.device("cpu"))
    position = payload["train_state"]["consumed"]
    order = epoch_permutation(len(data.train_x), cfg.seed, payload["train_state"]["epoch"])
    torch.set_num_threads(1)
    try:
        for step in range(steps):
            batch_positions = order[position + step * batch : position + (step + 1) * batch]
            loss = F.cross_entropy(model(data.train_x[batch_positions]), data.train_y[batch_positions])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def test_resume_at_another_world_size_skips_and_repeats_no_sample(tmp_path: Path) -> None:
    """2 processes -> 1 -> 2, stopped by SIGTERM mid-epoch each time, global batch fixed at 500."""
    run_dir = tmp_path / "run"
    # Every checkpoint kept: the test reads the first ones of each world size.
    args = [*trainer_args(run_dir), "--global-batch-size", "500", "--epochs", "1", "--keep-checkpoints", "20"]
    two = Launched(torchrun_command(2, "trainer", args), clean_env(), tmp_path / "two.log")
    wait_until(lambda: latest_step(run_dir) >= 20, 120, "step 20", two)
    workers(two.pid)[0].send_signal(signal.SIGTERM)
    assert two.wait(120) != 0
    stopped = int(two.output().split("stopped by SIGTERM at step ")[1].split(";")[0])

    # One thread, as the replay below uses: the same arithmetic, so the same bits.
    one = Launched([sys.executable, "-m", "trainer", *args], clean_env(OMP_NUM_THREADS="1"), tmp_path / "one.log")
    wait_until(lambda: latest_step(run_dir) >= 50, 120, "step 50", one)
    one.proc.send_signal(signal.SIGTERM)
    assert one.wait(120) == 128 + signal.SIGTERM
    assert "written at world size 2 (now 1), batch per rank 250 (now 500)" in one.output()
    # The weights and momentum went on from the world-size-2 checkpoint: one process's first
    # checkpoint is what those steps give when replayed here from that checkpoint.
    saved = read_checkpoint(run_dir / "checkpoints" / f"step-{stopped:08d}.pt")
    first = min(step_of(p) for p in (run_dir / "checkpoints").glob("step-*.pt") if step_of(p) > stopped)
    written = read_checkpoint(run_dir / "checkpoints" / f"step-{first:08d}.pt")
    replayed = replay_one_process(saved, first - stopped, 500)
    for name, tensor in written["model"].items():
        assert torch.equal(tensor, replayed["model"][name]), f"{name} after step {first}"
    for index, state in written["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], replayed["optimizer"]["state"][index]["momentum_buffer"])

    # 1 -> 2: the shared step (the default on one host) takes the single process's momentum over
    # into its shared copy; the same resume where each rank steps its own copy (gloo, the same
    # two-term sum) must end with the same weights.
    private = tmp_path / "private"
    shutil.copytree(run_dir, private)
    again = run_torchrun(2, args, timeout=300)
    assert_ok(again)
    assert "written at world size 1 (now 2), batch per rank 500 (now 250)" in again.stderr
    assert "one shared copy of the weights, each rank steps 1/2 of them" in again.stderr
    assert read_summary(run_dir)["global_step"] == 96
    assert_every_sample_once(run_dir, epochs=1)
    private_args = [*trainer_args(private), *args[len(trainer_args(run_dir)) :], "--comm", "gloo"]
    assert_ok(run_torchrun(2, private_args, timeout=300))
    assert read_summary(private)["params_sha256"] == read_summary(run_dir)["params_sha256"]


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


# PowerSGD and local SGD start after 5 exact steps; a checkpoint every 10 steps, all of them kept.
COMM_ARGS = ("--hidden", "64", "--batch-size", "100", "--epochs", "1", "--max-steps", "40", "--log-every", "10")
COMM_ARGS += ("--checkpoint-every", "10", "--keep-checkpoints", "10", "--comm-warmup-steps", "5")


@pytest.mark.parametrize("comm", ["powersgd", "localsgd", "bf16", "fp16"])
def test_resume_is_exact_for_each_lossy_comm_option(tmp_path: Path, comm: str) -> None:
    """A run continued from its step-20 checkpoint ends with the uninterrupted run's weights, bit for bit.

    At step 20 PowerSGD's error feedback is each rank's own residual, and local SGD's replicas
    (averaged after steps 6 and 14, next after 22) and momenta differ between the ranks: each
    must come back to its rank, or the weights differ. bf16 and fp16 hold no state.
    """
    per_rank = comm in ("powersgd", "localsgd")
    whole = tmp_path / "whole"
    assert_ok(run_torchrun(2, [*COMM_ARGS, "--comm", comm, "--run-dir", str(whole)], timeout=300))
    checkpoint = whole / "checkpoints" / "step-00000020.pt"
    saved = read_checkpoint(checkpoint)
    if per_rank:
        assert len(saved["per_rank"]) == 2 and saved["per_rank"][1]["comm"]["option"] == comm
    else:
        assert "per_rank" not in saved

    continued = tmp_path / "continued"
    args = [*COMM_ARGS, "--comm", comm, "--run-dir", str(continued), "--resume", str(checkpoint)]
    result = run_torchrun(2, args, timeout=300)
    assert_ok(result)
    assert "resuming from" in result.stderr and "is not exact" not in result.stderr
    assert read_summary(continued)["resumed_from_step"] == 20
    assert read_summary(continued)["params_sha256"] == read_summary(whole)["params_sha256"]
    assert metrics_rows(continued) == metrics_rows(whole)
    if not per_rank:
        return

    # One process cannot continue two ranks' state: it says so, and goes on from rank 0's.
    alone = tmp_path / "alone"
    result = run_trainer([*COMM_ARGS, "--comm", comm, "--run-dir", str(alone), "--resume", str(checkpoint)])
    assert_ok(result)
    assert f"holds each rank's --comm {comm} state; at world size 1 it is not restored" in result.stderr


def test_powersgd_memories_follow_their_parameters_into_another_bucket_layout() -> None:
    """Memories saved in one bucket layout are laid out by parameter in another (DDP's first vs rebuilt order)."""
    model = default_model(hidden=(64,))
    state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=4, start_powerSGD_iter=2)
    saved = PowerSGDMemory(state, model)
    first, rebuilt = (0, 1, 2, 3), (3, 2, 1, 0)
    saved.layouts[0] = rebuilt
    # Compressed: the two weight matrices (64x784 and 10x64); each parameter's values are its index.
    state.error_dict[0] = torch.cat([torch.full((saved.params[i].numel(),), float(i)) for i in rebuilt])
    state.p_memory_dict[0] = torch.cat([torch.full((n * 4,), float(i)) for i, n in ((2, 10), (0, 64))])
    state.q_memory_dict[0] = torch.cat([torch.full((m * 4,), float(i)) for i, m in ((2, 64), (0, 784))])
    pieces = saved.state_dict()
    assert set(pieces) == {0, 1, 2, 3} and {"p", "q"} <= set(pieces[0]) and "p" not in pieces[1]

    restored_state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=4, start_powerSGD_iter=2)
    restored = PowerSGDMemory(restored_state, model)
    restored.load_state_dict(pieces, torch.device("cpu"), keep_error=True)
    restored._place(0, first)
    error = restored_state.error_dict[0]
    expected = torch.cat([torch.full((restored.params[i].numel(),), float(i)) for i in first])
    assert torch.equal(error, expected)
    assert torch.equal(restored_state.p_memory_dict[0], torch.cat([torch.zeros(64 * 4), torch.full((40,), 2.0)]))
    assert torch.equal(restored_state.q_memory_dict[0], torch.cat([torch.zeros(784 * 4), torch.full((256,), 2.0)]))

    restored.load_state_dict(pieces, torch.device("cpu"), keep_error=False)  # another world size
    restored._place(0, first)
    assert 0 not in restored_state.error_dict and 0 in restored_state.p_memory_dict
