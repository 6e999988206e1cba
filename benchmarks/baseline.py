"""The textbook DDP recipe for the same work, as the reference the trainer is compared with.

    torchrun --standalone --nproc_per_node=2 -m benchmarks.baseline --data-dir /tmp/mnist --out result.json

What the tutorials write: torchvision's MNIST dataset with ``ToTensor`` + ``Normalize``, a
``DistributedSampler``, a ``DataLoader`` at batch 32 (default workers), DDP over gloo, the
threads torchrun leaves (``OMP_NUM_THREADS=1`` for more than one process). Model, initial
weights, optimiser, learning rate, train/validation split and the per-rank batch are the
trainer's, so the work is the same: one epoch over the 48,000 training images.

``--data-dir`` needs ``DIR/MNIST/raw`` with the four uncompressed files; ``prepare_data``
writes them from the copy shipped with the package (``benchmarks.compare`` calls it).
Rank 0 writes the epoch's time and the test accuracy to ``--out``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from importlib import resources
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler
from torchvision import datasets, transforms

from trainer.core.config import TrainConfig
from trainer.core.optim import build_optimizer
from trainer.engine.sampling import split_indices
from trainer.tasks.mnist_data import FILES, MEAN, STD
from trainer.tasks.mnist_mlp import MnistOptions, default_model


def prepare_data(data_dir: Path) -> None:
    """Uncompressed MNIST in torchvision's layout, from the package's own files (no download)."""
    raw = data_dir / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    source = Path(str(resources.files("trainer.tasks") / "mnist"))
    for stem in FILES.values():
        target = raw / stem
        if not target.exists():
            target.write_bytes(gzip.decompress((source / f"{stem}.gz").read_bytes()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, default=None, help="Stop the epoch after this many steps.")
    args = parser.parse_args(argv)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = TrainConfig()
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])
    full = datasets.MNIST(args.data_dir, train=True, transform=transform)
    train_idx, _ = split_indices(len(full), MnistOptions.val_fraction, cfg.seed)
    train = Subset(full, train_idx.tolist())
    test = datasets.MNIST(args.data_dir, train=False, transform=transform)
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(train, batch_size=cfg.batch_size, sampler=sampler)
    model = default_model(cfg.seed)
    ddp = DistributedDataParallel(model)
    optimizer = build_optimizer(cfg, model)

    sampler.set_epoch(0)
    dist.barrier()
    started = time.perf_counter()
    steps = 0
    for images, labels in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(ddp(images.view(images.size(0), -1)), labels)
        loss.backward()
        optimizer.step()
        steps += 1
        if args.max_steps is not None and steps >= args.max_steps:
            break
    epoch_seconds = time.perf_counter() - started

    correct = 0
    model.eval()
    with torch.no_grad():
        for images, labels in DataLoader(test, batch_size=1000):
            correct += int((model(images.view(images.size(0), -1)).argmax(1) == labels).sum())
    dist.barrier()
    if rank == 0:
        result = {
            "world_size": world,
            "steps": steps,
            "samples": steps * cfg.batch_size * world,
            "train_seconds": epoch_seconds,
            "samples_per_second": steps * cfg.batch_size * world / epoch_seconds,
            "test_accuracy": correct / len(test),
            "threads_per_rank": torch.get_num_threads(),
        }
        Path(args.out).write_text(json.dumps(result, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
