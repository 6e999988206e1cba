"""A model built to break gradient syncs that hold for one MLP only, and the recipes the tests train it with.

``Adversarial`` has:

- an embedding whose weight is also the output layer's (one Parameter used twice, as GPTs tie them);
- a BatchNorm layer (running statistics: buffers that DDP re-broadcasts from rank 0);
- a frozen layer (``requires_grad=False``, held by the optimiser all the same);
- a layer no rank ever uses (its ``.grad`` must stay None and weight decay must not move it);
- a layer used by some ranks at some forward passes only (``(forward + rank) % 3 == 0``: at world
  size 2 one step has no rank using it, the others one rank);
- dropout, seeded per rank and forward pass, so that a run and its reference draw the same masks.

Every rank initialises it from its own seed, so set-up must give every rank rank 0's weights,
buffers and frozen weights. With ``storage_tie`` a second Parameter views the hidden layer's
weight storage (weights tied through one storage, which the shared step must not untie).

Recipes: (name, optimiser, clipping, micro-steps per step), with two parameter groups (weight
decay on the 2-D weights only). Used by ``tests/comm_worker.py adversarial`` and ``tests/test_comm.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, WIDTH, BATCH, TOKENS = 16, 16, 8, 4
STEPS = 4


class Adversarial(nn.Module):
    def __init__(self, seed: int, storage_tie: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.norm = nn.BatchNorm1d(WIDTH)
        self.frozen = nn.Linear(WIDTH, WIDTH)
        self.frozen.requires_grad_(False)
        self.hidden = nn.Linear(WIDTH, WIDTH)
        self.sometimes = nn.Linear(WIDTH, WIDTH)
        self.unused = nn.Linear(WIDTH, 3)
        self.drop = nn.Dropout(0.25)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied: one Parameter, two uses
        with torch.no_grad():  # buffers that differ by rank, so the set-up broadcast shows
            self.norm.running_mean.uniform_(-1, 1)
        self.alias: nn.Parameter | None = None
        if storage_tie:  # a second Parameter on the same storage
            self.alias = nn.Parameter(self.hidden.weight.data.view(-1)[:WIDTH])
        self.use_sometimes = False

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.embed(tokens).mean(1))
        x = self.frozen(x).relu()
        x = self.drop(self.hidden(x).relu())
        if self.alias is not None:
            x = x * self.alias
        if self.use_sometimes:
            x = x + self.sometimes(x)
        return self.head(x)


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Weight decay on 2-D weights only; the rest (biases, BatchNorm's affine, frozen ones) without."""
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.dim() >= 2]},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(param_groups(model), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model), lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)


def adam_fused_amsgrad(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(param_groups(model), lr=0.01, weight_decay=0.01, amsgrad=True, fused=True)


Recipe = tuple[str, Callable[[nn.Module], torch.optim.Optimizer], float | None, int]
RECIPES: list[Recipe] = [
    ("sgd", sgd, None, 1),
    ("adamw-clip-accumulate", adamw, 0.05, 2),  # 0.05 lies below the gradients' norm: every step clips
    ("adam-fused-amsgrad", adam_fused_amsgrad, None, 1),
]


def batch(rank: int, forward: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7000 + 100 * forward + rank)
    tokens = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=generator)
    return tokens, torch.randint(0, VOCAB, (BATCH,), generator=generator)


def train(
    model: Adversarial,
    forward: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    rank: int,
    clip: Callable[[float], torch.Tensor] | None,
    max_norm: float | None,
    micro_steps: int,
    no_sync: Callable[[], contextlib.AbstractContextManager],
    step: Callable[[], None],
) -> list[torch.Tensor]:
    """``STEPS`` optimiser steps of ``micro_steps`` forward and backward passes each, the ones before the
    last inside ``no_sync``; returns the norms clipping returned."""
    norms, passes = [], 0
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        for micro in range(micro_steps):
            tokens, targets = batch(rank, passes)
            model.use_sometimes = (passes + rank) % 3 == 0
            torch.manual_seed(9000 + 100 * passes + rank)  # dropout's masks: the same in a run and its reference
            with no_sync() if micro < micro_steps - 1 else contextlib.nullcontext():
                (F.cross_entropy(forward(tokens), targets) / micro_steps).backward()
            passes += 1
        if clip is not None and max_norm is not None:
            norms.append(clip(max_norm).detach().clone())
        step()
    return norms


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Copies of what a run ends with: the model's state (weights and buffers), the optimiser's state,
    which ``.grad`` are None, and whether the storage tie still holds."""
    state = optimizer.state_dict()["state"]  # what a checkpoint holds: whole tensors, numbered
    names = {id(p): name for name, p in model.named_parameters()}
    numbered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    tied = isinstance(model, Adversarial) and model.alias is not None
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": {numbered[i]: {k: v.clone() for k, v in s.items()} for i, s in state.items()},
        "grad_none": {name: p.grad is None for name, p in model.named_parameters()},
        "still_tied": tied and model.alias.data_ptr() == model.hidden.weight.data_ptr(),  # type: ignore[union-attr]
    }
