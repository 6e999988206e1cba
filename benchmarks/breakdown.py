"""Where a training step's time goes: the bare step, then the trainer's parts added one at a time.

    python -m benchmarks.breakdown                 # world sizes 1 and 2, 400 steps a variant, 5 rounds
    python -m benchmarks.breakdown --quick         # 40 steps, 1 round

Every rank runs the variants below in the same process, interleaved round by round and in step
with its peer (a barrier before each), on the same batches, so their differences are what each
part costs, measured side by side:

- ``bare step``: gather a batch, forward, cross-entropy, backward, fused SGD, on a model with no
  hooks: the floor of ``benchmarks.floor``, in the trainer's process.
- ``+ guard, accuracy``: the bare step plus what ``Trainer.eager_step`` adds besides the sync:
  the guard's read of every gradient and the loss (as at world size 1), the count of right
  predictions, the (loss, correct) pair, and the step's clock readings.
- ``+ gradient sync``: the same on the trainer's model, whose backward pass ends with the
  gradient sync ``--comm auto`` chose (world size 2 and up), with the guard as the trainer
  runs it there (under shm the sync's own verdict replaces the read of every gradient), and
  with its update (``Trainer.update``: under shm each rank steps its chunk of the shared weights).
- ``train_step``: ``Trainer.train_step`` itself.
- ``train loop``: ``train_step`` plus the loop's per-step book-keeping (``Progress.step_done``,
  the window's running sums), with the run's background threads (psutil sampler, hang watch)
  running.

And parts timed alone, each rank in step with its peer:

- ``sync alone``: the gradient sync with nothing else running (under the shared step its
  phases 1 and 2: the chunk's average and the verdict, without the update).
- ``grads read``: the guard's read of every gradient (``grads_finite``).
- ``gradient copy``: one copy of the gradients (2.1 MB) from one private buffer to another.

Reported: ms per step (median over rounds, mean over ranks) of each, the difference from the
line before, the machine and the load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
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

CUMULATIVE = ("bare step", "+ guard, accuracy", "+ gradient sync", "train_step", "train loop")
ALONE = ("sync alone", "grads read", "gradient copy")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="Timed steps per variant and round.")
    parser.add_argument("--rounds", type=int, default=5, help="Interleaved rounds.")
    parser.add_argument("--world-sizes", default="1,2", help="Comma-separated world sizes.")
    parser.add_argument("--quick", action="store_true", help="40 steps, 1 round.")
    parser.add_argument("--out", default=None, help="Results folder.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # the result file of a worker job
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.rounds = 40, 1
    return args


def worker(result_path: Path, steps: int, rounds: int, run_dir: Path) -> None:
    """One rank of the job: time every variant, write this rank's figures to ``result_path``-rank<r>.json.
    ``run_dir``: where the Trainer it wraps keeps its files."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from trainer.core.config import TrainConfig
    from trainer.core.optim import build_optimizer
    from trainer.distributed.env import configure_threads, read_dist_env
    from trainer.engine.loop import Trainer
    from trainer.lifecycle.guard import grads_finite
    from trainer.tasks.mnist_mlp import MnistMLP, default_data, default_model, splits_of
    from trainer.watch.metrics import StepTimes

    env = read_dist_env()
    configure_threads(env)
    if env.distributed:
        dist.init_process_group("gloo")
    device = torch.device("cpu")
    cfg = TrainConfig(run_dir=str(run_dir))
    data = default_data(cfg.seed, device)
    trainer = Trainer(cfg, env, device, MnistMLP(), splits_of(data))
    bare_model = default_model(cfg.seed)
    bare_optimizer = build_optimizer(cfg, bare_model)
    generator = torch.Generator().manual_seed(env.rank)
    batch = trainer.batch_size
    warmup = max(5, steps // 10)
    positions = torch.randint(0, len(data.train_x), (warmup + steps, batch), generator=generator)
    sums = torch.zeros(2, dtype=torch.float64)

    def plain(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rows: torch.Tensor, extras: bool) -> None:
        """The bare step; with ``extras``, what ``Trainer.eager_step`` adds, its guard as on ``model``
        (the gradient read at world size 1; under shm the sync's verdict; else the poison and the read)."""
        nonlocal sums
        if not extras:
            loss = F.cross_entropy(model(data.train_x[rows]), data.train_y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return
        started = time.perf_counter()
        inputs, targets = data.train_x[rows], data.train_y[rows]
        loaded = time.perf_counter()
        logits = model(inputs)
        loss = F.cross_entropy(logits, targets)
        correct = (logits.detach().argmax(dim=1) == targets).sum()
        optimizer.zero_grad(set_to_none=True)
        if model is bare_model:  # the world-size-1 guard
            loss.backward()
            if grads_finite(model.parameters(), loss):
                optimizer.step()
        else:  # the trainer's own guard for its sync, and its update (shared between ranks, or not)
            trainer.backward(loss)
            if trainer.step_is_finite(loss):
                trainer.update()
        finished = time.perf_counter()
        StepTimes().add((loaded - started) * 1e3, (finished - loaded) * 1e3, 0.0)
        sums += torch.stack((loss.detach().double(), correct.double()))

    def loop_step(rows: torch.Tensor) -> None:
        nonlocal sums
        sums += trainer.train_step(rows, window)
        trainer.state.global_step += 1
        trainer.progress.step_done(trainer.state, rows)

    window = StepTimes()
    flat = torch.zeros(sum(p.numel() for p in trainer.model.parameters()))
    copy_target = torch.zeros_like(flat)
    variants: dict[str, Callable[[torch.Tensor], None]] = {
        "bare step": lambda rows: plain(bare_model, bare_optimizer, rows, extras=False),
        "+ guard, accuracy": lambda rows: plain(bare_model, bare_optimizer, rows, extras=True),
        "train_step": lambda rows: trainer.train_step(rows, window),
        "train loop": loop_step,
        "grads read": lambda rows: grads_finite(trainer.model.parameters()),
        "gradient copy": lambda rows: copy_target.copy_(flat),
    }
    if env.distributed:
        sync = trainer.comm.shm_sync if trainer.comm is not None else None
        variants["+ gradient sync"] = lambda rows: plain(trainer.model, trainer.optimizer, rows, extras=True)
        # The option's own sync with nothing else running: shm's private call, else an all-reduce of
        # the gradients' size (the DDP options sync inside backward and cannot be called alone).
        variants["sync alone"] = (
            (lambda rows: sync._sync()) if sync is not None else (lambda rows: dist.all_reduce(flat))
        )
    trainer.progress.start(None, trainer.state)  # the run's background threads, as in a real run
    figures: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, step in variants.items():
            for index in range(warmup):
                step(positions[index])
            if env.distributed:
                dist.barrier()
            started = time.perf_counter()
            for index in range(warmup, warmup + steps):
                step(positions[index])
            figures[name].append((time.perf_counter() - started) * 1e3 / steps)
    trainer.progress.stop()
    Path(f"{result_path}-rank{env.rank}.json").write_text(json.dumps(figures))
    if env.distributed:
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        with tempfile.TemporaryDirectory(prefix="breakdown-") as run_dir:
            worker(Path(args.worker), args.steps, args.rounds, Path(run_dir))
        return
    out = results_dir("breakdown", args.out)
    info = machine()
    write_json(out / "machine.json", info)
    raw: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for world in (int(w) for w in args.world_sizes.split(",")):
        result = out / f"ws{world}"
        worker_args = ["--worker", str(result), "--steps", str(args.steps), "--rounds", str(args.rounds)]
        env = child_env() if world > 1 else child_env(OMP_NUM_THREADS=str(len(os.sched_getaffinity(0))))
        run_checked(torchrun_command(world, "benchmarks.breakdown", worker_args), env, timeout=1800)
        ranks = [json.loads(Path(f"{result}-rank{r}.json").read_text()) for r in range(world)]
        previous = None
        for name in (*CUMULATIVE, *ALONE):
            if name not in ranks[0]:
                continue
            per_round = [statistics.mean(rank[name][i] for rank in ranks) for i in range(args.rounds)]
            raw += [{"world_size": world, "what": name, "round": i, "ms": ms} for i, ms in enumerate(per_round)]
            median, low, high = median_spread(per_round)
            row = {"world_size": world, "what": name, "ms": median, "range": f"{low:.3f}-{high:.3f}"}
            if name in CUMULATIVE:
                row["added_ms"] = median - previous if previous is not None else None
                previous = median
            rows.append(row)
    write_csv(out / "raw.csv", raw)
    write_json(out / "breakdown.json", {"rows": rows, "machine": info, "steps": args.steps, "rounds": args.rounds})
    text = (
        f"Where a step's time goes: {args.steps} steps per variant, median of {args.rounds} interleaved "
        f"round(s), mean over ranks.\nMachine: {machine_line(info)}\n\n"
        + markdown_table(
            rows,
            (
                ("world_size", "world size"),
                ("what", "variant"),
                ("ms", "ms/step (median)"),
                ("range", "min-max"),
                ("added_ms", "added ms"),
            ),
        )
        + "\n"
    )
    publish(out, "breakdown", text)


if __name__ == "__main__":
    sys.exit(main())
