"""A character-level GPT on Tiny Shakespeare: nanoGPT's ``shakespeare_char`` on the engine.

A training sample at position ``i`` is the window of ``block_size + 1`` characters that starts at
character ``i * window_stride`` of the training text (inputs: its first ``block_size``; targets: the
same shifted by one). An epoch is every such window once, in the engine's shuffled order, so
exact resume, a change of world size and ``--max-steps`` work as for any task. The validation
windows are fixed: those starting at every multiple of ``block_size`` in the validation text, so
each of its characters after the first is predicted once. docs/shakespeare.md says more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from trainer.core.config import TrainConfig
from trainer.core.errors import UsageError
from trainer.core.optim import build_optimizer
from trainer.core.task import Batch, Splits, StepResult, Task, option
from trainer.tasks.gpt import GPT, GPTShape, decay_groups, sample
from trainer.tasks.shakespeare_data import WindowSplit, load_corpus


@dataclass(frozen=True)
class ShakespeareOptions:
    n_layer: int = option(4, "Transformer blocks.")
    n_head: int = option(4, "Attention heads per block (must divide --n-embd).")
    n_embd: int = option(128, "Width of the embeddings and the residual stream.")
    block_size: int = option(64, "Context length in characters: each training window is this plus one.")
    dropout: float = option(0.0, "Dropout after the embeddings, in attention and after each residual branch.")
    bias: bool = option(False, "Biases in the Linear layers and LayerNorms (nanoGPT's default has none).")
    window_stride: int = option(
        1, "Characters between the starts of consecutive training windows: 1 is every window; N keeps 1 in N."
    )

    def __post_init__(self) -> None:
        checks = [
            (
                min(self.n_layer, self.n_head, self.n_embd, self.block_size) >= 1,
                "--n-layer, --n-head, --n-embd and --block-size must be positive",
            ),
            (self.n_embd % self.n_head == 0, f"--n-embd {self.n_embd} must be a multiple of --n-head {self.n_head}"),
            (0 <= self.dropout < 1, "--dropout must be in [0, 1), e.g. 0.1"),
            (self.window_stride >= 1, "--window-stride must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)


class ShakespeareChar(Task):
    """Next-character prediction; the loss is the mean cross-entropy per character (nats).

    Perplexity per character is ``exp`` of it (not reported as a metric: a mean of per-batch
    perplexities is not the perplexity of the mean loss).
    """

    name = "shakespeare-char"
    Options = ShakespeareOptions
    # Tokens per forward pass in evaluation: 64 windows of 64 characters by default.
    eval_batch_size = 64
    # nanoGPT's CPU recipe (config/train_shakespeare_char.py with its CPU overrides): 2000 steps
    # of 12 windows, AdamW, 100 warm-up steps then cosine decay to 1e-4 at step 2000, gradient
    # norm clipped to 1.
    defaults: ClassVar[dict[str, Any]] = {
        "optimizer": "adamw",
        "lr": 1e-3,
        "lr_schedule": "cosine",
        "warmup_steps": 100,
        "lr_decay_steps": 2000,
        "min_lr": 1e-4,
        "beta2": 0.99,
        "weight_decay": 0.1,
        "global_batch_size": 12,
        "clip_grad_norm": 1.0,
        "epochs": 1,
        "max_steps": 2000,
        "run_dir": "runs/shakespeare-char",
    }

    @property
    def vocabulary(self) -> str:
        return load_corpus().vocabulary

    @property
    def block_size(self) -> int:
        return self.options.block_size

    def shape(self) -> GPTShape:
        o = self.options
        return GPTShape(len(self.vocabulary), o.block_size, o.n_layer, o.n_head, o.n_embd, o.dropout, o.bias)

    def build_model(self) -> nn.Module:
        return GPT(self.shape())

    def build_data(self, device: torch.device) -> Splits:
        corpus, size = load_corpus(), self.options.block_size
        return Splits(
            train=WindowSplit(corpus.train, size, self.options.window_stride, device),
            val=WindowSplit(corpus.val, size, size, device),
        )

    def loss(self, model: nn.Module, batch: Batch) -> StepResult:
        inputs, targets = batch
        logits = model(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)), {}

    def build_optimizer(self, model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
        return build_optimizer(cfg, decay_groups(model, cfg.weight_decay))

    def encode(self, text: str) -> list[int]:
        """Character ids of ``text``; a character outside the vocabulary is a one-line ``UsageError``."""
        index = {c: i for i, c in enumerate(self.vocabulary)}
        for c in text:
            if c not in index:
                raise UsageError(
                    f"the character {c!r} is not in the vocabulary of shakespeare-char (letters, digit 3, space, "
                    f"newline and {''.join(c for c in self.vocabulary if not c.isalnum() and not c.isspace())}); "
                    "remove or replace it"
                )
        return [index[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocabulary[i] for i in ids)

    def describe(self, model: nn.Module) -> str:
        o = self.options
        return f"GPT {o.n_layer} layers, {o.n_head} heads, width {o.n_embd}, context {o.block_size}"

    def tokens_per_sample(self) -> int:
        return self.options.block_size

    def flops_per_sample(self, model: nn.Module) -> float:
        """nanoGPT's ``estimate_mfu`` per window: 6 N + 12 L H Q T per token, N the weights less the
        position embeddings (a lookup, no multiply-adds), Q the head width, T the context."""
        o = self.options
        weights = sum(p.numel() for p in model.parameters()) - o.block_size * o.n_embd
        per_token = 6 * weights + 12 * o.n_layer * o.n_head * (o.n_embd // o.n_head) * o.block_size
        return float(per_token * o.block_size)

    def sample_text(self, model: nn.Module) -> str:
        """200 characters after a newline, at temperature 1 from a generator seeded with 0, as
        ``trainer generate RUN_DIR --prompt '\\n' --tokens 200 --seed 0`` prints them."""
        was_training = model.training
        try:
            new = sample(model, self.encode("\n"), 200, torch.Generator().manual_seed(0), 1.0, None)  # type: ignore[arg-type]
        finally:
            model.train(was_training)
        return self.decode(new)

    def export_metadata(self, model: nn.Module) -> dict[str, Any]:
        o = self.options
        return {
            "vocabulary": self.vocabulary,
            "encoding": "character i of the text is vocabulary.index(character); logits index the same list",
            "block_size": o.block_size,
            "n_layer": o.n_layer,
            "n_head": o.n_head,
            "n_embd": o.n_embd,
            "bias": o.bias,
            "tied": ["transformer.wte.weight", "lm_head.weight"],
            "architecture": "nanoGPT GPT: pre-LayerNorm blocks, causal attention, 4x GELU MLP, final LayerNorm",
        }
