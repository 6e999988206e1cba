"""Multi-node for real: test hosts of their own (tests/hosts.py), one torchrun agent on each.

Each host has its own network, host name and ``/dev/shm``, so the trainer sees distinct hosts:
with two ranks on each, ``--comm auto`` sums within each host through shared memory and between
the hosts through gloo (``hierarchical``); ``--comm gloo`` sends every rank's share through gloo.
Needs root, iproute2 and util-linux; where the machine refuses, the tests are skipped with its
reason. docs/multinode.md says more.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
from comm_worker import SUM_CALLS, known_terms
from conftest import assert_ok, read_jsonl, read_summary, run_process, run_torchrun, wait_all_ok, wait_until
from etcd_server import etcd_on
from faults import first_steps, latest_step, trained_positions
from hosts import Host, HostsUnavailable, host_processes, kill_host, make_hosts, rank_zero_host
from launching import LAUNCH, STEPS, THREADS, launch_env, read_sha
from safetensors.torch import load_file

from trainer.distributed.jobs import torchrun_command

UNROUTED = "10.78.0.1"  # outside the hosts' only route: no packet leaves for it
RDZV_PORT = 29400  # each host has ports of its own: no collision with the machine's
NPROC = 2  # ranks per host in the two-host runs
WORLD_SIZE = 2 * NPROC
# Largest weight difference allowed between the hierarchical and the flat gloo sync after STEPS
# steps: the same sums added in another order differ by float32 rounding (about 1e-7 of the
# summed magnitudes per step).
WEIGHT_TOLERANCE = 1.5e-7  # 10x the 1.1e-8 to 1.5e-8 seen


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


@pytest.fixture(scope="module")
def one_host_gloo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The flat reference: one host, four processes, ``--comm gloo`` (the same all-reduce over four
    ranks as two hosts of two with ``--comm gloo``, and one thread per rank)."""
    if os.geteuid() != 0:
        pytest.skip("cannot make test hosts (root, iproute2 and util-linux needed): not root")
    run_dir = tmp_path_factory.mktemp("one-host") / "run"
    cmd = [str(LAUNCH / "local.sh"), *STEPS, "--comm", "gloo", "--run-dir", str(run_dir)]
    assert_ok(run_process(cmd, launch_env(NPROC=str(WORLD_SIZE))))
    return run_dir


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


def train_on_hosts(hosts: list[Host], run_dir: Path, *args: str, **env: str) -> list[str]:
    """The trainer on both hosts, two ranks each, STEPS steps, every rank logging; each host's log."""
    cmd = [str(LAUNCH / "multinode.sh"), *STEPS, "--log-all-ranks", "--run-dir", str(run_dir), *args]
    agents = [
        host.run(cmd, agent_env(hosts[0], "2", NPROC, RDZV_ID=run_dir.name, **env), run_dir.parent / f"{host.name}.log")
        for host in hosts
    ]
    wait_all_ok(agents, 240)
    return [agent.output() for agent in agents]


def rank_shas(run_dir: Path) -> dict[int, str]:
    """Rank -> the hash of that rank's own final weights (the last line of its rank log)."""
    return {r: read_jsonl(run_dir / f"rank{r}.jsonl")[-1]["params_sha256"] for r in range(WORLD_SIZE)}


def test_two_hosts_train_like_one(tmp_path: Path, hosts: list[Host], one_host_gloo: Path) -> None:
    """Two processes per host with ``--comm gloo``: every rank's share crosses the link through gloo.

    The reference is one host at the same world size with ``--comm gloo``: the same all-reduce
    over four ranks (and one thread per rank), so the weights must match bit for bit.
    """
    run_dir = tmp_path / "two-hosts"
    logs = train_on_hosts(hosts, run_dir, "--comm", "gloo")
    summary = read_summary(run_dir)
    assert (summary["world_size"], summary["global_step"]) == (WORLD_SIZE, 30)
    assert sync_paths(logs[0] + logs[1]) == dict.fromkeys(range(WORLD_SIZE), "gloo")
    assert "gradient sync: gloo (--comm gloo)" in logs[0] + logs[1]
    for log in logs:  # each host ran only its share of the ranks
        assert len(re.findall(rf"rank \d of {WORLD_SIZE} \(local \d of {NPROC}\)", log)) == NPROC
    assert summary["params_sha256"] == read_sha(one_host_gloo)


def test_auto_syncs_hierarchically_across_hosts(tmp_path: Path, hosts: list[Host], one_host_gloo: Path) -> None:
    """``--comm auto`` on two hosts of two ranks: the hierarchical sync on every rank; every rank ends
    with the same weights bit for bit, a second run with the same ones again, and they agree with
    flat gloo's within WEIGHT_TOLERANCE.

    Not bit for bit with gloo: the hierarchical sync adds ``(g0 + g1) + (g2 + g3)`` and divides the
    sum by 4, gloo adds ``g/4`` terms in its ring's order; float32 rounds the two orders differently.
    """
    first, second = tmp_path / "first", tmp_path / "second"
    logs = train_on_hosts(hosts, first)
    train_on_hosts(hosts, second)
    assert sync_paths(logs[0] + logs[1]) == dict.fromkeys(range(WORLD_SIZE), "hierarchical")
    assert "(auto: 2 hosts x 2 ranks: shared memory within each host, gloo between hosts)" in logs[0]
    summary = read_summary(first)
    assert (summary["world_size"], summary["global_step"]) == (WORLD_SIZE, 30)
    assert rank_shas(first) == dict.fromkeys(range(WORLD_SIZE), summary["params_sha256"])
    assert read_sha(second) == summary["params_sha256"]
    hierarchical, flat = load_file(first / "model.safetensors"), load_file(one_host_gloo / "model.safetensors")
    assert hierarchical.keys() == flat.keys()
    worst = max((hierarchical[name] - flat[name]).abs().max().item() for name in flat)
    print(f"largest weight difference from flat gloo after 30 steps: {worst:.3g}")
    assert worst < WEIGHT_TOLERANCE


def test_hierarchical_sum_is_the_fixed_order_sum(tmp_path: Path, hosts: list[Host]) -> None:
    """Known terms on four ranks of two hosts: every rank receives ``((g0 + g1) + (g2 + g3)) / 4`` in
    float32, bit for bit, in each of several calls. The terms differ in magnitude by rank, so
    another order (a flat left-to-right sum, say) rounds differently; the test checks that it does."""
    out = tmp_path / "sums"
    out.mkdir()
    launcher = ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint={hosts[0].name}:{RDZV_PORT}", "--rdzv-id=sums"]
    cmd = torchrun_command(NPROC, "tests.comm_worker", ["hierarchical", str(out)], launcher, standalone=False)
    wait_all_ok([host.run(cmd, launch_env(), tmp_path / f"{host.name}.log") for host in hosts], 180)
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    assert ranks[0]["hosts"] == [[0, 1], [2, 3]]
    for call in range(SUM_CALLS):
        g = [torch.cat(known_terms(r, call)) for r in range(WORLD_SIZE)]
        want = ((g[0] + g[1]) + (g[2] + g[3])) / 4
        assert not torch.equal(want, (((g[0] + g[1]) + g[2]) + g[3]) / 4), "the terms cannot tell orders apart"
        for r, rank in enumerate(ranks):
            assert torch.equal(rank["results"][call], want), f"rank {r}, call {call}: not the fixed-order sum"


def worker_env(proc: psutil.Process) -> dict[str, str]:
    with contextlib.suppress(psutil.Error):
        if "trainer.distributed.agent" not in proc.cmdline() and "trainer" in proc.cmdline():
            return proc.environ()
    return {}


def test_a_stopped_leader_is_named_and_no_live_leader_is_blamed(tmp_path: Path, hosts: list[Host]) -> None:
    """The hierarchical sync, two hosts of two ranks: the leader of the host without rank 0 stops
    (SIGSTOP) in training. The other host's leader fails its gloo exchange after ``--timeout`` and
    names the stopped rank; the ranks that wait for a leader wait twice as long, so the other host's
    non-leader never blames its own live leader for not finishing its step across hosts."""
    run_dir = tmp_path / "run"
    cmd = [str(LAUNCH / "multinode.sh"), "--epochs", "1", "--batch-size", "50", "--log-every", "5"]
    cmd += ["--timeout", "6", "--comm", "hierarchical", "--log-all-ranks", "--run-dir", str(run_dir)]
    env = agent_env(hosts[0], "2", NPROC, RDZV_ID=run_dir.name, MAX_RESTARTS="0")
    agents = [host.run(cmd, env, tmp_path / f"{host.name}.log") for host in hosts]
    stopped = None
    try:
        wait_until(lambda: latest_step(run_dir) >= 10, 180, "step 10", agents[0])
        live = rank_zero_host(hosts)
        assert live is not None
        other = next(host for host in hosts if host != live)
        leaders = [p for p in host_processes(other) if worker_env(p).get("LOCAL_RANK") == "0"]
        assert len(leaders) == 1
        stopped, stopped_rank = leaders[0], int(worker_env(leaders[0])["RANK"])
        stopped.suspend()
        live_agent = agents[hosts.index(live)]
        live_agent.wait(120)
    finally:
        if stopped is not None:
            with contextlib.suppress(psutil.Error):
                stopped.kill()
        for agent in agents:
            agent.kill()
    logs = "".join(agent.output() for agent in agents)
    assert re.search(rf"HangDetected: rank 0 gave up waiting for peers .*did not arrive: rank {stopped_rank} ", logs), (
        logs[-5000:]
    )
    assert not re.search(r"rank\(s\) [01] did not finish its step across hosts", logs), logs[-5000:]


def test_failed_set_up_on_one_rank_means_gloo_on_every_rank(tmp_path: Path, hosts: list[Host]) -> None:
    """Rank 3 (not on rank 0's host) cannot map its host's shared memory: all four ranks fall back to
    flat gloo together, rank 0 says why once, and the run trains."""
    run_dir = tmp_path / "run"
    logs = "".join(train_on_hosts(hosts, run_dir, TRAINER_TEST_SHM_FAIL="3:map"))
    assert sync_paths(logs) == dict.fromkeys(range(WORLD_SIZE), "gloo")
    fallback = re.findall(r"\[rank 0\] \w+ gradient sync: gloo \(shared memory set-up failed \((.*)\)", logs)
    assert len(fallback) == 1 and "rank 3 failed mapping shared memory" in fallback[0], logs[-4000:]
    assert read_summary(run_dir)["global_step"] == 30


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
        # A checkpoint, not any file: the ranks' probe of whether the directory is shared comes first.
        wait_until(lambda: any(checkpoints.glob("step-*.json")), 180, "a checkpoint of both hosts")
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


# The elastic runs below: a global batch that both 3 and 2 ranks divide, so a resume at either
# world size optimises alike; two epochs, a checkpoint every few steps, every one kept (the test
# replays from the one the survivors resumed from), and every trained sample recorded.
ELASTIC_ARGS = (
    *("--global-batch-size", "600", "--epochs", "2", "--log-every", "5", "--checkpoint-every", "5"),
    *("--keep-checkpoints", "1000", "--record-samples", "--timeout", "30"),
)
TRAIN_SPLIT = 48_000


@pytest.fixture
def four_hosts(tmp_path: Path) -> Iterator[list[Host]]:
    """Four hosts on one link: three for trainers, the last for etcd."""
    try:
        with make_hosts(4, tmp_path) as made:
            yield made
    except HostsUnavailable as exc:
        reason = f"cannot make test hosts (root, iproute2 and util-linux needed): {exc}"
        print(reason)
        pytest.skip(reason)


@pytest.fixture
def etcd(tmp_path: Path, four_hosts: list[Host]) -> Iterator[str]:
    """A real etcd (v2 API on) alone on the last host; its client address ``host:port``."""
    with etcd_on(four_hosts[-1], tmp_path) as endpoint:
        yield endpoint


def checkpoint_steps(run_dir: Path, world_size: int, directory: Path | None = None) -> list[int]:
    """The steps of the complete checkpoints that ``world_size`` ranks wrote (in ``directory``,
    by default the run's own)."""
    steps = []
    for path in sorted((directory or run_dir / "checkpoints").glob("step-*.pt")):
        with contextlib.suppress(Exception):  # one being written, or renamed away
            if torch.load(path, weights_only=True, map_location="cpu")["world_size"] == world_size:
                steps.append(int(path.stem.split("-")[1]))
    return steps


def test_etcd_rendezvous_survives_losing_the_rank_zero_node(tmp_path: Path, four_hosts: list[Host], etcd: str) -> None:
    """Three trainer hosts (one rank each) meet at etcd on a fourth, ``NNODES=2:3``. Mid-run every
    process of the host that holds rank 0 is killed, its agent too. The two survivors meet again
    at etcd, resume from the newest checkpoint at world size 2 and finish; every sample of both
    epochs is trained exactly once, and the final weights are bit for bit those of a run resumed
    from that same checkpoint at world size 2 on one host (two ranks, gloo: a sum of two terms
    has one order)."""
    run_dir, trainers = tmp_path / "run", four_hosts[:3]
    env = launch_env(
        NNODES="2:3",
        NPROC_PER_NODE="1",
        MAX_RESTARTS="3",
        RDZV_BACKEND="etcd-v2",
        RDZV_ENDPOINT=etcd,
        RDZV_ID=f"etcd-{os.getpid()}",
        RDZV_CONF="last_call_timeout=3",
    )
    cmd = [str(LAUNCH / "multinode.sh"), *ELASTIC_ARGS, "--run-dir", str(run_dir)]
    agents = {host.name: host.run(cmd, env, tmp_path / f"{host.name}.log") for host in trainers}
    try:
        wait_until(lambda: checkpoint_steps(run_dir, 3), 300, "a checkpoint of the three hosts", every=0.1)
        dead = rank_zero_host(trainers)
        assert dead is not None
        step_at_kill, killed_at = latest_step(run_dir), time.time()
        killed = kill_host(dead)
        assert any("-m trainer.distributed.agent" in cmd for cmd in killed), killed  # the agent ...
        assert any(" -u -m trainer " in cmd for cmd in killed), killed  # ... and the worker
        survivors = [host for host in trainers if host != dead]
        statuses = {host.name: agents[host.name].wait(300) for host in survivors}
        logs = {host.name: agents[host.name].output() for host in survivors}
    finally:
        for agent in agents.values():
            agent.kill()
    assert statuses == dict.fromkeys(statuses, 0), {name: log[-3000:] for name, log in logs.items()}
    summary = read_summary(run_dir)
    assert (summary["world_size"], summary["global_step"]) == (2, 160), summary
    assert "one directory, shared by every rank" in "".join(logs.values())  # so no copies were sent
    resumed = re.findall(r"resuming from (\S+/checkpoints/step-\d+\.pt): step (\d+)", "".join(logs.values()))
    assert resumed, logs
    checkpoint, step = max(resumed, key=lambda found: int(found[1]))
    assert int(step) in checkpoint_steps(run_dir, 3)  # written by the three, before the kill
    back = min(r["time"] for r in first_steps(run_dir) if r["world_size"] == 2)
    print(f"recovery: {back - killed_at:.1f} s from the kill to the first step at world size 2;", end=" ")
    print(f"resumed from step {step}, the last step logged before the kill was {step_at_kill}")
    positions = trained_positions(run_dir, by_restarts=False)
    assert sorted(positions) == [1, 2]
    for epoch, trained in positions.items():
        assert sorted(trained) == list(range(TRAIN_SPLIT)), f"epoch {epoch}: a sample lost or trained twice"

    replay = tmp_path / "replay"
    args = [*ELASTIC_ARGS, "--comm", "gloo", "--run-dir", str(replay), "--resume", checkpoint]
    assert_ok(run_torchrun(2, args, timeout=300, **THREADS))
    assert read_sha(replay) == summary["params_sha256"]


def test_c10d_rendezvous_host_lost_ends_the_job_in_one_line(tmp_path: Path, four_hosts: list[Host]) -> None:
    """The same three hosts and kill under c10d, whose rendezvous lives inside the agent on the node
    RDZV_ENDPOINT names: that node's processes are all killed mid-run. The survivors cannot meet
    again; each ends with exit status 1 and, as its last line, one that names the lost rendezvous
    and the way out, with no traceback of the rendezvous error."""
    run_dir, trainers = tmp_path / "run", four_hosts[:3]
    env = agent_env(trainers[0], "2:3", 1, rdzv_conf="last_call_timeout=3", MAX_RESTARTS="3", RDZV_ID="c10d")
    cmd = [str(LAUNCH / "multinode.sh"), *ELASTIC_ARGS, "--run-dir", str(run_dir)]
    agents = {host.name: host.run(cmd, env, tmp_path / f"{host.name}.log") for host in trainers}
    try:
        wait_until(lambda: checkpoint_steps(run_dir, 3), 300, "a checkpoint of the three hosts", every=0.1)
        assert any("-m trainer.distributed.agent" in cmd for cmd in kill_host(trainers[0]))
        statuses = {host.name: agents[host.name].wait(300) for host in trainers[1:]}
        logs = {host.name: agents[host.name].output() for host in trainers[1:]}
    finally:
        for agent in agents.values():
            agent.kill()
    endpoint = f"{trainers[0].name}:{RDZV_PORT}"
    for name, log in logs.items():
        assert statuses[name] == 1, log[-3000:]
        last = log.strip().splitlines()[-1]
        assert last.startswith(f"multinode.sh: error: lost the c10d rendezvous at {endpoint} ("), last
        assert "RDZV_BACKEND=etcd-v2" in last, last
        assert "raise RendezvousConnectionError" not in log, log[-3000:]


# Run on a test host before the command: a private, empty tmpfs over directory $0, seen by the
# command and its children only (each command on a host has its own mount namespace).
PRIVATE_DIR = 'mount -t tmpfs tmpfs "$0" && exec "$@"'


def test_checkpoints_on_no_shared_storage_survive_losing_the_rank_zero_node(
    tmp_path: Path, four_hosts: list[Host], etcd: str
) -> None:
    """As the etcd test above, but every host's checkpoint directory is its own (a tmpfs that only
    that host's agent and workers see). The trainer finds that the directory is not shared, and
    rank 0 sends every checkpoint to the other hosts, which keep a SHA-256-checked copy. Once the
    three hosts have written a checkpoint and the other two hold their copies, every process of
    the rank-0 host is killed: the survivors resume from that newest checkpoint (not from step 0),
    finish, and every sample of both epochs is trained exactly once."""
    run_dir, checkpoints, trainers = tmp_path / "run", tmp_path / "checkpoints", four_hosts[:3]
    checkpoints.mkdir()
    env = launch_env(
        NNODES="2:3",
        NPROC_PER_NODE="1",
        MAX_RESTARTS="3",
        RDZV_BACKEND="etcd-v2",
        RDZV_ENDPOINT=etcd,
        RDZV_ID=f"local-{os.getpid()}",
        RDZV_CONF="last_call_timeout=3",
    )
    args = [*ELASTIC_ARGS, "--run-dir", str(run_dir), "--checkpoint-dir", str(checkpoints)]
    cmd = ["sh", "-c", PRIVATE_DIR, str(checkpoints), str(LAUNCH / "multinode.sh"), *args]
    agents = {host.name: host.run(cmd, env, tmp_path / f"{host.name}.log") for host in trainers}

    def held(host: Host) -> list[int]:  # the steps of the world-size-3 checkpoints on ``host``
        return checkpoint_steps(run_dir, 3, Path(f"/proc/{agents[host.name].pid}/root{checkpoints}"))

    try:
        wait_until(lambda: all(held(host) for host in trainers), 300, "a checkpoint on every host", every=0.1)
        dead = rank_zero_host(trainers)
        assert dead is not None
        on_survivors = {host.name: held(host) for host in trainers if host != dead}
        assert not any(checkpoints.iterdir()), "the hosts' directories must be their own"
        kill_host(dead)
        survivors = [host for host in trainers if host != dead]
        statuses = {host.name: agents[host.name].wait(300) for host in survivors}
        logs = {host.name: agents[host.name].output() for host in survivors}
    finally:
        for agent in agents.values():
            agent.kill()
    assert statuses == dict.fromkeys(statuses, 0), {name: log[-3000:] for name, log in logs.items()}
    everything = "".join(logs.values())
    assert "not shared between the nodes; each node keeps a copy" in everything
    summary = read_summary(run_dir)
    assert (summary["world_size"], summary["global_step"]) == (2, 160), summary
    resumed = [int(step) for step in re.findall(r"resuming from \S+/step-\d+\.pt: step (\d+)", everything)]
    assert resumed and min(resumed) >= min(max(steps) for steps in on_survivors.values()), (resumed, on_survivors)
    positions = trained_positions(run_dir, by_restarts=False)
    assert sorted(positions) == [1, 2]
    for epoch, trained in positions.items():
        assert sorted(trained) == list(range(TRAIN_SPLIT)), f"epoch {epoch}: a sample lost or trained twice"
