"""The GPU step captured in a CUDA graph against eager steps, interleaved in one sitting.

    python -m benchmarks.cuda_graph                 # 3 epochs per run, 3 rounds
    python -m benchmarks.cuda_graph --quick         # 200 steps, 1 round

Each round trains the main job's model (one process, batch 32, the defaults) on the first GPU
twice: with ``--cuda-graph off`` (eager steps) and ``--cuda-graph on``. Reported: samples per
second of training time (evaluation excluded) and ms per step, median over rounds with min-max,
the speed-up, and whether the two modes ended with the same weights (``params_sha256``). Needs a
CUDA GPU; elsewhere it says so in one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

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

MODES = ("off", "on")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="Epochs per run.")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds.")
    parser.add_argument("--quick", action="store_true", help="200 steps, 1 round.")
    parser.add_argument("--out", default=None, help="Results folder.")
    return parser.parse_args(argv)


def run_trainer(mode: str, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    budget = ["--epochs", "1", "--max-steps", "200"] if args.quick else ["--epochs", str(args.epochs)]
    command = [sys.executable, "-m", "trainer", *budget, "--cuda-graph", mode, "--run-dir", str(run_dir)]
    output, _ = run_checked([*command, "--overwrite"], child_env(hide_gpus=False), 900)
    if mode == "on" and "captured in a CUDA graph" not in output:
        raise RuntimeError(f"--cuda-graph on did not capture the step:\n{output[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "samples_per_second": summary["samples_per_second"],
        "ms_per_step": summary["train_seconds"] * 1e3 / summary["global_step"],
        "params_sha256": summary["params_sha256"],
        "test_accuracy": summary["test_accuracy"],
        "peak_gpu_mb": summary["peak_gpu_mb"],
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.cuda_graph: no CUDA GPU visible; run it on a machine with one", file=sys.stderr)
        sys.exit(2)
    rounds = 1 if args.quick else args.rounds
    out = results_dir("cuda_graph", args.out)
    info = machine() | {"gpu": torch.cuda.get_device_name(0)}
    write_json(out / "machine.json", info)
    raw = []
    for round_index in range(rounds):
        for mode in MODES:
            figures = run_trainer(mode, args, out / "runs" / f"{mode}-r{round_index}")
            raw.append({"round": round_index, "cuda_graph": mode, **figures})
        print(f"round {round_index + 1}/{rounds} done", flush=True)
    write_csv(out / "raw.csv", raw)
    rows = []
    for mode in MODES:
        mine = [r for r in raw if r["cuda_graph"] == mode]
        speed, low, high = median_spread([r["samples_per_second"] for r in mine])
        rows.append(
            {
                "cuda_graph": mode,
                "samples_per_second": speed,
                "range": f"{low:,.0f}-{high:,.0f}",
                "ms_per_step": median_spread([r["ms_per_step"] for r in mine])[0],
                "test_accuracy": mine[0]["test_accuracy"],
                "peak_gpu_mb": mine[0]["peak_gpu_mb"],
            }
        )
    speedup = rows[1]["samples_per_second"] / rows[0]["samples_per_second"]
    same = len({r["params_sha256"] for r in raw}) == 1
    write_json(out / "cuda_graph.json", {"rows": rows, "speedup": speedup, "same_weights": same, "machine": info})
    budget = "200 steps" if args.quick else f"{args.epochs} epochs"
    text = (
        f"CUDA graph against eager steps: one process on {info['gpu']}, {budget} per run, batch 32, "
        f"median of {rounds} interleaved round(s).\nMachine: {machine_line(info)}\n\n"
        + markdown_table(
            rows,
            (
                ("cuda_graph", "--cuda-graph"),
                ("samples_per_second", "samples/s (median)"),
                ("range", "min-max"),
                ("ms_per_step", "ms/step"),
                ("test_accuracy", "test accuracy"),
                ("peak_gpu_mb", "peak GPU MB"),
            ),
        )
        + f"\n\nspeed-up {speedup:.1f}x (target 5x); same weights in every run: {'yes' if same else 'NO'}\n"
    )
    publish(out, "cuda_graph", text)


if __name__ == "__main__":
    main()
