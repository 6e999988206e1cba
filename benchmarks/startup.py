"""What a rank's start costs as the package ships it, without its start-up collector pause, and
without its decoded copy of MNIST.

    python -m benchmarks.startup            # 8 interleaved rounds
    python -m benchmarks.startup --quick    # 1 round (CI)

Each round starts, for each variant, a one-step MNIST run in a fresh run directory: one plain
process (world size 1), then a two-rank ``torchrun`` job (world size 2, agent included). CPU
seconds are the children's user and system time, wall seconds the time to exit. The variants:

- ``as shipped``: no cyclic collection while it imports torch and torch's compiler stack, then
  those objects frozen (``trainer/core/collector.py``); MNIST read from the decoded copy a first
  start keeps (``trainer/tasks/gunzip_cache.py``; made before the first round, untimed);
- ``collector on``: the same, with ``gc.disable`` and ``gc.freeze`` made no-ops (through a
  ``sitecustomize`` on the children's ``PYTHONPATH``), as Python runs it by default;
- ``MNIST decoded each start``: the same as shipped, with ``TRAINER_CACHE_DIR`` naming a file,
  where no copy can be kept, so every start inflates the gzip files.

Almost all of a one-step run is its start, so this is the price of each rank start and restart.
"""

from __future__ import annotations

import argparse
import resource
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

VARIANTS = ("as shipped", "collector on", "MNIST decoded each start")
NEUTRALISED = "import gc\ngc.disable = gc.freeze = lambda: None  # benchmarks/startup.py: the collector stays on\n"
ARGS = ("--max-steps", "1", "--log-every", "1")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """CPU seconds (all the command's processes, as they are waited for) and wall seconds."""
    cpu, started = children_cpu(), time.perf_counter()
    run_checked(cmd, env, timeout=300)
    return children_cpu() - cpu, time.perf_counter() - started


def command(world_size: int, run_dir: Path) -> list[str]:
    args = [*ARGS, "--run-dir", str(run_dir)]
    if world_size == 1:
        return [sys.executable, "-m", "trainer", *args]
    return torchrun_command(world_size, "trainer", args)


def summarize(raw: list[dict[str, Any]], worlds: list[int]) -> list[dict[str, Any]]:
    rows = []
    for world_size in worlds:
        shipped_cpu = median_spread(
            [r["cpu_s"] for r in raw if (r["world_size"], r["variant"]) == (world_size, VARIANTS[0])]
        )[0]
        for variant in VARIANTS:
            mine = [r for r in raw if r["world_size"] == world_size and r["variant"] == variant]
            cpu, cpu_min, cpu_max = median_spread([r["cpu_s"] for r in mine])
            wall, _, _ = median_spread([r["wall_s"] for r in mine])
            rows.append(
                {
                    "world_size": world_size,
                    "variant": variant,
                    "cpu_s": cpu,
                    "cpu_s_min": cpu_min,
                    "cpu_s_max": cpu_max,
                    "wall_s": wall,
                    "cpu_vs_shipped": cpu / shipped_cpu,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8, help="Interleaved rounds.")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2], choices=[1, 2], help="World sizes.")
    parser.add_argument("--quick", action="store_true", help="1 round (CI).")
    parser.add_argument("--out", default=None, help="Results folder.")
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    out = results_dir("startup", args.out)
    info = machine()
    write_json(out / "machine.json", info)

    raw: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="startup-") as scratch:
        neutral = Path(scratch) / "collector-on"
        neutral.mkdir()
        (neutral / "sitecustomize.py").write_text(NEUTRALISED)
        cache, no_cache = Path(scratch) / "cache", Path(scratch) / "not-a-folder"
        no_cache.write_text("TRAINER_CACHE_DIR names this file: no decoded copy can be kept\n")
        envs = {variant: child_env(TRAINER_CACHE_DIR=str(cache)) for variant in VARIANTS}
        envs["collector on"]["PYTHONPATH"] = f"{neutral}:{envs['collector on']['PYTHONPATH']}"
        envs["MNIST decoded each start"]["TRAINER_CACHE_DIR"] = str(no_cache)
        warm = "from trainer.tasks.mnist_data import load_mnist; load_mnist(None)"
        run_checked([sys.executable, "-c", warm], envs["as shipped"], timeout=300)
        for round_index in range(rounds):
            for world_size in args.worlds:
                for variant in VARIANTS:
                    run_dir = Path(scratch) / f"run-{round_index}-{world_size}-{variant.replace(' ', '-')}"
                    cpu, wall = timed(command(world_size, run_dir), envs[variant])
                    row = {"round": round_index, "world_size": world_size, "variant": variant}
                    raw.append({**row, "cpu_s": cpu, "wall_s": wall})
    write_csv(out / "raw.csv", raw)
    rows = summarize(raw, args.worlds)
    write_csv(out / "startup.csv", rows)
    write_json(out / "startup.json", {"machine": info, "rounds": rounds, "rows": rows})
    columns = [
        ("world_size", "world"),
        ("variant", "start-up"),
        ("cpu_s", "CPU s (median)"),
        ("cpu_s_min", "min"),
        ("cpu_s_max", "max"),
        ("wall_s", "wall s"),
        ("cpu_vs_shipped", "CPU vs as shipped"),
    ]
    text = f"{machine_line(info)}\n\nA one-step run, {rounds} interleaved rounds:\n\n{markdown_table(rows, columns)}\n"
    publish(out, "startup", text)


if __name__ == "__main__":
    main()
