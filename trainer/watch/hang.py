"""When a rank waits for a peer that never comes: say who, and where every live rank was.

Two ways a wait ends badly, and both leave ``RUN_DIR/hang-rank<r>.txt`` (Python stacks of all
threads, the last step completed, the ranks that did not arrive):

- the wait times out (gloo after ``--timeout``, the shared-memory all-reduce's ``PeerGone``): the
  loop hands the error to ``HangWatch.failed``, which writes the file and raises ``HangDetected``,
  whose one line names the missing ranks (torchrun's error summary shows it, through ``@record``);
- the wait never returns (a rank blocked inside C++ never reaches Python code again): a watchdog
  thread writes the file once no step has completed for twice ``--timeout``.

Who did not arrive comes from the job's store: every rank's watchdog publishes a heartbeat (its
last completed step and the time) each second. A rank whose heartbeat is stale is not running
(stopped, swapped out, dead); failing that, the ranks whose last step is behind the others'.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

import torch.distributed as dist

from trainer.distributed.env import DistEnv
from trainer.sync.shm import PeerGone

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
KEY = "trainer/heartbeat/rank{}"


class HangDetected(RuntimeError):
    """A collective or the shared-memory wait gave up on a peer; the message names who and where to look."""


def is_peer_wait_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a wait for peers that timed out or lost them (not a bug in this rank)."""
    return isinstance(exc, (PeerGone, dist.DistError)) or "timed out" in str(exc).lower()


def _store() -> dist.Store | None:
    # The process group's own store: no port of our own to choose, and it lives as long as the group.
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):
        return None


class HangWatch:
    """Heartbeat, watchdog and hang file of one rank (inactive at world size 1: no peer to wait for)."""

    def __init__(self, run_dir: Path, dist_env: DistEnv, timeout_s: float) -> None:
        self.path = run_dir / f"hang-rank{dist_env.rank}.txt"
        self.dist_env, self.timeout_s = dist_env, timeout_s
        self.last_step, self.last_step_at = 0, time.time()
        # Until then the watchdog keeps quiet: a wait for rank 0's write has its own limit.
        self.quiet_until = 0.0
        self._written = threading.Lock()
        self._stop = threading.Event()
        self._store: dist.Store | None = None
        self._thread = threading.Thread(target=self._run, name="hang-watch", daemon=True)

    def start(self, step: int) -> None:
        if not self.dist_env.distributed:
            return
        self.step_done(step)
        self._store = _store()
        self._beat()  # at once: a rank stopped before the thread's first beat is still found
        self._thread.start()

    def step_done(self, step: int) -> None:
        """Note a completed step (two attribute writes: cheap enough for every step)."""
        self.last_step, self.last_step_at = step, time.time()

    def expect_wait(self, seconds: float) -> None:
        """No step will complete for up to ``seconds`` by design (the others wait for rank 0's
        checkpoint or export under --checkpoint-timeout): no watchdog report meanwhile."""
        self.quiet_until = time.time() + seconds

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._beat()
            now = time.time()
            stalled = now - max(self.last_step_at, min(self.quiet_until, now))
            if stalled > 2 * self.timeout_s:
                self.write(f"no step completed for {stalled:.0f} s (watchdog; --timeout {self.timeout_s:g} s)")

    def _beat(self) -> None:
        if self._store is None:
            return
        try:
            self._store.set(KEY.format(self.dist_env.rank), json.dumps([self.last_step, time.time()]))
        except Exception as exc:  # the store's host is gone: the failure surfaces in the main thread
            log.warning("rank %d: heartbeat not written (%s); hang reports cannot name peers", self.dist_env.rank, exc)
            self._store = None

    def missing_ranks(self) -> list[str]:
        """Who the others are waiting for, read off the heartbeats: one phrase per rank."""
        store, now = self._store, time.time()
        if store is None:
            return []
        beats: dict[int, tuple[int, float] | None] = {}
        for rank in range(self.dist_env.world_size):
            key = KEY.format(rank)
            try:
                beats[rank] = tuple(json.loads(store.get(key))) if store.check([key]) else None
            except Exception:
                return []
        stale_after = max(3 * HEARTBEAT_S, self.timeout_s / 2)
        stale = [
            f"rank {r} (no heartbeat)"
            if b is None
            else f"rank {r} (no heartbeat for {now - b[1]:.0f} s, the last at step {b[0]})"
            for r, b in beats.items()
            if b is None or now - b[1] > stale_after
        ]
        if stale:
            return stale
        ahead = max(b[0] for b in beats.values() if b is not None)
        return [f"rank {r} (at step {b[0]}, others at {ahead})" for r, b in beats.items() if b and b[0] < ahead]

    def failed(self, exc: BaseException) -> None:
        """Called with whatever ended training: a wait for peers raises ``HangDetected`` naming them."""
        if not self.dist_env.distributed or not is_peer_wait_failure(exc):
            return
        missing = self.missing_ranks()
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        who = "; ".join(missing) if missing else "unknown (no heartbeat readable)"
        self.write(f"{type(exc).__name__}: {first_line}", missing)
        raise HangDetected(
            f"rank {self.dist_env.rank} gave up waiting for peers after step {self.last_step}: did not arrive: {who}; "
            f"stacks in {self.path.parent}/hang-rank*.txt ({first_line})"
        ) from exc

    def write(self, reason: str, missing: list[str] | None = None) -> None:
        """Write ``hang-rank<r>.txt`` once: why, the last step, who is missing, and every thread's stack."""
        if not self._written.acquire(blocking=False):
            return
        if missing is None:
            missing = self.missing_ranks()
        env = self.dist_env
        header = [
            f"rank {env.rank} of {env.world_size}, pid {os.getpid()}, host {socket.gethostname()}",
            f"written {time.strftime('%Y-%m-%d %H:%M:%S')}: {reason}",
            f"last completed step: {self.last_step} ({time.time() - self.last_step_at:.1f} s ago)",
            f"ranks that did not arrive: {'; '.join(missing) if missing else 'unknown'}",
            "",
            "Python stacks of all threads (most recent call first):",
            "",
        ]
        try:
            with self.path.open("w") as handle:
                handle.write("\n".join(header))
                handle.flush()
                faulthandler.dump_traceback(file=handle, all_threads=True)
        except OSError as exc:
            log.warning("could not write %s: %s", self.path, exc)
            return
        log.error("rank %d: %s; stacks in %s", env.rank, reason, self.path)
