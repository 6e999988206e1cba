"""Every launch script run for real (a few steps), and the contract's failure modes.

Each run of world size 2 must end with the same weights as ``local.sh`` (torchrun on this host):
the scripts change how processes are started, never what they compute. ``slurm.sbatch`` runs
under a real Slurm cluster in tests/test_slurm.py.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import stat
import sys
import time
from pathlib import Path

import pytest
from conftest import Launched, assert_ok, ephemeral_low, free_port, read_summary, run_process, wait_all_ok, wait_until
from faults import has_trained, workers
from launching import LAUNCH, STEPS, launch_env, read_sha

SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
RUNNABLE = [p for p in SCRIPTS if p.name != "lib.sh"]
TIMEOUT = 5  # the trainer's --timeout in the failure tests


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``launch/local.sh`` with two processes: torchrun itself, the reference for the other ways."""
    run_dir = tmp_path_factory.mktemp("local") / "run"
    assert_ok(run_script("local.sh", [*STEPS, "--run-dir", str(run_dir)], NPROC="2"))
    return run_dir


@pytest.fixture(scope="module")
def baseline(local_run: Path) -> str:
    return read_sha(local_run)


def run_script(name: str, args: list[str], timeout: float = 180, **env: str):
    return run_process([str(LAUNCH / name), *args], launch_env(**env), timeout)


def test_shellcheck_passes_on_every_script() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian: apt-get install -y shellcheck)")
    result = run_process(["shellcheck", "-x", *map(str, SCRIPTS)], launch_env(), timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", RUNNABLE, ids=lambda p: p.name)
def test_every_script_explains_itself(script: Path) -> None:
    assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable"
    assert "set -euo pipefail" in script.read_text()
    result = run_process([str(script), "--help"], launch_env(), timeout=30)
    assert_ok(result)
    assert result.stdout.startswith("usage:"), result.stdout


def test_local_sh_runs_torchrun_standalone(local_run: Path) -> None:
    summary = read_summary(local_run)
    assert (summary["world_size"], summary["global_step"], summary["backend"]) == (2, 30, "gloo")


def test_env_launch_starts_every_rank_and_prefixes_output(tmp_path: Path, baseline: str) -> None:
    run_dir = tmp_path / "run"
    result = run_script("env_launch.sh", [*STEPS, "--run-dir", str(run_dir), "--log-all-ranks"], NPROC="2")
    assert_ok(result)
    assert read_summary(run_dir)["world_size"] == 2
    assert read_sha(run_dir) == baseline
    lines = result.stderr.splitlines()
    (port,) = re.findall(r"^env_launch\.sh: starting 2 ranks, rendezvous at 127\.0\.0\.1:(\d+)$", result.stderr, re.M)
    assert int(port) < ephemeral_low()  # no socket the kernel numbers can take it before rank 0 binds it
    for rank in (0, 1):
        assert any(line.startswith(f"[rank{rank}]: ") and f"[rank {rank}] INFO" in line for line in lines), rank


def test_env_launch_one_rank_per_terminal(tmp_path: Path, baseline: str) -> None:
    run_dir, port = tmp_path / "run", str(free_port())
    ranks = [
        Launched(
            [str(LAUNCH / "env_launch.sh"), *STEPS, "--run-dir", str(run_dir)],
            launch_env(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            tmp_path / f"rank{rank}.log",
        )
        for rank in (0, 1)
    ]
    wait_all_ok(ranks, 180)
    assert read_sha(run_dir) == baseline


def start_long_env_launch(tmp_path: Path) -> tuple[Launched, Path]:
    run_dir = tmp_path / "run"
    args = ["--epochs", "3", "--log-every", "10", "--timeout", "30", "--run-dir", str(run_dir)]
    script = Launched(
        [str(LAUNCH / "env_launch.sh"), *args], launch_env(NPROC="2", STOP_GRACE="20"), tmp_path / "out.log"
    )
    # Both ranks are training once rank 1 has finished a step.
    wait_until(lambda: has_trained(run_dir, 1), 120, "rank 1 to start training")
    return script, run_dir


def test_env_launch_stops_the_others_when_a_rank_fails(tmp_path: Path) -> None:
    script, _ = start_long_env_launch(tmp_path)
    try:
        workers(script.proc.pid)[1].kill()
        started = time.monotonic()
        status = script.wait(60)
        out = script.output()
    finally:
        script.kill()
    assert status == 128 + signal.SIGKILL, out[-3000:]
    assert "rank 1 exited with status 137; stopping ranks 0" in out
    assert time.monotonic() - started < 25  # rank 0 went on SIGTERM, not at its --timeout


def test_env_launch_forwards_sigterm_to_every_rank(tmp_path: Path) -> None:
    script, _ = start_long_env_launch(tmp_path)
    try:
        ranks = workers(script.proc.pid)
        assert sorted(ranks) == [0, 1]
        script.proc.send_signal(signal.SIGTERM)
        status = script.wait(60)
        out = script.output()
        assert not any(proc.is_running() for proc in ranks.values())
    finally:
        script.kill()
    assert status != 0, out[-3000:]
    assert "got SIGTERM, passing it to ranks" in out


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is above 1"),
        ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "http"}, "MASTER_PORT='http' is not a whole number"),
        ({"NPROC": "0"}, "NPROC=0 is below 1"),
        ({"NPROC": "2", "WORLD_SIZE": "4"}, "WORLD_SIZE=4 but NPROC=2"),
    ],
)
def test_env_launch_rejects_bad_variables(env: dict[str, str], message: str) -> None:
    result = run_script("env_launch.sh", [], timeout=30, **env)
    assert result.returncode == 2
    assert message in result.stderr


def test_multinode_sh_static_rendezvous_two_agents(tmp_path: Path, baseline: str) -> None:
    run_dir, port = tmp_path / "run", str(free_port())
    agents = [
        Launched(
            [str(LAUNCH / "multinode.sh"), *STEPS, "--run-dir", str(run_dir)],
            launch_env(NNODES="2", NODE_RANK=str(node), NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            tmp_path / f"node{node}.log",
        )
        for node in (0, 1)
    ]
    wait_all_ok(agents, 180)
    assert read_summary(run_dir)["world_size"] == 2
    assert read_sha(run_dir) == baseline


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NNODES": "2:1", "RDZV_ENDPOINT": "h:1"}, "has MIN above MAX"),
        ({"NNODES": "two", "RDZV_ENDPOINT": "h:1"}, "must be a node count"),
        ({"NNODES": "2"}, "set RDZV_ENDPOINT=host:port"),
        ({"RDZV_ENDPOINT": "node0"}, "must be host:port"),
        ({"RDZV_ENDPOINT": "h:1", "RDZV_BACKEND": "zookeeper"}, "must be c10d or etcd-v2"),
        ({"NNODES": "1:2", "NODE_RANK": "0", "MASTER_ADDR": "h"}, "needs a fixed NNODES"),
        ({"NNODES": "2", "NODE_RANK": "0"}, "MASTER_ADDR is not"),
    ],
)
def test_multinode_sh_rejects_bad_variables(env: dict[str, str], message: str) -> None:
    result = run_script("multinode.sh", [], timeout=30, **env)
    assert result.returncode == 2
    assert message in result.stderr


def test_pytorchjob_manifest_matches_the_contract(tmp_path: Path, baseline: str) -> None:
    """Start each pod's container as the training operator would: its env plus the operator's."""
    yaml = pytest.importorskip("yaml")
    job = yaml.safe_load((LAUNCH / "k8s" / "pytorchjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    specs = job["spec"]["pytorchReplicaSpecs"]
    world_size = sum(spec["replicas"] for spec in specs.values())
    port, run_dir = str(free_port()), tmp_path / "run"
    pods, rank = [], 0
    for role in ("Master", "Worker"):
        for _ in range(specs[role]["replicas"]):
            (container,) = specs[role]["template"]["spec"]["containers"]
            assert container["name"] == "pytorch"
            assert any(p["name"] == "pytorch" for p in container["ports"])
            env = launch_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=str(world_size), RANK=str(rank))
            env.update({item["name"]: item["value"] for item in container["env"]})
            command = [sys.executable if word == "python" else word for word in container["command"]]
            args = [*container["args"], *STEPS, "--run-dir", str(run_dir), "--timeout", "60"]
            pods.append(Launched([*command, *args], env, tmp_path / f"pod{rank}.log"))
            rank += 1
    wait_all_ok(pods, 180)
    assert read_summary(run_dir)["world_size"] == world_size == 2
    assert read_sha(run_dir) == baseline


# The contract's failure modes: each rank ends with a one-line error within --timeout, never a hang.


def start_rank(tmp_path: Path, rank: int, world_size: int, port: int, addr: str = "127.0.0.1") -> Launched:
    env = launch_env(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR=addr, MASTER_PORT=str(port))
    args = [*STEPS, "--run-dir", str(tmp_path / "run"), "--timeout", str(TIMEOUT)]
    return Launched([sys.executable, "-m", "trainer", *args], env, tmp_path / f"rank{rank}-{world_size}.log")


def expect_errors(ranks: list[Launched], *messages: str) -> None:
    """Every rank exits 2 within --timeout plus start-up, with its message on the last line."""
    try:
        for rank, message in zip(ranks, messages, strict=True):
            status = rank.wait(TIMEOUT + 60)
            last = rank.output().strip().splitlines()[-1]
            assert status == 2, rank.output()[-3000:]
            assert last.startswith("trainer: error: ") and message in last, last
    finally:
        for rank in ranks:
            rank.kill()


def test_master_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as other_program:
        other_program.bind(("127.0.0.1", 0))
        other_program.listen()
        port = other_program.getsockname()[1]
        ranks = [start_rank(tmp_path, rank, 2, port) for rank in (0, 1)]
        expect_errors(
            ranks,
            f"MASTER_PORT={port} is already in use on rank 0's host",
            "cannot reach the rendezvous store at MASTER_ADDR=127.0.0.1",  # it reached the other program
        )


def test_nothing_listening_at_master_addr(tmp_path: Path) -> None:
    port = free_port()
    message = f"MASTER_PORT={port} within --timeout {TIMEOUT}s (Connection refused)"
    expect_errors([start_rank(tmp_path, 1, 2, port)], message)


def test_world_size_differs_between_ranks(tmp_path: Path) -> None:
    port = free_port()
    ranks = [start_rank(tmp_path, 0, 2, port), start_rank(tmp_path, 1, 3, port)]
    expect_errors(
        ranks,
        "rank 0 has WORLD_SIZE=2, rank 1 has WORLD_SIZE=3",
        "rank 1 has WORLD_SIZE=3, rank 0 has WORLD_SIZE=2",
    )
