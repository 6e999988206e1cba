"""Failure drills: kill a random node K times in one elastic run, check that nothing is lost,
and measure each recovery.

    python -m benchmarks.drills --kills 4 --seed 1 --epochs 12  # 4 kills, ~2.5 minutes here
    python -m benchmarks.drills --kills 2 --seed 3 --quick     # CI (tests/test_drills.py), ~80 s

Needs root, etcd (Debian's ``etcd-server``, v2 API) and python-etcd: four test hosts
(``tests/hosts.py``), etcd alone on the fourth, and on each of the other three one torchrun agent
(``launch/multinode.sh``, ``NNODES=2:3``, ``RDZV_BACKEND=etcd-v2``) with one trainer process and
``--record-samples``. Every host has a checkpoint directory of its own (a directory of this
machine bind-mounted, in that host's mount namespace only, over the path ``--checkpoint-dir``
names), kept when the host is killed, as a node's disk survives a crash: no storage is shared,
so rank 0 sends every checkpoint to the other hosts (``trainer/lifecycle/replicas.py``).

A drill: once the three hosts train, wait a random time (``--gap``), then kill a node chosen
uniformly among the three: SIGKILL to every process in its network namespace, torchrun's agent
and the worker alike (torchrun starts workers in sessions of their own, so a process group is not
enough). In a drill of two kills or more the node holding rank 0 is hit at least once: if no
earlier kill hit it, the last one does. Once the two survivors train again, the node's launch
script starts again and it rejoins; once the three train, the next kill is drawn.

Measured for each kill, from the rank logs and sample records in the shared run directory:

- recovery: from the kill to the first training step completed after it (the ``first_step``
  event, with its wall-clock time, that every process writes to ``rank<r>.jsonl``);
- steps lost: steps trained twice, the last step the killed attempt trained minus the step the
  next attempt resumed from;
- rejoin: from the node's restart to the first step of the three together.

Checked, each one a line in the report and a field of ``checks``:

- completed: every agent running at the end exits 0 and the summary shows every step;
- samples once: each epoch's training positions, over the attempts that count
  (``tests.faults.trained_positions``), are the training split exactly once;
- checkpoints kept: the step each attempt resumed from never decreases; each recovery resumes
  from a step no older than the newest valid checkpoint any survivor held at the kill; and every
  node at the end holds the final checkpoint, with the same SHA-256 in every node's manifest;
- recovery measured: a recovery time for every kill.

Prints the median and worst recovery and steps lost, and writes them, every kill and the checks
as JSON to ``--out`` (default ``benchmarks/results/drills-<time>.json``). Exits 1 when a check
fails, 2 when the machine cannot make test hosts or run etcd.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from statistics import median
from typing import Any

from benchmarks.common import REPO, child_env, machine, write_json
from tests.faults import first_steps, records, trained_positions
from tests.hosts import ETCD_PORT, Host, HostsUnavailable, etcd_command, kill_host, make_hosts, rank_zero_host
from trainer.lifecycle.checkpoint import manifests, newest_valid, step_of

TRAINERS = 3
TRAIN_SPLIT = 48_000  # MNIST's 60,000 less the default validation fifth
# Run on a host before the launch script: its own directory $0 over the shared path $1, seen by
# this command and its children only (each command on a host has a mount namespace of its own).
OWN_DISK = 'mount --bind "$0" "$1" && shift && exec "$@"'


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=5, help="Nodes killed, one after another, in the one run.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the victims and the moments.")
    parser.add_argument("--epochs", type=int, default=3, help="MNIST epochs (80 steps each).")
    parser.add_argument("--global-batch-size", type=int, default=600, help="Divisible by 2 and 3.")
    parser.add_argument("--checkpoint-every", type=int, default=5, help="Steps between checkpoints.")
    parser.add_argument(
        "--gap",
        type=float,
        nargs=2,
        default=(2.0, 6.0),
        metavar=("MIN", "MAX"),
        help="Seconds of training at full size before each kill, drawn uniformly.",
    )
    parser.add_argument("--last-call", type=int, default=2, help="Rendezvous last_call_timeout, seconds.")
    parser.add_argument("--deadline", type=float, default=900.0, help="Seconds the whole drill may take.")
    parser.add_argument("--quick", action="store_true", help="CI: gaps of 0.5 to 1.5 s.")
    parser.add_argument("--out", default=None, help="JSON results file.")
    parser.add_argument("--keep", default=None, help="Keep the run directory, logs and disks here.")
    args = parser.parse_args(argv)
    if args.quick:
        args.gap = (0.5, 1.5)
    if args.kills < 1:
        parser.error(f"--kills {args.kills}: a drill needs at least one kill; pass --kills 1 or more")
    if args.global_batch_size % 6 or TRAIN_SPLIT % args.global_batch_size:
        parser.error(f"--global-batch-size {args.global_batch_size} must divide {TRAIN_SPLIT} and be divisible by 6")
    return args


class DrillFailed(RuntimeError):
    """The run did not reach a state the drill waits for (within the deadline)."""


@dataclass
class Node:
    """A trainer host, its own checkpoint disk, and the agent started on it last."""

    host: Host
    disk: Path
    agent: subprocess.Popen | None = None
    launches: int = 0

    def checkpoint(self) -> int:
        """The step of the newest valid checkpoint on this node's disk (0: none)."""
        found = newest_valid(self.disk)
        return step_of(found[0]) if found else 0

    def final_sha(self) -> tuple[int, str] | None:
        listed = manifests(self.disk)
        if not listed:
            return None
        newest = max(listed, key=lambda m: m["step"])
        return newest["step"], newest["sha256"]


@dataclass
class Drill:
    args: argparse.Namespace
    work: Path
    nodes: list[Node]
    env: dict[str, str]
    started: float = field(default_factory=time.time)
    kills: list[dict[str, Any]] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return self.work / "run"

    def trainer_args(self) -> list[str]:
        a = self.args
        return [
            *("--epochs", str(a.epochs), "--global-batch-size", str(a.global_batch_size), "--log-every", "5"),
            *("--checkpoint-every", str(a.checkpoint_every), "--keep-checkpoints", "5", "--record-samples"),
            *("--timeout", "30", "--run-dir", str(self.run_dir), "--checkpoint-dir", str(self.work / "checkpoints")),
        ]

    def launch(self, node: Node) -> None:
        """Start ``node``'s launch script (again), its output in a log of its own."""
        node.launches += 1
        log = (self.work / "logs" / f"{node.host.name}-{node.launches}.log").open("w")
        script = str(REPO / "launch" / "multinode.sh")
        cmd = [*node.host.prefix(), "sh", "-c", OWN_DISK, str(node.disk), str(self.work / "checkpoints"), script]
        node.agent = subprocess.Popen(
            [*cmd, *self.trainer_args()], env=node.host.env(self.env), cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()  # the agent holds its own copy

    def wait_for(self, what: str, ready: Callable[[], Any]) -> Any:
        while time.time() < self.started + self.args.deadline:
            found = ready()
            if found:
                return found
            if self.finished():
                raise DrillFailed(f"the run ended before {what}")
            if all(n.agent is not None and n.agent.poll() is not None for n in self.nodes):
                raise DrillFailed(f"every agent exited before {what} (logs: {self.work / 'logs'})")
            time.sleep(0.05)
        raise DrillFailed(f"no {what} within --deadline {self.args.deadline:.0f} s")

    def finished(self) -> bool:
        return (self.run_dir / "summary.json").exists()

    def first_step_after(self, moment: float, world_size: int | None = None) -> float | None:
        """The time of the first step any process completed after ``moment`` (at ``world_size``)."""
        times = [
            r["time"] for r in first_steps(self.run_dir) if r["time"] > moment and world_size in (None, r["world_size"])
        ]
        return min(times, default=None)

    def choose(self, rng: random.Random, index: int, rank_zero: Node) -> tuple[Node, bool]:
        """The victim, uniformly, except that the last kill of two or more hits rank 0's node if none did."""
        victim = rng.choice(self.nodes)
        last = index == self.args.kills - 1
        if last and self.args.kills >= 2 and not any(k["held_rank_0"] for k in self.kills) and victim is not rank_zero:
            return rank_zero, True
        return victim, False

    def kill_once(self, rng: random.Random, index: int) -> None:
        time.sleep(rng.uniform(*self.args.gap))
        if self.finished():
            raise DrillFailed(f"the run ended before kill {index + 1}; give it more --epochs")
        holder = self.wait_for("rank 0's node", lambda: rank_zero_host([n.host for n in self.nodes]))
        rank_zero = next(n for n in self.nodes if n.host == holder)
        victim, forced = self.choose(rng, index, rank_zero)
        killed_at = time.time()
        killed = kill_host(victim.host)
        survivors = [n for n in self.nodes if n is not victim]
        newest_held = max(n.checkpoint() for n in survivors)
        back = self.wait_for(f"a step after kill {index + 1}", lambda: self.first_step_after(killed_at))
        restarted_at = time.time()
        self.launch(victim)
        rejoined = self.wait_for(
            f"the three nodes training after kill {index + 1}",
            lambda: self.first_step_after(restarted_at, TRAINERS),
        )
        self.kills.append(
            {
                "victim": victim.host.name,
                "held_rank_0": victim is rank_zero,
                "forced_to_rank_0": forced,
                "processes_killed": len(killed),
                "at_s": round(killed_at - self.started, 3),
                "killed_at": killed_at,
                "newest_checkpoint_on_survivors": newest_held,
                "recovery_s": round(back - killed_at, 3),
                "rejoin_s": round(rejoined - restarted_at, 3),
            }
        )
        print(
            f"kill {index + 1}: {victim.host.name}{' (rank 0)' if victim is rank_zero else ''} at "
            f"{killed_at - self.started:.1f} s; training again after {back - killed_at:.2f} s, "
            f"three nodes again {rejoined - restarted_at:.2f} s after its restart",
            flush=True,
        )

    def run(self) -> None:
        for node in self.nodes:
            self.launch(node)
        self.wait_for("the three nodes training", lambda: self.first_step_after(0, TRAINERS))
        rng = random.Random(self.args.seed)
        for index in range(self.args.kills):
            self.kill_once(rng, index)

    def wait_end(self) -> dict[str, int | None]:
        """Each node's agent's exit status (None: still running at the deadline, then killed)."""
        statuses: dict[str, int | None] = {}
        for node in self.nodes:
            assert node.agent is not None
            try:
                statuses[node.host.name] = node.agent.wait(max(1.0, self.started + self.args.deadline - time.time()))
            except subprocess.TimeoutExpired:
                statuses[node.host.name] = None
        return statuses


def attempts(run_dir: Path) -> list[dict[str, Any]]:
    """Each start of the worker group, in time order: when, at which world size, from which step,
    and the last step it trained (from the ``--record-samples`` files; grouped as
    ``trained_positions(by_restarts=False)`` groups them)."""
    found: dict[tuple[Any, ...], dict[str, Any]] = {}
    for path in (run_dir / "samples").glob("*.jsonl"):
        lines = records(path)
        start = lines[0]
        key = (start["run_id"], start["world_size"], start["resumed_from_step"])
        attempt = found.setdefault(
            key, {"time": start["time"], "world_size": start["world_size"], "resumed": start["resumed_from_step"]}
        )
        attempt["time"] = min(attempt["time"], start["time"])
        last = max((r["step"] for r in lines[1:] if "step" in r), default=start["resumed_from_step"])
        attempt["last_step"] = max(attempt.get("last_step", 0), last)
    return sorted(found.values(), key=lambda a: a["time"])


def steps_lost(kill: dict[str, Any], ordered: list[dict[str, Any]]) -> tuple[int, int] | None:
    """(steps trained twice, step resumed from) for one kill: the last step of the attempt it hit
    minus the step of the next attempt's resume."""
    before = [a for a in ordered if a["time"] < kill["killed_at"]]
    after = [a for a in ordered if a["time"] > kill["killed_at"]]
    if not before or not after:
        return None
    return before[-1]["last_step"] - after[0]["resumed"], after[0]["resumed"]


def check(drill: Drill, statuses: dict[str, int | None]) -> dict[str, Any]:
    """The four checks (module docstring), each a bool, and the problems found, one line each."""
    args, problems = drill.args, []
    steps = args.epochs * TRAIN_SPLIT // args.global_batch_size
    summary = json.loads((drill.run_dir / "summary.json").read_text()) if drill.finished() else {}
    if any(status != 0 for status in statuses.values()):
        problems.append(f"agents' exit statuses {statuses}, not all 0")
    if summary.get("global_step") != steps:
        problems.append(f"the run ended at step {summary.get('global_step')}, not {steps}")
    completed = not problems

    positions = trained_positions(drill.run_dir, by_restarts=False)
    wrong = [e for e in range(1, args.epochs + 1) if sorted(positions.get(e, [])) != list(range(TRAIN_SPLIT))]
    for epoch in wrong:
        trained = positions.get(epoch, [])
        problems.append(
            f"epoch {epoch}: {len(trained)} samples trained, {len(set(trained))} distinct, of {TRAIN_SPLIT}"
        )

    ordered, kept = attempts(drill.run_dir), len(problems)
    resumes = [a["resumed"] for a in ordered]
    if resumes != sorted(resumes):
        problems.append(f"the step resumed from went backwards: {resumes}")
    for number, kill in enumerate(drill.kills, 1):
        found = steps_lost(kill, ordered)
        if found is None:
            problems.append(f"kill {number}: no attempt before and after it in the sample records")
            continue
        kill["steps_lost"], kill["resumed_from"] = found
        if found[1] < kill["newest_checkpoint_on_survivors"]:
            problems.append(
                f"kill {number}: resumed from step {found[1]}, older than step "
                f"{kill['newest_checkpoint_on_survivors']} that a survivor held"
            )
    finals = {n.host.name: n.final_sha() for n in drill.nodes if statuses.get(n.host.name) == 0}
    if not finals or any(final is None or final[0] != steps for final in finals.values()):
        problems.append(f"not every node that finished holds the checkpoint of step {steps}: {finals}")
    elif len({final[1] for final in finals.values() if final}) != 1:
        problems.append(f"the nodes' final checkpoints differ: {finals}")
    return {
        "completed": completed,
        "samples_once": not wrong,
        "checkpoints_kept": len(problems) == kept,
        "recovery_measured": len(drill.kills) == args.kills and all("recovery_s" in k for k in drill.kills),
        "problems": problems,
        "final_checkpoints": {name: final[0] if final else None for name, final in finals.items()},
        "attempts": [{k: a[k] for k in ("world_size", "resumed", "last_step")} for a in ordered],
    }


def figures(kills: list[dict[str, Any]], key: str) -> dict[str, float | None]:
    values = [k[key] for k in kills if key in k]
    return {"median": median(values) if values else None, "worst": max(values, default=None)}


def start_etcd(host: Host, work: Path, stack: ExitStack) -> str:
    """etcd on ``host``, stopped when ``stack`` closes; its client address."""
    log = work / "logs" / "etcd.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [*host.prefix(), *etcd_command(host, work / "etcd")], stdout=out, stderr=subprocess.STDOUT
        )
    stack.callback(server.kill)
    deadline = time.time() + 60
    while "ready to serve client requests" not in log.read_text():
        if server.poll() is not None or time.time() > deadline:
            raise DrillFailed(f"etcd did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    return f"{host.addr}:{ETCD_PORT}"


def drill_in(work: Path, args: argparse.Namespace) -> tuple[Drill, dict[str, int | None], str | None]:
    """The drill on fresh hosts in ``work``; every process it started is gone when it returns."""
    (work / "logs").mkdir(parents=True)
    (work / "checkpoints").mkdir()
    with ExitStack() as stack:
        hosts = stack.enter_context(make_hosts(TRAINERS + 1, work))
        endpoint = start_etcd(hosts[-1], work, stack)
        env = child_env(
            PYTHON=sys.executable,
            OMP_NUM_THREADS="1",
            NNODES=f"2:{TRAINERS}",
            NPROC_PER_NODE="1",
            MAX_RESTARTS=str(2 * args.kills + 3),  # a kill and a rejoin each restart the group
            RDZV_BACKEND="etcd-v2",
            RDZV_ENDPOINT=endpoint,
            RDZV_ID=f"drill-{work.name}",
            RDZV_CONF=f"last_call_timeout={args.last_call}",
        )
        nodes = []
        for host in hosts[:TRAINERS]:
            (work / "disks" / host.name).mkdir(parents=True)
            nodes.append(Node(host, work / "disks" / host.name))
        drill = Drill(args, work, nodes, env)
        stack.callback(lambda: [kill_host(n.host) for n in nodes])
        error = None
        try:
            drill.run()
        except DrillFailed as exc:
            error = str(exc)
            for node in nodes:  # nothing left to wait for
                kill_host(node.host)
        return drill, drill.wait_end(), error


def report(drill: Drill, statuses: dict[str, int | None], error: str | None) -> dict[str, Any]:
    checks = check(drill, statuses)
    if error:
        checks["problems"].insert(0, error)
    result = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "command": "python -m benchmarks.drills " + " ".join(sys.argv[1:]),
        "kills_asked": drill.args.kills,
        "seed": drill.args.seed,
        "settings": {k: v for k, v in vars(drill.args).items() if k not in ("out", "keep")},
        "recovery_s": figures(drill.kills, "recovery_s"),
        "steps_lost": figures(drill.kills, "steps_lost"),
        "rejoin_s": figures(drill.kills, "rejoin_s"),
        "checks": {k: checks[k] for k in ("completed", "samples_once", "checkpoints_kept", "recovery_measured")},
        "problems": checks["problems"],
        "kills": [{k: v for k, v in kill.items() if k != "killed_at"} for kill in drill.kills],
        "attempts": checks["attempts"],
        "final_checkpoints": checks["final_checkpoints"],
        "agents_exit": statuses,
        "machine": machine(),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [tool for tool in ("etcd", "ip", "nsenter", "unshare") if shutil.which(tool) is None]
    if missing:
        print(f"drills: {', '.join(missing)} missing (Debian: apt-get install -y etcd-server iproute2 util-linux)")
        return 2
    with tempfile.TemporaryDirectory(prefix="drills-") as tmp:
        work = Path(tmp) / "work"
        try:
            drill, statuses, error = drill_in(work, args)
        except HostsUnavailable as exc:
            print(f"drills: cannot make test hosts (root, iproute2 and util-linux needed): {exc}")
            return 2
        result = report(drill, statuses, error)
        if args.keep:
            shutil.copytree(work, args.keep, dirs_exist_ok=True, ignore=shutil.ignore_patterns("etcd", "*.pt"))
    out = (
        Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"drills-{datetime.now():%Y%m%d-%H%M%S}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    rec, lost = result["recovery_s"], result["steps_lost"]
    print(f"{len(drill.kills)} kills: recovery median {rec['median']} s, worst {rec['worst']} s;", end=" ")
    print(f"steps lost median {lost['median']}, worst {lost['worst']}")
    print("checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in result["checks"].items()))
    for problem in result["problems"]:
        print(f"problem: {problem}")
    print(f"results: {out}")
    return 0 if all(result["checks"].values()) and not result["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
