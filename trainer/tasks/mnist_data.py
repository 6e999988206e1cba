"""MNIST, decoded once into memory as normalised float tensors.

The package ships the four gzip files (checked by SHA-256 on load), so the main job runs
offline. ``--data-dir`` reads a torchvision-layout copy (``DIR/MNIST/raw``, plain or gzip). A
gzip file is decoded once and the decoded copy kept for later starts (trainer/tasks/gunzip_cache.py).
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
from trainer.tasks.gunzip_cache import gunzipped, read_into_tensor

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


def _read_payload(path: Path, verified: tuple[str, bytes] | None, source_hint: str) -> torch.Tensor:
    """The file's bytes, decoded if it is gzip (kept decoded for the next start: gunzip_cache.py).
    ``verified``: the SHA-256 and bytes of a file already read and checked (the shipped copy)."""
    try:
        if path.suffix != ".gz":
            return read_into_tensor(path)
        if verified is None:
            raw = path.read_bytes()
            verified = hashlib.sha256(raw).hexdigest(), raw
        digest, raw = verified
        return gunzipped(raw, digest, path.stem)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise UsageError(f"{path} is truncated or not valid gzip ({exc}); {source_hint}") from None


def _parse_idx(data: torch.Tensor, path: Path, magic: int, count: int, source_hint: str) -> torch.Tensor:
    """Parse an IDX file (big-endian header, then uint8 payload) and check its shape; the payload
    is a view of ``data``."""
    ndim = 3 if magic == IMAGE_MAGIC else 1
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise UsageError(f"{path} is too short to be an MNIST file ({len(data)} bytes); {source_hint}")
    header = np.frombuffer(data[:header_len].numpy().tobytes(), dtype=">i4")
    dims = tuple(int(d) for d in header[1:])
    expected_dims = (count, 28, 28) if ndim == 3 else (count,)
    if int(header[0]) != magic or dims != expected_dims:
        raise UsageError(
            f"{path} has header magic={int(header[0])} shape={dims}, expected magic={magic} shape={expected_dims}; "
            f"{source_hint}"
        )
    payload = data[header_len:]
    if payload.numel() != int(np.prod(expected_dims)):
        raise UsageError(
            f"{path} holds {payload.numel()} bytes of data, expected {int(np.prod(expected_dims))} "
            f"(truncated?); {source_hint}"
        )
    return payload.view(expected_dims)


def _find(directory: Path, stem: str, source_hint: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise UsageError(f"{directory / stem}[.gz] is missing; {source_hint}")


def _verify_bundled(directory: Path) -> dict[str, tuple[str, bytes]]:
    """Check the shipped files against the shipped SHA256SUMS; file name -> its SHA-256 and bytes."""
    fix = "the installed package is damaged: reinstall it, or pass --data-dir"
    verified = {}
    for line in (directory / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        path = directory / name
        if not path.is_file():
            raise UsageError(f"{path} is missing; {fix}")
        raw = path.read_bytes()
        if hashlib.sha256(raw).hexdigest() != digest:
            raise UsageError(f"{path} fails its SHA-256 check; {fix}")
        verified[name] = digest, raw
    return verified


# 512 rows of float32 pixels, 1.6 MB: a chunk that stays in the core's cache through its four passes.
NORMALIZE_ROWS = 512


def normalize(pixels: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 pixels (the rows ``rows`` of them, default all) -> float32 inputs, roughly zero-mean
    and unit-variance: ``(pixels / 255 - MEAN) / STD``.

    Chunk by chunk, so that the conversion and the three passes of arithmetic run in the cache
    rather than four times over 170 MB of memory; each element gets the same float32 operations
    in the same order, so the values are the same bit for bit.
    """
    count = len(pixels) if rows is None else len(rows)
    out = torch.empty((count, *pixels.shape[1:]), dtype=torch.float32, device=pixels.device)
    for begin in range(0, count, NORMALIZE_ROWS):
        end = min(begin + NORMALIZE_ROWS, count)
        source = pixels[begin:end] if rows is None else pixels.index_select(0, rows[begin:end])
        out[begin:end].copy_(source).div_(255.0).sub_(MEAN).div_(STD)
    return out


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
        train_x=normalize(data.train_x, train_idx).to(device),
        train_y=data.train_y[train_idx].to(device),
        val_x=normalize(data.train_x, val_idx).to(device),
        val_y=data.train_y[val_idx].to(device),
        test_x=normalize(data.test_x).to(device),
        test_y=data.test_y.to(device),
    )


def load_mnist(data_dir: str | None) -> MnistArrays:
    """Load the shipped copy (``data_dir=None``) or a torchvision-layout one."""
    if data_dir is None:
        directory = Path(str(resources.files("trainer.tasks") / "mnist"))
        verified = _verify_bundled(directory)
        hint = "reinstall the package, or pass --data-dir"
    else:
        directory = Path(data_dir) / "MNIST" / "raw"
        hint = f"point --data-dir at a folder holding MNIST/raw, or add --download to fetch it into {data_dir}"
        verified = {}  # a gzip file's digest is taken as it is read
        if not directory.is_dir():
            raise UsageError(f"{directory} does not exist; {hint}")
    arrays: dict[str, torch.Tensor] = {}
    for key, stem in FILES.items():
        split, kind = key.split("_")
        path = _find(directory, stem, hint)
        magic = IMAGE_MAGIC if kind == "images" else LABEL_MAGIC
        data = _read_payload(path, verified.get(path.name), hint)
        arrays[key] = _parse_idx(data, path, magic, EXPECTED_COUNT[split], hint)
    log.info("loaded MNIST from %s", directory)
    return MnistArrays(
        train_x=arrays["train_images"].view(-1, 28 * 28),
        train_y=arrays["train_labels"].long(),
        test_x=arrays["test_images"].view(-1, 28 * 28),
        test_y=arrays["test_labels"].long(),
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
