"""The default optimiser recipe of a task: ``--optimizer`` with ``--lr``, ``--momentum`` and ``--weight-decay``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from trainer.core.config import TrainConfig

# The hyper-parameters the command line sets; on resume they win over a checkpoint's.
COMMAND_LINE_HYPERPARAMETERS = ("lr", "momentum", "weight_decay")


def build_optimizer(cfg: TrainConfig, params: nn.Module | Iterable[Any]) -> torch.optim.Optimizer:
    """SGD (with momentum), Adam or AdamW over ``params`` (a model's parameters, tensors, or parameter
    groups as dicts).

    Fused: one pass over all parameters per step instead of a few small ops per parameter, a
    large share of a small model's step on CPU (measured in docs/performance.md).
    """
    if isinstance(params, nn.Module):
        params = params.parameters()
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True)


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each parameter group's settings (everything but its parameters), to put back after loading a checkpoint."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def reapply(optimizer: torch.optim.Optimizer, settings: list[dict[str, Any]]) -> list[str]:
    """Give the groups ``settings`` again (``optimizer.load_state_dict`` restores the checkpoint's);
    returns ``name: checkpoint -> now`` for each value that changed, for the log."""
    changed = []
    if len(settings) != len(optimizer.param_groups):
        return changed  # load_state_dict has already refused a different group layout
    for index, (group, wanted) in enumerate(zip(optimizer.param_groups, settings, strict=True)):
        for key, value in wanted.items():
            if key in group and group[key] != value and not isinstance(value, torch.Tensor):
                where = f"group {index} " if len(settings) > 1 else ""
                changed.append(f"{where}{key}: {group[key]!r} in the checkpoint, {value!r} now")
            group[key] = value
    return changed
