"""Where training stands, besides the model, the optimiser and the RNGs: what a resume continues from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    """Where training stands: everything besides model, optimiser and RNGs that a resume needs.

    Every field is global (the same on all ranks), so any rank's copy can continue the run at any
    world size.
    """

    epoch: int = 0  # zero-based epoch in progress
    consumed: int = 0  # global samples of that epoch already trained on
    global_step: int = 0
    # Sums over the epoch's steps of the batch loss and of each of the task's metrics, each averaged
    # over the ranks (as the batches were trained on, the model changing meanwhile).
    epoch_sums: list[float] = field(default_factory=list)
    epoch_steps: int = 0
    epoch_seconds: float = 0.0  # training time spent in the epoch so far
    train_seconds: float = 0.0  # training time of the whole run (evaluation excluded)
    samples_trained: int = 0  # global samples trained on in the whole run
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics row per epoch
    skipped_steps: int = 0  # steps whose update --on-nonfinite skip dropped (non-finite loss or gradient)
