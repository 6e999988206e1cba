"""The training loop: steps, epochs, evaluation, and the state a resume continues from."""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.core.clock import device_clock
from trainer.core.config import TrainConfig
from trainer.core.errors import UsageError
from trainer.core.rng import capture_rng, restore_rng
from trainer.distributed.collectives import any_rank, barrier, reduce_sum
from trainer.distributed.env import DistEnv
from trainer.engine.cuda_graph import GraphedStep, use_cuda_graph
from trainer.engine.evaluation import loss_and_correct
from trainer.engine.export import export_model
from trainer.engine.sampling import EpochPlan, epoch_permutation
from trainer.lifecycle.checkpoint import FORMAT, save_checkpoint
from trainer.lifecycle.guard import Diverged, all_finite, grads_finite, poison_nonfinite
from trainer.lifecycle.signals import StopRequested, StopSignal
from trainer.lifecycle.train_state import TrainState
from trainer.sync.comm import wrap_model
from trainer.sync.shared_step import recipe_reason
from trainer.tasks.mnist_data import RunData
from trainer.tasks.mnist_model import INPUT_SIZE, NUM_CLASSES, build_model, build_optimizer, count_parameters
from trainer.watch.metrics import StepTimes
from trainer.watch.progress import Progress

log = logging.getLogger(__name__)


class Trainer:
    """Owns the model, optimiser, data and state of one process of the job."""

    def __init__(self, cfg: TrainConfig, dist_env: DistEnv, device: torch.device, data: RunData) -> None:
        self.cfg, self.dist_env, self.device, self.data = cfg, dist_env, device, data
        self.batch_size = cfg.per_rank_batch(dist_env.world_size)
        global_batch = self.batch_size * dist_env.world_size
        if global_batch > len(data.train_x):
            raise UsageError(
                f"a global batch of {global_batch} ({self.batch_size} per process x {dist_env.world_size} processes) "
                f"exceeds the {len(data.train_x)} training samples; use a smaller --batch-size or --global-batch-size"
            )
        self.model = build_model(cfg).to(device)
        self.optimizer = build_optimizer(cfg, self.model)
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
        )
        if not_shared and self.comm is not None and self.comm.option == "shm":
            log.info("optimiser step not shared between ranks: %s", not_shared)
        # One process on CUDA: the step is captured in a CUDA graph after a few eager steps.
        self.graphed = (
            GraphedStep(self.model, self.optimizer, data.train_x, data.train_y, self.batch_size, cfg.clip_grad_norm)
            if use_cuda_graph(cfg, device, dist_env.world_size)
            else None
        )
        self.state = TrainState()
        self.resumed_from_step: int | None = None
        self.stop = StopSignal()
        self.progress = Progress(cfg, dist_env, device)
        self.clock = device_clock(device)
        log.info(
            "model %s: %d parameters; train %d, validation %d, test %d samples",
            "-".join(str(w) for w in (INPUT_SIZE, *cfg.hidden, NUM_CLASSES)),
            count_parameters(self.model),
            len(data.train_x),
            len(data.val_x),
            len(data.test_x),
        )

    # -- one step ------------------------------------------------------------------------
    def train_step(self, positions: torch.Tensor, times: StepTimes) -> torch.Tensor:
        """One optimiser step on this rank's batch; returns (loss, samples predicted right) as float64."""
        if self.graphed is not None:
            return self.graphed.step(positions, times, self.state.global_step, self.eager_step)
        return self.eager_step(positions, times)

    def eager_step(self, positions: torch.Tensor, times: StepTimes) -> torch.Tensor:
        """``train_step`` run op by op (a CUDA graph records this minus its host reads: engine/cuda_graph.py)."""
        started = time.perf_counter()
        positions = positions.to(self.device, non_blocking=True)
        inputs, targets = self.data.train_x[positions], self.data.train_y[positions]
        loaded = self.clock()
        logits = self.forward(inputs)
        loss = F.cross_entropy(logits, targets)
        correct = (logits.detach().argmax(dim=1) == targets).sum()
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        if self.step_is_finite(loss):
            if self.cfg.clip_grad_norm is not None:  # the synced gradients: every rank clips the same
                if self.comm is not None:  # under the shared step each rank clips its chunk
                    self.comm.clip_grad_norm_(self.cfg.clip_grad_norm)
                else:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad_norm)
            self.update()
        else:  # the skipped step adds nothing to the epoch's loss and accuracy
            loss, correct = torch.zeros_like(loss), torch.zeros_like(correct)
        finished = self.clock()
        sync_ms = self.comm.take_ms() if self.comm is not None else 0.0
        times.add((loaded - started) * 1e3, (finished - loaded) * 1e3 - sync_ms, sync_ms)
        return torch.stack((loss.detach().double(), correct.double()))

    def update(self) -> None:
        """The optimiser step on the synced gradients (under a shared step, this rank's chunk of it)."""
        if self.comm is None:
            self.optimizer.step()
        else:
            self.comm.step(self.optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        """The backward pass, which ends with the gradient sync of the --comm option. A non-finite loss
        on any rank must reach every rank's verdict (trainer/lifecycle/guard.py), so all ranks skip or stop together."""
        sync = self.comm.shm_sync if self.comm is not None else None
        if self.comm is None:  # world size 1: the loss joins the gradient check in ``step_is_finite``
            loss.backward()
        elif sync is not None and sync.tells_finite:  # the sync's verdict covers every rank's loss
            sync.loss_finite = bool(torch.isfinite(loss))
            loss.backward()
        else:  # the averaged gradient carries it: NaN on every rank
            poison_nonfinite(loss).backward()

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
            permutation=epoch_permutation(len(self.data.train_x), cfg.seed, state.epoch).to(self.device),
            start=state.consumed,
            batch_size=self.batch_size,
            world_size=env.world_size,
            rank=env.rank,
        )
        # float64: float32 losses add up exactly, so the epoch loss does not depend on where the
        # windows fell (a run continued from --max-steps has one boundary more than an uninterrupted one).
        window, window_sums = StepTimes(), torch.zeros(2, dtype=torch.float64, device=self.device)
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
                window, window_sums = StepTimes(), torch.zeros(2, dtype=torch.float64, device=self.device)
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

    def _end_window(self, window: StepTimes, window_sums: torch.Tensor, bar: Any, at_log: bool) -> bool:
        """Fold a window of steps (``window_sums``: loss and correct predictions) into the epoch and
        run totals and record it; True if the ranks stop."""
        state, world_size = self.state, self.dist_env.world_size
        loss_sum, correct = window_sums.tolist()
        # One small collective per window: every rank calls it at the same step, so it cannot
        # deadlock, and it makes the epoch loss and the stop decision global (a signal may reach
        # one rank only). A dead peer makes it fail after --timeout instead of hanging.
        total_loss, total_correct, stopping = reduce_sum([loss_sum, correct, float(self.stop.requested)], self.device)
        state.epoch_loss_sum += total_loss / world_size
        state.epoch_correct += total_correct
        state.epoch_steps += window.steps
        state.samples_trained += window.steps * self.batch_size * world_size
        self.progress.window_done(state, window, loss_sum / window.steps, bar, at_log)
        return stopping > 0

    def _add_time(self, since: float) -> float:
        now = time.perf_counter()
        self.state.epoch_seconds += now - since
        self.state.train_seconds += now - since
        return now

    def max_steps_reached(self) -> bool:
        return self.cfg.max_steps is not None and self.state.global_step >= self.cfg.max_steps

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
        """Loss and accuracy over a whole split; each rank takes a slice and the sums are reduced."""
        env = self.dist_env
        begin = len(inputs) * env.rank // env.world_size
        end = len(inputs) * (env.rank + 1) // env.world_size
        loss_sum, correct = loss_and_correct(self.model, inputs, targets, begin, end)
        loss_sum, correct, count = reduce_sum([loss_sum, correct, float(end - begin)], self.device)
        return loss_sum / count, correct / count

    def finish_epoch(self, complete: bool) -> None:
        """Evaluate and record the epoch's row; a complete epoch moves the state on.

        An epoch cut short by ``--max-steps`` still gets its row, but the state stays in it.
        """
        if self.comm is not None:
            self.comm.sync_replicas(self.model)  # local SGD: evaluate (and keep) one model, not a mix
        val_loss, val_accuracy = self.evaluate(self.data.val_x, self.data.val_y)
        self.progress.epoch_row(self.state, val_loss, val_accuracy)
        if complete:
            state = self.state
            state.epoch += 1
            state.consumed = 0
            state.epoch_loss_sum, state.epoch_correct, state.epoch_steps, state.epoch_seconds = 0.0, 0.0, 0, 0.0

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
                self.write_checkpoint(val_accuracy=self.state.history[-1]["val_accuracy"] if complete else None)
                if not complete:
                    log.info("stopped at --max-steps %d, inside epoch %d", self.cfg.max_steps, self.state.epoch + 1)
                    break
            test = self.evaluate(self.data.test_x, self.data.test_y)
            if self.dist_env.is_main:  # before the summary, which marks the run finished
                export_model(self.cfg, self.model, self.state, test, self.data)
        except Exception as exc:
            self.progress.hang.failed(exc)  # a wait for peers that failed: raises, naming who did not arrive
            raise
        finally:
            self.stop.restore()
            self.progress.stop()
        return self.progress.finish(self.state, self.model, test, time.perf_counter() - wall_started)

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
        self.load_rank_state(payload.get("per_rank"))

    def rank_state(self) -> dict[str, Any]:
        """This rank's own state under a ``--comm`` option that keeps per-rank state (``Comm.per_rank_state``):
        the option's state and, where replicas differ (local SGD), this rank's model and optimiser."""
        assert self.comm is not None
        state: dict[str, Any] = {"comm": self.comm.state_dict()}
        if self.comm.replicas_differ:
            state["model"] = self.model.state_dict()
            state["optimizer"] = self.optimizer.state_dict()
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

    def write_checkpoint(self, val_accuracy: float | None = None) -> None:
        """Rank 0 writes the checkpoint of the current step; the others go straight on.

        ``val_accuracy``: the validation accuracy of an epoch-end checkpoint, which makes it a
        candidate for the best checkpoint.

        For most options no collective is involved, so a peer that died cannot hang the write.
        A failed write (full disk, say) is a warning: training goes on and the earlier
        checkpoints stay.
        """
        per_rank = None
        if self.comm is not None and self.comm.per_rank_state:
            # Only for --comm powersgd and localsgd, whose state differs between ranks: rank 0
            # gathers every rank's. A collective (every rank checkpoints at the same step); a
            # dead peer fails it after --timeout instead of hanging.
            gathered: list[Any] | None = [None] * self.dist_env.world_size if self.dist_env.is_main else None
            dist.gather_object(self.rank_state(), gathered, dst=0)
            per_rank = gathered
        if not self.dist_env.is_main:
            return
        started = time.perf_counter()
        payload = self.state_dict()
        if per_rank is not None:
            payload["per_rank"] = per_rank
        if not all_finite([payload["model"], payload["optimizer"]]):
            log.error(
                "checkpoint of step %d not written: the model or optimiser holds NaN or Inf", self.state.global_step
            )
            return
        try:
            path = save_checkpoint(
                self.cfg.checkpoint_root,
                self.state.global_step,
                payload,
                self.cfg.keep_checkpoints,
                val_accuracy=val_accuracy,
            )
        except OSError as exc:
            log.warning(
                "checkpoint of step %d not written (%s); training goes on and the earlier checkpoints are kept",
                self.state.global_step,
                exc.strerror or exc,
            )
            return
        log.info("checkpoint %s written in %.0f ms", path, (time.perf_counter() - started) * 1e3)
