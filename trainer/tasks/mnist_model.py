"""The workload: an MLP classifier, its optimiser, and a fingerprint of its weights."""

from __future__ import annotations

import hashlib
import itertools

import torch
from torch import nn

from trainer.core.config import TrainConfig

INPUT_SIZE, NUM_CLASSES = 28 * 28, 10


def build_model(cfg: TrainConfig) -> nn.Sequential:
    """784 -> hidden... -> 10 with ReLU, initialised from ``cfg.seed`` (identical on every rank)."""
    torch.manual_seed(cfg.seed)
    widths = (INPUT_SIZE, *cfg.hidden)
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(widths):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], NUM_CLASSES))
    return nn.Sequential(*layers)


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    # Fused: one pass over all parameters per step instead of a few small ops per parameter, a
    # large share of so small a model's step on CPU (measured in docs/performance.md).
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, fused=True)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def params_sha256(model: nn.Module) -> str:
    """SHA-256 over every parameter's bytes in name order: equal hashes mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()
