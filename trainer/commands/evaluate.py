"""``trainer evaluate PATH``: test (and validation) loss and accuracy of a trained model, as one JSON line.

PATH is a run directory (its exported final model, or, for a run that has not finished, its
newest valid checkpoint), a checkpoint (``step-N.pt``) or an exported ``.safetensors`` with its
``model.json`` beside it. The evaluation is one process on the CPU with the code the run itself
uses (trainer/engine/evaluation.py) on the splits rebuilt from the saved config (seed, val_fraction), so
the final model's figures equal ``summary.json``'s for a run trained on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from trainer.core.config import TrainConfig
from trainer.core.errors import UsageError
from trainer.engine.evaluation import split_metrics
from trainer.engine.export import CARD, FINAL, read_export
from trainer.lifecycle.checkpoint import CheckpointError, newest_valid, read_checkpoint
from trainer.tasks.mnist_data import load_mnist, prepare_splits
from trainer.tasks.mnist_model import build_model

FIX = "pass a run directory, a step-N.pt checkpoint or an exported .safetensors"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainer evaluate",
        description="Test (and validation) loss and accuracy of a trained model, printed as one JSON line.",
    )
    parser.add_argument("path", type=Path, help="A run directory, a step-N.pt checkpoint or an exported .safetensors.")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="Read MNIST from DIR/MNIST/raw (torchvision layout) instead of the copy shipped with the package.",
    )
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


def model_from(
    path: Path, state: dict[str, torch.Tensor], config: dict[str, Any]
) -> tuple[torch.nn.Module, TrainConfig]:
    """The model the weights belong to, with them loaded; mismatches are one-line errors, not torch's list."""
    try:
        cfg = TrainConfig.from_dict(config)
    except (UsageError, TypeError) as exc:
        raise UsageError(f"{path}: its config cannot be read ({exc})") from None
    model = build_model(cfg)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state.items()}
    if found != expected:
        raise UsageError(f"{path}: the weights {found} do not fit the model of its config {expected}")
    model.load_state_dict(state)
    return model, cfg


def evaluate(path: Path, data_dir: str | None) -> dict[str, Any]:
    """Evaluate the model PATH stands for on its run's validation split and the test split."""
    source = resolve(path)
    state, config, about = load(source)
    model, cfg = model_from(source, state, config)
    splits = prepare_splits(load_mnist(data_dir), cfg.val_fraction, cfg.seed, torch.device("cpu"))
    val_loss, val_accuracy = split_metrics(model, splits.val_x, splits.val_y)
    test_loss, test_accuracy = split_metrics(model, splits.test_x, splits.test_y)
    return {
        "path": str(source),
        **about,
        "test_accuracy": test_accuracy,
        "test_loss": test_loss,
        "test_samples": len(splits.test_x),
        "val_accuracy": val_accuracy,
        "val_loss": val_loss,
        "val_samples": len(splits.val_x),
    }


def main(argv: Sequence[str]) -> None:
    """``trainer evaluate PATH [--data-dir DIR]``: one JSON line on stdout; bad input exits 2 with one line."""
    args = build_parser().parse_args(argv)
    try:
        result = evaluate(args.path, args.data_dir)
    except UsageError as exc:
        print(f"trainer evaluate: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(result))
