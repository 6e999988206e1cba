"""Multi-node for real: two test hosts in network namespaces, one torchrun agent on each.

The hosts are made by tests/testhosts.py (``ip netns``, a veth pair, addresses 10.77.0.1 and
10.77.0.2 of their own), so all traffic stays inside namespaces this test created. Needs root and
iproute2; where the machine refuses, the tests are skipped with its reason.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import assert_ok, read_summary, run_process, wait_until
from launching import LAUNCH, STEPS, launch_env, read_sha
from testhosts import Host, HostsUnavailable, make_hosts

SUBNET = "10.77.0"
UNROUTED = "10.78.0.1"  # outside the hosts' only route: no packet leaves for it
RDZV_PORT = 29400  # each namespace has ports of its own: no collision with the machine's


@pytest.fixture
def hosts() -> Iterator[tuple[Host, Host]]:
    """Two hosts joined by a veth pair, removed afterwards whatever happened."""
    try:
        with make_hosts(f"trn{os.getpid() % 100000}", SUBNET) as pair:
            yield pair
    except HostsUnavailable as exc:
        reason = f"cannot make test hosts in network namespaces (root and iproute2 needed): {exc}"
        print(reason)
        pytest.skip(reason)


def agent_env(host: Host, first: Host, nnodes: str, nproc: int, rdzv_conf: str = "", **extra: str) -> dict[str, str]:
    """multinode.sh's variables on ``host``; ``first`` hosts the c10d rendezvous."""
    # The hosts share this machine's name, so torchrun cannot tell from it who hosts the store.
    is_host = f"is_host={'true' if host is first else 'false'}"
    return launch_env(
        NNODES=nnodes,
        NPROC_PER_NODE=str(nproc),
        RDZV_ENDPOINT=f"{first.addr}:{RDZV_PORT}",
        RDZV_CONF=f"{is_host},{rdzv_conf}" if rdzv_conf else is_host,
        LOCAL_ADDR=host.addr,
        **extra,
    )


def test_two_hosts_train_like_one(tmp_path: Path, hosts: tuple[Host, Host]) -> None:
    """Two processes per host, so ranks talk both within a host and across the link."""
    nproc = 2
    world_size = 2 * nproc
    local = tmp_path / "one-host"
    cmd = [str(LAUNCH / "local.sh"), *STEPS, "--run-dir", str(local)]
    assert_ok(run_process(cmd, launch_env(NPROC=str(world_size))))

    run_dir = tmp_path / "two-hosts"
    agents = [
        host.run(
            [str(LAUNCH / "multinode.sh"), *STEPS, "--run-dir", str(run_dir)],
            agent_env(host, hosts[0], "2", nproc),
            tmp_path / f"{host.netns}.log",
        )
        for host in hosts
    ]
    try:
        for agent in agents:
            assert agent.wait(240) == 0, agent.output()[-4000:]
        logs = agents[0].output() + agents[1].output()
    finally:
        for agent in agents:
            agent.kill()
    summary = read_summary(run_dir)
    assert (summary["world_size"], summary["global_step"]) == (world_size, 30)
    assert summary["params_sha256"] == read_sha(local)
    assert f"rank 0 of {world_size} (local 0 of {nproc})" in logs  # each host ran only its share of the ranks


def test_unreachable_master_addr(tmp_path: Path, hosts: tuple[Host, Host]) -> None:
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


def test_survivor_finishes_alone_from_the_checkpoint(tmp_path: Path, hosts: tuple[Host, Host]) -> None:
    run_dir, steps = tmp_path / "run", 1500  # two epochs at world size 2: the kill lands mid-run
    args = ["--max-steps", str(steps), "--epochs", "5", "--log-every", "10", "--checkpoint-every", "20"]
    agents = [
        host.run(
            [str(LAUNCH / "multinode.sh"), *args, "--run-dir", str(run_dir), "--timeout", "30"],
            agent_env(host, hosts[0], "1:2", 1, rdzv_conf="last_call_timeout=2", MAX_RESTARTS="3"),
            tmp_path / f"{host.netns}.log",
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
