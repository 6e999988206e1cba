"""Decoded copies of gzip data files, kept once per content, so that a rank's start reads them.

Every rank of every run decodes the MNIST it trains on: 47 MB of pixels inflated from 10 MB of
gzip, about 0.12 CPU-s each time, while reading a decoded copy takes about 0.02. The copy is named
by the SHA-256 of the gzip file, so a changed or damaged source never meets an old copy, and its
size must equal the size the gzip file records; it is written under a temporary name, flushed and
renamed, so a reader sees a whole copy or none, and ranks that start together and all miss each
write their own and the last rename wins (the contents are the same).

The folder: ``$TRAINER_CACHE_DIR``, else ``$XDG_CACHE_HOME/trainer``, else ``~/.cache/trainer``.
Where it cannot be written, the file is decoded in memory at each start, as without a cache.
"""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

import torch

from trainer.core.fileio import atomic_write_bytes

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where decoded copies live (module docstring)."""
    if os.environ.get("TRAINER_CACHE_DIR"):
        return Path(os.environ["TRAINER_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trainer"


def recorded_size(gzipped: bytes) -> int:
    """The decoded size the gzip trailer records (ISIZE: the size modulo 2**32)."""
    return int.from_bytes(gzipped[-4:], "little") if len(gzipped) >= 18 else -1


def read_into_tensor(path: Path) -> torch.Tensor:
    """The whole file as a writable uint8 tensor, read straight into it (no second copy)."""
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        buffer = torch.empty(size, dtype=torch.uint8)
        if handle.readinto(memoryview(buffer.numpy())) != size:
            raise OSError(f"{path} changed size while being read")
    return buffer


def gunzipped(gzipped: bytes, digest: str, name: str) -> torch.Tensor:
    """``gzipped`` (a file whose SHA-256 is ``digest``; ``name`` its decoded name) decoded, as a writable uint8
    tensor: read from the cache when a whole copy is there, else decoded here and kept there.

    Raises what ``gzip.decompress`` raises for data that is not valid gzip.
    """
    copy = cache_dir() / "gunzipped" / f"{name}.{digest}"
    try:
        if copy.stat().st_size % 2**32 == recorded_size(gzipped):
            return read_into_tensor(copy)
    except OSError:
        pass  # no copy yet, or it went away: decode
    data = gzip.decompress(gzipped)
    try:
        atomic_write_bytes(copy, data)
    except OSError as exc:
        log.debug("not keeping the decoded %s in %s: %s", name, copy.parent, exc)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)
