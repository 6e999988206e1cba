"""launch/slurm.sbatch under a real Slurm of two nodes (tests/slurm_cluster.py).

Every run must end with the weights of an uninterrupted run: on one host, two processes, gloo,
one thread each, the same steps. The nodes have host names of their own, so the trainer's
``--comm auto`` sees two hosts of one rank each and syncs gradients with flat gloo (no host has
ranks to combine first, so not the hierarchical sync; at world size 2 gloo's sum is exact,
whatever the order). Needs root, slurm-wlm and munge; skipped with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import assert_ok, read_summary, run_torchrun, wait_until
from etcd_server import etcd_on
from faults import has_trained, trained_positions
from hosts import IFNAME
from launching import LAUNCH, STEPS, THREADS, launch_env, read_sha
from slurm_cluster import SlurmCluster, gone, seconds, slurm_cluster

# A test starts the trainers up to three times (about 15 s each on an idle 2-core machine, a
# minute when it is busy), and waits for Slurm's 30-s time-limit check and its requeue delay.
pytestmark = pytest.mark.timeout(900)
TRAIN_SPLIT = 48_000
# Long enough that a requeue lands mid-run, short enough for the suite.
LONG_STEPS = 400
# Another program on a node, listening on port argv[1].
LISTEN = (
    # SO_REUSEADDR: an earlier job's rendezvous on this port may linger in TIME_WAIT, which is no listener
    "import socket, sys, time; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
    "s.bind(('', int(sys.argv[1]))); s.listen(); "
    "print('listening', flush=True); time.sleep(900)"
)
LONG = ("--max-steps", str(LONG_STEPS), "--epochs", "1", "--log-every", "10", "--checkpoint-every", "100")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


@pytest.fixture(autouse=True)
def nothing_left_on_the_nodes(cluster: SlurmCluster) -> Iterator[None]:
    """No job of a test may outlive it: every process of it has ended, on both nodes."""
    yield
    wait_until(lambda: not cluster.job_processes(), 60, "the jobs' processes to end on both nodes")


def one_host_reference(run_dir: Path, args: tuple[str, ...]) -> str:
    """The uninterrupted run: one host, two processes, one thread each, the default ``--comm``
    (there: shared memory and the shared step; across two nodes of one process each: gloo), so
    the jobs that equal it show the same weights however the processes are spread."""
    assert_ok(run_torchrun(2, [*args, "--run-dir", str(run_dir)], timeout=300, **THREADS))
    return read_sha(run_dir)


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    return one_host_reference(tmp_path_factory.mktemp("reference") / "run", LONG)


def submit(
    cluster: SlurmCluster, run_dir: Path, args: tuple[str, ...], sbatch: tuple[str, ...] = (), **env: str
) -> int:
    """``sbatch [SBATCH] launch/slurm.sbatch ARGS`` from the repository root, output in the run's parent."""
    job_env = launch_env(RUN_DIR=str(run_dir), GLOO_SOCKET_IFNAME=IFNAME, **env)
    run_dir.parent.mkdir(parents=True, exist_ok=True)  # Slurm fails a job whose output it cannot open
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
    assert fields["NodeList"] == "node[0-1]", fields
    assert f"2 node(s) x 1, rendezvous {cluster.hosts[0].addr}:" in out
    assert "gradient sync: gloo (auto: shared memory unavailable (the group spans 2 hosts" in out
    summary = read_summary(run_dir)
    assert (summary["world_size"], summary["global_step"]) == (2, 30)
    assert summary["params_sha256"] == reference


def test_jobs_sharing_nodes_get_different_ports(tmp_path: Path, cluster: SlurmCluster) -> None:
    """Two jobs at once on the same two nodes, while another program listens on the first port of
    the range on the first node: each job takes a port of its own (the script probes the port and
    holds a lock on it), neither the taken one, and both train like one host."""
    reference = one_host_reference(tmp_path / "one-host", STEPS)
    low = 29700  # a range no other test uses, so no earlier job's closing connection holds a port of it
    listener = cluster.hosts[0].run([sys.executable, "-c", LISTEN, str(low)], launch_env(), tmp_path / "listener.log")
    try:
        wait_until(lambda: "listening" in listener.output(), 30, "the other program to listen", listener)
        jobs = {}
        for name in ("first", "second"):
            run_dir = tmp_path / name / "run"
            jobs[name] = (submit(cluster, run_dir, STEPS, RDZV_PORTS=f"{low}-{low + 9}"), run_dir)
        ports = set()
        for job_id, run_dir in jobs.values():
            assert_completed(cluster, job_id, run_dir, 240)
            found = re.findall(rf"rendezvous {re.escape(cluster.hosts[0].addr)}:(\d+)", job_output(run_dir, job_id))
            assert len(found) == 1, job_output(run_dir, job_id)[-4000:]
            ports.add(int(found[0]))
            assert read_sha(run_dir) == reference
    finally:
        listener.kill()
    assert ports == {low + 1, low + 2}, ports


def test_sbatch_with_etcd_rendezvous_trains_like_one_host(tmp_path: Path, cluster: SlurmCluster) -> None:
    """``RDZV_BACKEND=etcd-v2``: the agents meet at an etcd server (here on the first node, as a
    process of its own) instead of a port the script picks; the run trains like one host."""
    reference = one_host_reference(tmp_path / "one-host", STEPS)
    run_dir = tmp_path / "run"
    with etcd_on(cluster.hosts[0], tmp_path) as endpoint:
        job_id = submit(cluster, run_dir, STEPS, RDZV_BACKEND="etcd-v2", RDZV_ENDPOINT=endpoint)
        assert_completed(cluster, job_id, run_dir, 240)
    assert f"rendezvous {endpoint} (etcd-v2)" in job_output(run_dir, job_id)
    summary = read_summary(run_dir)
    assert (summary["world_size"], summary["global_step"]) == (2, 30)
    assert summary["params_sha256"] == reference


def wait_training(cluster: SlurmCluster, job_id: int, run_dir: Path) -> None:
    """Until both ranks have finished a step (from then on they checkpoint on SIGTERM)."""

    def trained() -> bool:
        state = cluster.job(job_id)["JobState"]
        assert state in ("PENDING", "RUNNING"), job_output(run_dir, job_id)[-6000:]
        return has_trained(run_dir, 0) and has_trained(run_dir, 1)

    wait_until(trained, 240, f"job {job_id} to train on both ranks", every=0.5)


def trainers(cluster: SlurmCluster, job_id: int) -> list[psutil.Process]:
    """The job's trainer processes, on whichever node."""
    found = []
    for proc in cluster.job_processes():
        with contextlib.suppress(psutil.Error):
            env = proc.environ()
            if env.get("SLURM_JOB_ID") == str(job_id) and "RANK" in env and "trainer" in proc.cmdline():
                found.append(proc)
    return found


def test_time_limit_requeues_and_resumes_exactly(tmp_path: Path, cluster: SlurmCluster, long_reference: str) -> None:
    """The script's ``#SBATCH --signal=B:USR1@120``: Slurm signals the job two minutes before its time
    limit, the script requeues it, the trainers checkpoint, and the job starts again and resumes.

    Slurm checks time limits every 30 s, and how long the trainers take to start varies with the
    machine's load; so once they train, they are frozen (SIGSTOP), so that the run cannot end before
    Slurm's next check however fast this machine is, and then the limit is cut to 36-96 s ahead
    (``scontrol update``, as an administrator may), which makes the warning due at once. Slurm
    sends SIGCONT ahead of the SIGTERM of a requeue, as for every job it stops. Once the job is
    requeued its original limit is restored, so the resumed run is not cut short as well.
    """
    run_dir = tmp_path / "run"
    job_id = submit(cluster, run_dir, LONG)
    wait_training(cluster, job_id, run_dir)
    # Frozen before the limit is cut: Slurm's check may come at any moment after the cut, and its
    # SIGCONT must find the trainers already stopped (a freeze after it would hold them until SIGKILL).
    frozen = trainers(cluster, job_id)
    assert len(frozen) == 2
    for proc in frozen:
        proc.suspend()
    job = cluster.job(job_id)
    ahead = (seconds(job["RunTime"]) + 36 + 59) // 60
    cluster.command("scontrol", "update", f"JobId={job_id}", f"TimeLimit={ahead}")
    cluster.wait_job(job_id, lambda job: job["Restarts"] == "1", 90, "to be requeued by its time limit")
    cluster.command("scontrol", "update", f"JobId={job_id}", f"TimeLimit={job['TimeLimit']}")
    fields = assert_completed(cluster, job_id, run_dir, 300)
    out = job_output(run_dir, job_id)
    assert f"time limit near: requeueing job {job_id}" in out
    assert fields["Restarts"] == "1", fields
    assert re.search(r"resuming from \S+/checkpoints/step-\d+\.pt: step [1-9]", out), out[-6000:]
    summary = read_summary(run_dir)
    assert (summary["world_size"], summary["global_step"]) == (2, LONG_STEPS)
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


def test_scancel_leaves_no_process_and_no_shared_memory(tmp_path: Path, cluster: SlurmCluster) -> None:
    """Two jobs cancelled mid-run: one on both nodes (gloo between them), one on a single node with
    two processes (gradients through shared memory). Nothing of either is left on any node, and
    no trainer file in any node's /dev/shm."""
    jobs = {}
    for name, nodes, nproc in (("two-nodes", 2, 1), ("one-node", 1, 2)):
        run_dir = tmp_path / name / "run"
        jobs[name] = (submit(cluster, run_dir, LONG, (f"--nodes={nodes}",), NPROC_PER_NODE=str(nproc)), run_dir)
    processes, ranks = {}, {}
    for name, (job_id, run_dir) in jobs.items():
        wait_training(cluster, job_id, run_dir)
        processes[name] = [p for p in cluster.job_processes() if p.environ().get("SLURM_JOB_ID") == str(job_id)]
        ranks[name] = trainers(cluster, job_id)
    assert len({cluster.node_of(p) for p in ranks["two-nodes"]}) == 2
    assert len({cluster.node_of(p) for p in ranks["one-node"]}) == 1
    cluster.command("scancel", *(str(job_id) for job_id, _ in jobs.values()))
    for name, (job_id, run_dir) in jobs.items():
        assert cluster.wait_ended(job_id, 120)["JobState"] == "CANCELLED"
        ended = processes[name]
        wait_until(lambda: all(map(gone, ended)), 60, f"every process of {name} to end")  # noqa: B023
        shms = [Path("/dev/shm"), *map(cluster.shm, cluster.hosts)]  # the machine's and each node's
        left = [path.name for shm in shms for p in ranks[name] for path in shm.glob(f"trainer-allreduce-{p.pid}-*")]
        assert not left, name
        sync = "gradient sync: gloo" if name == "two-nodes" else "gradient sync: shm"
        assert sync in job_output(run_dir, job_id)


def test_a_dead_node_is_requeued_by_slurm_and_every_sample_trained_once(tmp_path: Path, cluster: SlurmCluster) -> None:
    """The second node dies mid-run: its slurmd, slurmstepd and trainer are killed at once. Slurm
    notices (SlurmdTimeout), sets the node down and requeues the job (``--requeue``); once the node
    is back (its slurmd started again, as after a reboot) the job runs again, resumes from the last
    checkpoint, and every sample of the epoch is trained once: none lost, none twice."""
    run_dir = tmp_path / "run"
    args = ("--epochs", "1", "--batch-size", "250", "--log-every", "5", "--checkpoint-every", "10", "--record-samples")
    job_id = submit(cluster, run_dir, args)
    dead = cluster.hosts[1]
    try:
        wait_training(cluster, job_id, run_dir)
        checkpoints = run_dir / "checkpoints"
        wait_until(lambda: any(checkpoints.glob("step-*.pt")), 120, "a checkpoint of both nodes", every=0.2)
        killed = cluster.kill_node(dead)
        assert any(cmd.startswith("slurmd") for cmd in killed), killed
        assert any("trainer" in cmd for cmd in killed), killed
        cluster.wait_job(job_id, lambda job: job["Restarts"] == "1", 120, "to be requeued after the node failure")
    finally:
        cluster.start_slurmd(dead)
    fields = assert_completed(cluster, job_id, run_dir, 300)
    out = job_output(run_dir, job_id)
    assert f"JOB {job_id} ON {cluster.hosts[0].name} CANCELLED AT" in out and "DUE TO NODE FAILURE" in out
    assert re.search(r"resuming from \S+/checkpoints/step-\d+\.pt: step [1-9]", out), out[-6000:]
    assert read_summary(run_dir)["world_size"] == 2
    positions = trained_positions(run_dir)[1]
    assert sorted(positions) == list(range(TRAIN_SPLIT))  # the whole epoch, each sample once
    assert fields["NodeList"] == "node[0-1]"
