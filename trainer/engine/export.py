"""The trained model in a form anyone can load: safetensors weights and a ``model.json`` that describes them.

At the end of a run rank 0 writes, in ``--run-dir``:

- ``model.safetensors``: the final weights (the model ``summary.json``'s test figures are of);
- ``best.safetensors``: the weights of the best checkpoint (by the task's ``best`` figure at an
  epoch end), when an epoch ended;
- ``model.json``: the task, every tensor's shape, what the task records about its model
  (``Task.export_metadata``: for MNIST the layer widths, activation, input normalisation and
  classes), the test figures of both models and the run's config.

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
from trainer.core.task import Splits, Task
from trainer.core.weights import count_parameters
from trainer.engine.evaluation import split_figures
from trainer.lifecycle.checkpoint import CheckpointError, best_manifest, read_checkpoint
from trainer.lifecycle.train_state import TrainState

log = logging.getLogger(__name__)

FORMAT = "trainer-export/1"
# Keys of model.json that the engine writes; a task's ``export_metadata`` adds others beside them.
ENGINE_KEYS = ("format", "task", "task_options", "tensors", "parameters", "models", "config", "torch_version")
CARD, FINAL, BEST = "model.json", "model.safetensors", "best.safetensors"


def weights_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """A state dict as safetensors bytes (CPU, contiguous, as the format requires).

    safetensors refuses tensors that share memory, so a weight tied between two modules (an input
    embedding and an output projection, say) is written under each of its names as a copy:
    ``load_state_dict`` then gives the one parameter the same values twice.
    """
    tensors, storages = {}, set()
    for name, tensor in state.items():
        plain = tensor.detach().to("cpu").contiguous()
        if plain.untyped_storage().data_ptr() in storages:
            plain = plain.clone()
        storages.add(plain.untyped_storage().data_ptr())
        tensors[name] = plain
    return safetensors.torch.save(tensors, metadata={"format": "pt"})


def export_model(
    cfg: TrainConfig, task: Task, model: nn.Module, state: TrainState, test: dict[str, float], splits: Splits
) -> None:
    """Write the final and the best model and ``model.json`` into the run directory (rank 0, end of run).

    ``test`` is the final model's ``test_*`` figures. A failed write (full disk) is logged, not
    raised: the run's checkpoints still hold the model.
    """
    run_dir = Path(cfg.run_dir)
    try:
        card = _write_weights(run_dir, cfg, task, model, state, test, splits)
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
    run_dir: Path,
    cfg: TrainConfig,
    task: Task,
    model: nn.Module,
    state: TrainState,
    test: dict[str, float],
    splits: Splits,
) -> dict[str, Any]:
    """Write the weights files; returns the ``model.json`` content that describes them."""
    last = state.history[-1] if state.history else None
    weights = model.state_dict()
    final_bytes = weights_bytes(weights)
    atomic_write_bytes(run_dir / FINAL, final_bytes)
    # The validation figures of the final weights exist when the run ended at an epoch end.
    at_end = last is not None and last["global_step"] == state.global_step
    final = {
        "file": FINAL,
        "sha256": hashlib.sha256(final_bytes).hexdigest(),
        "step": state.global_step,
        "epochs_completed": state.epoch,
        **test,
        **{name: (last.get(name) if at_end else None) for name in val_names(task)},
    }
    best = _write_best(run_dir, cfg, task, model, state, splits)
    metadata = task.export_metadata(model)
    clash = sorted(set(metadata) & set(ENGINE_KEYS))
    if clash:
        raise UsageError(f"{type(task).__name__}.export_metadata uses keys the export reserves: {clash}; rename them")
    return {
        "format": FORMAT,
        "task": task.name,
        "task_options": cfg.task_options,
        **metadata,
        "tensors": {name: list(tensor.shape) for name, tensor in weights.items()},
        "parameters": count_parameters(model),
        "models": {"final": final, "best": best},
        "config": cfg.to_dict(),
        "torch_version": torch.__version__,
    }


def val_names(task: Task) -> list[str]:
    return [f"val_{name}" for name in ("loss", *task.metrics)]


def _write_best(
    run_dir: Path, cfg: TrainConfig, task: Task, model: nn.Module, state: TrainState, splits: Splits
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
    test = split_figures(task, best_model, splits.test, "test") if splits.test is not None else {}
    best_bytes = weights_bytes(payload["model"])
    atomic_write_bytes(run_dir / BEST, best_bytes)
    return {
        "file": BEST,
        "sha256": hashlib.sha256(best_bytes).hexdigest(),
        "checkpoint": str(cfg.checkpoint_root / manifest["file"]),
        "step": manifest["step"],
        "epochs_completed": manifest["epochs_completed"],
        manifest["best"]["name"]: manifest["best"]["value"],
        **test,
    }


# -- reading ----------------------------------------------------------------------------
def read_export(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights of an exported ``.safetensors`` and the ``model.json`` beside it; ``UsageError`` if unusable."""
    card_path = path.with_name(CARD)
    if not card_path.is_file():
        raise UsageError(f"{path} has no {CARD} beside it; keep the two files of an export together")
    try:
        card = json.loads(card_path.read_text())
        tensors = card["tensors"]
        if not isinstance(card["config"], dict):
            raise TypeError("its config is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{card_path} is unreadable ({type(exc).__name__}: {exc}); export the model again") from None
    try:
        state = safetensors.torch.load(path.read_bytes())
    except (OSError, SafetensorError) as exc:
        raise UsageError(f"{path} is not a readable safetensors file ({exc}); export the model again") from None
    expected = set(tensors)
    if set(state) != expected:
        raise UsageError(f"{path} holds tensors {sorted(state)}, but {card_path} describes {sorted(expected)}")
    return state, card
