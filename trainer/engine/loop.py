"""The training loop: steps, epochs, evaluation, and the state a resume continues from."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer.core import schedule
from trainer.core.clock import device_clock
from trainer.core.config import TrainConfig
from trainer.core.errors import UsageError
from trainer.core.fileio import atomic_write_text
from trainer.core.optim import hyperparameters, reapply
from trainer.core.rng import capture_rng, restore_rng, seed_rank
from trainer.core.task import Splits, Task
from trainer.core.weights import count_parameters
from trainer.distributed.collectives import WriterWait, any_rank, barrier, reduce_sum
from trainer.distributed.env import DistEnv
from trainer.engine.cuda_graph import GraphedStep, use_cuda_graph
from trainer.engine.evaluation import evaluate_split, step_figures
from trainer.engine.export import export_model
from trainer.engine.sampling import EpochPlan, epoch_permutation
from trainer.lifecycle.checkpoint import FORMAT, save_checkpoint
from trainer.lifecycle.guard import Diverged, all_finite, grads_finite, poison_nonfinite
from trainer.lifecycle.replicas import Replicas
from trainer.lifecycle.signals import StopRequested, StopSignal
from trainer.lifecycle.train_state import TrainState
from trainer.sync.comm import wrap_model
from trainer.sync.shared_step import recipe_reason
from trainer.watch.metrics import StepTimes
from trainer.watch.progress import Progress
from trainer.watch.report import SAMPLE_FILE

log = logging.getLogger(__name__)


# Test-only, "RANK:STEP": that rank stops itself (SIGSTOP) at the checkpoint of that step, rank 0
# as it starts writing it, another rank before it waits for rank 0.
TEST_STOP_ENV = "TRAINER_TEST_STOP_AT_CHECKPOINT"


class Trainer:
    """Owns the model, optimiser, data and state of one process of the job, for any task."""

    def __init__(self, cfg: TrainConfig, dist_env: DistEnv, device: torch.device, task: Task, splits: Splits) -> None:
        self.cfg, self.dist_env, self.device, self.task, self.splits = cfg, dist_env, device, task, splits
        self.batch_size = cfg.per_rank_batch(dist_env.world_size)
        global_batch = self.batch_size * dist_env.world_size
        self.train_samples = len(splits.train)
        if global_batch > self.train_samples:
            raise UsageError(
                f"a global batch of {global_batch} ({self.batch_size} per process x {dist_env.world_size} processes) "
                f"exceeds the {self.train_samples} training samples; use a smaller --batch-size or --global-batch-size"
            )
        # The same initial weights on every rank, from --seed; then each rank its own random streams
        # (dropout, augmentation), which checkpoints save per rank.
        torch.manual_seed(cfg.seed)
        self.model = task.build_model().to(device)
        seed_rank(cfg.seed, dist_env.rank)
        self.optimizer = task.build_optimizer(self.model, cfg)
        # Each group's configured rate: the schedule scales it by the global step (core/schedule.py).
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.scheduled = schedule.scheduled(cfg)
        # What the step calls: the model itself, or DDP around it; ``comm`` syncs and times the gradients.
        not_shared = recipe_reason(cfg)
        self.forward, self.comm = wrap_model(
            self.model,
            device,
            dist_env.distributed,
            cfg.comm,
            cfg.timeout,
            warmup_steps=cfg.comm_warmup_steps,
            share_step=not_shared is None,
            optimizer=self.optimizer,
            find_unused_parameters=task.find_unused_parameters,
        )
        if not_shared and self.comm is not None and self.comm.option == "shm":
            log.info("optimiser step not shared between ranks: %s", not_shared)
        # One process on CUDA: the step is captured in a CUDA graph after a few eager steps.
        self.graphed = (
            GraphedStep(self.model, self.optimizer, self.task, splits.train, self.batch_size, cfg.clip_grad_norm)
            if use_cuda_graph(cfg, device, dist_env.world_size, splits.train)
            else None
        )
        self.state = TrainState()
        self.resumed_from_step: int | None = None
        self.writer_wait = WriterWait(cfg.checkpoint_timeout, cfg.timeout)
        # Set by the caller where checkpoints need copies on every node (no shared directory).
        self.replicas: Replicas | None = None
        self.stop = StopSignal()
        self.progress = Progress(cfg, dist_env, device, task)
        self.clock = device_clock(device)
        log.info(
            "task %s, model %s: %d parameters; train %d, validation %d, test %d samples",
            task.name,
            task.describe(self.model),
            count_parameters(self.model),
            self.train_samples,
            len(splits.val) if splits.val is not None else 0,
            len(splits.test) if splits.test is not None else 0,
        )
        if self.scheduled:
            log.info("%s", schedule.describe(cfg))

    # -- one step ------------------------------------------------------------------------
    def train_step(self, positions: torch.Tensor, times: StepTimes) -> torch.Tensor:
        """One optimiser step on this rank's batch; returns (loss, *the task's metrics) as float64."""
        if self.scheduled:
            self.set_lr(self.state.global_step)
        if self.graphed is not None:
            return self.graphed.step(positions, times, self.state.global_step, self.eager_step)
        return self.eager_step(positions, times)

    def set_lr(self, step: int) -> None:
        """The scheduled rate of the step after ``step`` completed steps, in every parameter group."""
        factor = schedule.lr_factor(self.cfg, step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def optimizer_state(self) -> dict[str, Any]:
        """The optimiser's state for a checkpoint, with each group's configured rate, not the step's
        scheduled one: the schedule derives that from the step, and a resume compares the configured ones."""
        state = self.optimizer.state_dict()
        if self.scheduled:
            for group, base in zip(state["param_groups"], self.base_lrs, strict=True):
                group["lr"] = base
        return state

    def eager_step(self, positions: torch.Tensor, times: StepTimes) -> torch.Tensor:
        """``train_step`` run op by op (a CUDA graph records this minus its host reads: engine/cuda_graph.py)."""
        if self.cfg.grad_accum_steps > 1:
            return self.accumulated_step(positions, times)
        started = time.perf_counter()
        positions = positions.to(self.device, non_blocking=True)
        batch = self.splits.train.batch(positions)
        loaded = self.clock()
        with self.autocast():
            loss, metrics = self.task.loss(self.forward, batch)
        figures = step_figures(self.task, loss, metrics)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        return self.finish_step(loss, figures, started, loaded, times)

    def accumulated_step(self, positions: torch.Tensor, times: StepTimes) -> torch.Tensor:
        """One optimiser step over ``--grad-accum-steps`` micro-batches of this rank's batch, in order:
        each loss is scaled by 1/K, so the gradient is the mean over the rank's batch as without
        accumulation, and only the last backward pass exchanges gradients (``Comm.no_sync``)."""
        started = time.perf_counter()
        loaded = started
        micro_steps = self.cfg.grad_accum_steps
        self.optimizer.zero_grad(set_to_none=True)
        losses, figures = [], []
        for index, micro in enumerate(positions.to(self.device, non_blocking=True).chunk(micro_steps)):
            last = index == micro_steps - 1
            # DDP decides at the forward pass whether the backward pass syncs: both go inside no_sync.
            with contextlib.nullcontext() if last or self.comm is None else self.comm.no_sync():
                batch = self.splits.train.batch(micro)
                if index == 0:
                    loaded = self.clock()
                with self.autocast():
                    loss, metrics = self.task.loss(self.forward, batch)
                figures.append(step_figures(self.task, loss, metrics))
                losses.append(loss.detach())
                if not last:
                    (loss / micro_steps).backward()
            if last:  # a non-finite loss of any micro-batch counts, as the guard sees each rank's loss
                self.backward(loss / micro_steps, torch.stack(losses).sum())
        return self.finish_step(torch.stack(losses).sum(), torch.stack(figures).mean(dim=0), started, loaded, times)

    def autocast(self) -> Any:
        """``--precision bf16``: the forward pass and loss in bfloat16 where autocast chooses it."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    def finish_step(
        self, loss: torch.Tensor, figures: torch.Tensor, started: float, loaded: float, times: StepTimes
    ) -> torch.Tensor:
        """The guard, clipping and the optimiser step after the backward pass(es); the step's times."""
        if self.step_is_finite(loss):
            if self.cfg.clip_grad_norm is not None:  # the synced gradients: every rank clips the same
                if self.comm is not None:  # under the shared step each rank clips its chunk
                    self.comm.clip_grad_norm_(self.cfg.clip_grad_norm)
                else:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad_norm)
            self.update()
        else:  # the skipped step adds nothing to the epoch's loss and metrics
            figures = torch.zeros_like(figures)
        finished = self.clock()
        sync_ms = self.comm.take_ms() if self.comm is not None else 0.0
        times.add((loaded - started) * 1e3, (finished - loaded) * 1e3 - sync_ms, sync_ms)
        return figures

    def update(self) -> None:
        """The optimiser step on the synced gradients (under a shared step, this rank's chunk of it)."""
        if self.comm is None:
            self.optimizer.step()
        else:
            self.comm.step(self.optimizer)

    def backward(self, loss: torch.Tensor, verdict_of: torch.Tensor | None = None) -> None:
        """The backward pass, which ends with the gradient sync of the --comm option. A non-finite loss
        on any rank must reach every rank's verdict (trainer/lifecycle/guard.py), so all ranks skip or stop
        together. ``verdict_of``: the loss whose finiteness counts (the micro-batches' sum), if not ``loss``."""
        sync = self.comm.shm_sync if self.comm is not None else None
        judged = loss if verdict_of is None else verdict_of
        if self.comm is None:  # world size 1: the loss joins the gradient check in ``step_is_finite``
            loss.backward()
        elif sync is not None and sync.tells_finite:  # the sync's verdict covers every rank's loss
            sync.loss_finite = bool(torch.isfinite(judged))
            loss.backward()
        else:  # the averaged gradient carries it: NaN on every rank
            factor = torch.where(torch.isfinite(judged), 1.0, float("nan"))
            (poison_nonfinite(loss) if verdict_of is None else loss * factor).backward()

    def step_is_finite(self, loss: torch.Tensor) -> bool:
        """Whether this step's loss and synced gradients are finite, the same verdict on every rank
        (trainer/lifecycle/guard.py).

        A non-finite step raises ``Diverged`` under ``--on-nonfinite stop``; under ``skip`` it is
        counted and the caller leaves the weights and the optimiser state as they were.
        """
        if self.comm is None:
            finite = grads_finite(self.model.parameters(), loss)
        else:  # under shm the sync has checked the chunk each rank reduced; else one read of every gradient
            synced = self.comm.synced_finite()
            finite = grads_finite(self.model.parameters()) if synced is None else synced
        if self.comm is not None and self.comm.option == "localsgd":  # gradients not averaged: vote
            finite = not any_rank(not finite, self.device)
        if finite:
            return True
        self.nonfinite_steps(self.state.global_step + 1, 1)
        return False

    def nonfinite_steps(self, first: int, count: int) -> None:
        """``count`` steps from step ``first`` were not finite: stop (``Diverged``), or count them as skipped."""
        if self.cfg.on_nonfinite == "stop":
            raise Diverged(first, self.cfg.checkpoint_root)
        self.state.skipped_steps += count
        self.progress.step_skipped(first, count)

    def settle_graph(self, window: StepTimes) -> None:
        """Under a CUDA graph, at a window's end: the window's time, and its non-finite steps (once a window)."""
        if self.graphed is None:
            return
        skipped, first = self.graphed.settle(window)
        if skipped:
            self.nonfinite_steps(first, skipped)

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
            # On the device: each batch's positions are then a slice there, not a copy from the host.
            permutation=epoch_permutation(self.train_samples, cfg.seed, state.epoch).to(self.device),
            start=state.consumed,
            batch_size=self.batch_size,
            world_size=env.world_size,
            rank=env.rank,
        )
        # float64: float32 losses add up exactly, so the epoch loss does not depend on where the
        # windows fell (a run continued from --max-steps has one boundary more than an uninterrupted one).
        window, window_sums = StepTimes(), self._zero_figures()
        steps_done = 0
        mark = time.perf_counter()
        with self.progress.epoch_bar(plan.steps, state.epoch) as bar:
            for positions in plan.batches():
                if self.max_steps_reached():
                    break
                window_sums += self.train_step(positions, window)
                steps_done += 1
                state.global_step += 1
                state.consumed = plan.consumed_after(steps_done)
                self.progress.step_done(state, positions)
                bar.update()
                step, last = state.global_step, steps_done == plan.steps
                at_log, at_checkpoint = step % cfg.log_every == 0, step % cfg.checkpoint_every == 0
                if not (at_log or at_checkpoint or last or self.max_steps_reached()):
                    continue
                self.settle_graph(window)
                mark = self._add_time(mark)
                stop = self._end_window(window, window_sums, bar, at_log)
                window, window_sums = StepTimes(), self._zero_figures()
                # The epoch's last step and the --max-steps step get theirs after evaluation, in ``train``.
                if stop or (at_checkpoint and not (last or self.max_steps_reached())):
                    self.write_checkpoint()
                    mark = time.perf_counter()
                if stop:
                    # Nobody leaves before rank 0's checkpoint is on disk: an early exit would make
                    # torchrun signal rank 0 again, and a second signal exits without finishing.
                    barrier()
                    raise StopRequested(self.stop.signum or signal.SIGTERM, step)
        self._add_time(mark)
        return steps_done == plan.steps

    def _zero_figures(self) -> torch.Tensor:
        return torch.zeros(1 + len(self.task.metrics), dtype=torch.float64, device=self.device)

    def _end_window(self, window: StepTimes, window_sums: torch.Tensor, bar: Any, at_log: bool) -> bool:
        """Fold a window of steps (``window_sums``: loss and the task's metrics, summed over its steps)
        into the epoch and run totals and record it; True if the ranks stop."""
        state, world_size = self.state, self.dist_env.world_size
        sums = window_sums.tolist()
        # One small collective per window: every rank calls it at the same step, so it cannot
        # deadlock, and it makes the epoch figures and the stop decision global (a signal may reach
        # one rank only). A dead peer makes it fail after --timeout instead of hanging.
        *totals, stopping = reduce_sum([*sums, float(self.stop.requested)], self.device)
        if not state.epoch_sums:
            state.epoch_sums = [0.0] * len(totals)
        state.epoch_sums = [kept + total / world_size for kept, total in zip(state.epoch_sums, totals, strict=True)]
        state.epoch_steps += window.steps
        state.samples_trained += window.steps * self.batch_size * world_size
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.progress.window_done(state, window, sums[0] / window.steps, bar, at_log, lr)
        return stopping > 0

    def _add_time(self, since: float) -> float:
        now = time.perf_counter()
        self.state.epoch_seconds += now - since
        self.state.train_seconds += now - since
        return now

    def max_steps_reached(self) -> bool:
        return self.cfg.max_steps is not None and self.state.global_step >= self.cfg.max_steps

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, split_name: str) -> dict[str, float]:
        """``{split}_loss`` and ``{split}_{metric}`` over a whole split; each rank takes a slice of it
        and the sums are reduced. Empty when the task has no such split."""
        split = getattr(self.splits, split_name)
        if split is None:
            return {}
        env = self.dist_env
        begin, end = len(split) * env.rank // env.world_size, len(split) * (env.rank + 1) // env.world_size
        with self.autocast():
            sums = evaluate_split(self.task, self.model, split, begin, end)
        *totals, count = reduce_sum([*sums, float(end - begin)], self.device)
        names = ("loss", *self.task.metrics)
        return {f"{split_name}_{name}": total / count for name, total in zip(names, totals, strict=True)}

    def finish_epoch(self, complete: bool) -> None:
        """Evaluate and record the epoch's row; a complete epoch moves the state on.

        An epoch cut short by ``--max-steps`` still gets its row, but the state stays in it.
        """
        if self.comm is not None:
            self.comm.sync_replicas(self.model)  # local SGD: evaluate (and keep) one model, not a mix
        self.progress.epoch_row(self.state, self.evaluate("val"))
        if complete:
            state = self.state
            state.epoch += 1
            state.consumed = 0
            state.epoch_sums, state.epoch_steps, state.epoch_seconds = [], 0, 0.0

    # -- the run ------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run the remaining epochs, test, write ``summary.json``; returns the summary."""
        wall_started = time.perf_counter()
        self.progress.start(self.resumed_from_step, self.state)
        self.stop.install()
        try:
            while self.state.epoch < self.cfg.epochs and not self.max_steps_reached():
                complete = self.run_epoch()
                self.finish_epoch(complete)
                # Also at --max-steps: a finished run can be continued from it when the budget grows.
                # An epoch-end checkpoint is a candidate for the best one.
                self.write_checkpoint(scores=self.state.history[-1] if complete else None)
                if not complete:
                    log.info("stopped at --max-steps %d, inside epoch %d", self.cfg.max_steps, self.state.epoch + 1)
                    break
            test = self.evaluate("test")
            self.progress.hang.expect_wait(self.cfg.checkpoint_timeout)
            if self.dist_env.is_main:  # before the summary, which marks the run finished
                export_model(self.cfg, self.task, self.model, self.state, test, self.splits)
                self.write_sample()
            self.wait_for_writer("the exported model")
        except Exception as exc:
            self.progress.hang.failed(exc)  # a wait for peers that failed: raises, naming who did not arrive
            raise
        finally:
            self.stop.restore()
            self.progress.stop()
        # Gradient exchanges of this launch on this rank: one per step, however many micro-batches.
        self.progress.extra["gradient_exchanges"] = self.comm.timer.exchanges if self.comm is not None else 0
        return self.progress.finish(self.state, self.model, test, time.perf_counter() - wall_started)

    def write_sample(self) -> None:
        """``RUN_DIR/sample.txt``: what the trained model writes (``Task.sample_text``), for the report."""
        model = self.model if self.device.type == "cpu" else copy.deepcopy(self.model).cpu()
        text = self.task.sample_text(model)
        if text is not None:
            atomic_write_text(Path(self.cfg.run_dir) / SAMPLE_FILE, text)

    # -- checkpoint state ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, as tensors and plain values (so ``weights_only`` loading takes it)."""
        return {
            "format": FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer_state(),
            "train_state": dataclasses.asdict(self.state),
            "rng": [capture_rng()],  # every rank's, in rank order (``write_checkpoint`` gathers them)
            "config": self.cfg.to_dict(),
            "task": self.task.name,
            "world_size": self.dist_env.world_size,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        """Inverse of ``state_dict``: continue exactly where the checkpoint's run stood.

        The hyper-parameters the command line and the task give now (learning rate, momentum,
        weight decay...) win over the checkpoint's: ``optimizer.load_state_dict`` restores the
        saved ones, so the current ones are put back, and the log names each that changed.
        """
        self.model.load_state_dict(payload["model"])
        wanted = hyperparameters(self.optimizer)
        self.optimizer.load_state_dict(payload["optimizer"])
        changed = reapply(self.optimizer, wanted)
        if changed:
            log.info(
                "optimiser settings that differ from the checkpoint's (the current ones apply): %s", "; ".join(changed)
            )
        self.state = TrainState(**payload["train_state"])
        self.resumed_from_step = self.state.global_step
        self.restore_rank_rng(payload["rng"])
        self.load_rank_state(payload.get("per_rank"))

    def restore_rank_rng(self, saved: list[dict[str, Any]]) -> None:
        """Each rank continues its own random streams; at another world size the checkpoint's streams
        do not map onto the ranks, so each rank starts fresh ones from (seed, rank, step) and says so."""
        env = self.dist_env
        if len(saved) == env.world_size:
            restore_rng(saved[env.rank])
            return
        seed_rank(self.cfg.seed, env.rank, self.state.global_step)
        log.info(
            "random streams (dropout, augmentation) restart from --seed, rank and step %d: the checkpoint holds "
            "those of %d ranks, this run has %d",
            self.state.global_step,
            len(saved),
            env.world_size,
        )

    def rank_state(self) -> dict[str, Any]:
        """This rank's own state under a ``--comm`` option that keeps per-rank state (``Comm.per_rank_state``):
        the option's state and, where replicas differ (local SGD), this rank's model and optimiser."""
        assert self.comm is not None
        state: dict[str, Any] = {"comm": self.comm.state_dict()}
        if self.comm.replicas_differ:
            state["model"] = self.model.state_dict()
            state["optimizer"] = self.optimizer_state()
        return state

    def load_rank_state(self, saved: list[dict[str, Any]] | None) -> None:
        """Give each rank its own saved state (``rank_state``) back; at another world size, say what is reset."""
        if saved is None:
            return
        saved_option = saved[0]["comm"]["option"]
        if self.comm is None:
            log.warning(
                "the checkpoint holds each rank's --comm %s state; at world size 1 it is not restored (the run "
                "continues from rank 0's model and optimiser state)",
                saved_option,
            )
            return
        option = self.comm.option
        if option != saved_option:
            log.warning(
                "the checkpoint holds each rank's --comm %s state; it does not apply to --comm %s at world size %d "
                "and is not restored",
                saved_option,
                option,
                self.dist_env.world_size,
            )
            return
        own = len(saved) == self.dist_env.world_size
        mine = saved[self.dist_env.rank] if own else saved[0]
        reset = self.comm.load_state_dict(mine["comm"], own, self.device)
        if own and "model" in mine:
            self.model.load_state_dict(mine["model"])
            self.optimizer.load_state_dict(mine["optimizer"])
        elif "model" in mine:
            reset.append("every rank continues from rank 0's local SGD replica and optimiser state")
        if reset:
            log.warning(
                "resuming --comm %s at world size %d from world size %d is not exact: %s",
                option,
                self.dist_env.world_size,
                len(saved),
                "; ".join(reset),
            )

    def write_checkpoint(self, scores: dict[str, Any] | None = None) -> None:
        """Rank 0 writes the checkpoint of the current step, with every rank's random streams.

        ``scores``: the epoch's row (validation figures) of an epoch-end checkpoint, which makes it a
        candidate for the best checkpoint (the task's ``best``).

        Rank 0 gathers each rank's RNG states (and, under --comm powersgd and localsgd, the
        option's per-rank state): a collective, which every rank reaches at the same step; a dead
        peer fails it after --timeout instead of hanging. The write itself waits for nobody.
        A failed write (full disk, say) is a warning: training goes on and the earlier
        checkpoints stay. The other ranks then wait for rank 0 under --checkpoint-timeout, not
        --timeout (``WriterWait``).
        """
        # From here until the wait below no step completes by design: no watchdog report meanwhile.
        self.progress.hang.expect_wait(self.cfg.checkpoint_timeout)
        per_rank = self.comm is not None and self.comm.per_rank_state
        mine = {"rng": capture_rng(), **({"state": self.rank_state()} if per_rank else {})}
        gathered: list[Any] | None = [mine]
        if self.dist_env.distributed:
            gathered = [None] * self.dist_env.world_size if self.dist_env.is_main else None
            dist.gather_object(mine, gathered, dst=0)
        if os.environ.get(TEST_STOP_ENV) == f"{self.dist_env.rank}:{self.state.global_step}":
            os.kill(os.getpid(), signal.SIGSTOP)  # test-only: a rank that stalls here, until SIGCONT
        written = None
        if self.dist_env.is_main:
            assert gathered is not None
            written = self._write_checkpoint(gathered, scores)
        self.wait_for_writer(f"the checkpoint of step {self.state.global_step}")
        if self.replicas is not None:
            self.replicas.after_write(written)

    def wait_for_writer(self, what: str) -> None:
        """Every rank waits here for rank 0 to finish writing ``what``, under --checkpoint-timeout."""
        self.writer_wait.wait(what)
        self.progress.hang.expect_wait(0)

    def _write_checkpoint(self, gathered: list[Any], scores: dict[str, Any] | None) -> Path | None:
        """Rank 0's part of ``write_checkpoint``: the payload, and the file; its path, or None."""
        per_rank = self.comm is not None and self.comm.per_rank_state
        started = time.perf_counter()
        payload = self.state_dict()
        payload["rng"] = [rank["rng"] for rank in gathered]
        if per_rank:
            payload["per_rank"] = [rank["state"] for rank in gathered]
        if not all_finite([payload["model"], payload["optimizer"]]):
            log.error(
                "checkpoint of step %d not written: the model or optimiser holds NaN or Inf", self.state.global_step
            )
            return None
        best = None
        if scores is not None:
            best = {"name": self.task.best[0], "value": scores.get(self.task.best[0]), "mode": self.task.best[1]}
        try:
            path = save_checkpoint(
                self.cfg.checkpoint_root, self.state.global_step, payload, self.cfg.keep_checkpoints, best=best
            )
        except OSError as exc:
            log.warning(
                "checkpoint of step %d not written (%s); training goes on and the earlier checkpoints are kept",
                self.state.global_step,
                exc.strerror or exc,
            )
            return None
        log.info("checkpoint %s written in %.0f ms", path, (time.perf_counter() - started) * 1e3)
        return path
