"""The default task: an MLP classifier on MNIST, the shipped copy or a torchvision-layout one."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.core.errors import UsageError
from trainer.core.task import Batch, Splits, StepResult, Task, TensorSplit, option
from trainer.tasks.mnist_data import MEAN, STD, RunData, download_mnist, load_mnist, prepare_splits

log = logging.getLogger(__name__)

INPUT_SIZE, NUM_CLASSES = 28 * 28, 10


@dataclass(frozen=True)
class MnistOptions:
    hidden: tuple[int, ...] = option((512, 256), "Hidden layer widths, comma-separated (e.g. 512,256).")
    val_fraction: float = option(0.2, "Fraction of the 60k training images held out for validation.")
    data_dir: str | None = option(
        None,
        "Read MNIST from DIR/MNIST/raw (torchvision layout) instead of the copy shipped with the package.",
        must_match=False,
    )
    download: bool = option(
        False, "Download MNIST into --data-dir with torchvision first (needs internet).", must_match=False
    )

    def __post_init__(self) -> None:
        if not all(h >= 1 for h in self.hidden):
            raise UsageError("--hidden widths must be positive integers, e.g. 512,256")
        if not 0 < self.val_fraction < 1:
            raise UsageError("--val-fraction must be between 0 and 1, e.g. 0.2")
        if self.download and self.data_dir is None:
            raise UsageError("--download needs --data-dir DIR to download into")


def build_mlp(hidden: tuple[int, ...]) -> nn.Sequential:
    """784 -> hidden... -> 10 with ReLU."""
    widths = (INPUT_SIZE, *hidden)
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(widths):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], NUM_CLASSES))
    return nn.Sequential(*layers)


class MnistMLP(Task):
    """Digit classification: 28x28 images flattened to 784 inputs, 10 classes, cross-entropy."""

    name = "mnist-mlp"
    Options = MnistOptions
    metrics = ("accuracy",)
    best = ("val_accuracy", "max")
    eval_batch_size = 4096

    def build_model(self) -> nn.Module:
        return build_mlp(self.options.hidden)

    def prepare(self, local_rank: int) -> None:
        """Download once per host, before any rank reads the files (the engine waits for every rank after)."""
        if self.options.download and local_rank == 0:
            download_mnist(self.options.data_dir or "")

    def build_data(self, device: torch.device) -> Splits:
        return splits_of(
            prepare_splits(load_mnist(self.options.data_dir), self.options.val_fraction, self.seed, device)
        )

    def loss(self, model: nn.Module, batch: Batch) -> StepResult:
        inputs, targets = batch
        logits = model(inputs)
        correct = (logits.detach().argmax(dim=1) == targets).sum()
        return F.cross_entropy(logits, targets), {"accuracy": correct.double() / len(targets)}

    def describe(self, model: nn.Module) -> str:
        return "MLP " + "-".join(str(w) for w in (INPUT_SIZE, *self.options.hidden, NUM_CLASSES))

    def flops_per_sample(self, model: nn.Module) -> float:
        """6 per weight of the Linear layers (a multiply-add forward, two backward); biases and
        ReLU are left out, as in the usual estimate."""
        return float(6 * sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)))

    def export_metadata(self, model: nn.Module) -> dict[str, Any]:
        return {
            "layer_widths": [INPUT_SIZE, *self.options.hidden, NUM_CLASSES],
            "activation": "relu",
            "input": {
                "size": INPUT_SIZE,
                "image_shape": [28, 28],
                "mean": MEAN,
                "std": STD,
                "normalise": "x = (pixels / 255 - mean) / std, pixels the 28x28 uint8 image flattened row by row",
            },
            "classes": NUM_CLASSES,
            "layers": layer_table(model),
        }


def splits_of(data: RunData) -> Splits:
    """The task's splits over MNIST already decoded and split (on the training device)."""
    return Splits(
        train=TensorSplit(data.train_x, data.train_y),
        val=TensorSplit(data.val_x, data.val_y),
        test=TensorSplit(data.test_x, data.test_y),
    )


def layer_table(model: nn.Module) -> list[dict[str, Any]]:
    """Each linear layer in order: its tensor names in the weights file, its shape, the activation after it."""
    children = list(model.named_children())
    table = []
    for position, (name, module) in enumerate(children):
        if not isinstance(module, nn.Linear):
            continue
        after = children[position + 1][1] if position + 1 < len(children) else None
        table.append(
            {
                "weight": f"{name}.weight",  # (out_features, in_features): y = x @ weight.T + bias
                "bias": f"{name}.bias",
                "in_features": module.in_features,
                "out_features": module.out_features,
                "activation": "relu" if isinstance(after, nn.ReLU) else None,
            }
        )
    return table


# -- for benchmarks and tests that run the default model outside the engine --------------------
def default_model(seed: int = 0, hidden: tuple[int, ...] = MnistOptions.hidden) -> nn.Sequential:
    """The MLP as a run with ``--seed seed`` starts it (the engine seeds torch, then builds the model)."""
    torch.manual_seed(seed)
    return build_mlp(hidden)


def default_data(seed: int = 0, device: torch.device | str = "cpu") -> RunData:
    """The shipped MNIST split as a run with ``--seed seed`` and the default options splits it."""
    return prepare_splits(load_mnist(None), MnistOptions.val_fraction, seed, torch.device(device))
