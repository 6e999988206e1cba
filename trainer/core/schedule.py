"""The learning-rate schedule: the rate of each step as a pure function of the run's global step.

Nothing but the step count decides it, and the step count is in every checkpoint, so a resumed or
resized run continues the schedule exactly where it stood. The schedule scales each parameter
group's own rate (``--lr`` for the default optimiser) by ``lr_factor``:

- ``constant``: the rate after the warm-up, unchanged.
- ``cosine`` (nanoGPT's): after the warm-up, a half cosine from ``--lr`` down to ``--min-lr`` at step
  ``--lr-decay-steps``, then ``--min-lr``.
- ``wsd`` (warm-up, stable, decay): after the warm-up, ``--lr`` until the last ``WSD_DECAY_FRACTION``
  of ``--lr-decay-steps``, then a straight line down to ``--min-lr`` at step ``--lr-decay-steps``.

The warm-up (``--warmup-steps``, any schedule) rises linearly: step ``s`` (counted from 0) of it
runs at ``lr * (s + 1) / (warmup_steps + 1)``, as nanoGPT's ``get_lr``.
"""

from __future__ import annotations

import math

from trainer.core.config import TrainConfig

WSD_DECAY_FRACTION = 0.2


def scheduled(cfg: TrainConfig) -> bool:
    """Whether the rate ever differs from ``--lr`` (else the trainer leaves the optimiser's rate alone)."""
    return cfg.lr_schedule != "constant" or cfg.warmup_steps > 0


def min_lr(cfg: TrainConfig) -> float:
    """``--min-lr``, by default a tenth of ``--lr`` (nanoGPT's choice)."""
    return cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr


def lr_at(cfg: TrainConfig, step: int) -> float:
    """The learning rate of the step that follows ``step`` completed steps."""
    lr, floor = cfg.lr, min_lr(cfg)
    if step < cfg.warmup_steps:
        return lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.lr_schedule == "constant":
        return lr
    decay_end = cfg.decay_steps
    if step >= decay_end:
        return floor
    if cfg.lr_schedule == "cosine":
        ratio = (step - cfg.warmup_steps) / (decay_end - cfg.warmup_steps)
        return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - floor)
    decay_start = max(cfg.warmup_steps, decay_end - round(WSD_DECAY_FRACTION * decay_end))
    if step < decay_start:
        return lr
    return lr + (floor - lr) * (step - decay_start) / (decay_end - decay_start)


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """``lr_at`` as a multiple of ``--lr``, to scale every parameter group's own rate."""
    return lr_at(cfg, step) / cfg.lr


def describe(cfg: TrainConfig) -> str:
    """One line for the log."""
    warmup = f"linear warm-up over {cfg.warmup_steps} steps, then " if cfg.warmup_steps else ""
    if cfg.lr_schedule == "constant":
        return f"learning rate: {warmup}constant {cfg.lr:g}"
    shape = "cosine" if cfg.lr_schedule == "cosine" else f"constant, then linear over the last {WSD_DECAY_FRACTION:.0%}"
    return f"learning rate: {warmup}{shape} from {cfg.lr:g} to {min_lr(cfg):g} at step {cfg.decay_steps}"
