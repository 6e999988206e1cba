"""Elastic data-parallel training with PyTorch, launched by torchrun: bring a task, get the rest.

The public interface: ``Task`` and what it returns (``Splits``, ``TensorSplit``, ``DatasetSplit``,
``option`` for a task's own options), ``fit`` to train a task from a script, and ``TrainConfig``,
the engine's options. docs/tasks.md describes them with a complete example.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from trainer.core.collector import collector_paused

if TYPE_CHECKING:
    from trainer.core.config import TrainConfig
    from trainer.core.task import Batch, DatasetSplit, NoOptions, Split, Splits, StepResult, Task, TensorSplit, option

# Where each public name lives. Each is imported on first use (PEP 562): ``import trainer`` alone
# imports no torch, and ``python -m trainer`` makes all its imports in its own start
# (trainer/__main__.py, trainer/core/collector.py).
_HOMES = {"TrainConfig": "trainer.core.config"}
_HOMES |= dict.fromkeys(
    ("Batch", "DatasetSplit", "NoOptions", "Split", "Splits", "StepResult", "Task", "TensorSplit", "option"),
    "trainer.core.task",
)

__all__ = [
    "Batch",
    "DatasetSplit",
    "NoOptions",
    "Split",
    "Splits",
    "StepResult",
    "Task",
    "TensorSplit",
    "TrainConfig",
    "fit",
    "option",
]


def fit(task: Task, argv: list[str] | None = None) -> dict | None:
    """Train ``task``: ``trainer.cli.fit`` (imported here on call, so ``import trainer`` stays light)."""
    from trainer.cli import fit as run_fit

    return run_fit(task, argv)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    with collector_paused():  # importing torch: trainer/core/collector.py says why
        value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
