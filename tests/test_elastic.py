"""Elastic behaviour under the real launcher: a node leaving, signals, and a peer that stops answering."""

from __future__ import annotations

import re
import signal
import sys
import time
from pathlib import Path

import psutil
from conftest import Launched, clean_env, free_port, read_summary, wait_until
from faults import first_steps, latest_step, trained_positions, workers

from trainer.distributed.jobs import torchrun_command
from trainer.engine.loop import TEST_STOP_ENV
from trainer.engine.sampling import epoch_permutation
from trainer.lifecycle.signals import REPEAT_WINDOW_S

TRAIN_SPLIT = 48_000


def listening(port: int) -> bool:
    """Whether a process on this machine accepts TCP connections on ``port``."""
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in psutil.net_connections("tcp"))


def agent_cmd(port: int, is_host: bool, run_dir: Path) -> list[str]:
    """One torchrun agent ("node") of an elastic 1-2 node job on loopback, one worker each."""
    launcher = [
        "--nnodes=1:2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=membership-test",
        # Short keep-alive timings so the survivor notices the lost node in seconds. The last call
        # (how long a round waits for more nodes once one is in) leaves node B time to start up
        # on a loaded machine; the survivor's regroup waits as long.
        f"--rdzv-conf=is_host={int(is_host)},last_call_timeout=15,keep_alive_interval=1,keep_alive_max_attempt=2,"
        "join_timeout=60",
        "--max-restarts=3",
        "--monitor-interval=0.1",
    ]
    args = ["--run-dir", str(run_dir), "--batch-size", "250", "--epochs", "1", "--log-every", "5"]
    args += ["--checkpoint-every", "10", "--max-steps", "60", "--record-samples"]
    return torchrun_command(1, "trainer", args, launcher, standalone=False)


def test_a_node_leaves_and_the_survivor_continues_alone_from_the_checkpoint(tmp_path: Path) -> None:
    run_dir, port = tmp_path / "run", free_port()
    host = Launched(agent_cmd(port, True, run_dir), clean_env(), tmp_path / "node-a.log")
    wait_until(lambda: listening(port), 60, "node A serving the rendezvous store", host)
    other = Launched(agent_cmd(port, False, run_dir), clean_env(), tmp_path / "node-b.log")
    try:
        # Both nodes trained together (world size 2) past a checkpoint, then node B dies whole. The
        # checkpoint's manifest, written last, not the logged step: a kill between the step and its
        # checkpoint's commit rightly resumes from the one before.
        manifest = run_dir / "checkpoints" / "step-00000020.json"
        wait_until(manifest.exists, 180, "the checkpoint of step 20 at world size 2", host)
        assert "of 2 (local 0 of 1)" in host.output() + other.output()
        other.kill()
        assert host.wait(240) == 0, host.output()[-6000:]
    finally:
        other.kill()
        host.kill()

    summary = read_summary(run_dir)
    assert summary["world_size"] == 1
    assert summary["restarts"] >= 1
    assert summary["resumed_from_step"] >= 20 and summary["resumed_from_step"] % 10 == 0
    assert "written at world size 2 (now 1), batch per rank 250 (now 250)" in host.output()
    # --batch-size 250 per process: 500 samples a step at two nodes, 250 at one. The samples trained
    # are exactly the epoch's order up to the position reached: none skipped, none twice.
    resumed = summary["resumed_from_step"]
    reached = resumed * 500 + (60 - resumed) * 250
    positions = trained_positions(run_dir)[1]
    assert len(positions) == len(set(positions)) == reached
    assert set(positions) == set(epoch_permutation(TRAIN_SPLIT, 0, 0)[:reached].tolist())


def test_first_signal_stops_gracefully_second_exits_at_once(tmp_path: Path) -> None:
    """SIGINT is only noted until the next checkpoint point; a second SIGINT ends the process there and then."""
    run_dir = tmp_path / "run"
    # One process, few agreement points (log and checkpoint points far apart): the first signal waits.
    args = ["--run-dir", str(run_dir), "--batch-size", "8", "--epochs", "1", "--log-every", "100000"]
    job = Launched(
        [sys.executable, "-m", "trainer", *args, "--checkpoint-every", "100000"], clean_env(), tmp_path / "p.log"
    )
    wait_until(lambda: first_steps(run_dir), 120, "the first step", job)
    job.proc.send_signal(signal.SIGINT)
    wait_until(lambda: "SIGINT received; stopping at the next" in job.output(), 30, "the first SIGINT noted", job)
    # Not synchronisation (the handler has run): what is tested depends on elapsed time, since a
    # repeat within REPEAT_WINDOW_S counts as the same request.
    time.sleep(REPEAT_WINDOW_S + 0.5)
    assert job.proc.poll() is None, "the first SIGINT must not end the process before the next checkpoint point"
    job.proc.send_signal(signal.SIGINT)
    assert job.wait(30) == -signal.SIGINT
    assert "second SIGINT, exiting now without a checkpoint" in job.output()
    assert not list((run_dir / "checkpoints").glob("step-*"))


def test_sigint_stop_writes_a_checkpoint_and_exits_130(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), "--batch-size", "64", "--epochs", "1", "--log-every", "7"]
    job = Launched([sys.executable, "-m", "trainer", *args], clean_env(), tmp_path / "p.log")
    wait_until(lambda: latest_step(run_dir) >= 14, 120, "step 14", job)
    job.proc.send_signal(signal.SIGINT)
    assert job.wait(60) == 130
    out = job.output()
    step = int(out.split("stopped by SIGINT at step ")[1].split(";")[0])
    assert step % 7 == 0
    assert (run_dir / "checkpoints" / f"step-{step:08d}.json").exists()


def test_survivor_of_an_unresponsive_peer_exits_after_the_timeout(tmp_path: Path) -> None:
    """Rank 1 is frozen (SIGSTOP): rank 0 must fail its collective after --timeout, not wait forever."""
    run_dir, port = tmp_path / "run", free_port()
    args = [sys.executable, "-m", "trainer", "--run-dir", str(run_dir), "--batch-size", "64", "--timeout", "5"]
    args += ["--log-every", "5"]
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    ranks = [Launched(args, clean_env(RANK=str(r), **env), tmp_path / f"rank{r}.log") for r in (0, 1)]
    try:
        wait_until(lambda: latest_step(run_dir) >= 10, 120, "step 10", ranks[0])
        ranks[1].proc.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        code = ranks[0].wait(60)
        waited = time.monotonic() - frozen_at
    finally:
        for launched in ranks:
            launched.kill()
    assert code != 0
    assert 4 < waited < 40, f"rank 0 exited {waited:.1f} s after its peer froze"
    # The error that ended rank 0 (the traceback's last line) blames the frozen peer and the 5 s.
    error = [line for line in ranks[0].output().splitlines() if line.startswith("[rank0]: ")][-1]
    # Where rank 0 was waiting when its peer froze is a matter of timing: in the shared-memory wait
    # for the gradients (most of a step), in the shared step's wait for the peers' shares of the
    # update, or in a gloo collective at a window's end (the agreement on stopping, the loss).
    # Either way the hang report names rank 1 from its stale heartbeat, and the wrapped error is
    # that wait's own, with the 5 s of --timeout.
    match = re.search(r"HangDetected: rank 0 gave up .*: did not arrive: (.*); stacks in .* \((.*)\)$", error)
    assert match, error
    missing, cause = match.groups()
    assert re.fullmatch(r"rank 1 \(no heartbeat for \d+ s, the last at step \d+\)", missing), error
    shm_wait = r"rank\(s\) 1 did not (reach .*|finish its share of the optimiser step) within 5 s"
    gloo_wait = r".*Timed out waiting 5000ms for (recv|send) operation to complete"
    # ... or, if rank 1 froze as rank 0 was writing a checkpoint, in the meeting after the write.
    writer_wait = r"after writing the checkpoint of step \d+, .*Ranks 1 failed to pass monitoredBarrier in 5000 ms"
    assert re.fullmatch(f"{shm_wait}|{gloo_wait}|{writer_wait}", cause), error
    hang_file = (run_dir / "hang-rank0.txt").read_text()
    assert "rank 1 (no heartbeat" in hang_file, hang_file[:2000]


def stalled_checkpoint_job(
    tmp_path: Path, checkpoint_timeout: str, rank: int = 0
) -> tuple[Path, Launched, psutil.Process]:
    """torchrun, two ranks, a checkpoint every 10 steps and ``--timeout 5``; ``rank`` stops itself
    (SIGSTOP) at the checkpoint of step 10 (rank 0 as it starts writing it), and the test waits
    until it has. Under torchrun, as users run it, the job's store lives in the agent, which stays up."""
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), "--batch-size", "64", "--timeout", "5", "--log-every", "5"]
    args += ["--checkpoint-every", "10", "--max-steps", "30", "--checkpoint-timeout", checkpoint_timeout]
    env = clean_env(**{TEST_STOP_ENV: f"{rank}:10"})
    job = Launched(torchrun_command(2, "trainer", args), env, tmp_path / "job.log")
    stalled = wait_until(lambda: workers(job.pid).get(rank), 120, f"rank {rank} to start", job)
    assert isinstance(stalled, psutil.Process)
    wait_until(lambda: stalled.status() == psutil.STATUS_STOPPED, 120, "the stop at the checkpoint of step 10", job)
    return run_dir, job, stalled


def test_a_slow_checkpoint_fails_no_peer_within_the_checkpoint_timeout(tmp_path: Path) -> None:
    """Rank 0 stalls in its checkpoint for three times ``--timeout`` (and past the hang watchdog's
    2 x --timeout); rank 1, waiting for it under ``--checkpoint-timeout``, neither fails nor reports
    a hang, and the run finishes once rank 0 goes on."""
    run_dir, job, rank0 = stalled_checkpoint_job(tmp_path, "120")
    try:
        time.sleep(15)
        assert set(workers(job.pid)) == {0, 1}, job.output()[-3000:]  # rank 1 still waits
        rank0.resume()
        code = job.wait(120)
    finally:
        job.kill()
    assert code == 0, job.output()[-3000:]
    assert read_summary(run_dir)["global_step"] == 30
    assert not list(run_dir.glob("hang-rank*.txt"))


def test_a_stalled_checkpoint_fails_the_peers_naming_rank_zero(tmp_path: Path) -> None:
    """Rank 0 stays stopped in its checkpoint: rank 1 gives up after ``--checkpoint-timeout`` (8 s),
    not ``--timeout`` (5 s), with an error that names rank 0 and the checkpoint it was writing."""
    _, job, rank0 = stalled_checkpoint_job(tmp_path, "8")
    try:
        stalled_at = time.monotonic()
        wait_until(lambda: "[rank1]: " in job.output(), 120, "rank 1 to fail", job)
        waited = time.monotonic() - stalled_at
        rank0.kill()  # stopped, it would hold torchrun in its 30 s grace before SIGKILL
        assert job.wait(120) != 0
    finally:
        job.kill()
    assert 7 < waited < 60, f"rank 1 failed {waited:.1f} s after rank 0 stalled"
    errors = [line for line in job.output().splitlines() if line.startswith("[rank1]: ") and "HangDetected" in line]
    assert errors, job.output()[-4000:]
    match = re.search(r"HangDetected: rank 1 gave up .*: did not arrive: (.*); stacks in \S+ \((.*)\)$", errors[-1])
    assert match, errors[-1]
    missing, cause = match.groups()
    assert missing.startswith("rank 0 (no heartbeat for"), errors[-1]
    blame = "rank 0 did not finish writing the checkpoint of step 10 within --checkpoint-timeout 8 s"
    assert cause.startswith(blame), errors[-1]


def test_a_peer_stalled_at_a_checkpoint_is_named_by_rank_zero_after_the_timeout(tmp_path: Path) -> None:
    """Rank 1 stops at the checkpoint of step 10: rank 0, done writing, waits for it only ``--timeout``
    (5 s), not ``--checkpoint-timeout``, and fails naming rank 1."""
    _, job, rank1 = stalled_checkpoint_job(tmp_path, "120", rank=1)
    try:
        stalled_at = time.monotonic()
        wait_until(lambda: "[rank0]: " in job.output(), 120, "rank 0 to fail", job)
        waited = time.monotonic() - stalled_at
        rank1.kill()  # stopped, it would hold torchrun in its 30 s grace before SIGKILL
        assert job.wait(120) != 0
    finally:
        job.kill()
    assert 4 < waited < 60, f"rank 0 failed {waited:.1f} s after rank 1 stalled"
    errors = [line for line in job.output().splitlines() if line.startswith("[rank0]: ") and "HangDetected" in line]
    assert errors, job.output()[-4000:]
    match = re.search(r"HangDetected: rank 0 gave up .*: did not arrive: (.*); stacks in \S+ \((.*)\)$", errors[-1])
    assert match, errors[-1]
    missing, cause = match.groups()
    assert missing.startswith("rank 1 (no heartbeat for"), errors[-1]
    blame = "after writing the checkpoint of step 10, the other ranks did not all arrive: "
    assert cause.startswith(blame) and "Ranks 1 failed to pass monitoredBarrier in 5000 ms" in cause, errors[-1]
