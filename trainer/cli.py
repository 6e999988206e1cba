"""Entry point: read the environment once, build, train, tear down on every exit path."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from trainer.core.collector import collector_paused
from trainer.core.config import TrainConfig, build_parser, plain, task_values
from trainer.core.errors import UsageError
from trainer.core.fileio import write_json
from trainer.core.logs import setup_logging
from trainer.core.task import Task
from trainer.distributed.collectives import agree_on_step, agree_to_start, any_rank, barrier
from trainer.distributed.env import DistEnv, configure_threads, read_dist_env, resolve_backend, resolve_device
from trainer.distributed.rendezvous import destroy_process_group, init_process_group
from trainer.engine.loop import Trainer
from trainer.lifecycle.checkpoint import check_writable, choose_checkpoint, compatibility, set_aside_newer
from trainer.lifecycle.guard import DIVERGED_EXIT_CODE, Diverged
from trainer.lifecycle.replicas import Replicas
from trainer.lifecycle.rundir import check_run_dir, finished_run, prepare_run_dir, starts_fresh
from trainer.lifecycle.runlock import RunLock
from trainer.lifecycle.signals import StopRequested
from trainer.tasks.find import find_task, spec_of

log = logging.getLogger("trainer")


def parse_run(argv: Sequence[str], task: Task | None = None) -> tuple[TrainConfig, Task]:
    """Command line -> (config, task). ``--task`` is read first, so that the task's own options join the
    parser (and ``--help``); with ``task`` given (``trainer.fit``) it is the task, and its options are
    the defaults. Bad values exit through argparse or raise ``UsageError``."""
    if task is None:
        first = argparse.ArgumentParser(add_help=False)
        first.add_argument("--task", default=TrainConfig.task)
        spec = first.parse_known_args(argv)[0].task
        task_class, defaults = find_task(spec), None
        spec = _absolute_file_spec(spec)
    else:
        task_class, defaults, spec = type(task), task.options, spec_of(type(task))
    clash = {f.name for f in dataclasses.fields(task_class.Options)} & {f.name for f in dataclasses.fields(TrainConfig)}
    if clash:
        raise UsageError(f"{task_class.__name__}.Options reuses the engine's option names {sorted(clash)}; rename them")
    parser = build_parser(task_class.Options, task_class.name, defaults)
    parser.set_defaults(**engine_defaults(task_class))
    namespace = parser.parse_args(argv)
    values, options = task_values(namespace, task_class.Options)
    values.update(task=spec, task_options=plain(dataclasses.asdict(options)))
    chosen = task if task is not None and options == task.options else task_class(options)
    return TrainConfig(**values), chosen


def engine_defaults(task_class: type[Task]) -> dict[str, Any]:
    """The task's defaults for the engine's options (``Task.defaults``), checked against the config's fields."""
    settable = {f.name for f in dataclasses.fields(TrainConfig)} - {"task", "task_options"}
    unknown = sorted(set(task_class.defaults) - settable)
    if unknown:
        raise UsageError(f"{task_class.__name__}.defaults names no option of the engine: {unknown}; see TrainConfig")
    return dict(task_class.defaults)


def _absolute_file_spec(spec: str) -> str:
    """A task file named relative to where the run started, made absolute: ``trainer evaluate`` may run elsewhere."""
    where, _, name = spec.rpartition(":")
    if where.endswith(".py"):
        return f"{Path(where).resolve()}:{name}"
    return spec


def pick_checkpoint(cfg: TrainConfig, task: Task, device: torch.device) -> tuple[Path, dict] | None:
    """The checkpoint to resume from, agreed by all ranks; incompatible ones are refused by name."""
    reason = None
    try:
        chosen = choose_checkpoint(cfg)
    except UsageError as exc:
        chosen, reason = None, str(exc)
    if chosen is not None:
        saved_task = chosen[1].get("task", chosen[1]["config"].get("task"))
        must_match = tuple(f.name for f in dataclasses.fields(task.Options) if f.metadata.get("must_match", True))
        refused, changed = compatibility(chosen[1]["config"], cfg, must_match)
        if saved_task != task.name:
            reason = (
                f"checkpoint {chosen[0]} is of the task {saved_task!r}, not {task.name!r}; continue it with that task, "
                "or start over with --overwrite or a new --run-dir"
            )
        elif refused:
            reason = (
                f"checkpoint {chosen[0]} cannot continue this run, its settings differ: {'; '.join(refused)}. "
                "Use the checkpoint's values, or start over with --overwrite or a new --run-dir"
            )
        elif changed:
            log.info("settings that differ from the checkpoint's (the current ones apply): %s", "; ".join(changed))
    agree_to_start(reason, device)
    agree_on_step(chosen[1]["train_state"]["global_step"] if chosen else 0, device)
    return chosen


def log_resume(path: Path, payload: dict, trainer: Trainer) -> None:
    state, cfg = trainer.state, trainer.cfg
    log.info(
        "resuming from %s: step %d, epoch %d of %d at sample %d of %d, written at world size %d "
        "(now %d), batch per rank %d (now %d)",
        path,
        state.global_step,
        state.epoch + 1,
        cfg.epochs,
        state.consumed,
        trainer.train_samples,
        payload["world_size"],
        trainer.dist_env.world_size,
        payload["batch_size"],
        trainer.batch_size,
    )


def run(cfg: TrainConfig, task: Task, dist_env: DistEnv, device: torch.device) -> dict | None:
    """Hold the run directory for this job (before anything there changes), then prepare and train."""
    lock = RunLock(cfg)
    reason = None
    if dist_env.is_main:
        try:
            lock.acquire(dist_env)
        except UsageError as exc:
            reason = str(exc)
    try:
        agree_to_start(reason, device)
        return run_locked(cfg, task, dist_env, device)
    finally:
        lock.release()


def run_locked(cfg: TrainConfig, task: Task, dist_env: DistEnv, device: torch.device) -> dict | None:
    """Prepare or resume the run on an initialised process group (or none at world size 1), then train."""
    run_dir = Path(cfg.run_dir)
    fresh = starts_fresh(cfg, dist_env)
    if cfg.overwrite and not fresh:
        log.info("--overwrite applied at this launch's first start; this restart resumes instead")
    finished = finished_run(cfg, fresh)
    if any_rank(finished is not None, device):
        # Not an error: running the same job again is a no-op, and torchrun sees success.
        if dist_env.is_main:
            log.warning("%s", finished or "another rank found this run finished")
        return None
    agree_to_start(check_run_dir(cfg, fresh), device)
    task.seed = cfg.seed
    task.prepare(dist_env.local_rank)
    barrier()  # whatever ``prepare`` fetched is complete before any rank reads it
    splits = task.build_data(device)  # bad data fails here, before anything but the lock file is written
    if dist_env.is_main:
        prepare_run_dir(cfg, fresh, dist_env.run_id)
        write_json(run_dir / "config.json", cfg.to_dict())
    # Only rank 0 writes checkpoints, but every rank must know it can, or they all stop now.
    # (This collective also keeps every rank out of the run directory until rank 0 has prepared it.)
    agree_to_start(check_writable(cfg.checkpoint_root) if dist_env.is_main else None, device)
    replicas = Replicas(cfg.checkpoint_root, dist_env, cfg.keep_checkpoints, cfg.checkpoint_timeout)
    if cfg.resume == "auto":
        replicas.fetch_newest()  # where nodes keep their own copies: the newest any holds, to all
    chosen = pick_checkpoint(cfg, task, device)
    trainer = Trainer(cfg, dist_env, device, task, splits)
    trainer.replicas = None if replicas.shared else replicas
    if chosen is not None:
        trainer.load_state_dict(chosen[1])
        log_resume(chosen[0], chosen[1], trainer)
    elif cfg.resume == "auto":
        log.info("no checkpoint in %s; starting at step 0", cfg.checkpoint_root)
    if dist_env.is_main or (not replicas.shared and dist_env.local_rank == 0):  # each node's own copies too
        moved = set_aside_newer(cfg.checkpoint_root, trainer.state.global_step)
        if moved:
            log.warning("set aside checkpoint files newer than the resumed step: %s", ", ".join(moved))
    return trainer.train()


# Commands besides training (``trainer NAME ARGS``): each module's ``main(argv)`` runs it.
COMMANDS: dict[str, str] = {
    "evaluate": "trainer.commands.evaluate",
    "generate": "trainer.commands.generate",
    "report": "trainer.watch.report",
    "platform": "trainer.watch.machine",
}


@record
def main(argv: Sequence[str] | None = None) -> None:
    """``trainer [COMMAND] ...`` / ``python -m trainer``; bad input exits 2 with a one-line message."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        importlib.import_module(COMMANDS[args[0]]).main(args[1:])
        return
    train_main(args)


@record
def fit(task: Task, argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Train ``task`` from Python, in a script run plainly or by torchrun; the engine's options come
    from ``argv`` (default: the script's command line), with the task's options as given to it.

    Returns the run's summary (None where the run had already finished). Bad input exits 2 with
    one line, as on the command line.
    """
    return train_main(list(sys.argv[1:] if argv is None else argv), task)


def train_main(argv: Sequence[str], task: Task | None = None) -> dict[str, Any] | None:
    """Train: the default command."""
    try:
        cfg, task = parse_run(argv, task)
        dist_env = read_dist_env()
        setup_logging(dist_env.rank, cfg.log_all_ranks)
        threads, source = configure_threads(dist_env)
        cfg.per_rank_batch(dist_env.world_size)  # an uneven --global-batch-size fails before any waiting
        device = resolve_device(cfg.device, dist_env)
        backend = resolve_backend(cfg.backend, device)
        log.info("config:\n%s", cfg.to_json())
        log.info(
            "rank %d of %d (local %d of %d), device %s, backend %s, %d threads (%s)",
            dist_env.rank,
            dist_env.world_size,
            dist_env.local_rank,
            dist_env.local_world_size,
            device,
            backend if dist_env.distributed else "none (one process)",
            threads,
            source,
        )
        # Every torch.optim optimiser's constructor imports the compiler stack: here, after bad input
        # has had its one line and before the job has a process group, a model or data (core/collector.py).
        with collector_paused(freeze=True):
            import torch._dynamo  # noqa: F401
        init_process_group(dist_env, backend, device, cfg.timeout)
        try:
            return run(cfg, task, dist_env, device)
        except StopRequested as stop:
            log.warning("%s; exiting with %d so the launcher knows the run is unfinished", stop, stop.exit_code)
            raise SystemExit(stop.exit_code) from None
        except Diverged as exc:
            print(f"trainer: error: {exc}", file=sys.stderr)
            raise SystemExit(DIVERGED_EXIT_CODE) from None
        finally:
            destroy_process_group()
    except UsageError as exc:
        print(f"trainer: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
