"""What the trainer costs around the arithmetic, at world size 1.

    python -m benchmarks.overhead            # one epoch (1,500 steps) per measurement, 5 rounds
    python -m benchmarks.overhead --quick

Three loops over the same batches of the same tensors, interleaved round by round:

- ``floor``: forward, loss, ``zero_grad``, backward, optimiser step on batches gathered
  beforehand, nothing else;
- ``train_step``: the trainer's step (gathers its batch, times itself);
- ``run_epoch``: the trainer's whole epoch loop (plan, step, loss accumulation, step logs,
  progress bar, the psutil sampler thread running).

The target is ``run_epoch`` within 1.3x of ``floor``. Threads are set as the trainer sets them
(the usable CPUs at world size 1) unless ``--threads`` says otherwise.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

from benchmarks.common import (
    machine,
    machine_line,
    markdown_table,
    median_spread,
    publish,
    results_dir,
    write_csv,
    write_json,
)
from trainer.core.config import TrainConfig
from trainer.distributed.env import DistEnv, configure_threads
from trainer.engine.loop import Trainer
from trainer.engine.sampling import EpochPlan, epoch_permutation
from trainer.tasks.mnist_mlp import MnistMLP, default_data, splits_of
from trainer.watch.metrics import StepTimes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="Interleaved rounds of the three loops.")
    parser.add_argument("--steps", type=int, default=None, help="Steps per loop (default one epoch).")
    parser.add_argument("--threads", type=int, default=None, help="Intra-op threads (default: as the trainer).")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 100 steps (CI).")
    parser.add_argument("--out", default=None, help="Results folder.")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 2, args.steps or 100
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        configure_threads(DistEnv())
    out = results_dir("overhead", args.out)
    info = machine()
    write_json(out / "machine.json", info)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = TrainConfig(run_dir=run_dir, log_every=100)
        cpu = torch.device("cpu")
        data = default_data(cfg.seed, cpu)
        trainer = Trainer(cfg, DistEnv(), cpu, MnistMLP(), splits_of(data))
        plan = EpochPlan(epoch_permutation(len(data.train_x), cfg.seed, 0), 0, cfg.batch_size, 1, 0)
        positions = list(plan.batches())[: args.steps]
        steps = len(positions)
        batches = [(data.train_x[p], data.train_y[p]) for p in positions]
        model, optimizer = trainer.model, trainer.optimizer

        def floor() -> None:
            for inputs, targets in batches:
                loss = F.cross_entropy(model(inputs), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        def train_step() -> None:
            times = StepTimes()
            for p in positions:
                trainer.train_step(p, times)

        def run_epoch() -> None:
            trainer.state.consumed = len(data.train_x) - steps * cfg.batch_size  # exactly `steps` left
            trainer.run_epoch()

        loops = {"floor": floor, "train_step": train_step, "run_epoch": run_epoch}
        trainer.progress.start(None, trainer.state)
        try:
            floor()  # warm-up: allocator, caches, momentum buffers
            samples: dict[str, list[float]] = {name: [] for name in loops}
            raw = []
            for round_index in range(args.rounds):
                for name, loop in loops.items():
                    started = time.perf_counter()
                    loop()
                    ms = (time.perf_counter() - started) * 1e3 / steps
                    samples[name].append(ms)
                    raw.append({"round": round_index, "loop": name, "ms_per_step": ms})
        finally:
            trainer.progress.stop()
            trainer.progress.rank_log.close()
    base = median_spread(samples["floor"])[0]
    rows = []
    for name, values in samples.items():
        median, low, high = median_spread(values)
        rows.append({"loop": name, "ms_per_step": median, "min": low, "max": high, "vs_floor": median / base})
    write_csv(out / "raw.csv", raw)
    write_csv(out / "overhead.csv", rows)
    columns = (
        ("loop", "loop"),
        ("ms_per_step", "ms/step (median)"),
        ("min", "min"),
        ("max", "max"),
        ("vs_floor", "x floor"),
    )
    text = (
        f"Trainer overhead at world size 1: {steps} steps per loop, {args.rounds} rounds, "
        f"{torch.get_num_threads()} threads.\nMachine: {machine_line(info)}\n\n" + markdown_table(rows, columns) + "\n"
    )
    publish(out, "overhead", text)


if __name__ == "__main__":
    main()
