"""The training loop: steps, epochs, evaluation, and the files a run leaves behind."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from trainer.checkpoint import FORMAT, capture_rng, restore_rng, save_checkpoint
from trainer.comm import wrap_model
from trainer.config import TrainConfig
from trainer.data import MnistArrays, normalize
from trainer.distributed import DistEnv, barrier
from trainer.errors import UsageError
from trainer.fileio import write_json
from trainer.metrics import (
    RankLog,
    ResourceSampler,
    StepTimes,
    device_clock,
    peak_rss_mb,
    percentile,
    write_metrics_csv,
)
from trainer.model import build_model, build_optimizer, count_parameters, params_sha256
from trainer.sampling import EpochPlan, epoch_permutation, split_indices
from trainer.signals import StopRequested, StopSignal

log = logging.getLogger(__name__)

EVAL_BATCH = 4096


@dataclass
class TrainState:
    """Where training stands: everything besides model, optimiser and RNGs that a resume needs.

    Every field is global (the same on all ranks), so any rank's copy can continue the run at any
    world size.
    """

    epoch: int = 0  # zero-based epoch in progress
    consumed: int = 0  # global samples of that epoch already trained on
    global_step: int = 0
    epoch_loss_sum: float = 0.0  # sum over the epoch's steps of the batch loss averaged over ranks
    epoch_steps: int = 0
    epoch_seconds: float = 0.0  # training time spent in the epoch so far
    train_seconds: float = 0.0  # training time of the whole run (evaluation excluded)
    samples_trained: int = 0  # global samples trained on in the whole run
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics row per epoch


def reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum across ranks (identity at world size 1)."""
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def reduce_max(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


class Trainer:
    """Owns the model, optimiser, data and state of one process of the job."""

    def __init__(self, cfg: TrainConfig, dist_env: DistEnv, device: torch.device, data: MnistArrays) -> None:
        self.cfg, self.dist_env, self.device = cfg, dist_env, device
        self.run_dir = Path(cfg.run_dir)
        train_idx, val_idx = split_indices(len(data.train_x), cfg.val_fraction, cfg.seed)
        self.batch_size = cfg.per_rank_batch(dist_env.world_size)
        global_batch = self.batch_size * dist_env.world_size
        if global_batch > len(train_idx):
            raise UsageError(
                f"a global batch of {global_batch} ({self.batch_size} per process x {dist_env.world_size} processes) "
                f"exceeds the {len(train_idx)} training samples; use a smaller --batch-size or --global-batch-size"
            )
        # Decoded once: steps only gather rows, with no per-sample Python work.
        self.train_x, self.train_y = normalize(data.train_x[train_idx]).to(device), data.train_y[train_idx].to(device)
        self.val_x, self.val_y = normalize(data.train_x[val_idx]).to(device), data.train_y[val_idx].to(device)
        self.test_x, self.test_y = normalize(data.test_x).to(device), data.test_y.to(device)
        self.model = build_model(cfg).to(device)
        self.ddp, self.comm = wrap_model(self.model, device, dist_env.distributed, cfg.comm, cfg.timeout)
        self.optimizer = build_optimizer(cfg, self.model)
        self.state = TrainState()
        self.resumed_from_step: int | None = None
        self.stop = StopSignal()
        self.sampler = ResourceSampler()
        self.rank_log = RankLog(self.run_dir / f"rank{dist_env.rank}.jsonl")
        self.samples_log = (
            RankLog(self.run_dir / "samples" / f"rank{dist_env.rank}-pid{os.getpid()}.jsonl")
            if cfg.record_samples
            else None
        )
        self.first_step_done = False
        self.run_times = StepTimes()
        self.clock = device_clock(device)
        log.info(
            "model %s: %d parameters; train %d, validation %d, test %d samples",
            "-".join(str(w) for w in (784, *cfg.hidden, 10)),
            count_parameters(self.model),
            len(self.train_x),
            len(self.val_x),
            len(self.test_x),
        )

    # -- one step ------------------------------------------------------------------------
    def train_step(self, positions: torch.Tensor, times: StepTimes) -> torch.Tensor:
        started = time.perf_counter()
        positions = positions.to(self.device, non_blocking=True)
        inputs, targets = self.train_x[positions], self.train_y[positions]
        loaded = self.clock()
        loss = F.cross_entropy(self.ddp(inputs), targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # ends with the gradient sync of the --comm option
        self.optimizer.step()
        if self.comm is not None:
            self.comm.after_step(self.model.parameters())
        finished = self.clock()
        sync_ms = self.comm.take_ms() if self.comm is not None else 0.0
        times.add((loaded - started) * 1e3, (finished - loaded) * 1e3 - sync_ms, sync_ms)
        return loss.detach()

    # -- checkpoint state ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, as tensors and plain values (so ``weights_only`` loading takes it)."""
        return {
            "format": FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "train_state": dataclasses.asdict(self.state),
            "rng": capture_rng(),
            "config": self.cfg.to_dict(),
            "world_size": self.dist_env.world_size,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        """Inverse of ``state_dict``: continue exactly where the checkpoint's run stood."""
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.state = TrainState(**payload["train_state"])
        restore_rng(payload["rng"])
        self.resumed_from_step = self.state.global_step

    def save_checkpoint(self) -> None:
        """Rank 0 writes the checkpoint of the current step; the others go straight on.

        No collective is involved, so a peer that died cannot hang the write. A failed write
        (full disk, say) is a warning: training goes on and the earlier checkpoints stay.
        """
        if not self.dist_env.is_main:
            return
        started = time.perf_counter()
        try:
            path = save_checkpoint(
                self.cfg.checkpoint_root, self.state.global_step, self.state_dict(), self.cfg.keep_checkpoints
            )
        except OSError as exc:
            log.warning(
                "checkpoint of step %d not written (%s); training goes on and the earlier checkpoints are kept",
                self.state.global_step,
                exc.strerror or exc,
            )
            return
        log.info("checkpoint %s written in %.0f ms", path, (time.perf_counter() - started) * 1e3)

    def _note_step(self, positions: torch.Tensor) -> None:
        """Per-step records that are off or one-off: the sample positions (debugging), the first step."""
        state = self.state
        if self.samples_log is not None:
            self.samples_log.write(
                {"step": state.global_step, "epoch": state.epoch + 1, "positions": positions.tolist()}
            )
        if not self.first_step_done:
            self.first_step_done = True
            self.rank_log.write(
                {
                    "event": "first_step",
                    "step": state.global_step,
                    "time": time.time(),
                    "restarts": self.dist_env.restart_count,
                    "resumed_from_step": self.resumed_from_step,
                }
            )

    # -- one epoch ----------------------------------------------------------------------
    def run_epoch(self) -> bool:
        """Train from the state's position to the end of its epoch; False if ``max_steps`` stopped it.

        A window of steps ends at every ``--log-every`` and ``--checkpoint-every`` step, at the
        epoch's end and at ``--max-steps``: all ranks reach these points at the same step. There the
        ranks agree on the window's loss and on whether a signal asked them to stop, and there
        checkpoints are written, so they always hold global, consistent state.
        """
        cfg, state, env = self.cfg, self.state, self.dist_env
        plan = EpochPlan(
            permutation=epoch_permutation(len(self.train_x), cfg.seed, state.epoch),
            start=state.consumed,
            batch_size=self.batch_size,
            world_size=env.world_size,
            rank=env.rank,
        )
        window = StepTimes()
        window_loss = torch.zeros((), device=self.device)
        show_bar = env.is_main and sys.stdout.isatty()
        bar = tqdm(
            total=plan.steps, desc=f"epoch {state.epoch + 1}/{cfg.epochs}", file=sys.stdout, disable=not show_bar
        )
        mark = time.perf_counter()
        steps_done = 0
        with bar, logging_redirect_tqdm([logging.getLogger("trainer")]) if show_bar else nullcontext():
            for positions in plan.batches():
                if self.max_steps_reached():
                    break
                window_loss += self.train_step(positions, window)
                steps_done += 1
                state.global_step += 1
                state.consumed = plan.consumed_after(steps_done)
                self._note_step(positions)
                bar.update()
                step, last = state.global_step, steps_done == plan.steps
                at_log, at_checkpoint = step % cfg.log_every == 0, step % cfg.checkpoint_every == 0
                if not (at_log or at_checkpoint or last or self.max_steps_reached()):
                    continue
                mark = self._add_time(mark)
                stop = self._end_window(window, window_loss, bar, log_line=at_log and not show_bar)
                window, window_loss = StepTimes(), torch.zeros((), device=self.device)
                # The epoch's last step gets its checkpoint after evaluation, in ``train``.
                if stop or (at_checkpoint and not last):
                    self.save_checkpoint()
                    mark = time.perf_counter()
                if stop:
                    # Nobody leaves before rank 0's checkpoint is on disk: an early exit would make
                    # torchrun signal rank 0 again, and a second signal exits without finishing.
                    barrier()
                    raise StopRequested(self.stop.signum or signal.SIGTERM, step)
        self._add_time(mark)
        return steps_done == plan.steps

    def _add_time(self, since: float) -> float:
        now = time.perf_counter()
        self.state.epoch_seconds += now - since
        self.state.train_seconds += now - since
        return now

    def max_steps_reached(self) -> bool:
        return self.cfg.max_steps is not None and self.state.global_step >= self.cfg.max_steps

    def _end_window(self, window: StepTimes, window_loss: torch.Tensor, bar: tqdm, log_line: bool) -> bool:
        """Fold a window of steps into the epoch and run totals and log a sample of it; True if the ranks stop."""
        state, env = self.state, self.dist_env
        loss_sum = float(window_loss)
        # One small collective per window: every rank calls it at the same step, so it cannot
        # deadlock, and it makes the epoch loss and the stop decision global (a signal may reach
        # one rank only). A dead peer makes it fail after --timeout instead of hanging.
        total_loss, stopping = reduce_sum([loss_sum, float(self.stop.requested)], self.device)
        state.epoch_loss_sum += total_loss / env.world_size
        state.epoch_steps += window.steps
        state.samples_trained += window.steps * self.batch_size * env.world_size
        for name in ("data_ms", "compute_ms", "sync_ms", "step_ms"):
            setattr(self.run_times, name, getattr(self.run_times, name) + getattr(window, name))
        self.run_times.steps += window.steps
        self.run_times.sync_samples.extend(window.sync_samples)
        record = {
            "step": state.global_step,
            "epoch": state.epoch + 1,
            "loss": loss_sum / window.steps,
            "step_ms": window.mean("step_ms"),
            "data_ms": window.mean("data_ms"),
            "compute_ms": window.mean("compute_ms"),
            "sync_ms": window.mean("sync_ms"),
            "cpu_percent": self.sampler.last_cpu_percent,
            "rss_mb": self.sampler.last_rss_mb,
            "time": time.time(),
        }
        self.rank_log.write(record)
        if log_line:
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
            bar.set_postfix(loss=f"{record['loss']:.4f}", sync_ms=f"{record['sync_ms']:.2f}")
        return stopping > 0

    # -- evaluation ---------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
        """Loss and accuracy over a whole split; each rank takes a slice and the sums are reduced."""
        env = self.dist_env
        begin = len(inputs) * env.rank // env.world_size
        end = len(inputs) * (env.rank + 1) // env.world_size
        self.model.eval()
        loss_sum, correct = 0.0, 0.0
        for chunk in range(begin, end, EVAL_BATCH):
            stop = min(end, chunk + EVAL_BATCH)
            logits = self.model(inputs[chunk:stop])
            loss_sum += float(F.cross_entropy(logits, targets[chunk:stop], reduction="sum"))
            correct += float((logits.argmax(dim=1) == targets[chunk:stop]).sum())
        self.model.train()
        loss_sum, correct, count = reduce_sum([loss_sum, correct, float(end - begin)], self.device)
        return loss_sum / count, correct / count

    # -- bookkeeping --------------------------------------------------------------------
    def finish_epoch(self, complete: bool) -> dict[str, Any]:
        """Evaluate and append the epoch's metrics row; a complete epoch moves the state on.

        An epoch cut short by ``--max-steps`` still gets its row, but the state stays in it.
        """
        state, env = self.state, self.dist_env
        if self.comm is not None:
            self.comm.sync_replicas(self.model)  # local SGD: evaluate (and keep) one model, not a mix
        val_loss, val_accuracy = self.evaluate(self.val_x, self.val_y)
        cpu = self.sampler.take_mean_cpu()
        cpu_total, rss_total = reduce_sum([cpu, self.sampler.last_rss_mb], self.device)
        steps, seconds = state.epoch_steps, state.epoch_seconds
        row = {
            "epoch": state.epoch + 1,
            "global_step": state.global_step,
            "train_loss": state.epoch_loss_sum / steps if steps else float("nan"),
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "epoch_seconds": seconds,
            "batches_per_second": steps / seconds if seconds else 0.0,
            # ``consumed`` counts the epoch's samples across restarts and world sizes.
            "samples_per_second": state.consumed / seconds if seconds else 0.0,
            "cpu_percent_total": cpu_total,
            "rss_mb_total": rss_total,
        }
        state.history.append(row)
        if env.is_main:
            write_metrics_csv(self.run_dir / "metrics.csv", state.history)
        log.info(
            "epoch %d done: train loss %.4f, val loss %.4f, val accuracy %.4f, %.1f s, %.0f samples/s",
            row["epoch"],
            row["train_loss"],
            val_loss,
            val_accuracy,
            seconds,
            row["samples_per_second"],
        )
        if complete:
            state.epoch += 1
            state.consumed = 0
            state.epoch_loss_sum, state.epoch_steps, state.epoch_seconds = 0.0, 0, 0.0
        return row

    def train(self) -> dict[str, Any]:
        """Run the remaining epochs, test, write ``summary.json``; returns the summary."""
        wall_started = time.perf_counter()
        if self.samples_log is not None:
            env = self.dist_env
            self.samples_log.write(
                {
                    "event": "start",
                    "time": time.time(),
                    "resumed_from_step": self.resumed_from_step or 0,
                    "run_id": env.run_id,
                    "restarts": env.restart_count,
                    "rank": env.rank,
                    "world_size": env.world_size,
                }
            )
        self.sampler.start()
        self.stop.install()
        try:
            while self.state.epoch < self.cfg.epochs and not self.max_steps_reached():
                complete = self.run_epoch()
                self.finish_epoch(complete)
                if not complete:
                    log.info("stopped at --max-steps %d, inside epoch %d", self.cfg.max_steps, self.state.epoch + 1)
                    break
                self.save_checkpoint()
            test_loss, test_accuracy = self.evaluate(self.test_x, self.test_y)
            summary = self.summarize(test_loss, test_accuracy, time.perf_counter() - wall_started)
        finally:
            self.stop.restore()
            self.sampler.stop()
        self.rank_log.write({"event": "end", "step": self.state.global_step, "params_sha256": summary["params_sha256"]})
        self.rank_log.close()
        if self.dist_env.is_main:
            write_json(self.run_dir / "summary.json", summary)
        log.info(
            "done: test accuracy %.4f, test loss %.4f, train %.1f s, %.0f samples/s, sync %.3f ms/batch, "
            "peak RSS %.0f MB/rank",
            summary["test_accuracy"],
            summary["test_loss"],
            summary["train_seconds"],
            summary["samples_per_second"],
            summary["sync_ms_per_batch"],
            summary["peak_rss_mb"],
        )
        return summary

    def summarize(self, test_loss: float, test_accuracy: float, wall_seconds: float) -> dict[str, Any]:
        env, state, times = self.dist_env, self.state, self.run_times
        means = [times.mean(n) for n in ("step_ms", "data_ms", "compute_ms", "sync_ms")]
        peak = peak_rss_mb()
        cpu_mean = sum(r["cpu_percent_total"] for r in state.history) / max(1, len(state.history))
        *sums, peak_total = reduce_sum([*means, peak], self.device)
        step_ms, data_ms, compute_ms, sync_ms = (value / env.world_size for value in sums)
        on_cuda = self.device.type == "cuda"
        peak_gpu = torch.cuda.max_memory_allocated(self.device) / 2**20 if on_cuda else 0.0
        peak_max, p50, p95, peak_gpu_max = reduce_max(
            [peak, percentile(times.sync_samples, 50), percentile(times.sync_samples, 95), peak_gpu], self.device
        )
        return {
            "world_size": env.world_size,
            "epochs": len(state.history),
            "epochs_requested": self.cfg.epochs,
            "global_step": state.global_step,
            "restarts": env.restart_count,
            "resumed_from_step": self.resumed_from_step,
            "test_accuracy": test_accuracy,
            "test_loss": test_loss,
            "val_accuracy": state.history[-1]["val_accuracy"] if state.history else None,
            "train_seconds": state.train_seconds,
            "wall_seconds": wall_seconds,
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
            "peak_gpu_mb": peak_gpu_max if on_cuda else None,
            "threads_per_rank": torch.get_num_threads(),
            "backend": dist.get_backend() if dist.is_initialized() else "none",
            "device": str(self.device),
            "torch_version": torch.__version__,
            "parameters": count_parameters(self.model),
            "params_sha256": params_sha256(self.model),
        }
