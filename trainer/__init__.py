"""Elastic data-parallel training with PyTorch, launched by torchrun."""

__version__ = "0.1.0"
