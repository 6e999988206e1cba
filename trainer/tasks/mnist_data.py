"""MNIST, decoded once into memory as normalised float tensors.

The package ships the four gzip files (checked by SHA-256 on load), so the main job runs
offline. ``--data-dir`` reads a torchvision-layout copy (``DIR/MNIST/raw``, plain or gzip).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from trainer.core.errors import UsageError
from trainer.engine.sampling import split_indices

log = logging.getLogger(__name__)

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
EXPECTED_COUNT = {"train": 60_000, "test": 10_000}
# The usual MNIST statistics, so inputs are roughly zero-mean and unit-variance.
MEAN, STD = 0.1307, 0.3081


@dataclass(frozen=True)
class MnistArrays:
    """Raw pixels as uint8 (N, 784), labels as int64 (N,). ``normalize`` turns pixels into inputs.

    Pixels stay uint8 until the split is taken, so the peak memory holds one float copy, not two.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def _read_bytes(path: Path, source_hint: str) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise UsageError(f"{path} is truncated or not valid gzip ({exc}); {source_hint}") from None


def _parse_idx(data: bytes, path: Path, magic: int, count: int, source_hint: str) -> np.ndarray:
    """Parse an IDX file (big-endian header, then uint8 payload) and check its shape."""
    ndim = 3 if magic == IMAGE_MAGIC else 1
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise UsageError(f"{path} is too short to be an MNIST file ({len(data)} bytes); {source_hint}")
    header = np.frombuffer(data[:header_len], dtype=">i4")
    dims = tuple(int(d) for d in header[1:])
    expected_dims = (count, 28, 28) if ndim == 3 else (count,)
    if int(header[0]) != magic or dims != expected_dims:
        raise UsageError(
            f"{path} has header magic={int(header[0])} shape={dims}, expected magic={magic} shape={expected_dims}; "
            f"{source_hint}"
        )
    payload = np.frombuffer(data, dtype=np.uint8, offset=header_len)
    if payload.size != int(np.prod(expected_dims)):
        raise UsageError(
            f"{path} holds {payload.size} bytes of data, expected {int(np.prod(expected_dims))} "
            f"(truncated?); {source_hint}"
        )
    return payload.reshape(expected_dims)


def _find(directory: Path, stem: str, source_hint: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise UsageError(f"{directory / stem}[.gz] is missing; {source_hint}")


def _verify_bundled(directory: Path) -> None:
    """Check the shipped files against the shipped SHA256SUMS."""
    fix = "the installed package is damaged: reinstall it, or pass --data-dir"
    for line in (directory / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        path = directory / name
        if not path.is_file():
            raise UsageError(f"{path} is missing; {fix}")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise UsageError(f"{path} fails its SHA-256 check; {fix}")


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 inputs, roughly zero-mean and unit-variance."""
    return pixels.to(torch.float32).div_(255.0).sub_(MEAN).div_(STD)


@dataclass(frozen=True)
class RunData:
    """The run's three splits as model inputs (normalised float32) and labels, on the training device.

    Decoded once: a step only gathers rows, with no per-sample Python work.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def prepare_splits(data: MnistArrays, val_fraction: float, seed: int, device: torch.device) -> RunData:
    """Split the training images into train and validation (fixed by ``seed``), normalise, move to ``device``."""
    train_idx, val_idx = split_indices(len(data.train_x), val_fraction, seed)
    return RunData(
        train_x=normalize(data.train_x[train_idx]).to(device),
        train_y=data.train_y[train_idx].to(device),
        val_x=normalize(data.train_x[val_idx]).to(device),
        val_y=data.train_y[val_idx].to(device),
        test_x=normalize(data.test_x).to(device),
        test_y=data.test_y.to(device),
    )


def load_mnist(data_dir: str | None) -> MnistArrays:
    """Load the shipped copy (``data_dir=None``) or a torchvision-layout one."""
    if data_dir is None:
        directory = Path(str(resources.files("trainer.tasks") / "mnist"))
        _verify_bundled(directory)
        hint = "reinstall the package, or pass --data-dir"
    else:
        directory = Path(data_dir) / "MNIST" / "raw"
        hint = f"point --data-dir at a folder holding MNIST/raw, or add --download to fetch it into {data_dir}"
        if not directory.is_dir():
            raise UsageError(f"{directory} does not exist; {hint}")
    arrays: dict[str, np.ndarray] = {}
    for key, stem in FILES.items():
        split, kind = key.split("_")
        path = _find(directory, stem, hint)
        magic = IMAGE_MAGIC if kind == "images" else LABEL_MAGIC
        arrays[key] = _parse_idx(_read_bytes(path, hint), path, magic, EXPECTED_COUNT[split], hint)
    log.info("loaded MNIST from %s", directory)
    return MnistArrays(
        train_x=torch.from_numpy(arrays["train_images"].reshape(-1, 28 * 28).copy()),
        train_y=torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        test_x=torch.from_numpy(arrays["test_images"].reshape(-1, 28 * 28).copy()),
        test_y=torch.from_numpy(arrays["test_labels"].astype(np.int64)),
    )


def download_mnist(data_dir: str) -> None:
    """Fetch MNIST into ``data_dir/MNIST/raw`` with torchvision (users who are online)."""
    from torchvision.datasets import MNIST  # imported here: only this path needs it

    try:
        for train in (True, False):
            MNIST(root=data_dir, train=train, download=True)
    except Exception as exc:  # torchvision raises RuntimeError/URLError/OSError
        reason = " ".join(str(exc).split())[:300]  # torchvision's message spans lines; keep ours on one
        raise UsageError(
            f"downloading MNIST into {data_dir} failed ({reason}); check the network or drop --download"
        ) from None
