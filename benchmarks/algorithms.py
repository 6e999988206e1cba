"""Each ``--comm`` option trained for the default 5 epochs: accuracy beside speed.

    python -m benchmarks.algorithms                  # world size 2, every option, 5 epochs, 1 run each
    python -m benchmarks.algorithms --quick          # auto and localsgd, 50 steps (CI)

The exact options (gloo, shm) must reach the same weights bit for bit; the ones that send
less (bf16, fp16, powersgd, localsgd) trade arithmetic for bytes, and this table shows what
each costs in test accuracy and buys in samples/s on this machine.
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks.common import machine, machine_line, markdown_table, publish, results_dir, write_csv, write_json
from benchmarks.scaling import run_once
from trainer.core.config import COMM_OPTIONS

# Every option but auto, which only picks one of the others, and hierarchical, which is for ranks
# on several hosts (benchmarks.hierarchical measures it there).
OPTIONS = ",".join(option for option in COMM_OPTIONS if option not in ("auto", "hierarchical"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--comm", default=OPTIONS, help="Comma-separated --comm options.")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--max-steps", type=int, default=None, help="Stop each run after this many steps.")
    parser.add_argument("--quick", action="store_true", help="auto and localsgd, 1 epoch cut at 50 steps (CI).")
    parser.add_argument("--out", default=None, help="Results folder.")
    args = parser.parse_args(argv)
    if args.quick:
        args.comm, args.epochs, args.max_steps = "auto,localsgd", 1, 50
    out = results_dir("algorithms", args.out)
    info = machine()
    write_json(out / "machine.json", info)
    samples = args.max_steps * 32 * args.world_size if args.max_steps else None
    rows: list[dict[str, Any]] = []
    for comm in args.comm.split(","):
        row = run_once(args.world_size, comm, samples, out / "runs" / comm, timeout=1800, epochs=args.epochs)
        rows.append(row)
        print(
            f"{comm}: test accuracy {row['test_accuracy']:.4f}, {row['samples_per_second']:,.0f} samples/s", flush=True
        )
        write_csv(out / "algorithms.csv", rows)
    work = f"{args.max_steps} steps" if args.max_steps else f"{args.epochs} epochs"
    text = (
        f"--comm options at world size {args.world_size}, {work}, batch 32 per rank, one run each.\n"
        f"Machine: {machine_line(info)}\n\n"
        + markdown_table(
            rows,
            (
                ("comm", "--comm"),
                ("test_accuracy", "test accuracy"),
                ("samples_per_second", "samples/s"),
                ("train_seconds", "train s"),
                ("sync_ms_per_batch", "sync ms/batch"),
                ("sync_ms_p95", "sync p95"),
                ("compute_ms", "compute ms"),
            ),
        )
        + "\n"
    )
    publish(out, "algorithms", text)


if __name__ == "__main__":
    main()
