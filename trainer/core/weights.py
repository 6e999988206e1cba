"""A model's size and a fingerprint of its weights."""

from __future__ import annotations

import hashlib

from torch import nn


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def params_sha256(model: nn.Module) -> str:
    """SHA-256 over every parameter's and buffer's bytes in name order: equal hashes mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()
