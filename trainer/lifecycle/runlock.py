"""One job per run directory: rank 0 holds an exclusive ``flock`` on ``run.lock`` while the job lives.

Two launches into one ``--run-dir`` (a second terminal, a scheduler requeue while the old job is
still shutting down) would write the same checkpoints and interleave the same logs. The first
launch's rank 0 takes the lock before anything in the directory is written, renamed or deleted,
and keeps it until it exits; a second launch finds it taken and stops with the holder's name.

The kernel drops a ``flock`` when its process dies, however it dies (``kill -9`` included), so
there is nothing to clean up: workers that torchrun restarts, or a new job after a crash, take the
lock at once. The lock file's content (JSON: host, pid, start time, torchrun's run id) only names
the holder for the error message; it is emptied on a clean exit, so a finished run's files do not
change when it is launched again.

Shared file systems: a ``flock`` only excludes processes that see the same lock. Local disks do;
Linux emulates ``flock`` on NFS with byte-range locks that the server arbitrates (NFSv4, or NFSv3
with lockd), so it works across clients. Some FUSE and object-store file systems keep locks
per host or refuse them: where refused, the run stops with a one-line error (see docs/run-lifecycle.md).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from trainer.core.config import TrainConfig
from trainer.core.errors import UsageError
from trainer.distributed.env import DistEnv

LOCK_FILE = "run.lock"


class RunDirInUse(UsageError):
    """Another live job holds the lock of the run or checkpoint directory."""


def describe_holder(path: Path) -> str:
    """The holder named in a lock file, for the error message."""
    try:
        holder = json.loads(path.read_text())
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["started"])))
        text = f"host {holder['host']}, pid {holder['pid']}, started {started}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a job that has not written its details yet"
    if holder.get("run_id"):
        text += f", torchrun run id {holder['run_id']}"
    return text


class DirectoryLock:
    """An exclusive, non-blocking ``flock`` on ``DIRECTORY/run.lock``, naming its holder inside."""

    def __init__(self, directory: Path, flag: str) -> None:
        self.path = directory / LOCK_FILE
        self.flag = flag  # the option that named the directory, for messages
        self.fd: int | None = None

    def acquire(self, holder: dict[str, Any]) -> None:
        """Take the lock and write ``holder`` into the file; ``UsageError`` if it cannot be taken.

        Nothing in the directory changes when the lock is taken by someone else: the file is opened
        without truncation and only written once the lock is ours.
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(
                f"cannot create {self.flag} {self.path.parent} ({exc.strerror or exc}); pass a writable directory"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirInUse(
                    f"{self.flag} {self.path.parent} is in use by another job ({describe_holder(self.path)}); "
                    f"wait for it to end or stop it, or pick another {self.flag}"
                ) from None
            # Refused outright (ENOLCK, EOPNOTSUPP, ...): without a lock two jobs could destroy
            # each other's work, so the safe choice is not to start.
            raise UsageError(
                f"{self.flag} {self.path.parent} is on a file system that refuses file locks ({exc.strerror or exc}), "
                "so this job cannot make sure it is the only one there; use a local disk or NFS with locking"
            ) from None
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(holder, sort_keys=True) + "\n").encode())
        os.fsync(fd)

    def release(self) -> None:
        """Empty the file while still holding it, then let go (closing the descriptor drops the lock)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):  # the lock is dropped below all the same
            os.ftruncate(self.fd, 0)
        os.close(self.fd)
        self.fd = None


class RunLock:
    """The locks of one job: its run directory, and its checkpoint directory when that lies elsewhere."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.locks = [DirectoryLock(Path(cfg.run_dir), "--run-dir")]
        run_dir, checkpoints = Path(cfg.run_dir).resolve(), cfg.checkpoint_root.resolve()
        if not checkpoints.is_relative_to(run_dir):
            self.locks.append(DirectoryLock(cfg.checkpoint_root, "--checkpoint-dir"))

    def acquire(self, dist_env: DistEnv) -> None:
        """Take every lock, in a fixed order (run directory first), or none of them."""
        run_id = dist_env.run_id if dist_env.run_id != "none" else None  # torchrun's default id names nothing
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "run_id": run_id}
        try:
            for lock in self.locks:
                lock.acquire(holder)
        except UsageError:
            self.release()
            raise

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()
