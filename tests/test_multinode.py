"""Multi-node for real: test hosts of their own (tests/hosts.py), one torchrun agent on each.

Each host has its own network, host name and ``/dev/shm``, so the trainer sees distinct hosts:
ranks on one host sync through shared memory only if they all share it, and here they do not,
so every gradient crosses the link through gloo. Needs root, iproute2 and util-linux; where the
machine refuses, the tests are skipped with its reason. docs/multinode.md says more.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import assert_ok, read_summary, run_process, wait_all_ok, wait_until
from hosts import Host, HostsUnavailable, make_hosts
from launching import LAUNCH, STEPS, launch_env, read_sha

UNROUTED = "10.78.0.1"  # outside the hosts' only route: no packet leaves for it
RDZV_PORT = 29400  # each host has ports of its own: no collision with the machine's


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[list[Host]]:
    """Two hosts on one link, removed afterwards whatever happened."""
    try:
        with make_hosts(2, tmp_path) as made:
            yield made
    except HostsUnavailable as exc:
        reason = f"cannot make test hosts (root, iproute2 and util-linux needed): {exc}"
        print(reason)
        pytest.skip(reason)


def agent_env(first: Host, nnodes: str, nproc: int, rdzv_conf: str = "", **extra: str) -> dict[str, str]:
    """multinode.sh's variables; ``first`` hosts the c10d rendezvous.

    The endpoint is a host name: each host resolves it, and the host it names recognises
    itself (torchrun compares it with its own name), so no ``is_host`` or ``LOCAL_ADDR`` is set.
    """
    env = launch_env(NNODES=nnodes, NPROC_PER_NODE=str(nproc), RDZV_ENDPOINT=f"{first.name}:{RDZV_PORT}", **extra)
    if rdzv_conf:
        env["RDZV_CONF"] = rdzv_conf
    return env


def sync_paths(logs: str) -> dict[int, str]:
    """Rank -> the gradient sync it logged (``--log-all-ranks``)."""
    return {int(rank): option for rank, option in re.findall(r"\[rank (\d+)\] \w+ gradient sync: (\w+)", logs)}


def test_two_hosts_train_like_one(tmp_path: Path, hosts: list[Host]) -> None:
    """Two processes per host; no host holds all ranks, so every rank syncs with gloo over the link.

    The reference is one host at the same world size with ``--comm gloo``: the same all-reduce
    over four ranks (and one thread per rank), so the weights must match bit for bit.
    """
    nproc = 2
    world_size = 2 * nproc
    local = tmp_path / "one-host"
    cmd = [str(LAUNCH / "local.sh"), *STEPS, "--comm", "gloo", "--run-dir", str(local)]
    assert_ok(run_process(cmd, launch_env(NPROC=str(world_size))))

    run_dir = tmp_path / "two-hosts"
    args = [*STEPS, "--log-all-ranks", "--run-dir", str(run_dir)]
    agents = [
        host.run([str(LAUNCH / "multinode.sh"), *args], agent_env(hosts[0], "2", nproc), tmp_path / f"{host.name}.log")
        for host in hosts
    ]
    wait_all_ok(agents, 240)
    logs = [agent.output() for agent in agents]
    summary = read_summary(run_dir)
    assert (summary["world_size"], summary["global_step"]) == (world_size, 30)
    assert sync_paths(logs[0] + logs[1]) == dict.fromkeys(range(world_size), "gloo")
    assert "auto: shared memory unavailable" in logs[0] + logs[1]
    for log in logs:  # each host ran only its share of the ranks
        assert len(re.findall(rf"rank \d of {world_size} \(local \d of {nproc}\)", log)) == nproc
    assert summary["params_sha256"] == read_sha(local)


def test_unreachable_master_addr(tmp_path: Path, hosts: list[Host]) -> None:
    """Rank 1 on the first host, pointed at an address its host has no route to."""
    env = launch_env(RANK="1", WORLD_SIZE="2", MASTER_ADDR=UNROUTED, MASTER_PORT="29500")
    args = [*STEPS, "--run-dir", str(tmp_path / "run"), "--timeout", "5"]
    rank = hosts[0].run([sys.executable, "-m", "trainer", *args], env, tmp_path / "rank1.log")
    try:
        status = rank.wait(90)
        last = rank.output().strip().splitlines()[-1]
    finally:
        rank.kill()
    assert status == 2
    assert last.startswith(f"trainer: error: cannot reach the rendezvous store at MASTER_ADDR={UNROUTED}"), last
    assert "(Network is unreachable)" in last, last


def test_survivor_finishes_alone_from_the_checkpoint(tmp_path: Path, hosts: list[Host]) -> None:
    run_dir, steps = tmp_path / "run", 1500  # two epochs at world size 2: the kill lands mid-run
    args = ["--max-steps", str(steps), "--epochs", "5", "--log-every", "10", "--checkpoint-every", "20"]
    agents = [
        host.run(
            [str(LAUNCH / "multinode.sh"), *args, "--run-dir", str(run_dir), "--timeout", "30"],
            agent_env(hosts[0], "1:2", 1, rdzv_conf="last_call_timeout=2", MAX_RESTARTS="3"),
            tmp_path / f"{host.name}.log",
        )
        for host in hosts
    ]
    try:
        checkpoints = run_dir / "checkpoints"
        wait_until(lambda: checkpoints.is_dir() and any(checkpoints.iterdir()), 180, "a checkpoint of both hosts")
        assert "rank 0 of 2" in agents[0].output() + agents[1].output()
        agents[1].kill()  # the second host dies: its agent and its worker, without warning
        status = agents[0].wait(240)
        survivor_log = agents[0].output()
    finally:
        for agent in agents:
            agent.kill()
    assert status == 0, survivor_log[-4000:]
    summary = read_summary(run_dir)
    assert (summary["world_size"], summary["global_step"]) == (1, steps), summary
    assert "rank 0 of 1" in survivor_log  # restarted alone ...
    assert re.search(r"resuming from \S+/checkpoints/", survivor_log)  # ... from the checkpoint, not from scratch
