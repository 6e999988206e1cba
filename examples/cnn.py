"""A small CNN with BatchNorm and dropout on the MNIST copy shipped with trainer: a task of your own.

    torchrun --standalone --nproc_per_node=2 -m trainer --task examples/cnn.py:Task --max-steps 200

docs/tasks.md walks through it. Everything the default task gets, this one gets too: exact resume,
the shared-memory sync, the lock, the guard, the export, the report.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import trainer
from trainer.tasks.mnist_data import load_mnist, normalize


@dataclass(frozen=True)
class Options:
    channels: int = trainer.option(8, "Channels of the first convolution; the second has twice as many.")
    dropout: float = trainer.option(0.25, "Dropout before the classifier.")


class Task(trainer.Task):
    name = "mnist-cnn"
    Options = Options
    metrics = ("accuracy",)
    best = ("val_accuracy", "max")

    def build_model(self) -> nn.Module:
        c = self.options.channels
        return nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(self.options.dropout), nn.Linear(2 * c * 7 * 7, 10),
        )  # fmt: skip

    def build_data(self, device: torch.device) -> trainer.Splits:
        mnist = load_mnist(None)
        images, test_images = (normalize(x).view(-1, 1, 28, 28) for x in (mnist.train_x, mnist.test_x))
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed))
        val, train = order[:10_000], order[10_000:]
        return trainer.Splits(
            train=trainer.TensorSplit(images[train], mnist.train_y[train], device=device),
            val=trainer.TensorSplit(images[val], mnist.train_y[val], device=device),
            test=trainer.TensorSplit(test_images, mnist.test_y, device=device),
        )

    def loss(self, model: nn.Module, batch: trainer.Batch) -> trainer.StepResult:
        images, labels = batch
        logits = model(images)
        return F.cross_entropy(logits, labels), {"accuracy": (logits.argmax(1) == labels).double().mean()}

    def export_metadata(self, model: nn.Module) -> dict:
        return {"input": "1x28x28 images: (pixels / 255 - 0.1307) / 0.3081", "classes": 10}
