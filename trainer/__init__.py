"""Elastic data-parallel training with PyTorch, launched by torchrun: bring a task, get the rest.

The public interface: ``Task`` and what it returns (``Splits``, ``TensorSplit``, ``DatasetSplit``,
``option`` for a task's own options), ``fit`` to train a task from a script, and ``TrainConfig``,
the engine's options. docs/tasks.md describes them with a complete example.
"""

from trainer.core.collector import collector_paused

with collector_paused():  # importing torch: trainer/core/collector.py says why
    from trainer.core.config import TrainConfig
    from trainer.core.task import Batch, DatasetSplit, NoOptions, Split, Splits, StepResult, Task, TensorSplit, option

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
