"""The run's configuration: one frozen dataclass, built from the command line.

Every field carries its own help text, so ``--help``, the logged config and the
``config.json`` in the run directory all come from this one definition.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.core.errors import UsageError

# Gradient sync options (trainer/sync/comm.py says what each does).
COMM_OPTIONS = ("auto", "gloo", "shm", "hierarchical", "bf16", "fp16", "powersgd", "localsgd")


def _opt(default: Any, help: str, choices: Sequence[str] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run. Immutable once built."""

    epochs: int = _opt(5, "Passes over the training split.")
    batch_size: int = _opt(
        32, "Samples per process per step; the global batch is this times the world size, so it follows the world size."
    )
    global_batch_size: int | None = _opt(
        None,
        "Samples per step over all processes; overrides --batch-size with global / world size, so optimisation is "
        "the same at any world size (it must divide evenly).",
    )
    task: str = _opt(
        "mnist-mlp",
        "What to train: a built-in task (mnist-mlp, shakespeare-char), package.module:Name, or path/to/file.py:Name "
        "(a trainer.Task subclass; docs/tasks.md). Its own options follow under its name in --help.",
    )
    lr: float = _opt(0.01, "Learning rate (with the task's default optimiser).")
    momentum: float = _opt(0.9, "SGD momentum (ignored by Adam and AdamW).")
    weight_decay: float = _opt(0.0, "Weight decay (decoupled under AdamW).")
    beta2: float = _opt(0.999, "AdamW's second-moment decay (Adam keeps torch's 0.999).")
    optimizer: str = _opt("sgd", "The task's default optimiser.", choices=("sgd", "adam", "adamw"))
    lr_schedule: str = _opt(
        "constant",
        "Learning rate by global step (trainer/core/schedule.py): constant; cosine = down to --min-lr at "
        "--lr-decay-steps (nanoGPT's); wsd = constant, then straight down to --min-lr over the last 20%% of "
        "--lr-decay-steps. A resumed run continues it exactly.",
        ("constant", "cosine", "wsd"),
    )
    warmup_steps: int = _opt(0, "Steps of linear learning-rate warm-up at the start, before the schedule.")
    lr_decay_steps: int | None = _opt(None, "The step at which cosine and wsd reach --min-lr; unset means --max-steps.")
    min_lr: float | None = _opt(None, "The learning rate cosine and wsd end at; unset means --lr / 10.")
    seed: int = _opt(
        0, "Seed for the model's initial weights, the task's data split, the per-epoch shuffles and each rank's RNGs."
    )
    max_steps: int | None = _opt(None, "Stop after this many optimiser steps in total (for tests and benchmarks).")
    run_dir: str = _opt("runs/mnist-mlp", "Directory for everything the run writes.")
    backend: str = _opt(
        "auto", "Process-group backend; auto picks nccl on CUDA, gloo on CPU.", ("auto", "gloo", "nccl")
    )
    comm: str = _opt(
        "auto",
        "Gradient sync: auto = shm where all ranks share a host, hierarchical (shared memory within each host, "
        "gloo between hosts) where they span hosts with 2+ on each, else gloo (all exact); bf16/fp16/powersgd/"
        "localsgd send less but change the arithmetic (see trainer/sync/comm.py).",
        COMM_OPTIONS,
    )
    comm_warmup_steps: int | None = _opt(
        None,
        "Exact (all-reduced) steps before powersgd starts compressing or localsgd starts averaging "
        "periodically; unset means 100 (trainer/sync/comm.py). At least 2: PowerSGD needs two exact steps first.",
    )
    device: str = _opt("auto", "Device; auto picks CUDA when available.", ("auto", "cpu", "cuda"))
    cuda_graph: str = _opt(
        "auto",
        "Capture the training step in a CUDA graph after 3 eager steps (trainer/engine/cuda_graph.py): auto = where it "
        "can (one process on CUDA), on = require it, off = eager steps.",
        ("auto", "on", "off"),
    )
    shared_step: str = _opt(
        "auto",
        "Under shm, whether the host's ranks share one copy of the weights and each steps its chunk of them "
        "(trainer/sync/shared_step.py): auto = where the optimiser allows (SGD, Adam, AdamW), off = every rank "
        "steps all the weights on its own copy (its .grad then holds the average).",
        ("auto", "off"),
    )
    clip_grad_norm: float | None = _opt(
        None, "Clip the gradients' global L2 norm to this value after the sync, before each optimiser step."
    )
    grad_accum_steps: int = _opt(
        1,
        "Split each process's share of a step's batch into this many micro-batches, each a forward and "
        "backward pass; only the last exchanges gradients. The step still takes the same samples.",
    )
    precision: str = _opt(
        "fp32",
        "bf16 = forward pass and loss under torch.autocast(bfloat16) on CPU and CUDA; the weights, gradients "
        "and optimiser state stay float32.",
        ("fp32", "bf16"),
    )
    timeout: float = _opt(120.0, "Seconds a collective may wait for a peer before the run fails instead of hanging.")
    checkpoint_timeout: float = _opt(
        1800.0,
        "Seconds the other ranks wait for rank 0 to write a checkpoint or export the model before the run fails, "
        "naming rank 0 and what it was writing; apart from --timeout, so a slow disk on rank 0 fails no gradient wait.",
    )
    log_every: int = _opt(
        100, "Log progress, record a per-rank step sample and act on a stop signal (SIGTERM/SIGINT) every N steps."
    )
    log_all_ranks: bool = _opt(False, "Log INFO from every rank, not only rank 0.")
    overwrite: bool = _opt(
        False,
        "Replace whatever an earlier run left in --run-dir and --checkpoint-dir (once per launch: workers that "
        "torchrun restarts resume instead).",
    )
    checkpoint_dir: str | None = _opt(
        None, "Directory for checkpoints, on storage every node can read; unset means RUN_DIR/checkpoints."
    )
    checkpoint_every: int = _opt(200, "Write a checkpoint every N optimiser steps, and at each epoch end.")
    keep_checkpoints: int = _opt(
        3, "Keep the newest K checkpoints and the best (highest validation accuracy at an epoch end); delete others."
    )
    resume: str = _opt(
        "auto",
        "auto: continue from the newest valid checkpoint in --checkpoint-dir if there is one; never: refuse to "
        "start over existing checkpoints; or the path of a checkpoint (.pt) to continue from.",
    )
    on_nonfinite: str = _opt(
        "stop",
        "When a loss or gradient is NaN or Inf on any rank: stop (exit 3, naming the step and the newest good "
        "checkpoint) or skip that step's update and go on (counted in summary.json).",
        ("stop", "skip"),
    )
    record_samples: bool = _opt(
        False, "Debugging: each process writes the training-split positions of every batch it trains on."
    )
    tensorboard: bool = _opt(
        False, "Write TensorBoard event files to RUN_DIR/tensorboard (needs the extra trainer[tensorboard])."
    )
    # The task's own options (its ``Options`` dataclass as a dict): set by the command line under
    # the task's name, recorded with the rest of the config. Not a flag itself.
    task_options: dict[str, Any] = field(default_factory=dict, metadata={"help": None, "choices": None})

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.lr > 0, "--lr must be positive"),
            (0 <= self.momentum < 1, "--momentum must be in [0, 1)"),
            (self.weight_decay >= 0, "--weight-decay must be zero or positive"),
            (0 <= self.beta2 < 1, "--beta2 must be in [0, 1), e.g. 0.99"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be at least 1"),
            (self.timeout > 0, "--timeout must be positive"),
            (self.checkpoint_timeout > 0, "--checkpoint-timeout must be positive"),
            (self.comm_warmup_steps is None or self.comm_warmup_steps >= 2, "--comm-warmup-steps must be at least 2"),
            (self.clip_grad_norm is None or self.clip_grad_norm > 0, "--clip-grad-norm must be positive, e.g. 1.0"),
            (self.grad_accum_steps >= 1, "--grad-accum-steps must be at least 1"),
            (self.log_every >= 1, "--log-every must be at least 1"),
            (self.global_batch_size is None or self.global_batch_size >= 1, "--global-batch-size must be at least 1"),
            (self.checkpoint_every >= 1, "--checkpoint-every must be at least 1"),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be at least 1"),
            (self.resume.strip() != "", "--resume needs auto, never or a checkpoint path"),
            (self.warmup_steps >= 0, "--warmup-steps must be zero or positive"),
            (self.lr_decay_steps is None or self.lr_decay_steps >= 1, "--lr-decay-steps must be at least 1"),
            (self.min_lr is None or 0 <= self.min_lr <= self.lr, "--min-lr must be between 0 and --lr"),
            (
                self.lr_schedule == "constant" or self.lr_decay_steps is not None or self.max_steps is not None,
                f"--lr-schedule {self.lr_schedule} needs --lr-decay-steps N (or --max-steps N): the step where it "
                "reaches --min-lr",
            ),
            (
                self.lr_schedule == "constant" or self.warmup_steps < (self.lr_decay_steps or self.max_steps or 0),
                "--warmup-steps must be below --lr-decay-steps (or --max-steps)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    @property
    def decay_steps(self) -> int:
        """The step at which cosine and wsd reach --min-lr (``__post_init__`` made sure there is one)."""
        return self.lr_decay_steps or self.max_steps or 0

    @property
    def checkpoint_root(self) -> Path:
        """Where checkpoints go: ``--checkpoint-dir``, else ``RUN_DIR/checkpoints``."""
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(self.run_dir) / "checkpoints"

    def per_rank_batch(self, world_size: int) -> int:
        """Samples each process takes per step at ``world_size``."""
        if self.global_batch_size is None:
            if self.batch_size % self.grad_accum_steps:
                raise UsageError(
                    f"--grad-accum-steps {self.grad_accum_steps} does not divide --batch-size {self.batch_size}; "
                    f"pick a multiple of it"
                )
            return self.batch_size
        if self.global_batch_size % world_size:
            low = self.global_batch_size // world_size * world_size
            hint = f"e.g. {low} or {low + world_size}" if low else f"e.g. {world_size}"
            raise UsageError(
                f"--global-batch-size {self.global_batch_size} does not divide over {world_size} processes; "
                f"pick a multiple of {world_size} ({hint}), or use --batch-size for a per-process batch"
            )
        per_rank = self.global_batch_size // world_size
        if per_rank % self.grad_accum_steps:
            raise UsageError(
                f"--grad-accum-steps {self.grad_accum_steps} does not divide each process's {per_rank} samples "
                f"({self.global_batch_size} over {world_size} processes); pick a batch that world size x "
                f"--grad-accum-steps divides"
            )
        return per_rank

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (tuples become lists)."""
        return plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Inverse of ``to_dict``; unknown keys are an error so stale files are noticed."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UsageError(f"unknown config fields {unknown}; the file was written by another version")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def plain(values: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready values: tuples become lists, nested dicts too."""
    return {k: plain(v) if isinstance(v, dict) else list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def parse_widths(text: str) -> tuple[int, ...]:
    """``"512,256"`` -> ``(512, 256)``; an empty string means no hidden layer."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 512,256, got {text!r}") from None


def _arg_type(annotation: Any) -> Any:
    """The argparse ``type`` for a field's annotation (``int | None`` -> ``int``)."""
    if annotation == tuple[int, ...]:
        return parse_widths
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return inner[0]
    return annotation


def add_fields(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, defaults: Any = None) -> None:
    """One ``--flag`` per field of the dataclass ``cls`` that has help text (``defaults``: an instance
    whose values replace the fields' defaults)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("help") is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        value = getattr(defaults, f.name) if defaults is not None else f.default
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=value, help=f.metadata["help"])
            continue
        parser.add_argument(
            flag,
            type=_arg_type(kind),
            default=",".join(map(str, value)) if isinstance(value, tuple) else value,
            choices=f.metadata.get("choices"),
            help=f.metadata["help"],
            metavar=f.name.upper() if f.metadata.get("choices") is None else None,
            dest=f.name,
        )


def build_parser(options: type | None = None, task_name: str = "", defaults: Any = None) -> argparse.ArgumentParser:
    """The training command line: the engine's options, then ``options`` (a task's ``Options``
    dataclass) in a group of the task's own."""
    parser = argparse.ArgumentParser(
        prog="trainer",
        description="Train a task (an MLP on MNIST by default), one process or many (torchrun or exported "
        "RANK/WORLD_SIZE).",
        epilog="Other commands: trainer evaluate PATH (loss and metrics of a run directory, checkpoint or exported "
        "model; docs/using-the-model.md); trainer generate RUN_DIR (text from a language model; "
        "docs/shakespeare.md); trainer report RUN_DIR (report.html with plots); trainer platform "
        "(the machine and software, with measured figures; docs/watching.md). Each takes --help.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_fields(parser, TrainConfig)
    if options is not None and dataclasses.fields(options):
        add_fields(parser.add_argument_group(f"options of the task {task_name}"), options, defaults)
    return parser


def task_values(namespace: argparse.Namespace, options: type) -> tuple[dict[str, Any], Any]:
    """Split parsed arguments into the engine's values and an instance of the task's ``options``."""
    values = vars(namespace).copy()
    hints = typing.get_type_hints(options)
    mine = {}
    for f in dataclasses.fields(options):
        value = values.pop(f.name)
        if hints[f.name] == tuple[int, ...] and isinstance(value, str):
            value = parse_widths(value)
        mine[f.name] = value
    return values, options(**mine)
