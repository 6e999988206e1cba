"""launch/slurm.sbatch under a real Slurm of two nodes (tests/slurm_cluster.py).

Every run must end with the weights of an uninterrupted run: on one host, two processes, gloo,
one thread each, the same steps. The nodes have host names of their own, so the trainer's
``--comm auto`` sees two hosts and syncs gradients with gloo (at world size 2 gloo's sum is
exact, whatever the order). Needs root, slurm-wlm and munge; skipped with the reason otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import assert_ok, read_summary, run_torchrun, wait_until
from faults import has_trained, trained_positions
from launching import LAUNCH, STEPS, THREADS, launch_env, read_sha
from slurm_cluster import SlurmCluster, gone, seconds, slurm_cluster
from testhosts import IFNAME

SUBNET = "10.79.0"
TRAIN_SPLIT = 48_000
# Long enough that a time limit and a requeue land mid-run, short enough for the suite.
LONG = ("--max-steps", "1200", "--epochs", "2", "--log-every", "10", "--checkpoint-every", "400")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    with slurm_cluster(tmp_path_factory.mktemp("slurm"), SUBNET) as running:
        yield running


@pytest.fixture(autouse=True)
def nothing_left_on_the_nodes(cluster: SlurmCluster) -> Iterator[None]:
    """No job of a test may outlive it: every process of it has ended, on both nodes."""
    yield
    wait_until(lambda: not cluster.job_processes(), 60, "the jobs' processes to end on both nodes")


def one_host_reference(run_dir: Path, args: tuple[str, ...]) -> str:
    """The uninterrupted run: one host, two processes, gloo, one thread each."""
    assert_ok(run_torchrun(2, [*args, "--comm", "gloo", "--run-dir", str(run_dir)], timeout=300, **THREADS))
    return read_sha(run_dir)


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    return one_host_reference(tmp_path_factory.mktemp("reference") / "run", LONG)


def submit(
    cluster: SlurmCluster, run_dir: Path, args: tuple[str, ...], sbatch: tuple[str, ...] = (), **env: str
) -> int:
    """``sbatch [SBATCH] launch/slurm.sbatch ARGS`` from the repository root, output in the run's parent."""
    job_env = launch_env(RUN_DIR=str(run_dir), GLOO_SOCKET_IFNAME=IFNAME, **env)
    output = run_dir.parent / "slurm-%j.out"
    return cluster.sbatch([f"--output={output}", *sbatch, str(LAUNCH / "slurm.sbatch"), *args], job_env)


def job_output(run_dir: Path, job_id: int) -> str:
    return (run_dir.parent / f"slurm-{job_id}.out").read_text(errors="replace")


def assert_completed(cluster: SlurmCluster, job_id: int, run_dir: Path, timeout: float) -> dict[str, str]:
    fields = cluster.wait_ended(job_id, timeout)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), job_output(run_dir, job_id)[-6000:]
    assert cluster.squeue(job_id) == "COMPLETED"
    return fields


def test_sbatch_trains_on_two_nodes_like_one_host(tmp_path: Path, cluster: SlurmCluster) -> None:
    reference = one_host_reference(tmp_path / "one-host", STEPS)
    run_dir = tmp_path / "run"
    job_id = submit(cluster, run_dir, STEPS)
    fields = assert_completed(cluster, job_id, run_dir, 180)
    out = job_output(run_dir, job_id)
    assert fields["NodeList"] == f"{cluster.tag}n[1-2]", fields
    assert f"2 node(s) x 1, rendezvous {cluster.hosts[0].addr}:" in out
    assert "gradient sync: gloo (auto: shared memory unavailable (the group spans 2 hosts" in out
    summary = read_summary(run_dir)
    assert (summary["world_size"], summary["global_step"]) == (2, 30)
    assert summary["params_sha256"] == reference


def wait_training(cluster: SlurmCluster, job_id: int, run_dir: Path, timeout: float = 240) -> None:
    """Until both ranks have finished a step (from then on they checkpoint on SIGTERM)."""

    def trained() -> bool:
        state = cluster.job(job_id)["JobState"]
        assert state in ("PENDING", "RUNNING"), job_output(run_dir, job_id)[-6000:]
        return has_trained(run_dir, 0) and has_trained(run_dir, 1)

    wait_until(trained, timeout, f"job {job_id} to train on both nodes")


def test_time_limit_requeues_and_resumes_exactly(tmp_path: Path, cluster: SlurmCluster, long_reference: str) -> None:
    """The script's ``#SBATCH --signal=B:USR1@120``: Slurm signals the job two minutes before its time
    limit, the script requeues it, the trainers checkpoint, and the job starts again and resumes.

    How long the trainers take to start varies with the machine's load, so the limit is set once
    they train (``scontrol update TimeLimit``, as an administrator may): 36 to 96 s ahead, which
    puts the warning in the past, so Slurm sends it at its next time-limit check (every 30 s).
    Once the job is requeued the limit is lifted again, so that the resumed run is not cut short too.
    """
    run_dir = tmp_path / "run"
    job_id = submit(cluster, run_dir, LONG, ("--time=10",))
    wait_training(cluster, job_id, run_dir)
    elapsed = seconds(cluster.job(job_id)["RunTime"])
    cluster.command("scontrol", "update", f"JobId={job_id}", f"TimeLimit={(elapsed + 36 + 59) // 60}")
    cluster.wait_job(job_id, lambda job: job["Restarts"] == "1", 90, "to be requeued")
    cluster.command("scontrol", "update", f"JobId={job_id}", "TimeLimit=10")
    fields = assert_completed(cluster, job_id, run_dir, 300)
    out = job_output(run_dir, job_id)
    assert f"time limit near: requeueing job {job_id}" in out
    assert fields["Restarts"] == "1", fields
    assert re.search(r"resuming from \S+/checkpoints/step-\d+\.pt: step [1-9]", out), out[-6000:]
    summary = read_summary(run_dir)
    assert (summary["world_size"], summary["global_step"]) == (2, 1200)
    assert summary["params_sha256"] == long_reference


def test_preempted_job_resumes_exactly(tmp_path: Path, cluster: SlurmCluster, long_reference: str) -> None:
    """Preemption with requeue, as ``scontrol requeue`` does it: SIGTERM to every process, a checkpoint,
    the job pending again, then started again by Slurm, resuming from that checkpoint."""
    run_dir = tmp_path / "run"
    job_id = submit(cluster, run_dir, LONG)
    wait_training(cluster, job_id, run_dir)
    cluster.command("scontrol", "requeue", str(job_id))
    fields = assert_completed(cluster, job_id, run_dir, 300)
    out = job_output(run_dir, job_id)
    assert "DUE TO JOB REQUEUE" in out
    assert fields["Restarts"] == "1", fields
    assert re.search(r"resuming from \S+/checkpoints/step-\d+\.pt: step [1-9]", out), out[-6000:]
    assert read_summary(run_dir)["params_sha256"] == long_reference


@pytest.mark.parametrize("nodes", [2, 1], ids=["two-nodes-gloo", "one-node-shm"])
def test_scancel_leaves_no_process_and_no_shared_memory(tmp_path: Path, cluster: SlurmCluster, nodes: int) -> None:
    """Cancelled mid-run: nothing of the job is left on either node, and no trainer file in /dev/shm
    (on one node with two processes the gradients go through shared memory)."""
    run_dir = tmp_path / "run"
    nproc = 1 if nodes == 2 else 2
    job_id = submit(cluster, run_dir, LONG, (f"--nodes={nodes}",), NPROC_PER_NODE=str(nproc))
    wait_training(cluster, job_id, run_dir)
    processes = [p for p in cluster.job_processes() if p.environ().get("SLURM_JOB_ID") == str(job_id)]
    trainers = [p for p in processes if "trainer" in p.cmdline() and "RANK" in p.environ()]
    assert len(trainers) == 2, [p.cmdline() for p in processes]
    assert len({cluster.node_of(p) for p in trainers}) == nodes
    cluster.command("scancel", str(job_id))
    fields = cluster.wait_ended(job_id, 120)
    assert fields["JobState"] == "CANCELLED", fields
    wait_until(lambda: all(map(gone, processes)), 60, "every process of the job to end")
    left = [path.name for p in trainers for path in Path("/dev/shm").glob(f"trainer-allreduce-{p.pid}-*")]
    assert not left
    out = job_output(run_dir, job_id)
    expected = "gradient sync: shm" if nodes == 1 else "gradient sync: gloo"
    assert expected in out


def test_a_dead_node_is_requeued_by_slurm_and_every_sample_trained_once(tmp_path: Path, cluster: SlurmCluster) -> None:
    """The second node dies mid-run (slurmd, slurmstepd and trainer killed at once). Slurm marks it
    down, requeues the job (``--requeue``), and with ``--nodes=1-2`` starts it again on the node that
    is left; it resumes from the checkpoint at world size 1 and trains every sample of the epoch once."""
    run_dir = tmp_path / "run"
    args = ("--epochs", "1", "--batch-size", "250", "--log-every", "5", "--checkpoint-every", "10", "--record-samples")
    job_id = submit(cluster, run_dir, args, ("--nodes=1-2",))
    dead = cluster.hosts[1]
    try:
        wait_training(cluster, job_id, run_dir)
        assert cluster.job(job_id)["NodeList"] == f"{cluster.tag}n[1-2]"
        checkpoints = run_dir / "checkpoints"
        wait_until(lambda: any(checkpoints.glob("step-*.pt")), 120, "a checkpoint at world size 2", every=0.2)
        killed = cluster.kill_node(dead)
        assert any(cmd.startswith("slurmd") for cmd in killed), killed
        assert any("trainer" in cmd for cmd in killed), killed
        fields = assert_completed(cluster, job_id, run_dir, 300)
    finally:
        cluster.start_slurmd(dead)
        cluster.wait_idle(120)
    out = job_output(run_dir, job_id)
    assert int(fields["Restarts"]) >= 1, fields
    assert fields["NodeList"] == cluster.hosts[0].name, fields
    summary = read_summary(run_dir)
    assert summary["world_size"] == 1, summary
    assert re.search(r"resuming from \S+/checkpoints/step-\d+\.pt: step [1-9]", out), out[-6000:]
    assert "written at world size 2 (now 1)" in out
    positions = trained_positions(run_dir)[1]
    assert sorted(positions) == list(range(TRAIN_SPLIT))  # the whole epoch, each sample once
