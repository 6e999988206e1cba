"""What the non-finite guard (trainer/lifecycle/guard.py) costs per step, at world size 1.

    python -m benchmarks.guard            # 1,500 steps of each kind, interleaved
    python -m benchmarks.guard --quick

One process alternates a plain step (forward, loss, ``zero_grad``, backward, optimiser step) and
a guarded one (the loss's and the gradients' finiteness read before the optimiser step, as the
trainer does at world size 1), so both see the same machine load; it also times the check alone.
The default model (784-512-256-10) and batch (32), one thread.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import machine, machine_line, markdown_table, publish, results_dir, write_csv, write_json
from trainer.core.config import TrainConfig
from trainer.core.optim import build_optimizer
from trainer.lifecycle.guard import grads_finite
from trainer.tasks.mnist_mlp import INPUT_SIZE, NUM_CLASSES, default_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500, help="Steps of each kind.")
    parser.add_argument("--threads", type=int, default=1, help="Intra-op threads.")
    parser.add_argument("--quick", action="store_true", help="100 steps of each kind (CI).")
    parser.add_argument("--out", default=None, help="Results folder.")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = 100
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = results_dir("guard", args.out)
    info = machine()
    write_json(out / "machine.json", info)
    cfg = TrainConfig()
    model = default_model(cfg.seed)
    optimizer = build_optimizer(cfg, model)
    inputs = torch.randn(cfg.batch_size, INPUT_SIZE)
    targets = torch.randint(0, NUM_CLASSES, (cfg.batch_size,))

    def plain() -> None:
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def guarded() -> None:
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grads_finite(model.parameters(), loss):
            optimizer.step()

    def check() -> None:
        grads_finite(model.parameters())

    loops: dict[str, Callable[[], None]] = {"plain step": plain, "guarded step": guarded, "check alone": check}
    for _ in range(50):  # warm-up: allocator, momentum buffers
        plain()
        guarded()
    samples: dict[str, list[float]] = {name: [] for name in loops}
    for index in range(args.steps):
        order = list(loops) if index % 2 else [*reversed(list(loops))]
        for name in order:
            started = time.perf_counter()
            loops[name]()
            samples[name].append((time.perf_counter() - started) * 1e3)
    base = statistics.median(samples["plain step"])
    rows = []
    for name, values in samples.items():
        q1, median, q3 = statistics.quantiles(values, n=4)
        rows.append({"kind": name, "ms_median": median, "q1": q1, "q3": q3, "vs_plain": median / base})
    write_csv(out / "raw.csv", [{"kind": k, "ms": v} for k, values in samples.items() for v in values])
    write_csv(out / "guard.csv", rows)
    columns = (("kind", "kind"), ("ms_median", "ms (median)"), ("q1", "q1"), ("q3", "q3"), ("vs_plain", "x plain"))
    text = (
        f"Non-finite guard at world size 1: {args.steps} steps of each kind, interleaved, {args.threads} threads.\n"
        f"Machine: {machine_line(info)}\n\n" + markdown_table(rows, columns) + "\n"
    )
    publish(out, "guard", text)


if __name__ == "__main__":
    main()
