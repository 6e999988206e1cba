"""The trained model in a form anyone can load: safetensors weights and a ``model.json`` that describes them.

At the end of a run rank 0 writes, in ``--run-dir``:

- ``model.safetensors``: the final weights (the model ``summary.json``'s test accuracy is of);
- ``best.safetensors``: the weights of the best checkpoint (highest validation accuracy at an
  epoch end), when an epoch ended;
- ``model.json``: layer widths, activation, the input normalisation, the class count, which
  tensor is which layer, the accuracies of both models and the run's config.

Loading needs only ``safetensors`` and plain torch (docs/using-the-model.md has the snippet);
no pickle is involved, so loading runs no code. ``model.json`` is written last and holds the
SHA-256 of each weights file, so it vouches for a complete export.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from trainer.core.config import TrainConfig
from trainer.core.errors import UsageError
from trainer.core.fileio import atomic_write_bytes, write_json
from trainer.engine.evaluation import split_metrics
from trainer.lifecycle.checkpoint import CheckpointError, best_manifest, read_checkpoint
from trainer.lifecycle.train_state import TrainState
from trainer.tasks.mnist_data import MEAN, STD, RunData
from trainer.tasks.mnist_model import INPUT_SIZE, NUM_CLASSES, count_parameters

log = logging.getLogger(__name__)

FORMAT = "trainer-mlp/1"
CARD, FINAL, BEST = "model.json", "model.safetensors", "best.safetensors"


def layer_table(model: nn.Sequential) -> list[dict[str, Any]]:
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


def weights_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """A state dict as safetensors bytes (CPU, contiguous, as the format requires)."""
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()}
    return safetensors.torch.save(tensors, metadata={"format": "pt"})


def export_model(
    cfg: TrainConfig, model: nn.Sequential, state: TrainState, test: tuple[float, float], data: RunData
) -> None:
    """Write the final and the best model and ``model.json`` into the run directory (rank 0, end of run).

    ``test`` is the final model's (loss, accuracy) on the test split. A failed write (full disk)
    is logged, not raised: the run's checkpoints still hold the model.
    """
    run_dir = Path(cfg.run_dir)
    try:
        card = _write_weights(run_dir, cfg, model, state, test, data)
        write_json(run_dir / CARD, card)
    except OSError as exc:
        log.warning(
            "could not export the model to %s (%s); the checkpoints still hold it: trainer evaluate reads them",
            run_dir,
            exc.strerror or exc,
        )
        return
    which = "the final and the best model" if card["models"]["best"] else "the final model"
    log.info("exported %s to %s (described in %s)", which, run_dir, CARD)


def _write_weights(
    run_dir: Path, cfg: TrainConfig, model: nn.Sequential, state: TrainState, test: tuple[float, float], data: RunData
) -> dict[str, Any]:
    """Write the weights files; returns the ``model.json`` content that describes them."""
    last = state.history[-1] if state.history else None
    final_bytes = weights_bytes(model.state_dict())
    atomic_write_bytes(run_dir / FINAL, final_bytes)
    final = {
        "file": FINAL,
        "sha256": hashlib.sha256(final_bytes).hexdigest(),
        "step": state.global_step,
        "epochs_completed": state.epoch,
        "test_loss": test[0],
        "test_accuracy": test[1],
        # The validation figures of the final weights exist when the run ended at an epoch end.
        "val_accuracy": last["val_accuracy"] if last and last["global_step"] == state.global_step else None,
    }
    best = _write_best(run_dir, cfg, model, state, data)
    return {
        "format": FORMAT,
        "task": "MNIST digit classification: class i is the digit i",
        "layer_widths": [INPUT_SIZE, *cfg.hidden, NUM_CLASSES],
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
        "parameters": count_parameters(model),
        "models": {"final": final, "best": best},
        "config": cfg.to_dict(),
        "torch_version": torch.__version__,
    }


def _write_best(
    run_dir: Path, cfg: TrainConfig, model: nn.Sequential, state: TrainState, data: RunData
) -> dict[str, Any] | None:
    """Export the best checkpoint's weights with their test figures; None (and no file) when there is none."""
    manifest = best_manifest(cfg.checkpoint_root, up_to=state.global_step)
    payload = None
    if manifest is not None:
        try:
            payload = read_checkpoint(cfg.checkpoint_root / manifest["file"])
        except CheckpointError as exc:
            log.warning("best.safetensors not exported: %s", exc)
    if payload is None:
        (run_dir / BEST).unlink(missing_ok=True)  # an earlier export's, of weights this run no longer vouches for
        return None
    best_model = copy.deepcopy(model)
    best_model.load_state_dict(payload["model"])
    # One process evaluates the whole split, in the same chunks as a one-process run would.
    test_loss, test_accuracy = split_metrics(best_model, data.test_x, data.test_y)
    best_bytes = weights_bytes(payload["model"])
    atomic_write_bytes(run_dir / BEST, best_bytes)
    return {
        "file": BEST,
        "sha256": hashlib.sha256(best_bytes).hexdigest(),
        "checkpoint": str(cfg.checkpoint_root / manifest["file"]),
        "step": manifest["step"],
        "epochs_completed": manifest["epochs_completed"],
        "val_accuracy": manifest["val_accuracy"],
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
    }


# -- reading ----------------------------------------------------------------------------
def read_export(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights of an exported ``.safetensors`` and the ``model.json`` beside it; ``UsageError`` if unusable."""
    card_path = path.with_name(CARD)
    if not card_path.is_file():
        raise UsageError(f"{path} has no {CARD} beside it; keep the two files of an export together")
    try:
        card = json.loads(card_path.read_text())
        layers = card["layers"]
        if not isinstance(card["config"], dict):
            raise TypeError("its config is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{card_path} is unreadable ({type(exc).__name__}: {exc}); export the model again") from None
    try:
        state = safetensors.torch.load(path.read_bytes())
    except (OSError, SafetensorError) as exc:
        raise UsageError(f"{path} is not a readable safetensors file ({exc}); export the model again") from None
    expected = {layer[key] for layer in layers for key in ("weight", "bias")}
    if set(state) != expected:
        raise UsageError(f"{path} holds tensors {sorted(state)}, but {card_path} describes {sorted(expected)}")
    return state, card
