"""The trainer against its peers, side by side in one run: the textbook recipe (``benchmarks.baseline``)
and plain DDP with the data in memory (``benchmarks.ddp_peer``).

    python -m benchmarks.compare                    # world size 2, one epoch each, 3 alternating runs
    python -m benchmarks.compare --quick            # 100 steps each, one run (CI)

Both train the same model from the same weights on the same 48,000 images with batch 32 per
rank. The baseline runs twice per round, with the two thread settings its users meet:
``torchrun`` (one thread per process: torchrun sets ``OMP_NUM_THREADS=1`` when it starts more
than one) and ``torch default`` (every CPU in every process, as under ``mp.spawn`` in the
tutorials, which oversubscribes the cores). The figure compared is training time for the same
number of samples (start-up and evaluation excluded on both sides); runs alternate baseline,
trainer, baseline, ... so load from elsewhere hits both alike. Prints and writes the ratio of
the medians.

Each round also times the same number of steps as bare steps (``benchmarks.floor``: forward,
backward and fused SGD in concurrent one-thread processes, with no exchange): the fastest any
data-parallel trainer could train them on this machine. Its column, ``floor is x faster``, is the
ceiling on every speed-up in the table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.baseline import prepare_data
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
from benchmarks.floor import run_floor
from trainer.distributed.jobs import torchrun_command

PEER = "plain DDP, data in memory"
FLOOR = "compute floor (bare step, no exchange)"
TRAIN_SAMPLES = 48_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=None, help="Steps per run instead of one epoch.")
    parser.add_argument("--comm", default="auto", help="The trainer's --comm.")
    parser.add_argument(
        "--baseline-threads",
        default="torchrun,torch",
        help="Comma-separated thread settings for the baseline: torchrun (1 per process), torch (all CPUs).",
    )
    parser.add_argument("--quick", action="store_true", help="100 steps, one run, torchrun threads (CI).")
    parser.add_argument("--out", default=None, help="Results folder.")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_steps, args.repeats, args.baseline_threads = args.max_steps or 100, 1, "torchrun"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = results_dir("compare", args.out)
    info = machine()
    write_json(out / "machine.json", info)
    steps = ["--max-steps", str(args.max_steps)] if args.max_steps else []
    cpus = str(len(os.sched_getaffinity(0)))
    variants = {"torchrun": {}, "torch": {"OMP_NUM_THREADS": cpus}}
    who_names = {"torchrun": "baseline, torchrun threads", "torch": "baseline, torch default threads"}
    settings = args.baseline_threads.split(",")
    raw: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as data_dir:
        prepare_data(Path(data_dir))
        for repeat in range(args.repeats):
            results: dict[str, dict[str, Any]] = {}
            for setting in settings:
                result_file = out / f"baseline-{setting}-r{repeat}.json"
                baseline_args = ["--data-dir", data_dir, "--out", str(result_file), *steps]
                cmd = torchrun_command(args.world_size, "benchmarks.baseline", baseline_args)
                run_checked(cmd, child_env(**variants[setting]), timeout=900)
                results[who_names[setting]] = json.loads(result_file.read_text())
            peer_file = out / f"ddp-peer-r{repeat}.json"
            peer_args = ["--out", str(peer_file), *steps]
            run_checked(torchrun_command(args.world_size, "benchmarks.ddp_peer", peer_args), child_env(), timeout=900)
            results[PEER] = json.loads(peer_file.read_text())
            run_dir = out / "runs" / f"trainer-r{repeat}"
            trainer_args = ["--epochs", "1", "--comm", args.comm, "--run-dir", str(run_dir), "--overwrite", *steps]
            run_checked(torchrun_command(args.world_size, "trainer", trainer_args), child_env(), timeout=900)
            results["trainer"] = json.loads((run_dir / "summary.json").read_text())
            # The same steps as bare steps in concurrent one-thread processes: no trainer can be faster.
            floor_steps = args.max_steps or TRAIN_SAMPLES // (32 * args.world_size)
            floor_ms = max(run_floor(args.world_size, 1, floor_steps, Path(data_dir)))
            floor_seconds = floor_steps * floor_ms / 1e3
            results[FLOOR] = {
                "train_seconds": floor_seconds,
                "samples_per_second": floor_steps * 32 * args.world_size / floor_seconds,
                "test_accuracy": float("nan"),
                "threads_per_rank": 1,
            }
            for name, figures in results.items():
                raw.append(
                    {
                        "who": name,
                        "repeat": repeat,
                        "train_seconds": figures["train_seconds"],
                        "samples_per_second": figures["samples_per_second"],
                        "test_accuracy": figures["test_accuracy"],
                        "threads_per_rank": figures["threads_per_rank"],
                    }
                )
            line = ", ".join(f"{name} {figures['train_seconds']:.2f} s" for name, figures in results.items())
            print(f"run {repeat + 1}/{args.repeats}: {line}", flush=True)
    write_csv(out / "raw.csv", raw)
    rows = []
    for who in [who_names[s] for s in settings] + [PEER, "trainer", FLOOR]:
        mine = [r for r in raw if r["who"] == who]
        median, low, high = median_spread([r["train_seconds"] for r in mine])
        rows.append(
            {
                "who": who,
                "threads_per_rank": mine[0]["threads_per_rank"],
                "train_seconds": median,
                "range": f"{low:.2f}-{high:.2f}",
                "samples_per_second": median_spread([r["samples_per_second"] for r in mine])[0],
                "test_accuracy": median_spread([r["test_accuracy"] for r in mine])[0] if who != FLOOR else "",
            }
        )
    trainer_seconds, floor_seconds = rows[-2]["train_seconds"], rows[-1]["train_seconds"]
    for row in rows:
        row["trainer_speedup"] = row["train_seconds"] / trainer_seconds
        # The most any trainer could be faster than this one here: it cannot beat the floor.
        row["ceiling"] = row["train_seconds"] / floor_seconds
    work = f"{args.max_steps} steps" if args.max_steps else "one epoch"
    text = (
        f"Trainer (--comm {args.comm}) against its peers, world size {args.world_size}, {work}, "
        f"batch 32 per rank, median of {args.repeats} alternating run(s). Targets: at least 4x over "
        f"{PEER}, at least 15x over the textbook recipe.\nMachine: {machine_line(info)}\n\n"
        + markdown_table(
            rows,
            (
                ("who", ""),
                ("threads_per_rank", "threads/rank"),
                ("train_seconds", "train s (median)"),
                ("range", "min-max"),
                ("samples_per_second", "samples/s"),
                ("test_accuracy", "test acc"),
                ("trainer_speedup", "trainer is x faster"),
                ("ceiling", "floor is x faster"),
            ),
        )
        + "\n"
    )
    write_json(out / "compare.json", {"rows": rows})
    publish(out, "compare", text)


if __name__ == "__main__":
    main()
