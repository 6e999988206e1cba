"""Plain torch DDP with the data in memory: what a competent engineer writes without this package.

    torchrun --standalone --nproc_per_node=2 -m benchmarks.ddp_peer --out result.json

The same model, initial weights, optimiser (torch's default SGD implementation, not fused),
learning rate, split and per-rank batch as the trainer; the training split decoded once into
one float tensor per process; one intra-op thread per process (what torchrun sets for more than
one process); DDP over gloo with its defaults; each rank takes its slice of a per-epoch
permutation. No data loader, no transforms, no checkpoints, no timing inside the step. Rank 0
writes the epoch's training time and the test accuracy to ``--out``, in the baseline's format.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from trainer.core.config import TrainConfig
from trainer.tasks.mnist_mlp import default_data, default_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, default=None, help="Stop the epoch after this many steps.")
    args = parser.parse_args(argv)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    cfg = TrainConfig()
    data = default_data(cfg.seed, torch.device("cpu"))
    model = DistributedDataParallel(default_model(cfg.seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    order = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(cfg.seed))
    steps = len(order) // (cfg.batch_size * world)
    if args.max_steps is not None:
        steps = min(steps, args.max_steps)

    dist.barrier()
    started = time.perf_counter()
    for step in range(steps):
        begin = (step * world + rank) * cfg.batch_size
        rows = order[begin : begin + cfg.batch_size]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(data.train_x[rows]), data.train_y[rows])
        loss.backward()
        optimizer.step()
    dist.barrier()
    train_seconds = time.perf_counter() - started

    with torch.no_grad():
        correct = (model.module(data.test_x).argmax(dim=1) == data.test_y).float().mean().item()
    if rank == 0:
        result = {
            "train_seconds": train_seconds,
            "samples_per_second": steps * cfg.batch_size * world / train_seconds,
            "test_accuracy": correct,
            "threads_per_rank": torch.get_num_threads(),
            "steps": steps,
        }
        with open(args.out, "w") as handle:
            json.dump(result, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
