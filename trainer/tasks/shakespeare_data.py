"""Tiny Shakespeare as character ids, and windows of it addressed by position.

The package ships the text gzipped (``trainer/tasks/shakespeare/input.txt.gz``); ``SHA256SUMS``
holds the digest of the uncompressed text (the upstream file's), checked on every load. The
vocabulary is the text's 65 distinct characters, sorted; the first 90 % of the characters are the
training text and the last 10 % the validation text, as in nanoGPT's ``shakespeare_char``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from trainer.core.errors import UsageError

TRAIN_FRACTION = 0.9
FIX = "the installed package is damaged: reinstall it"


def data_dir() -> Path:
    return Path(str(resources.files("trainer.tasks") / "shakespeare"))


@functools.cache
def load_text() -> str:
    """The shipped text, after checking it against its SHA-256 (read once per process)."""
    directory = data_dir()
    digest, name = (directory / "SHA256SUMS").read_text().split()
    path = directory / f"{name}.gz"
    try:
        raw = gzip.decompress(path.read_bytes())
    except FileNotFoundError:
        raise UsageError(f"{path} is missing; {FIX}") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise UsageError(f"{path} is truncated or not valid gzip ({exc}); {FIX}") from None
    if hashlib.sha256(raw).hexdigest() != digest:
        raise UsageError(f"{path} fails its SHA-256 check; {FIX}")
    return raw.decode("utf-8")


@dataclass(frozen=True)
class Corpus:
    """The vocabulary and the two texts as int64 character ids."""

    vocabulary: str  # the distinct characters, sorted: id i is vocabulary[i]
    train: torch.Tensor
    val: torch.Tensor


@functools.cache
def load_corpus() -> Corpus:
    text = load_text()
    vocabulary = "".join(sorted(set(text)))
    table = torch.full((max(map(ord, vocabulary)) + 1,), -1, dtype=torch.int64)
    table[torch.tensor([ord(c) for c in vocabulary])] = torch.arange(len(vocabulary))
    ids = table[torch.tensor([ord(c) for c in text])]
    cut = int(len(ids) * TRAIN_FRACTION)
    return Corpus(vocabulary, ids[:cut], ids[cut:])


def window_count(length: int, size: int, stride: int) -> int:
    """How many windows of ``size`` ids start at multiples of ``stride`` and fit in ``length`` ids."""
    return max(0, (length - size) // stride + 1)


class WindowSplit:
    """Windows of ``block_size + 1`` ids of a text, window ``i`` starting at id ``i * stride``.

    ``batch`` returns (inputs, targets): each window's first ``block_size`` ids and the same shifted
    by one. The whole text lives on the training device and a batch is one gather there.
    """

    # A CUDA graph may record ``batch``: it is device work only, with no host read.
    capturable = True

    def __init__(self, ids: torch.Tensor, block_size: int, stride: int, device: torch.device | str) -> None:
        self.ids = ids.to(device)
        self.stride = stride
        self.count = window_count(len(ids), block_size + 1, stride)
        if self.count == 0:
            raise UsageError(f"a text of {len(ids)} characters holds no window of {block_size + 1}; lower --block-size")
        self.offsets = torch.arange(block_size + 1, device=device)

    def __len__(self) -> int:
        return self.count

    def batch(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        windows = self.ids[(positions * self.stride).unsqueeze(1) + self.offsets]
        return windows[:, :-1], windows[:, 1:]
