"""Every random number generator's state, as tensors and plain values that ``weights_only`` loading accepts."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng() -> dict[str, Any]:
    """Every RNG state as tensors and plain values, so ``weights_only`` loading accepts it."""
    version, py_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": numpy_rng_to_plain(np.random.get_state()),
        "python": {"version": version, "state": list(py_state), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng``."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(numpy_rng_from_plain(state["numpy"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def numpy_rng_to_plain(state: tuple[Any, ...]) -> dict[str, Any]:
    """A numpy ``get_state()`` tuple as a tensor and plain values (``weights_only`` refuses numpy arrays)."""
    kind, keys, pos, has_gauss, cached = state
    return {
        "kind": kind,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": pos,
        "has_gauss": has_gauss,
        "cached": cached,
    }


def numpy_rng_from_plain(plain: dict[str, Any]) -> tuple[Any, ...]:
    """Inverse of ``numpy_rng_to_plain``: a tuple for ``set_state``."""
    keys = plain["keys"].numpy().astype(np.uint32)
    return (plain["kind"], keys, plain["pos"], plain["has_gauss"], plain["cached"])


def seed_rank(seed: int, rank: int, step: int = 0) -> None:
    """Seed torch's, numpy's and Python's global generators for ``rank`` from (``seed``, ``rank``, ``step``).

    Each rank then draws its own dropout masks and augmentations, and the same run draws the same
    ones again; ``step`` gives a resumed run whose ranks' streams could not be restored fresh ones.
    """
    value = ((seed * 1_000_003 + rank) * 1_000_003 + step) % 2**63
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)
