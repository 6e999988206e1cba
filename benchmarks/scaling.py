"""Scaling: the trainer through torchrun at several world sizes on a fixed amount of work.

    python -m benchmarks.scaling                       # world sizes 1,2,4,8; --comm auto and gloo; 3 runs each
    python -m benchmarks.scaling --quick               # world sizes 1,2; 3,200 samples; 1 run

Every run trains on the same global samples (one epoch, or ``--samples``), so samples/s at
world size N against world size 1 is the speedup. Runs are interleaved (1, 2, 4, 8, 1, 2, ...)
so that a burst of load from elsewhere on the machine spreads over world sizes instead of
landing on one. The trainer's own ``summary.json`` gives throughput and the step split; CPU,
RSS and threads of each rank are sampled with psutil from outside the workers, over the
training window that the ranks' step logs delimit.

Writes ``raw.csv`` (every run), ``scaling.csv``, ``scaling.md``, ``scaling.png`` (with
matplotlib) and ``machine.json`` to ``--out`` (default ``benchmarks/results/scaling-<time>``).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
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
EPOCH_SAMPLES = 48_000
SUMMARY_KEYS = (
    "samples_per_second",
    "train_seconds",
    "step_ms",
    "data_ms",
    "compute_ms",
    "sync_ms_per_batch",
    "sync_ms_p50",
    "sync_ms_p95",
    "test_accuracy",
    "threads_per_rank",
)
COLUMNS = (
    ("world_size", "world"),
    ("comm", "sync"),
    ("samples_per_second", "samples/s"),
    ("samples_per_second_range", "min-max"),
    ("train_seconds", "train s"),
    ("step_ms", "step ms"),
    ("data_ms", "data ms"),
    ("compute_ms", "compute ms"),
    ("sync_ms_per_batch", "sync ms"),
    ("sync_ms_p50", "sync p50"),
    ("sync_ms_p95", "sync p95"),
    ("cpu_percent_per_rank", "CPU %/rank"),
    ("cpu_percent_total", "CPU % total"),
    ("rss_mb_per_rank", "RSS MB/rank"),
    ("rss_mb_total", "RSS MB total"),
    ("os_threads_per_rank", "threads/rank"),
    ("speedup", "speedup"),
    ("efficiency", "efficiency"),
    ("test_accuracy", "test acc"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", default="1,2,4,8", help="Comma-separated world sizes.")
    parser.add_argument("--comm", default="auto,gloo", help="Comma-separated --comm options for world sizes > 1.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per (world size, comm).")
    parser.add_argument("--samples", type=int, default=None, help="Global samples per run (default one epoch).")
    parser.add_argument("--quick", action="store_true", help="World sizes 1,2; 3,200 samples; one run (CI).")
    parser.add_argument("--out", default=None, help="Results folder.")
    parser.add_argument("--timeout", type=float, default=600, help="Seconds one run may take.")
    args = parser.parse_args(argv)
    if args.quick:
        args.world_sizes, args.samples, args.repeats = "1,2", args.samples or 3_200, 1
    return args


def training_window(run_dir: Path) -> tuple[float, float] | None:
    """Wall-clock span of the ranks' step records: training only, no start-up or evaluation."""
    times = []
    for path in run_dir.glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "time" in record:
                times.append(record["time"])
    return (min(times), max(times)) if len(times) >= 2 else None


def run_once(
    world: int, comm: str, samples: int | None, run_dir: Path, timeout: float, epochs: int = 1
) -> dict[str, Any]:
    """One trainer run under torchrun, sampled from outside; its summary figures plus CPU, RSS, threads."""
    args = ["--epochs", str(epochs), "--comm", comm, "--run-dir", str(run_dir), "--overwrite", "--log-every", "50"]
    if samples is not None:
        args += ["--max-steps", str(max(1, samples // (BATCH * world)))]
    output, monitor = run_checked(torchrun_command(world, "trainer", args), child_env(), timeout, monitor=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    chosen = re.search(r"gradient sync: (\w+)", output)
    row: dict[str, Any] = {"world_size": world, "comm": chosen.group(1) if chosen else "none"}
    row.update({key: summary[key] for key in SUMMARY_KEYS})
    assert monitor is not None
    workers = list(monitor.workers.values())
    window = training_window(run_dir)
    start, end = window if window else (0.0, float("inf"))
    per_rank = [w.window(start, end) for w in workers]
    if per_rank:
        row["cpu_percent_per_rank"] = sum(r["cpu_percent"] for r in per_rank) / len(per_rank)
        row["cpu_percent_total"] = sum(r["cpu_percent"] for r in per_rank)
        row["rss_mb_per_rank"] = max(r["rss_mb"] for r in per_rank)
        row["rss_mb_total"] = sum(r["rss_mb"] for r in per_rank)
        row["os_threads_per_rank"] = max(r["threads"] for r in per_rank)
    return row


def aggregate(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median of each figure per (world size, comm), the samples/s range, and speedup against world size 1."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for row in raw:
        groups[(row["world_size"], row["comm"])].append(row)
    table = []
    for (world, comm), rows in sorted(groups.items()):
        out: dict[str, Any] = {"world_size": world, "comm": comm, "runs": len(rows)}
        for key in rows[0]:
            if key not in out and isinstance(rows[0][key], int | float):
                out[key] = median_spread([r[key] for r in rows])[0]
        _, low, high = median_spread([r["samples_per_second"] for r in rows])
        out["samples_per_second_range"] = f"{low:,.0f}-{high:,.0f}"
        table.append(out)
    base = [r["samples_per_second"] for r in table if r["world_size"] == 1]
    for row in table:
        if base:
            row["speedup"] = row["samples_per_second"] / base[0]
            row["efficiency"] = row["speedup"] / row["world_size"]
    return table


def plot(table: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Throughput against world size, and the per-step time split; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    base = next((r for r in table if r["world_size"] == 1), None)
    for comm in sorted({r["comm"] for r in table if r["world_size"] > 1}):
        rows = ([base] if base else []) + [r for r in table if r["comm"] == comm and r["world_size"] > 1]
        left.plot([r["world_size"] for r in rows], [r["samples_per_second"] for r in rows], marker="o", label=comm)
    worlds = sorted({r["world_size"] for r in table})
    if base:
        # Not a linear-speedup line: world size 1 already runs intra-op threads on every usable CPU,
        # so on this machine more processes can only redistribute the same cores.
        left.axhline(
            base["samples_per_second"], ls=":", c="grey", label=f"world size 1 ({base['threads_per_rank']:.0f} threads)"
        )
    left.set(xlabel="processes (world size)", ylabel="samples/s", title="throughput", xscale="log", ylim=(0, None))
    left.set_xticks(worlds, labels=[str(w) for w in worlds])
    left.minorticks_off()
    left.legend()
    labels = [f"{r['world_size']}\n{r['comm']}" for r in table]
    bottom = [0.0] * len(table)
    for key, colour in (("data_ms", "tab:green"), ("compute_ms", "tab:blue"), ("sync_ms_per_batch", "tab:red")):
        values = [r[key] for r in table]
        right.bar(labels, values, bottom=bottom, label=key.replace("_per_batch", "").replace("_ms", ""), color=colour)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    right.set(ylabel="ms per step (per rank)", title="where a step's time goes")
    right.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    worlds = [int(w) for w in args.world_sizes.split(",")]
    comms = args.comm.split(",")
    out = results_dir("scaling", args.out)
    info = machine()
    write_json(out / "machine.json", info)
    raw: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for world in worlds:
            for comm in comms if world > 1 else comms[:1]:
                run_dir = out / "runs" / f"w{world}-{comm}-r{repeat}"
                row = run_once(world, comm, args.samples, run_dir, args.timeout)
                row["repeat"] = repeat
                raw.append(row)
                print(
                    f"world {world} {row['comm']:>5} run {repeat + 1}/{args.repeats}: "
                    f"{row['samples_per_second']:,.0f} samples/s, sync {row['sync_ms_per_batch']:.3f} ms/batch",
                    flush=True,
                )
                write_csv(out / "raw.csv", raw)
    table = aggregate(raw)
    write_csv(out / "scaling.csv", table)
    work = f"{args.samples:,} samples" if args.samples else f"one epoch ({EPOCH_SAMPLES:,} samples)"
    header = (
        f"Scaling, {work} per run, batch {BATCH} per rank, median of {args.repeats} run(s).\n"
        f"Machine: {machine_line(info)}\n\n"
    )
    text = header + markdown_table(table, COLUMNS) + "\n"
    plotted = plot(table, out / "scaling.png", f"trainer scaling, {work}; {info['cpu']}, {info['cpus_usable']} CPUs")
    publish(out, "scaling", text, "" if plotted else " (no plot: install the 'bench' extra for matplotlib)")


if __name__ == "__main__":
    main()
