"""The task interface: what a user writes to train their own model with ``trainer``.

A task says what to train; the engine says how (torchrun, the gradient sync, exact resume, the
lock, the guard, the export, the report). The engine never imports a task: it only calls these
methods. A minimal task::

    class Task(trainer.Task):
        name = "my-task"

        def build_model(self) -> nn.Module:
            return nn.Linear(10, 2)

        def build_data(self, device: torch.device) -> trainer.Splits:
            x, y = torch.randn(1000, 10), torch.randint(0, 2, (1000,))
            return trainer.Splits(train=trainer.TensorSplit(x[:800], y[:800], device=device),
                                  val=trainer.TensorSplit(x[800:], y[800:], device=device))

        def loss(self, model: nn.Module, batch: Batch) -> StepResult:
            inputs, targets = batch
            return F.cross_entropy(model(inputs), targets), {}

docs/tasks.md describes every method, the guarantees and a complete example.

Samples are addressed by position: the engine decides which positions each rank trains on at
each step (engine/sampling.py), so exact resume and a change of world size work for any split
that returns the same batch for the same positions. A ``TensorSplit`` keeps whole tensors on the
training device and gathers rows (no per-sample Python); a ``DatasetSplit`` wraps any map-style
dataset and collates ``dataset[i]`` for each position.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

if TYPE_CHECKING:
    from trainer.core.config import TrainConfig

Batch = Any  # whatever a split's ``batch`` returns and the task's ``loss`` takes (a tuple of tensors, say)
# The loss to minimise (a scalar tensor, the mean over the batch) and the task's metrics of the
# batch, each a scalar tensor averaged over the batch's samples (e.g. ``{"accuracy": ...}``).
StepResult = tuple[torch.Tensor, Mapping[str, torch.Tensor]]


class Split(Protocol):
    """Samples addressed by position ``0 .. len - 1``; the same positions always give the same batch."""

    def __len__(self) -> int: ...

    def batch(self, positions: torch.Tensor) -> Batch:
        """The samples at ``positions`` (an int64 tensor on the training device), collated, on that device."""
        ...


class TensorSplit:
    """Tensors whose first dimension indexes the samples, held on the training device.

    ``batch`` is one gather per tensor: the fast path for data that fits in memory.
    """

    # A CUDA graph may record ``batch``: it is device work only, with no host read.
    capturable = True

    def __init__(self, *tensors: torch.Tensor, device: torch.device | str | None = None) -> None:
        if not tensors:
            raise ValueError("TensorSplit needs at least one tensor")
        if len({len(t) for t in tensors}) != 1:
            raise ValueError(f"TensorSplit's tensors differ in length: {[len(t) for t in tensors]}")
        self.tensors = tuple(t if device is None else t.to(device) for t in tensors)

    def __len__(self) -> int:
        return len(self.tensors[0])

    def batch(self, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t[positions] for t in self.tensors)


class DatasetSplit:
    """A map-style ``torch.utils.data.Dataset``: ``batch`` collates ``dataset[i]`` for each position
    (``torch.utils.data.default_collate``, or ``collate``) and moves the result to ``device``.

    Random augmentation inside ``__getitem__`` resumes exactly when it draws from torch's global
    generator: the engine checkpoints each rank's generators.
    """

    capturable = False

    def __init__(
        self,
        dataset: Dataset,
        device: torch.device | str = "cpu",
        collate: Any = default_collate,
    ) -> None:
        self.dataset, self.device, self.collate = dataset, torch.device(device), collate

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]  # map-style datasets define it

    def batch(self, positions: torch.Tensor) -> Batch:
        samples = [self.dataset[i] for i in positions.tolist()]
        return _to_device(self.collate(samples), self.device)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


@dataclass(frozen=True)
class Splits:
    """A task's data: ``train`` is what the engine samples; ``val`` is evaluated at every epoch end and
    ``test`` once at the end (each may be None: its figures are then left out)."""

    train: Split
    val: Split | None = None
    test: Split | None = None


@dataclass(frozen=True)
class NoOptions:
    """A task without options of its own."""


def option(default: Any, help: str, choices: Sequence[str] | None = None, must_match: bool = True) -> Any:
    """A field of a task's ``Options`` dataclass: it becomes ``--NAME`` on the command line.

    ``must_match``: a checkpoint written with another value cannot continue the run (the model or
    the data would differ); False for options that only say where things are (a data directory).
    """
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "must_match": must_match})


class Task:
    """Subclass it; override ``build_model``, ``build_data`` and ``loss``, and the rest as needed.

    Class attributes:
    - ``name``: recorded in the run's config and checkpoints; a checkpoint of one task never resumes another.
    - ``Options``: a frozen dataclass of the task's own options (fields made with ``option``); they
      appear in ``--help`` for the task and in ``config.json``.
    - ``metrics``: the names of the metrics ``loss`` returns besides the loss (e.g. ``("accuracy",)``).
    - ``best``: which epoch-end figure picks the best checkpoint, and whether higher is better.
    - ``eval_batch_size``: samples per forward pass when evaluating a split.
    - ``find_unused_parameters``: True when some parameters get no gradient in some steps (a branch
      not taken, a head not used). Under the DDP sync options DDP then looks for them each forward
      pass, as it must; the shared-memory options handle them either way.
    - ``defaults``: the task's own defaults for the engine's options, by field name of
      ``TrainConfig`` (e.g. ``{"optimizer": "adamw", "lr": 1e-3}``): the recipe that ``--task NAME``
      alone gets. The command line still overrides each; ``config.json`` records what applied.
    """

    name: ClassVar[str] = "task"
    Options: ClassVar[type] = NoOptions
    metrics: ClassVar[tuple[str, ...]] = ()
    best: ClassVar[tuple[str, str]] = ("val_loss", "min")
    eval_batch_size: ClassVar[int] = 1024
    find_unused_parameters: ClassVar[bool] = False
    defaults: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, options: Any = None) -> None:
        self.options = self.Options() if options is None else options
        self.seed = 0  # the run's --seed: the engine sets it before calling build_model and build_data

    # -- required --------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """The model, on the CPU; the engine seeds torch with ``--seed`` first and moves it to the device."""
        raise NotImplementedError(f"{type(self).__name__} must define build_model()")

    def build_data(self, device: torch.device) -> Splits:
        """The train, validation and test splits; the same on every rank (each rank reads only its batches)."""
        raise NotImplementedError(f"{type(self).__name__} must define build_data(device)")

    def loss(self, model: nn.Module, batch: Batch) -> StepResult:
        """The mean loss of ``batch`` and its metrics (named in ``metrics``), each a scalar tensor.

        Called in training (model in train mode) and, without gradients, in evaluation (eval mode).
        """
        raise NotImplementedError(f"{type(self).__name__} must define loss(model, batch)")

    # -- optional, with defaults -----------------------------------------------------------
    def prepare(self, local_rank: int) -> None:
        """Runs on every rank before ``build_data``, and every rank waits until all have run it: the
        place to download or unpack files once per host (where ``local_rank == 0``)."""

    def build_optimizer(self, model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
        """The optimiser, from ``--optimizer``, ``--lr``, ``--momentum`` and ``--weight-decay``.

        Override for another optimiser or parameter groups; the hyper-parameters given on the
        command line win over a checkpoint's when a run is resumed.
        """
        from trainer.core.optim import build_optimizer  # the default recipe lives with the config

        return build_optimizer(cfg, model)

    def export_metadata(self, model: nn.Module) -> dict[str, Any]:
        """What ``model.json`` records beside the weights, so others can use them (input format, classes...)."""
        return {}

    def describe(self, model: nn.Module) -> str:
        """One line for the log: what this model is."""
        return f"{type(model).__name__}"

    def tokens_per_sample(self) -> int | None:
        """For a sample that is a sequence, its length in tokens (the summary then gives tokens/s);
        None otherwise."""
        return None

    def flops_per_sample(self, model: nn.Module) -> float | None:
        """The model FLOPs of one training sample, forward and backward (the usual estimate: 6 per
        weight per token, plus attention's), from which the summary gives the model FLOPs
        utilisation (``mfu``); None where the task gives none."""
        return None

    def sample_text(self, model: nn.Module) -> str | None:
        """A short text the trained model produces, for the report (a language model's sample);
        None for tasks with nothing to show. Runs on rank 0 after training, on the CPU copy."""
        return None
