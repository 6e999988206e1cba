"""``trainer evaluate PATH``: test (and validation) loss and metrics of a trained model, as one JSON line.

PATH is a run directory (its exported final model, or, for a run that has not finished, its
newest valid checkpoint), a checkpoint (``step-N.pt``) or an exported ``.safetensors`` with its
``model.json`` beside it. The evaluation is one process on the CPU with the code the run itself
uses (trainer/engine/evaluation.py) on the splits its task rebuilds from the saved config (the task,
its options, the seed), so the final model's figures equal ``summary.json``'s for a run trained on
the CPU at world size 1. Task options that only say where things are (MNIST's ``--data-dir``) may be
given again after PATH.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from trainer.core.config import TrainConfig, add_fields
from trainer.core.errors import UsageError
from trainer.core.task import Task
from trainer.engine.evaluation import split_figures
from trainer.engine.export import CARD, FINAL, read_export
from trainer.lifecycle.checkpoint import CheckpointError, newest_valid, read_checkpoint
from trainer.tasks.find import find_task

FIX = "pass a run directory, a step-N.pt checkpoint or an exported .safetensors"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainer evaluate",
        description="Test (and validation) loss and metrics of a trained model, printed as one JSON line. "
        "Options of the model's task that say where its data is (MNIST's --data-dir) may follow PATH.",
    )
    parser.add_argument("path", type=Path, help="A run directory, a step-N.pt checkpoint or an exported .safetensors.")
    return parser


def resolve(path: Path) -> Path:
    """The file PATH stands for: itself, a run's exported final model, or a directory's newest valid checkpoint."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise UsageError(f"{path} does not exist; {FIX}")
    if (path / CARD).is_file():
        return path / FINAL
    checkpoints = path
    if (path / "config.json").is_file():  # a run directory: its checkpoints may live elsewhere
        try:
            checkpoint_dir = json.loads((path / "config.json").read_text()).get("checkpoint_dir")
        except (OSError, ValueError, AttributeError):
            checkpoint_dir = None
        checkpoints = Path(checkpoint_dir) if checkpoint_dir else path / "checkpoints"
    elif (path / "checkpoints").is_dir():
        checkpoints = path / "checkpoints"
    found = newest_valid(checkpoints)
    if found is None:
        raise UsageError(f"{path} holds no run: no {CARD} and no valid checkpoint; {FIX}")
    return found[0]


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(weights, config, what the weights are) of a checkpoint or an export; ``UsageError`` if unusable."""
    if path.suffix == ".safetensors":
        state, card = read_export(path)
        described = [m for m in card.get("models", {}).values() if m and m.get("file") == path.name]
        about = {"kind": "export", "step": described[0].get("step") if described else None}
        return state, card["config"], about
    if path.suffix == ".pt":
        try:
            payload = read_checkpoint(path)
            about = {"kind": "checkpoint", "step": payload["train_state"]["global_step"]}
            return payload["model"], payload["config"], about
        except CheckpointError as exc:
            raise UsageError(str(exc)) from None
        except (KeyError, TypeError) as exc:
            raise UsageError(f"{path} lacks the model or config of a checkpoint ({exc})") from None
    raise UsageError(f"{path} is neither a checkpoint (.pt) nor an exported model (.safetensors); {FIX}")


def task_from(path: Path, config: dict[str, Any], extra: Sequence[str]) -> tuple[Task, TrainConfig]:
    """The task the weights were trained with, its saved options updated by ``extra`` (those that may
    differ from the run's: ``must_match=False``)."""
    try:
        cfg = TrainConfig.from_dict(config)
    except (UsageError, TypeError) as exc:
        raise UsageError(f"{path}: its config cannot be read ({exc})") from None
    task_class = find_task(cfg.task)
    parser = argparse.ArgumentParser(prog=f"trainer evaluate PATH ({task_class.name} options)")
    fields = [f for f in dataclasses.fields(task_class.Options) if not f.metadata.get("must_match", True)]
    saved = task_class.Options(**cfg.task_options)
    add_fields(parser, _only(task_class.Options, fields), saved)
    given = vars(parser.parse_args(list(extra)))
    task = task_class(dataclasses.replace(saved, **given))
    task.seed = cfg.seed
    return task, cfg


def _only(options: type, fields: list[dataclasses.Field]) -> type:
    """A dataclass with just ``fields`` of ``options`` (to build a parser of those)."""
    return dataclasses.make_dataclass(options.__name__, [(f.name, f.type, f) for f in fields], frozen=True)


def model_from(path: Path, state: dict[str, torch.Tensor], task: Task) -> torch.nn.Module:
    """The model the weights belong to, with them loaded; mismatches are one-line errors, not torch's list."""
    model = task.build_model()
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state.items()}
    if found != expected:
        raise UsageError(f"{path}: the weights {found} do not fit the model of its config {expected}")
    model.load_state_dict(state)
    return model


def evaluate(path: Path, extra: Sequence[str] = ()) -> dict[str, Any]:
    """Evaluate the model PATH stands for on its run's validation split and the test split."""
    source = resolve(path)
    state, config, about = load(source)
    task, cfg = task_from(source, config, extra)
    model = model_from(source, state, task)
    splits = task.build_data(torch.device("cpu"))
    result: dict[str, Any] = {"path": str(source), **about, "task": task.name, "precision": cfg.precision}
    # In the run's precision, so a bf16 run's figures are the ones its own evaluation gave.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        for name in ("test", "val"):
            split = getattr(splits, name)
            if split is not None:
                result.update(split_figures(task, model, split, name), **{f"{name}_samples": len(split)})
    return dict(sorted(result.items()))


def main(argv: Sequence[str]) -> None:
    """``trainer evaluate PATH [--data-dir DIR]``: one JSON line on stdout; bad input exits 2 with one line."""
    args, extra = build_parser().parse_known_args(argv)
    try:
        result = evaluate(args.path, extra)
    except UsageError as exc:
        print(f"trainer evaluate: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(result))
