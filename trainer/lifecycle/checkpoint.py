"""Checkpoints that cannot lie: atomic writes, a manifest with a checksum, safe loading, pruning.

A checkpoint is two files in the checkpoint directory: ``step-00000100.pt`` (``torch.save`` of
plain tensors and values) and ``step-00000100.json``, its manifest (size and SHA-256 of the
``.pt``, and where training stood). The manifest is written last, so it doubles as the
completion marker: a ``.pt`` without one, or one whose bytes do not match it, is not loaded.

An epoch-end checkpoint's manifest also holds the epoch's score by the task's ``best`` figure
(validation accuracy for MNIST, validation loss by default). The one that scores best is the best
checkpoint, which pruning keeps besides the newest ``--keep-checkpoints``.
Two pointer files make both easy to find: ``latest.json`` (the newest checkpoint written) and
``best.json``, each a copy of the chosen checkpoint's manifest entries. They are conveniences for
users and tools: resuming reads the manifests themselves.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import re
import time
from pathlib import Path
from typing import Any

import torch

from trainer.core.config import TrainConfig
from trainer.core.errors import UsageError
from trainer.core.fileio import atomic_write_bytes, fsync_dir, write_json

log = logging.getLogger(__name__)

# 2: every rank's RNG states, the task's name and options, the epoch's figures by name.
FORMAT = 2
_NAME = re.compile(r"^step-(\d{8,})\.(pt|json)$")
# A checkpoint written with other values of these cannot continue this run: the weights or the
# optimiser state would not fit, or the data split and order would differ. (A task's own options
# must match too unless made with ``must_match=False``.)
MUST_MATCH = ("optimizer", "seed")
LATEST, BEST = "latest.json", "best.json"
# What a pointer file copies from the manifest it points at.
POINTER_FIELDS = ("file", "step", "epoch", "epochs_completed", "samples_consumed_in_epoch", "best")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says why, on one line."""


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step-{step:08d}.pt"


def list_checkpoints(directory: Path) -> list[Path]:
    """The ``.pt`` path of every checkpoint (complete or not) in ``directory``, newest step first."""
    if not directory.is_dir():
        return []
    steps = {int(m.group(1)) for m in map(_NAME.match, os.listdir(directory)) if m}
    return [checkpoint_path(directory, step) for step in sorted(steps, reverse=True)]


def step_of(path: Path) -> int:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else -1


# -- writing ----------------------------------------------------------------------------
def save_checkpoint(
    directory: Path, step: int, payload: dict[str, Any], keep: int, best: dict[str, Any] | None = None
) -> Path:
    """Write ``payload`` as the checkpoint of ``step``, point ``latest.json`` at it, prune to the newest ``keep``.

    ``best`` (epoch-end checkpoints only: ``{"name": "val_accuracy", "value": 0.97, "mode": "max"}``)
    makes it a candidate for ``best.json`` and records the score under its name; the best
    checkpoint survives pruning. The ``.pt``, its manifest and then the pointers each go through a
    temporary file, fsync and ``os.replace``: a kill at any moment leaves either the previous
    checkpoints or the new, complete one. Raises ``OSError`` when the disk refuses the write;
    older checkpoints are untouched then.
    """
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    path = checkpoint_path(directory, step)
    path.with_suffix(".json").unlink(missing_ok=True)  # a stale manifest must never vouch for new bytes
    atomic_write_bytes(path, data)
    state = payload["train_state"]
    manifest = {
        "format": FORMAT,
        "file": path.name,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "step": step,
        "epoch": state["epoch"] + 1,  # the epoch in progress (the next one, at an epoch end)
        "epochs_completed": state["epoch"],
        "samples_consumed_in_epoch": state["consumed"],
        "best": best,
        **({best["name"]: best["value"]} if best else {}),
        "world_size": payload["world_size"],
        "time": time.time(),
    }
    write_json(path.with_suffix(".json"), manifest)
    # Pointers before pruning: a kill in between leaves an extra old checkpoint, never a dangling pointer.
    write_pointers(directory, manifest)
    prune(directory, keep, newest=step)
    return path


def save_copy(directory: Path, data: bytes, manifest: dict[str, Any], keep: int) -> Path:
    """Store a checkpoint written elsewhere (its bytes and manifest, checked by the caller) as
    ``save_checkpoint`` stores its own: ``.pt``, manifest, pointers, prune."""
    step = int(manifest["step"])
    path = checkpoint_path(directory, step)
    if path.name != manifest["file"]:
        raise CheckpointError(f"manifest names {manifest['file']!r}, not {path.name!r}")
    directory.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").unlink(missing_ok=True)
    atomic_write_bytes(path, data)
    write_json(path.with_suffix(".json"), manifest)
    write_pointers(directory, manifest)
    prune(directory, keep, newest=step)
    return path


def prune(directory: Path, keep: int, newest: int) -> None:
    """Keep the ``keep`` newest checkpoints up to step ``newest`` and the best; drop others and stray temporaries."""
    older = [p for p in list_checkpoints(directory) if step_of(p) <= newest]
    best = best_manifest(directory, up_to=newest)
    for path in older[keep:]:
        if best is not None and path.name == best["file"]:
            continue
        for part in (path.with_suffix(".json"), path):  # manifest first: a half-pruned one reads as incomplete
            part.unlink(missing_ok=True)
    # Only rank 0 writes here, so a temporary file at this point was left by a killed write.
    for name in os.listdir(directory):
        if name.startswith(".step-") and name.endswith(".tmp"):
            (directory / name).unlink(missing_ok=True)
    fsync_dir(directory)


def set_aside_newer(directory: Path, step: int) -> list[str]:
    """Rename checkpoints newer than ``step`` (a timeline this run abandoned) so no later resume picks them.

    They end in ``.stale`` and stay for inspection. Returns their names.
    """
    moved = []
    for path in list_checkpoints(directory):
        if step_of(path) <= step:
            break
        for part in (path.with_suffix(".json"), path):
            if part.exists():
                part.rename(part.with_name(part.name + ".stale"))
                moved.append(part.name)
    if moved:
        fsync_dir(directory)
        # The pointers may name a set-aside checkpoint (a best newer than ``step``, say): point them
        # at what remains. The newest remaining one is the checkpoint being resumed, if any.
        remaining = manifests(directory)
        write_pointers(directory, remaining[0] if remaining else None)
    return moved


def remove_all(directory: Path) -> None:
    """Delete this package's checkpoint files and pointers in ``directory`` (``--overwrite``); nothing else there."""
    for path in list_checkpoints(directory):
        path.with_suffix(".json").unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    for name in (LATEST, BEST):
        (directory / name).unlink(missing_ok=True)


# -- best and latest --------------------------------------------------------------------
def manifests(directory: Path) -> list[dict[str, Any]]:
    """The manifests of the checkpoints in ``directory``, newest first; unreadable ones are left out."""
    found = []
    for path in list_checkpoints(directory):
        try:
            manifest = json.loads(path.with_suffix(".json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict) and manifest.get("file") == path.name:
            found.append(manifest)
    return found


def best_manifest(directory: Path, up_to: int | None = None) -> dict[str, Any] | None:
    """The manifest of the epoch-end checkpoint (up to step ``up_to``) that scores best by its ``best`` figure.

    On a tie the earlier one wins: it reached that score first. None when no epoch ended yet.
    Pruning keeps this checkpoint, so the best of those on disk is the best of the run.
    """
    scored = [
        m
        for m in manifests(directory)
        if isinstance(m.get("best"), dict)
        and isinstance(m["best"].get("value"), (int, float))
        and m["best"]["value"] == m["best"]["value"]  # NaN never wins
        and (up_to is None or m["step"] <= up_to)
    ]
    return max(
        reversed(scored), key=lambda m: m["best"]["value"] * (1 if m["best"]["mode"] == "max" else -1), default=None
    )


def write_pointers(directory: Path, latest: dict[str, Any] | None) -> None:
    """Write ``latest.json`` (for the manifest ``latest``) and ``best.json``; remove a pointer with nothing to name."""
    best = best_manifest(directory, up_to=latest["step"] if latest else None)
    for name, manifest in ((LATEST, latest), (BEST, best)):
        if manifest is None:
            (directory / name).unlink(missing_ok=True)
        else:
            score = {manifest["best"]["name"]: manifest["best"]["value"]} if manifest.get("best") else {}
            write_json(directory / name, {**{key: manifest.get(key) for key in POINTER_FIELDS}, **score})


def check_writable(directory: Path) -> str | None:
    """Why checkpoints cannot be written to ``directory``, or None when they can."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(directory / ".write-test", b"")
        (directory / ".write-test").unlink()
    except OSError as exc:
        return (
            f"cannot write checkpoints to {directory} ({exc.strerror or exc}); make it writable or pass another "
            "--checkpoint-dir (to continue from a checkpoint held there, add --resume PATH)"
        )
    return None


# -- reading ----------------------------------------------------------------------------
def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load and verify one checkpoint; ``CheckpointError`` says why it cannot be used.

    Only ``weights_only=True`` loading is used: a file holding anything but tensors and plain
    values (a pickle that would run code, say) is refused, never executed.
    """
    manifest_path = path.with_suffix(".json")
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} has no manifest {manifest_path.name} (its write did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
        expected_bytes, expected_sha = int(manifest["bytes"]), str(manifest["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest_path} is unreadable ({exc})") from None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read ({exc.strerror or exc})") from None
    if len(data) != expected_bytes:
        raise CheckpointError(f"{path} is truncated or padded: {len(data)} bytes, manifest says {expected_bytes}")
    if hashlib.sha256(data).hexdigest() != expected_sha:
        raise CheckpointError(f"{path} fails its SHA-256 check (corrupted)")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} was refused by the safe loader (weights_only=True): {first}") from None
    except Exception as exc:  # torch raises RuntimeError/EOFError/... for bytes that are not a checkpoint
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or "format" not in payload:
        raise CheckpointError(f"{path} is not a checkpoint of this trainer (format {FORMAT})")
    if payload["format"] != FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {payload['format']!r}, this version of trainer reads {FORMAT}; "
            "finish its run with the version that wrote it"
        )
    return payload


def newest_valid(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``directory`` that verifies; invalid newer ones are skipped with a warning."""
    for path in list_checkpoints(directory):
        try:
            return path, read_checkpoint(path)
        except CheckpointError as exc:
            log.warning("skipping checkpoint: %s", exc)
    return None


def choose_checkpoint(cfg: TrainConfig) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint ``--resume`` asks for, or None to start from step 0. Bad requests raise ``UsageError``."""
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        return newest_valid(cfg.checkpoint_root)
    requested = Path(cfg.resume)
    if requested.is_dir():
        found = newest_valid(requested)
        if found is None:
            raise UsageError(f"--resume {requested}: the directory holds no valid checkpoint")
        return found
    if requested.suffix == ".json":
        requested = requested.with_suffix(".pt")
    if not requested.exists():
        raise UsageError(
            f"--resume {cfg.resume}: no such checkpoint; pass a step-N.pt file, a checkpoint directory, auto or never"
        )
    try:
        return requested, read_checkpoint(requested)
    except CheckpointError as exc:
        raise UsageError(f"--resume: {exc}") from None


def compatibility(
    saved: dict[str, Any], cfg: TrainConfig, task_must_match: tuple[str, ...] = ()
) -> tuple[list[str], list[str]]:
    """(fields that forbid resuming, other fields that differ), each as ``name: checkpoint -> now``.

    The task's options are compared one by one; ``task_must_match`` names those that forbid resuming.
    """
    now, then = _flat(cfg.to_dict()), _flat(saved)
    must = set(MUST_MATCH) | set(task_must_match)
    refused, changed = [], []
    for name in sorted(set(then) | set(now)):
        if name in ("resume", "overwrite") or then.get(name) == now.get(name):
            continue
        line = f"{name}: {then.get(name)!r} in the checkpoint, {now.get(name)!r} now"
        (refused if name in must else changed).append(line)
    return refused, changed


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    """A config with its task's options at the top level (their names are the task's flags)."""
    flat = {k: v for k, v in config.items() if k != "task_options"}
    flat.update(config.get("task_options") or {})
    return flat


# -- random number generators -----------------------------------------------------------
