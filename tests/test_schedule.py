"""The learning-rate schedule as a function of the global step (trainer/core/schedule.py); its exact
resume under torchrun and kill -9 is tested with the GPT in tests/test_shakespeare.py."""

from __future__ import annotations

import math

import pytest

from trainer.cli import parse_run
from trainer.core.errors import UsageError
from trainer.core.schedule import lr_at


def nanogpt_get_lr(it: int, learning_rate: float, warmup_iters: int, lr_decay_iters: int, min_lr: float) -> float:
    """nanoGPT's train.py ``get_lr``, transcribed."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


def test_cosine_is_nanogpts_schedule() -> None:
    cfg = parse_run(["--task", "shakespeare-char"])[0]  # the task's defaults: nanoGPT's recipe
    assert (cfg.lr_schedule, cfg.warmup_steps, cfg.lr_decay_steps, cfg.min_lr) == ("cosine", 100, 2000, 1e-4)
    for step in (0, 1, 50, 99, 100, 101, 777, 1999, 2000, 2001, 5000):
        assert lr_at(cfg, step) == pytest.approx(nanogpt_get_lr(step, 1e-3, 100, 2000, 1e-4), rel=1e-12), step


def test_wsd_holds_then_falls_linearly_over_the_last_fifth() -> None:
    args = ["--lr", "0.1", "--lr-schedule", "wsd", "--warmup-steps", "10", "--lr-decay-steps", "100"]
    cfg = parse_run([*args, "--min-lr", "0.0"])[0]
    assert [lr_at(cfg, s) for s in (0, 9)] == pytest.approx([0.1 / 11, 0.1 * 10 / 11])
    assert [lr_at(cfg, s) for s in (10, 50, 80, 90, 100, 150)] == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.0, 0.0])


def test_constant_is_the_rate_after_the_warm_up_and_defaults_are_untouched() -> None:
    cfg = parse_run(["--lr", "0.5", "--warmup-steps", "4"])[0]
    assert [lr_at(cfg, s) for s in (0, 3, 4, 10_000)] == pytest.approx([0.1, 0.4, 0.5, 0.5])
    plain = parse_run([])[0]
    assert (plain.lr_schedule, plain.warmup_steps) == ("constant", 0) and lr_at(plain, 123) == plain.lr


def test_a_decaying_schedule_needs_its_end() -> None:
    with pytest.raises(UsageError, match="--lr-schedule cosine needs --lr-decay-steps"):
        parse_run(["--lr-schedule", "cosine"])
    with pytest.raises(UsageError, match="--warmup-steps must be below"):
        parse_run(["--lr-schedule", "cosine", "--max-steps", "10", "--warmup-steps", "10"])
    assert parse_run(["--lr-schedule", "cosine", "--max-steps", "10"])[0].decay_steps == 10
