"""The hierarchical gradient sync against flat gloo, on two test hosts of two ranks each.

    python -m benchmarks.hierarchical             # 3 rounds; runs of 40 and 340 steps
    python -m benchmarks.hierarchical --quick     # 1 round; runs of 5 and 25 steps (CI)
    python -m benchmarks.hierarchical --comms hierarchical   # part 1 for one option only

Needs root: the two hosts are network, UTS and mount namespaces made by ``tests/hosts.py`` (each
its own host name, ``/dev/shm`` and an ``eth0`` on a bridge); without them it exits with one
line saying why. Both hosts share this machine's CPUs, so four ranks run on its cores.

Part 1, the trainer. Each round runs it through ``launch/multinode.sh`` on both hosts, two
ranks each, with ``--comm gloo`` and with ``--comm hierarchical`` (interleaved; ``--comms``
picks which), each twice: a short run and a long one. Reported per configuration, as the median
over rounds (min-max):

- sync ms per batch: each rank's median of its per-step ``sync_ms`` over the long run (the last
  line of ``rank<r>.jsonl``), averaged over the four ranks (the figure means for both options
  what it means for every ``--comm``: the sync call, plus any wait for a slower peer);
- ms per step: the long run's training time over its steps;
- link bytes per step, per host: each host's ``eth0`` transmit counter (read with ``ip -s link``
  in the host's network namespace, the counter ``/sys/class/net/eth0/statistics/tx_bytes`` shows
  there) before and after each run; ``(long - short) / (LONG - SHORT steps)``. Everything but the
  steps (rendezvous, process groups, shared-memory set-up, the weights' broadcast, evaluation,
  the end of the run) is the same in both runs and cancels; only the steps' traffic is left.

Part 2, the all-reduce alone: one job on both hosts times one all-reduce of the gradient's size
(2,143,272 bytes) through flat gloo (``dist.all_reduce`` of the pre-divided tensor, as the
``gloo`` option's hook does it, in one piece) and through ``trainer.sync.hierarchy``, alternating
round by round, ``--calls`` calls each after warm-up: median and 95th percentile per rank. Here
no rank computes, so the figures are the exchange itself, without waits for a slower peer.

Writes ``raw.csv`` (every run), ``hierarchical.csv``, ``allreduce.csv``, ``hierarchical.md`` and
``machine.json`` to ``--out`` (default ``benchmarks/results/hierarchical-<time>``). This file is
also part 2's worker (``--worker``, under torchrun).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from statistics import mean, median
from typing import Any

from benchmarks.common import (
    REPO,
    child_env,
    machine,
    machine_line,
    markdown_table,
    median_spread,
    publish,
    results_dir,
    write_csv,
    write_json,
)
from trainer.distributed.jobs import torchrun_command

OPTIONS = ("gloo", "hierarchical")
HOSTS, NPROC = 2, 2
GRADIENT_BYTES = 535_818 * 4  # S: the MLP's parameters in float32
RDZV_PORT = 29400


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds.")
    parser.add_argument("--short", type=int, default=40, help="Steps of the short run (start-up traffic).")
    parser.add_argument("--long", type=int, default=340, help="Steps of the long run (at most 375: one epoch).")
    parser.add_argument("--calls", type=int, default=300, help="Part 2: timed all-reduces per method.")
    parser.add_argument("--comms", nargs="+", choices=OPTIONS, default=list(OPTIONS), help="Part 1's --comm options.")
    parser.add_argument("--quick", action="store_true", help="1 round of 5 and 25 steps, 20 calls (CI).")
    parser.add_argument("--out", default=None, help="Results folder.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.short, args.long, args.calls = 1, 5, 25, 20
    if not 0 < args.short < args.long <= 375:
        parser.error("need 0 < --short < --long <= 375 (one epoch of 48,000 samples at global batch 128)")
    return args


def tx_bytes(netns: str) -> int:
    """Bytes ``eth0`` has sent in network namespace ``netns``. Through netlink: ``/sys`` as seen from
    this process shows the machine's own interfaces, not the namespace's."""
    result = subprocess.run(
        ["ip", "-n", netns, "-j", "-s", "link", "show", "dev", "eth0"], capture_output=True, text=True, check=True
    )
    return int(json.loads(result.stdout)[0]["stats64"]["tx"]["bytes"])


def on_hosts(hosts: list[Any], cmd: Sequence[str], env: dict[str, str], logs: Path, name: str) -> None:
    """``cmd`` started on every host at once; returns when all have exited 0, else raises with a log's tail."""
    logs.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        files = [stack.enter_context((logs / f"{name}-{h.name}.log").open("w")) for h in hosts]
        procs = [
            subprocess.Popen([*h.prefix(), *cmd], env=h.env(env), cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
            for h, f in zip(hosts, files, strict=True)
        ]
        try:
            codes = [proc.wait(timeout=900) for proc in procs]
        finally:
            for proc in procs:
                proc.kill()
    if any(codes):
        tail = (logs / f"{name}-{hosts[0].name}.log").read_text()[-3000:]
        raise RuntimeError(f"{name} exited {codes}:\n{tail}")


def job_env(hosts: list[Any], rdzv_id: str, **extra: str) -> dict[str, str]:
    """A job of two ranks per host meeting at the first host's c10d rendezvous, one thread per rank."""
    return child_env(
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        NNODES=str(HOSTS),
        NPROC_PER_NODE=str(NPROC),
        RDZV_ENDPOINT=f"{hosts[0].name}:{RDZV_PORT}",
        RDZV_ID=rdzv_id,
        **extra,
    )


def train(hosts: list[Any], comm: str, steps: int, run_dir: Path) -> dict[str, Any]:
    """The trainer on both hosts; its figures and the bytes each host sent while it ran."""
    args = ["--epochs", "1", "--max-steps", str(steps), "--log-every", "100", "--checkpoint-every", "100000"]
    cmd = [str(REPO / "launch" / "multinode.sh"), *args, "--comm", comm, "--run-dir", str(run_dir)]
    before = [tx_bytes(host.netns) for host in hosts]
    load = os.getloadavg()[0]
    on_hosts(hosts, cmd, job_env(hosts, run_dir.name), run_dir.parent, run_dir.name)
    sent = [tx_bytes(host.netns) - b for host, b in zip(hosts, before, strict=True)]
    summary = json.loads((run_dir / "summary.json").read_text())
    ends = [_last_line(run_dir / f"rank{r}.jsonl") for r in range(HOSTS * NPROC)]
    return {
        "comm": comm,
        "steps": summary["global_step"],
        "load_average_1m": load,
        "ms_per_step": summary["train_seconds"] * 1e3 / summary["global_step"],
        "sync_ms_p50_ranks": [end["sync_ms_p50"] for end in ends],
        "sync_ms": mean(end["sync_ms_p50"] for end in ends),
        "tx_bytes_hosts": sent,
    }


def _last_line(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text().splitlines()[-1])


def allreduce_worker(out: Path, calls: int, rounds: int) -> None:
    """Part 2 on one rank (under torchrun): flat gloo against the hierarchical all-reduce, alternating."""
    import torch
    import torch.distributed as dist

    from trainer.sync import hierarchy

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    numel = GRADIENT_BYTES // 4
    tensor, result = torch.randn(numel), torch.empty(numel)
    reducer = hierarchy.open_agreed(numel, timeout_s=60)
    methods: dict[str, Callable[[], object]] = {
        "gloo": lambda: dist.all_reduce(tensor.div_(world)),
        "hierarchical": lambda: reducer.allreduce([tensor], result, divide_by=world),
    }
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for method in methods.values():
        for _ in range(5):
            method()
    for _ in range(rounds):
        for name, method in methods.items():
            dist.barrier()
            for _ in range(max(1, calls // rounds)):
                started = time.perf_counter()
                method()
                samples[name].append((time.perf_counter() - started) * 1e3)
    figures = {name: [median(ms), sorted(ms)[int(0.95 * (len(ms) - 1))]] for name, ms in samples.items()}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, figures)
    reducer.close()
    dist.destroy_process_group()
    if rank == 0:
        (out / "allreduce.json").write_text(json.dumps(gathered))


def allreduce_rows(hosts: list[Any], calls: int, rounds: int, out: Path, logs: Path) -> list[dict[str, Any]]:
    """Part 2: one job on both hosts; a row per method and rank."""
    args = ["--worker", "--calls", str(calls), "--rounds", str(rounds), "--out", str(out)]
    cmd = torchrun_command(NPROC, "benchmarks.hierarchical", args, _launcher_args(hosts), standalone=False)
    load = os.getloadavg()[0]
    on_hosts(hosts, cmd, job_env(hosts, "allreduce"), logs, "allreduce")
    per_rank = json.loads((out / "allreduce.json").read_text())
    return [
        {"method": name, "rank": rank, "median_ms": mine[name][0], "p95_ms": mine[name][1], "load_average_1m": load}
        for name in ("gloo", "hierarchical")
        for rank, mine in enumerate(per_rank)
    ]


def _launcher_args(hosts: list[Any]) -> list[str]:
    rdzv = ["--rdzv-backend=c10d", f"--rdzv-endpoint={hosts[0].name}:{RDZV_PORT}", "--rdzv-id=allreduce"]
    return [f"--nnodes={HOSTS}", *rdzv]


def model_bytes(option: str, hosts: int, per_host: int, size: int = GRADIENT_BYTES) -> float:
    """Bytes one host sends over its link per all-reduce of ``size`` bytes (see docs/multinode.md).

    Flat gloo is a ring over all ranks in rank order: each rank sends 2 (P - 1) / P x S, and one
    rank per host sends to the next host. Hierarchical: the leaders' ring, 2 (H - 1) / H x S.
    """
    ranks = hosts if option == "hierarchical" else hosts * per_host
    return 2 * (ranks - 1) / ranks * size


def summarize(raw: list[dict[str, Any]], comms: Sequence[str], short: int, long: int) -> list[dict[str, Any]]:
    rows = []
    for comm in comms:
        runs = {(r["round"], r["steps"]): r for r in raw if r["comm"] == comm}
        pairs = [(runs[(i, short)], runs[(i, long)]) for i in sorted({i for i, _ in runs})]
        per_step = [
            mean(b - a for a, b in zip(s["tx_bytes_hosts"], lg["tx_bytes_hosts"], strict=True)) / (long - short)
            for s, lg in pairs
        ]
        sync, sync_low, sync_high = median_spread([lg["sync_ms"] for _, lg in pairs])
        step, step_low, step_high = median_spread([lg["ms_per_step"] for _, lg in pairs])
        link, link_low, link_high = median_spread(per_step)
        rows.append(
            {
                "comm": comm,
                "sync_ms_per_batch": sync,
                "sync_range": f"{sync_low:.2f}-{sync_high:.2f}",
                "ms_per_step": step,
                "step_range": f"{step_low:.2f}-{step_high:.2f}",
                "link_bytes_per_step_per_host": link,
                "link_range": f"{link_low:,.0f}-{link_high:,.0f}",
                "model_bytes_per_step_per_host": model_bytes(comm, HOSTS, NPROC),
                "load_average": mean(lg["load_average_1m"] for _, lg in pairs),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        allreduce_worker(Path(args.out), args.calls, args.rounds)
        return
    sys.path.insert(0, str(REPO))
    from tests.hosts import HostsUnavailable, make_hosts

    with tempfile.TemporaryDirectory() as scratch, ExitStack() as stack:
        try:
            hosts = stack.enter_context(make_hosts(HOSTS, Path(scratch)))
        except HostsUnavailable as exc:
            raise SystemExit(f"benchmarks.hierarchical: cannot make test hosts (needs root, iproute2): {exc}") from None
        out = results_dir("hierarchical", args.out)
        info = machine()
        write_json(out / "machine.json", info)
        raw: list[dict[str, Any]] = []
        for round_index in range(args.rounds):
            for comm in args.comms:
                for steps in (args.short, args.long):
                    run_dir = Path(scratch) / "runs" / f"{comm}-r{round_index}-s{steps}"
                    raw.append({"round": round_index, **train(hosts, comm, steps, run_dir)})
            print(f"round {round_index + 1}/{args.rounds} done", flush=True)
        per_rank = allreduce_rows(hosts, args.calls, max(2, args.rounds), out, Path(scratch) / "runs")
    write_csv(out / "raw.csv", raw)
    rows = summarize(raw, args.comms, args.short, args.long)
    write_csv(out / "hierarchical.csv", rows)
    write_csv(out / "allreduce.csv", per_rank)
    allreduce = []
    for method in ("gloo", "hierarchical"):
        mine = [r for r in per_rank if r["method"] == method]
        middle, low, high = median_spread([r["median_ms"] for r in mine])
        p95 = max(r["p95_ms"] for r in mine)
        allreduce.append({"method": method, "median_ms": middle, "ranks": f"{low:.2f}-{high:.2f}", "p95_ms": p95})
    text = (
        f"Two test hosts x {NPROC} ranks (network namespaces on one machine, veth through a bridge), "
        f"1 thread per rank; {args.rounds} round(s) of runs of {args.short} and {args.long} steps, "
        f"interleaved; median over rounds (min-max).\nMachine: {machine_line(info)}\n\n"
        + markdown_table(
            rows,
            (
                ("comm", "--comm"),
                ("sync_ms_per_batch", "sync ms/batch"),
                ("sync_range", "range"),
                ("ms_per_step", "ms/step"),
                ("step_range", "range"),
                ("link_bytes_per_step_per_host", "link bytes/step/host"),
                ("link_range", "range"),
                ("model_bytes_per_step_per_host", "model 2(n-1)/n x S"),
                ("load_average", "load avg"),
            ),
        )
        + f"\n\nOne all-reduce of {GRADIENT_BYTES:,} bytes alone, {args.calls} calls per method alternating "
        f"with the other, median over the four ranks of each rank's median (their range), largest p95; "
        f"load average {per_rank[0]['load_average_1m']:.2f} at its start.\n\n"
        + markdown_table(
            allreduce, (("method", "all-reduce"), ("median_ms", "ms"), ("ranks", "rank medians"), ("p95_ms", "p95 ms"))
        )
        + "\n"
    )
    publish(out, "hierarchical", text)


if __name__ == "__main__":
    main()
