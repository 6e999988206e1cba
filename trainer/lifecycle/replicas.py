"""Checkpoints on storage the nodes do not share: every node keeps a verified copy.

Rank 0 writes every checkpoint. Where ``--checkpoint-dir`` is one directory that every rank sees
(shared storage), that is all. Where each node has a directory of its own (local disks, cloud
VMs, spot instances), a node that dies would take the checkpoints with it, and the survivors
would find none, or different ones. So at start the ranks find out which case holds (rank 0
writes a random token; every rank looks for it), and where the directory is not shared:

- after each write, rank 0 sends the checkpoint's bytes and manifest to every rank, and each
  other node's first local rank stores them, SHA-256 checked, through the same temporary file,
  fsync and rename as rank 0's own write, and prunes as rank 0 does;
- at start, the ranks agree on the newest valid step that any of them holds; the lowest rank
  holding it sends it to the nodes that lack it, and every rank then resumes from it.

Ranks on one node are assumed to see one directory (a node's own disk). The transfers use a gloo
group of their own, so CPU tensors carry the bytes whatever the training backend.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer.core.fileio import atomic_write_bytes
from trainer.distributed.env import DistEnv
from trainer.lifecycle.checkpoint import CheckpointError, newest_valid, save_copy, step_of

log = logging.getLogger(__name__)

PROBE = ".shared-probe"


class Replicas:
    """The checkpoint directory's sharing, found at start, and the copies it calls for."""

    def __init__(self, directory: Path, dist_env: DistEnv, keep: int, timeout_s: float) -> None:
        self.directory, self.dist_env, self.keep = directory, dist_env, keep
        self.group = None
        self.shared = True
        if not dist.is_initialized():
            return
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self.shared = self._probe()
        if dist_env.is_main:
            if self.shared:
                log.info("checkpoint directory %s: one directory, shared by every rank", directory)
            else:
                log.info(
                    "checkpoint directory %s: not shared between the nodes; each node keeps a copy of every "
                    "checkpoint (rank 0 sends it to every rank after writing it)",
                    directory,
                )

    @property
    def keeper(self) -> bool:
        """Whether this rank stores what it receives: the first rank of a node other than rank 0's."""
        return not self.shared and self.dist_env.local_rank == 0 and not self.dist_env.is_main

    def _probe(self) -> bool:
        token = [secrets.token_hex(16) if self.dist_env.is_main else None]
        dist.broadcast_object_list(token, src=0, group=self.group)
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.dist_env.is_main:
            atomic_write_bytes(self.directory / PROBE, token[0].encode())
        dist.barrier(group=self.group)
        try:
            sees = (self.directory / PROBE).read_text() == token[0]
        except OSError:
            sees = False
        seen: list[Any] = [None] * self.dist_env.world_size
        dist.all_gather_object(seen, sees, group=self.group)
        dist.barrier(group=self.group)  # every rank has looked before the token goes
        if self.dist_env.is_main:
            (self.directory / PROBE).unlink(missing_ok=True)
        return all(seen)

    def _send(self, src: int, path: Path | None) -> dict[str, Any] | None:
        """Rank ``src``'s checkpoint at ``path`` (None: nothing) to every rank; keepers store it."""
        mine = self.dist_env.rank == src
        meta: list[Any] = [None]
        if mine and path is not None:
            meta[0] = {"manifest": _read_manifest(path)}
        dist.broadcast_object_list(meta, src=src, group=self.group)
        if meta[0] is None:
            return None
        manifest = meta[0]["manifest"]
        if mine:
            assert path is not None
            buffer = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        else:
            buffer = torch.empty(manifest["bytes"], dtype=torch.uint8)
        dist.broadcast(buffer, src=src, group=self.group)
        return {"manifest": manifest, "data": buffer.numpy().tobytes()}

    def after_write(self, path: Path | None) -> None:
        """Every rank, after rank 0 wrote ``path`` (None: it wrote nothing): the other nodes keep a copy."""
        if self.shared:
            return
        started = time.perf_counter()
        sent = self._send(0, path)
        if sent is None:
            return
        if self.keeper:
            self._store(sent)
        if self.dist_env.is_main:
            log.info(
                "checkpoint %s (%d bytes) sent to every rank for the other nodes' copies in %.0f ms",
                sent["manifest"]["file"],
                sent["manifest"]["bytes"],
                (time.perf_counter() - started) * 1000,
            )

    def fetch_newest(self) -> None:
        """Every rank, at start: the newest valid checkpoint any rank holds, copied to the nodes lacking it."""
        if self.shared:
            return
        found = newest_valid(self.directory)
        mine = step_of(found[0]) if found else 0
        steps: list[Any] = [None] * self.dist_env.world_size
        dist.all_gather_object(steps, mine, group=self.group)
        newest = max(steps)
        if newest == 0:
            return
        src = min(rank for rank, step in enumerate(steps) if step == newest)
        sent = self._send(src, found[0] if found and self.dist_env.rank == src else None)
        assert sent is not None
        if self.dist_env.local_rank == 0 and mine < newest:
            self._store(sent)
        dist.barrier(group=self.group)  # stored before any rank of the node reads it
        if self.dist_env.is_main:
            lacking = [rank for rank, step in enumerate(steps) if step < newest]
            if lacking:
                log.info(
                    "checkpoint of step %d: held by rank(s) %s, sent by rank %d to rank(s) %s",
                    newest,
                    ", ".join(str(r) for r, s in enumerate(steps) if s == newest),
                    src,
                    ", ".join(map(str, lacking)),
                )

    def _store(self, sent: dict[str, Any]) -> None:
        manifest, data = sent["manifest"], sent["data"]
        if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
            log.error("copy of checkpoint %s not kept: its SHA-256 differs from the manifest's", manifest["file"])
            return
        try:
            save_copy(self.directory, data, manifest, self.keep)
        except (OSError, CheckpointError) as exc:
            log.warning("copy of checkpoint %s not kept on this node: %s", manifest["file"], exc)


def _read_manifest(path: Path) -> dict[str, Any]:
    return json.loads(path.with_suffix(".json").read_text())
