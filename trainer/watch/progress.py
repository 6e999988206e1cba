"""What a run records as it goes: step windows, per-epoch rows, the summary, and the rank logs.

Files (under ``--run-dir``):

- ``rank<r>.jsonl``: every rank's window samples (loss, step/data/compute/sync ms, CPU %, RSS, USS, PSS)
  and events (first step, end);
- ``samples/rank<r>-pid<p>.jsonl``: with ``--record-samples``, the positions of every batch;
- ``metrics.csv``: one row per epoch (rank 0);
- ``summary.json``: the whole run (rank 0);
- ``platform.json``: the machine and software it ran on (rank 0; ``trainer.watch.machine``);
- ``tensorboard/``: with ``--tensorboard``, the curves as event files (rank 0; ``trainer.watch.tensorboard``);
- ``hang-rank<r>.txt``: only when a wait for peers fails (``trainer.watch.hang``).

Hazard: ``epoch_row`` and ``finish`` reduce figures across ranks, so every rank calls them at
the same point of the run.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from trainer.core.config import TrainConfig
from trainer.core.fileio import write_json
from trainer.core.task import Task
from trainer.core.weights import count_parameters, params_sha256
from trainer.distributed.collectives import reduce_max, reduce_sum
from trainer.distributed.env import DistEnv
from trainer.lifecycle.rundir import earlier_segments
from trainer.lifecycle.train_state import TrainState
from trainer.watch.hang import HangWatch
from trainer.watch.machine import measure_matmul, record_platform
from trainer.watch.metrics import RankLog, ResourceSampler, StepTimes, peak_rss_mb, percentile, write_metrics_csv
from trainer.watch.tensorboard import TensorBoardLog, require_tensorboard

log = logging.getLogger(__name__)


class Progress:
    """One rank's records of its run, and the progress bar on rank 0's terminal."""

    def __init__(self, cfg: TrainConfig, dist_env: DistEnv, device: torch.device, task: Task) -> None:
        self.cfg, self.dist_env, self.device = cfg, dist_env, device
        self.figures = ("loss", *task.metrics)  # what each step reports, in order
        self.task, self.task_name = task, task.name
        self.run_dir = Path(cfg.run_dir)
        self.sampler = ResourceSampler()
        self.rank_log = RankLog(self.run_dir / f"rank{dist_env.rank}.jsonl")
        self.samples_log = (
            RankLog(self.run_dir / "samples" / f"rank{dist_env.rank}-pid{os.getpid()}.jsonl")
            if cfg.record_samples
            else None
        )
        self.run_times = StepTimes()  # every window of this process, for the summary
        self.extra: dict[str, Any] = {}  # figures the engine adds to the summary
        self.show_bar = dist_env.is_main and sys.stdout.isatty()
        self._first_step_done = False
        self.resumed_from_step: int | None = None
        if cfg.tensorboard:
            require_tensorboard()
        self.tensorboard: TensorBoardLog | None = None
        self.hang = HangWatch(self.run_dir, dist_env, cfg.timeout)
        self._trained_at = (0, 0.0)  # (samples trained, training seconds) at the end of the previous window

    def start(self, resumed_from_step: int | None, state: TrainState) -> None:
        """Begin recording a run that resumed from ``resumed_from_step`` (None: from scratch). Collective."""
        self.resumed_from_step = resumed_from_step
        self._trained_at = (state.samples_trained, state.train_seconds)
        record_platform(self.run_dir, self.dist_env, self.cfg.comm)
        if self.cfg.tensorboard:
            self.tensorboard = TensorBoardLog(self.run_dir, self.dist_env, self.device, resumed_from_step)
        self.hang.start(state.global_step)
        if self.samples_log is not None:
            env = self.dist_env
            self.samples_log.write(
                {
                    "event": "start",
                    "time": time.time(),
                    "resumed_from_step": resumed_from_step or 0,
                    "run_id": env.run_id,
                    "restarts": env.restart_count,
                    "rank": env.rank,
                    "world_size": env.world_size,
                }
            )
        self.sampler.start()

    def stop(self) -> None:
        self.sampler.stop()
        self.hang.stop()
        if self.tensorboard is not None:
            self.tensorboard.close()

    @contextmanager
    def epoch_bar(self, steps: int, epoch: int) -> Iterator[tqdm]:
        """A bar over the epoch's steps on an interactive terminal (a disabled one elsewhere)."""
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", file=sys.stdout, disable=not self.show_bar)
        redirect = logging_redirect_tqdm([logging.getLogger("trainer")]) if self.show_bar else nullcontext()
        with bar, redirect:
            yield bar

    def step_done(self, state: TrainState, positions: torch.Tensor) -> None:
        """Per-step records that are off or one-off: the sample positions (debugging), the first step."""
        self.hang.step_done(state.global_step)
        if self.samples_log is not None:
            self.samples_log.write(
                {"step": state.global_step, "epoch": state.epoch + 1, "positions": positions.tolist()}
            )
        if not self._first_step_done:
            self._first_step_done = True
            self.rank_log.write(
                {
                    "event": "first_step",
                    "step": state.global_step,
                    "time": time.time(),
                    "restarts": self.dist_env.restart_count,
                    "resumed_from_step": self.resumed_from_step,
                    "world_size": self.dist_env.world_size,
                }
            )

    def step_skipped(self, step: int, count: int = 1) -> None:
        """Steps whose update ``--on-nonfinite skip`` dropped (``count`` from ``step``, as a CUDA graph reports
        them once a window): in the rank log, and a warning from rank 0."""
        record = {"event": "skipped_nonfinite", "step": step, "time": time.time()}
        if count == 1:
            self.rank_log.write(record)
            log.warning("step %d: loss or gradient not finite on some rank; update skipped (--on-nonfinite skip)", step)
            return
        self.rank_log.write({**record, "count": count})
        log.warning(
            "%d steps from step %d: loss or gradient not finite; updates skipped (--on-nonfinite skip)", count, step
        )

    def window_done(
        self, state: TrainState, window: StepTimes, loss: float, bar: tqdm, at_log: bool, lr: float | None = None
    ) -> None:
        """Record a window of steps (``loss``: this rank's mean; ``lr``: the rate of its last step) and
        log it at ``--log-every`` steps.

        With ``--tensorboard`` this is collective (the ranks' figures are gathered).
        """
        self.run_times.merge(window)
        samples, seconds = state.samples_trained - self._trained_at[0], state.train_seconds - self._trained_at[1]
        self._trained_at = (state.samples_trained, state.train_seconds)
        record = {
            "step": state.global_step,
            "epoch": state.epoch + 1,
            "loss": loss,
            "lr": lr,
            "step_ms": window.mean("step_ms"),
            "data_ms": window.mean("data_ms"),
            "compute_ms": window.mean("compute_ms"),
            "sync_ms": window.mean("sync_ms"),
            "cpu_percent": self.sampler.last_cpu_percent,
            "rss_mb": self.sampler.last_rss_mb,
            # Sampled every few seconds (ResourceSampler): the latest, not this window's own.
            "uss_mb": self.sampler.last_uss_mb,
            "pss_mb": self.sampler.last_pss_mb,
            "samples_per_second": samples / seconds if seconds > 0 else 0.0,
            **window.percentiles(),
            "time": time.time(),
        }
        self.rank_log.write(record)
        if self.tensorboard is not None:
            self.tensorboard.window(record)
        if at_log and not self.show_bar:
            log.info(
                "epoch %d step %d loss %.4f | step %.2f ms (data %.2f, compute %.2f, sync %.2f)",
                record["epoch"],
                record["step"],
                record["loss"],
                record["step_ms"],
                record["data_ms"],
                record["compute_ms"],
                record["sync_ms"],
            )
        if not bar.disable:
            bar.set_postfix(loss=f"{loss:.4f}", sync_ms=f"{record['sync_ms']:.2f}")

    def epoch_row(self, state: TrainState, val: dict[str, float]) -> dict[str, Any]:
        """The epoch's metrics row, appended to the history and ``metrics.csv``. Collective."""
        cpu = self.sampler.take_mean_cpu()
        self.sampler.sample_memory()
        sampler = self.sampler
        cpu_total, rss_total, uss_total, pss_total = reduce_sum(
            [cpu, sampler.last_rss_mb, sampler.last_uss_mb, sampler.last_pss_mb], self.device
        )
        steps, seconds = state.epoch_steps, state.epoch_seconds
        row = {
            "epoch": state.epoch + 1,
            "global_step": state.global_step,
            # Over the epoch's batches as they were trained on (the model changing meanwhile).
            **{
                f"train_{name}": (total / steps if steps else float("nan"))
                for name, total in zip(self.figures, state.epoch_sums or [0.0] * len(self.figures), strict=True)
            },
            **val,
            "epoch_seconds": seconds,
            "batches_per_second": steps / seconds if seconds else 0.0,
            # ``consumed`` counts the epoch's samples across restarts and world sizes.
            "samples_per_second": state.consumed / seconds if seconds else 0.0,
            "cpu_percent_total": cpu_total,
            "rss_mb_total": rss_total,
            # What the ranks hold alone, and what the job holds (shared pages counted once).
            "uss_mb_total": uss_total,
            "pss_mb_total": pss_total,
        }
        if state.history and state.history[-1]["epoch"] == row["epoch"]:
            state.history.pop()  # the row of this epoch as --max-steps cut it; a continued run completes it
        state.history.append(row)
        if self.tensorboard is not None:
            self.tensorboard.epoch(row)
        if self.dist_env.is_main:
            write_metrics_csv(self.run_dir / "metrics.csv", state.history)
        log.info(
            "epoch %d done: train loss %.4f, %s%.1f s, %.0f samples/s",
            row["epoch"],
            row["train_loss"],
            "".join(f"{name.replace('_', ' ')} {value:.4f}, " for name, value in val.items()),
            seconds,
            row["samples_per_second"],
        )
        return row

    def finish(self, state: TrainState, model: nn.Module, test: dict[str, float], wall_s: float) -> dict[str, Any]:
        """Write ``summary.json`` (rank 0) and close the rank log; returns the summary. Collective.

        ``test`` is the test split's figures (``test_loss``, ``test_<metric>``); ``wall_s`` the run's wall time.
        """
        summary = self._summarize(state, model, test, wall_s)
        times = self.run_times.sync_samples  # this rank's own sync distribution, for the report
        self.rank_log.write(
            {
                "event": "end",
                "step": state.global_step,
                "params_sha256": summary["params_sha256"],
                "sync_ms_p50": percentile(times, 50),
                "sync_ms_p95": percentile(times, 95),
                "time": time.time(),
            }
        )
        self.rank_log.close()
        if self.dist_env.is_main:
            write_json(self.run_dir / "summary.json", summary)
        if summary["tokens_per_second"] or summary["mfu"]:
            log.info(
                "model FLOPs: %s%s",
                f"{summary['tokens_per_second']:.0f} tokens/s, " if summary["tokens_per_second"] else "",
                f"MFU {summary['mfu']:.1%} of {summary['matmul_gflops_per_rank']:.1f} GFLOP/s per rank (fp32 matmul)"
                if summary["mfu"]
                else "no MFU (measured on the CPU only)",
            )
        log.info(
            "done: %strain %.1f s, %.0f samples/s, sync %.3f ms/batch, "
            "peak USS %.0f MB/rank (RSS %.0f, counting what the ranks share in each)",
            "".join(f"{name.replace('_', ' ')} {value:.4f}, " for name, value in test.items()),
            summary["train_seconds"],
            summary["samples_per_second"],
            summary["sync_ms_per_batch"],
            summary["peak_uss_mb"],
            summary["peak_rss_mb"],
        )
        return summary

    def _summarize(self, state: TrainState, model: nn.Module, test: dict[str, float], wall_s: float) -> dict:
        env, times = self.dist_env, self.run_times
        means = [times.mean(n) for n in ("step_ms", "data_ms", "compute_ms", "sync_ms")]
        peak = peak_rss_mb()
        self.sampler.sample_memory()
        peak_uss, peak_pss = self.sampler.peak_uss_mb, self.sampler.peak_pss_mb
        cpu_mean = sum(r["cpu_percent_total"] for r in state.history) / max(1, len(state.history))
        *sums, peak_total, peak_pss_total = reduce_sum([*means, peak, peak_pss], self.device)
        step_ms, data_ms, compute_ms, sync_ms = (value / env.world_size for value in sums)
        on_cuda = self.device.type == "cuda"
        peak_gpu = torch.cuda.max_memory_allocated(self.device) / 2**20 if on_cuda else 0.0
        p50, p95 = percentile(times.sync_samples, 50), percentile(times.sync_samples, 95)
        peak_max, p50, p95, peak_gpu_max, peak_uss_max, peak_pss_max = reduce_max(
            [peak, p50, p95, peak_gpu, peak_uss, peak_pss], self.device
        )
        last = state.history[-1] if state.history else {}
        earlier = earlier_segments(self.run_dir)
        start = earlier[-1]["to_step"] if earlier else 0
        segment: dict[str, Any] = {"from_step": start, "to_step": state.global_step}
        segment.update(epochs_requested=self.cfg.epochs, max_steps=self.cfg.max_steps)
        return {
            "task": self.task_name,
            "continued_from_step": start if earlier else None,
            "segments": [*earlier, segment],
            "world_size": env.world_size,
            "epochs": len(state.history),
            "epochs_requested": self.cfg.epochs,
            "global_step": state.global_step,
            "restarts": env.restart_count,
            "resumed_from_step": self.resumed_from_step,
            "skipped_nonfinite_steps": state.skipped_steps,
            **test,
            **{f"val_{name}": last.get(f"val_{name}") for name in self.figures},
            "train_seconds": state.train_seconds,
            "wall_seconds": wall_s,
            "samples_per_second": state.samples_trained / state.train_seconds if state.train_seconds else 0.0,
            "step_ms": step_ms,
            "data_ms": data_ms,
            "compute_ms": compute_ms,
            "sync_ms_per_batch": sync_ms,
            "sync_ms_p50": p50,
            "sync_ms_p95": p95,
            "cpu_percent_total": cpu_mean,
            "peak_rss_mb": peak_max,
            "peak_rss_mb_total": peak_total,
            # USS: what one rank alone holds; PSS: its share of every page (the ranks' PSS sum to the
            # job's memory). Sampled peaks; RSS counts the shared libraries and mapping in every rank.
            "peak_uss_mb": peak_uss_max,
            "peak_pss_mb": peak_pss_max,
            "peak_pss_mb_total": peak_pss_total,
            "peak_gpu_mb": peak_gpu_max if on_cuda else None,
            "threads_per_rank": torch.get_num_threads(),
            "backend": dist.get_backend() if dist.is_initialized() else "none",
            "device": str(self.device),
            "torch_version": torch.__version__,
            "parameters": count_parameters(model),
            "params_sha256": params_sha256(model),
            **self.model_flops(model, state.samples_trained / state.train_seconds if state.train_seconds else 0.0),
            **self.extra,
        }

    def model_flops(self, model: nn.Module, samples_per_second: float) -> dict[str, Any]:
        """tokens/s, and the model FLOPs utilisation: the task's FLOPs per sample times samples/s over
        world size x the fp32 matmul rate that rank 0 measures at the end at the ranks' thread count
        (a 512 x 512 torch.mm, about 0.1 s; ``trainer platform`` measures the same kind of figure).
        The MFU is rank 0's figure, on the CPU only: None elsewhere or where the task gives no FLOPs."""
        tokens = self.task.tokens_per_sample()
        flops = self.task.flops_per_sample(model)
        figures: dict[str, Any] = {
            "tokens_per_second": samples_per_second * tokens if tokens else None,
            "model_flops_per_sample": flops,
            "matmul_gflops_per_rank": None,
            "mfu": None,
        }
        if flops and self.dist_env.is_main and self.device.type == "cpu" and samples_per_second > 0:
            rate = measure_matmul(torch.get_num_threads(), size=512, repeats=5)["gflops"]
            figures["matmul_gflops_per_rank"] = rate
            figures["mfu"] = flops * samples_per_second / (self.dist_env.world_size * rate * 1e9)
        return figures
