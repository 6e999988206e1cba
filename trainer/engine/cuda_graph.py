"""The whole training step as one CUDA graph, for a model so small that its GPU step is launch-bound.

The MLP's step is a few dozen tiny kernels; in eager mode the GPU waits for Python to launch each
of them, and the step's clock and the divergence guard make the host wait for the GPU every step.
Here the step (gather of the batch, forward, backward, the guard, clipping, the optimiser) is
recorded once and replayed, and the host reads results only once per window of steps.

How it stays the same run as eager mode:

- The first ``WARMUP_STEPS`` steps of each process are eager (on a side stream, as PyTorch's
  recipe asks), so the optimiser's state exists before capture. The captured kernels are the
  eager ones, so the arithmetic is the same (tests/test_cuda.py compares the weights).
- The guard cannot branch on the host inside a graph. The step's verdict (loss and gradients
  finite) goes to the fused optimiser as ``found_inf``, which then leaves the weights and the
  momentum or Adam state untouched, exactly as eager mode skips the step; the loss and metrics of
  such a step count as zero, as in eager mode. The graph counts skipped steps and notes the first,
  and the trainer reads them at the end of each window: ``--on-nonfinite stop`` then stops naming
  that step, before any checkpoint of a later step is written.
- Batches must all have the same size (they do: the ragged tail of an epoch is dropped), and the
  learning rate is constant (the trainer has no schedule): both are baked into the graph.

What it gives up: per-step timings. The host waits for the GPU once per window, so each step of a
window is recorded as the window's mean (``data_ms`` reads 0: the gather is inside the graph).
Only one process on a CUDA device is supported: with several, the step would end in DDP's nccl
all-reduce, which this module does not capture.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from trainer.core.config import TrainConfig
from trainer.core.errors import UsageError
from trainer.core.schedule import scheduled
from trainer.core.task import Split, Task
from trainer.engine.evaluation import step_figures
from trainer.lifecycle.guard import grads_finite_tensor
from trainer.watch.metrics import StepTimes

log = logging.getLogger(__name__)

# Eager steps before capture: the first creates the optimiser's state, the others let lazy
# initialisation (cuBLAS workspaces, autograd's buffers) settle, as in PyTorch's recipe.
WARMUP_STEPS = 3

EagerStep = Callable[[torch.Tensor, StepTimes], torch.Tensor]


def use_cuda_graph(cfg: TrainConfig, device: torch.device, world_size: int, split: Split) -> bool:
    """Whether to capture the step: ``auto`` where it is safe (one process on CUDA, batches gathered on
    the device), ``on`` or an error."""
    capturable = bool(getattr(split, "capturable", False))
    possible = device.type == "cuda" and world_size == 1 and capturable
    if cfg.cuda_graph == "auto" and device.type == "cuda" and world_size == 1 and not capturable:
        log.info(
            "training step not captured in a CUDA graph: the task's training split (%s) collates its batches on "
            "the host; a TensorSplit gathers them on the device and can be captured",
            type(split).__name__,
        )
    if possible and scheduled(cfg):
        # The captured optimiser step replays the rate it was recorded with; a schedule changes it.
        if cfg.cuda_graph == "on":
            raise UsageError(
                f"--cuda-graph on replays one learning rate; --lr-schedule {cfg.lr_schedule} --warmup-steps "
                f"{cfg.warmup_steps} changes it each step: use --cuda-graph auto or off, or a constant rate"
            )
        if cfg.cuda_graph == "auto":
            log.info(
                "training step not captured in a CUDA graph: the learning-rate schedule changes the rate each step"
            )
        return False
    plain = cfg.grad_accum_steps == 1 and cfg.precision == "fp32"
    if possible and not plain:
        # The captured step is one forward and backward pass in float32.
        why = f"--grad-accum-steps {cfg.grad_accum_steps} --precision {cfg.precision}"
        if cfg.cuda_graph == "on":
            raise UsageError(f"--cuda-graph on captures one float32 pass per step, not {why}: use auto or off")
        if cfg.cuda_graph == "auto":
            log.info("training step not captured in a CUDA graph: %s", why)
        return False
    if cfg.cuda_graph == "on" and not possible:
        raise UsageError(
            f"--cuda-graph on needs one process on a CUDA device and a training split whose batches are "
            f"gathered on the device, such as a TensorSplit (here: device {device.type}, world size {world_size}, "
            f"{type(split).__name__}); use --cuda-graph auto, which captures only where it can"
        )
    return possible and cfg.cuda_graph != "off"


class GraphedStep:
    """Runs the training step eagerly ``WARMUP_STEPS`` times, then captures it and replays it."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        task: Task,
        split: Split,
        batch_size: int,
        clip_grad_norm: float | None,
    ) -> None:
        self.model, self.optimizer, self.task, self.split = model, optimizer, task, split
        self.clip_grad_norm = clip_grad_norm
        device = next(model.parameters()).device
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        # Written by the graph: steps skipped since the last ``settle``, the first of them (-1: none),
        # and the number of the step being replayed (the host's global step, kept on the device).
        self.skipped = torch.zeros((), dtype=torch.long, device=device)
        self.first_skipped = torch.full((), -1, dtype=torch.long, device=device)
        self.step_number = torch.zeros((), dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.result: torch.Tensor | None = None  # (loss, *metrics) of the replayed step, float64
        self.eager_steps = 0
        self.side_stream = torch.cuda.Stream(device)
        self.pending_steps = 0  # replayed since the last settle
        self.pending_since = 0.0

    def step(self, positions: torch.Tensor, times: StepTimes, global_step: int, eager: EagerStep) -> torch.Tensor:
        """One training step on the batch at ``positions`` (a device tensor); returns (loss, *metrics)."""
        if self.graph is None:
            if self.eager_steps < WARMUP_STEPS:
                self.eager_steps += 1
                return self._eager_on_side_stream(positions, times, eager)
            self._capture(global_step)
        self.positions.copy_(positions, non_blocking=True)
        if self.pending_steps == 0:
            self.pending_since = time.perf_counter()
        assert self.graph is not None and self.result is not None
        self.graph.replay()
        self.pending_steps += 1
        return self.result

    def settle(self, times: StepTimes) -> tuple[int, int]:
        """Wait for the replayed steps; record their time in ``times``; return (skipped, first skipped step).

        Called at the end of every window, where the host needs the window's results anyway.
        """
        if self.pending_steps == 0:
            return 0, -1
        torch.cuda.synchronize(self.positions.device)
        elapsed_ms = (time.perf_counter() - self.pending_since) * 1e3
        times.add_even(self.pending_steps, data_ms=0.0, compute_ms=elapsed_ms)
        self.pending_steps = 0
        skipped, first = int(self.skipped), int(self.first_skipped)
        if skipped:
            self.skipped.zero_()
            self.first_skipped.fill_(-1)
        return skipped, first

    def _eager_on_side_stream(self, positions: torch.Tensor, times: StepTimes, eager: EagerStep) -> torch.Tensor:
        main = torch.cuda.current_stream()
        self.side_stream.wait_stream(main)
        with torch.cuda.stream(self.side_stream):
            result = eager(positions, times)
        main.wait_stream(self.side_stream)
        return result

    def _capture(self, global_step: int) -> None:
        started = time.perf_counter()
        self.step_number.fill_(global_step)
        self.optimizer.zero_grad(set_to_none=True)  # the graph allocates the gradients it writes
        graph = torch.cuda.CUDAGraph()
        groups = self.optimizer.param_groups
        capturable = [group.get("capturable") for group in groups]
        for group in groups:
            # Fused Adam keeps its step count on the device, so it can be captured whatever this flag
            # says; Adam's capture check reads it. Restored at once: the saved optimiser state keeps it.
            if "capturable" in group:
                group["capturable"] = True
        try:
            with torch.cuda.graph(graph):
                self.result = self._step_body()
        finally:
            for group, flag in zip(groups, capturable, strict=True):
                if flag is not None:
                    group["capturable"] = flag
        self.graph = graph
        log.info(
            "training step captured in a CUDA graph after %d eager steps (%.0f ms); replayed from step %d",
            self.eager_steps,
            (time.perf_counter() - started) * 1e3,
            global_step + 1,
        )

    def _step_body(self) -> torch.Tensor:
        """The eager step of ``Trainer.train_step`` without a host read (recorded, not run)."""
        loss, metrics = self.task.loss(self.model, self.split.batch(self.positions))
        figures = step_figures(self.task, loss, metrics)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        finite = grads_finite_tensor(params, loss)
        if self.clip_grad_norm is not None:  # clips a non-finite step too: its update is dropped anyway
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        found_inf = (~finite).float()
        self.optimizer.found_inf = found_inf  # type: ignore[attr-defined]  # read by the fused optimisers
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf  # type: ignore[attr-defined]
        self.step_number.add_(1)
        self.skipped.add_((~finite).long())
        self.first_skipped.copy_(torch.where((self.first_skipped < 0) & ~finite, self.step_number, self.first_skipped))
        return torch.where(finite, figures, torch.zeros_like(figures))
