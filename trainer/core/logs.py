"""Logging setup: timestamp, rank and level on every line; INFO from rank 0 unless asked."""

from __future__ import annotations

import logging
import sys


def setup_logging(rank: int, all_ranks: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger("trainer")
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(logging.INFO if rank == 0 or all_ranks else logging.WARNING)
