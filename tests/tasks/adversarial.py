"""A task built to break assumptions a gradient sync may make about a model (tests/test_tasks.py).

Its model has a frozen parameter, a parameter no forward pass uses, a weight tied between the
input embedding and the output projection, a BatchNorm buffer and dropout; its optimiser has two
parameter groups (weight decay on the 2-D weights only). Its training split is a map-style
dataset whose ``__getitem__`` augments each sample from torch's global generator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import trainer

CLASSES, WIDTH, TOKENS = 12, 16, 6


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(CLASSES, WIDTH)
        self.frozen = nn.Linear(WIDTH, WIDTH)
        self.frozen.requires_grad_(False)
        self.mix = nn.Linear(WIDTH, WIDTH)
        self.norm = nn.BatchNorm1d(WIDTH)
        self.drop = nn.Dropout(0.2)
        self.unused = nn.Linear(WIDTH, WIDTH)  # never called
        self.head = nn.Linear(WIDTH, CLASSES, bias=False)
        self.head.weight = self.embed.weight  # tied: one Parameter in two places

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens).mean(dim=1)
        x = self.drop(torch.relu(self.norm(self.mix(x + self.frozen(x)))))
        return self.head(x)


class Augmented(torch.utils.data.Dataset):
    """Token sequences whose one random position is replaced by a random token, a fresh draw each time."""

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor) -> None:
        self.tokens, self.labels = tokens, labels

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokens[index].clone()
        tokens[torch.randint(0, TOKENS, ()).item()] = torch.randint(0, CLASSES, ())
        return tokens, self.labels[index]


class Task(trainer.Task):
    name = "adversarial"
    metrics = ("accuracy",)
    find_unused_parameters = True  # ``unused`` never gets a gradient

    def build_model(self) -> nn.Module:
        return Model()

    def build_data(self, device: torch.device) -> trainer.Splits:
        generator = torch.Generator().manual_seed(self.seed)
        tokens = torch.randint(0, CLASSES, (3000, TOKENS), generator=generator)
        labels = tokens.sum(dim=1) % CLASSES
        return trainer.Splits(
            train=trainer.DatasetSplit(Augmented(tokens[:2400], labels[:2400]), device=device),
            val=trainer.TensorSplit(tokens[2400:], labels[2400:], device=device),
        )

    def loss(self, model: nn.Module, batch: trainer.Batch) -> trainer.StepResult:
        tokens, labels = batch
        logits = model(tokens)
        return F.cross_entropy(logits, labels), {"accuracy": (logits.argmax(1) == labels).double().mean()}

    def build_optimizer(self, model: nn.Module, cfg: trainer.TrainConfig) -> torch.optim.Optimizer:
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": 0.01},
            {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
