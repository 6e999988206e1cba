"""``trainer generate RUN_DIR``: text sampled from a trained language model, printed on stdout.

RUN_DIR is found as ``trainer evaluate`` finds it (the exported final model, else the newest valid
checkpoint; or a checkpoint or export named directly). The model samples one token at a time on
the CPU from its distribution over the last ``block_size`` tokens, with a generator seeded by
``--seed``: the same weights, prompt and options print the same text. The task must be a language
model: one with ``encode``, ``decode`` and ``block_size`` (``shakespeare-char``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from trainer.commands.evaluate import load, model_from, resolve, task_from
from trainer.core.errors import UsageError
from trainer.tasks.gpt import sample


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainer generate",
        description="Sample text from a trained language model (shakespeare-char) and print it, prompt first.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("path", type=Path, help="A run directory, a step-N.pt checkpoint or an exported .safetensors.")
    parser.add_argument("--prompt", default="\n", help="The text to continue.")
    parser.add_argument("--tokens", type=int, default=500, help="How many tokens (characters) to generate.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampling: the same seed gives the same text.")
    parser.add_argument("--temperature", type=float, default=1.0, help="Divides the logits: lower is more likely text.")
    parser.add_argument("--top-k", type=int, default=None, help="Sample among the K likeliest tokens only.")
    return parser


def generate(args: argparse.Namespace) -> str:
    """The prompt and its continuation; ``UsageError`` (one line) for bad input."""
    checks = [
        (args.tokens >= 1, "--tokens must be at least 1"),
        (args.temperature > 0, "--temperature must be positive, e.g. 0.8"),
        (args.top_k is None or args.top_k >= 1, "--top-k must be at least 1"),
        (args.prompt != "", "--prompt must not be empty; give at least one character, e.g. a newline"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    source = resolve(args.path)
    state, config, _ = load(source)
    task, _ = task_from(source, config, ())
    if not all(hasattr(task, name) for name in ("encode", "decode", "block_size")):
        raise UsageError(
            f"{args.path} is a run of the task {task.name}; trainer generate needs a language-model task "
            "(shakespeare-char)"
        )
    ids = task.encode(args.prompt)  # type: ignore[attr-defined]  # checked just above
    model = model_from(source, state, task)
    generator = torch.Generator().manual_seed(args.seed)
    new = sample(model, ids, args.tokens, generator, args.temperature, args.top_k)  # type: ignore[arg-type]
    return args.prompt + task.decode(new)  # type: ignore[attr-defined]


def main(argv: Sequence[str]) -> None:
    """Print the text; bad input exits 2 with one line."""
    args = build_parser().parse_args(argv)
    try:
        text = generate(args)
    except UsageError as exc:
        print(f"trainer generate: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(text)
