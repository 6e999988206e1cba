"""Entry point: read the environment once, build, train, tear down on every exit path."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from trainer.config import TrainConfig, parse_config
from trainer.data import download_mnist, load_mnist
from trainer.distributed import (
    DistEnv,
    barrier,
    configure_threads,
    destroy_process_group,
    init_process_group,
    read_dist_env,
    resolve_backend,
    resolve_device,
)
from trainer.errors import UsageError
from trainer.fileio import write_json
from trainer.logs import setup_logging
from trainer.loop import Trainer
from trainer.rundir import check_run_dir, prepare_run_dir

log = logging.getLogger("trainer")


def agree_to_start(reason: str | None, device: torch.device) -> None:
    """Every rank stops if any rank found a reason to; no rank is left waiting in a collective."""
    refused = reason is not None
    if dist.is_initialized():
        flag = torch.tensor([float(refused)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        refused = bool(flag.item())
    if refused:
        raise UsageError(reason or "another rank refused to start; see rank 0's error")


def run(cfg: TrainConfig, dist_env: DistEnv, device: torch.device) -> dict:
    """Train on an initialised process group (or none at world size 1)."""
    run_dir = Path(cfg.run_dir)
    agree_to_start(check_run_dir(run_dir, cfg.overwrite), device)
    if cfg.download and dist_env.local_rank == 0:
        download_mnist(cfg.data_dir or "")
    barrier()  # the download is complete before any rank reads it
    data = load_mnist(cfg.data_dir)  # bad data fails here, before the run directory is touched
    if dist_env.is_main:
        prepare_run_dir(run_dir, cfg.overwrite)
        write_json(run_dir / "config.json", cfg.to_dict())
    barrier()  # the run directory exists before any rank writes into it
    return Trainer(cfg, dist_env, device, data).train()


@record
def main(argv: Sequence[str] | None = None) -> None:
    """``trainer`` / ``python -m trainer``; bad input exits 2 with a one-line message."""
    try:
        cfg = parse_config(argv)
        dist_env = read_dist_env()
        setup_logging(dist_env.rank, cfg.log_all_ranks)
        threads, source = configure_threads(dist_env)
        device = resolve_device(cfg.device, dist_env)
        backend = resolve_backend(cfg.backend, device)
        log.info("config:\n%s", cfg.to_json())
        log.info(
            "rank %d of %d (local %d of %d), device %s, backend %s, %d threads (%s)",
            dist_env.rank,
            dist_env.world_size,
            dist_env.local_rank,
            dist_env.local_world_size,
            device,
            backend if dist_env.distributed else "none (one process)",
            threads,
            source,
        )
        init_process_group(dist_env, backend, device, cfg.timeout)
        try:
            run(cfg, dist_env, device)
        finally:
            destroy_process_group()
    except UsageError as exc:
        print(f"trainer: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
