"""The trainer against its compute floor, interleaved in one sitting.

    python -m benchmarks.floor                  # 600 steps per run, 5 rounds
    python -m benchmarks.floor --quick          # 60 steps, 1 round (CI)

The floor of a step is the bare step the trainer wraps: gather a batch of 32 rows from the
in-memory training split, forward, cross-entropy, backward, one fused SGD step, with nothing
else in the process (no process group, no sync, no timing calls, no logs). Each round runs:

- ``floor ws2``: two one-thread processes running the bare step at the same time, no exchange
  (world size 2's floor: both cores busy with useful work and nothing else);
- ``floor ws1``: one process of two threads running the bare step (world size 1's floor);
- ``trainer ws1`` and ``trainer ws2``: the trainer through ``torchrun`` with its defaults
  (``--comm auto``), ms per step from its own training time over the windows after its first
  (``steady_ms_per_step``), as the floor's are timed after a warm-up; the whole run's figure,
  start-up steps included, beside it.

Reported: ms per step for each (median over rounds, min-max), and the ratios trainer/floor at
each world size, with the machine, versions and load. The floor workers start together on a
shared start file, so the two-process floor really runs concurrently.

This file is both the driver and the floor worker (``--worker``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    child_env,
    machine,
    machine_line,
    markdown_table,
    median_spread,
    publish,
    results_dir,
    run_checked,
    write_csv,
    write_json,
)
from trainer.distributed.jobs import torchrun_command

BATCH = 32
TRAINER_WARMUP = 100  # the trainer's first window (--log-every's default), not timed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="Timed steps per run (after warm-up).")
    parser.add_argument("--rounds", type=int, default=5, help="Interleaved rounds.")
    parser.add_argument("--quick", action="store_true", help="60 steps, 1 round (CI).")
    parser.add_argument("--out", default=None, help="Results folder.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--start-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.rounds = 60, 1
    return args


def bare_steps(steps: int, threads: int, seed: int, start_file: str | None) -> float:
    """ms per bare step of this process, timed after a warm-up, starting once ``start_file`` exists."""
    import torch
    import torch.nn.functional as F

    from trainer.core.config import TrainConfig
    from trainer.core.optim import build_optimizer
    from trainer.tasks.mnist_mlp import default_data, default_model

    torch.set_num_threads(threads)
    cfg = TrainConfig()
    data = default_data(cfg.seed, torch.device("cpu"))
    model = default_model(cfg.seed)
    optimizer = build_optimizer(cfg, model)
    generator = torch.Generator().manual_seed(seed)
    warmup = 50
    positions = torch.randint(0, len(data.train_x), (warmup + steps, BATCH), generator=generator)

    def step(index: int) -> None:
        rows = positions[index]
        loss = F.cross_entropy(model(data.train_x[rows]), data.train_y[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for index in range(warmup):
        step(index)
    if start_file:
        ready = Path(f"{start_file}.ready-{os.getpid()}")
        ready.touch()
        while not Path(start_file).exists():
            time.sleep(0.001)
    started = time.perf_counter()
    for index in range(warmup, warmup + steps):
        step(index)
    return (time.perf_counter() - started) * 1e3 / steps


def run_floor(processes: int, threads: int, steps: int, scratch: Path) -> list[float]:
    """ms/step of each of ``processes`` concurrent bare-step processes."""
    start = scratch / f"start-{time.monotonic_ns()}"
    results = [scratch / f"{start.name}-{i}.json" for i in range(processes)]
    env = child_env(OMP_NUM_THREADS=str(threads))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.floor",
                "--worker",
                "--threads",
                str(threads),
                "--steps",
                str(steps),
                "--seed",
                str(i),
                "--start-file",
                str(start),
                "--result",
                str(result),
            ],
            env=env,
        )
        for i, result in enumerate(results)
    ]
    deadline = time.monotonic() + 300
    while len(list(scratch.glob(f"{start.name}.ready-*"))) < processes:
        if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
            for p in procs:
                p.kill()
            raise RuntimeError("floor workers did not get ready")
        time.sleep(0.01)
    start.touch()  # all warmed up: go together
    for p in procs:
        if p.wait(timeout=600) != 0:
            raise RuntimeError(f"floor worker exited {p.returncode}")
    return [json.loads(r.read_text())["ms_per_step"] for r in results]


def run_trainer(world_size: int, steps: int, out: Path, name: str) -> dict[str, Any]:
    """The trainer's ms per step over ``steps`` steps (its training time, evaluation excluded)."""
    run_dir = out / "runs" / name
    # One default window (100 steps) of warm-up, then ``steps`` timed steps.
    total = str(TRAINER_WARMUP + steps)
    args = ["--epochs", "1", "--max-steps", total, "--log-every", str(TRAINER_WARMUP), "--run-dir", str(run_dir)]
    args.append("--overwrite")
    run_checked(torchrun_command(world_size, "trainer", args), child_env(), timeout=900)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "ms_per_step": steady_ms_per_step(run_dir, world_size),
        "whole_run_ms_per_step": summary["train_seconds"] * 1e3 / summary["global_step"],
        "compute_ms": summary["compute_ms"],
        "sync_ms": summary["sync_ms_per_batch"],
        "data_ms": summary["data_ms"],
    }


def steady_ms_per_step(run_dir: Path, world_size: int) -> float:
    """ms per step of training time over the windows after the first (rank 0's records).

    The floor's steps are timed after 50 warm-up steps, so the trainer's are timed after its first
    window (its first ``--log-every`` steps): the same steady state on both sides. Each window's
    samples/s is over training time alone (checkpoints and evaluation excluded).
    """
    windows = [
        json.loads(line)
        for line in (run_dir / "rank0.jsonl").read_text().splitlines()
        if '"samples_per_second"' in line and '"event"' not in line
    ]
    batch = BATCH * world_size
    seconds = steps = 0.0
    for before, window in itertools.pairwise(windows):
        done = window["step"] - before["step"]
        seconds += done * batch / window["samples_per_second"]
        steps += done
    if not steps:
        raise RuntimeError(f"{run_dir}: fewer than two windows of steps; run more steps than --log-every")
    return seconds * 1e3 / steps


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        ms = bare_steps(args.steps, args.threads, args.seed, args.start_file)
        Path(args.result).write_text(json.dumps({"ms_per_step": ms}))
        return
    out = results_dir("floor", args.out)
    info = machine()
    write_json(out / "machine.json", info)
    raw: list[dict[str, Any]] = []
    cpus = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            for ms in run_floor(2, 1, args.steps, Path(scratch)):
                raw.append({"round": round_index, "what": "floor ws2", "ms_per_step": ms})
            for ms in run_floor(1, cpus, args.steps, Path(scratch)):
                raw.append({"round": round_index, "what": "floor ws1", "ms_per_step": ms})
            for world in (1, 2):
                figures = run_trainer(world, args.steps, out, f"ws{world}-r{round_index}")
                raw.append({"round": round_index, "what": f"trainer ws{world}", **figures})
            print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    write_csv(out / "raw.csv", raw)
    rows = []
    for what in ("floor ws1", "trainer ws1", "floor ws2", "trainer ws2"):
        mine = [r for r in raw if r["what"] == what]
        median, low, high = median_spread([r["ms_per_step"] for r in mine])
        row: dict[str, Any] = {"what": what, "ms_per_step": median, "range": f"{low:.3f}-{high:.3f}"}
        for key in ("whole_run_ms_per_step", "compute_ms", "sync_ms", "data_ms"):
            if key in mine[0]:
                row[key] = median_spread([r[key] for r in mine])[0]
        rows.append(row)
    by = {r["what"]: r["ms_per_step"] for r in rows}
    ratios = {"ws1": by["trainer ws1"] / by["floor ws1"], "ws2": by["trainer ws2"] / by["floor ws2"]}
    for row in rows:
        if row["what"].startswith("trainer"):
            row["vs_floor"] = ratios[row["what"].split()[-1]]
    write_json(out / "floor.json", {"rows": rows, "ratios": ratios, "machine": info, "steps": args.steps})
    text = (
        f"Trainer against its compute floor: {args.steps} steps per run, batch {BATCH} per process, "
        f"median of {args.rounds} interleaved round(s).\nMachine: {machine_line(info)}\n\n"
        + markdown_table(
            rows,
            (
                ("what", ""),
                ("ms_per_step", "ms/step (median)"),
                ("range", "min-max"),
                ("whole_run_ms_per_step", "whole run ms/step"),
                ("compute_ms", "compute ms"),
                ("sync_ms", "sync ms"),
                ("data_ms", "data ms"),
                ("vs_floor", "x floor"),
            ),
        )
        + f"\n\ntrainer/floor: world size 1 {ratios['ws1']:.2f}x (target 1.15x), "
        f"world size 2 {ratios['ws2']:.2f}x (target 1.25x)\n"
    )
    publish(out, "floor", text)


if __name__ == "__main__":
    main()
