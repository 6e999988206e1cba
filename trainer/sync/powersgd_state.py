"""PowerSGD's memories kept per parameter, so a resumed DDP can take them whatever its bucket layout.

PowerSGD (``torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook``) keeps, per DDP bucket,
a flat error-feedback vector (this rank's residual) and flat warm-start P and Q matrices, each
laid out in the order of the bucket's parameters. DDP builds its buckets in one order and
rebuilds them after its first step in the order the gradients became ready; a run whose
PowerSGD starts after that step only ever sees the second layout, but a resumed run's new DDP
takes its first step in the first layout. Restoring the flat vectors as they were saved would
add each residual to another parameter's gradient.

So the checkpoint holds each parameter's pieces (its slice of the error, its P and Q), and
``PowerSGDMemory.hook`` lays them out for whichever layout the bucket has when it is called,
again after DDP rebuilds its buckets. The arithmetic is per parameter, so the result is the
same bits as an uninterrupted run's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

Pieces = dict[int, dict[str, torch.Tensor]]  # parameter index -> {"error", "p", "q"} (flat)


class PowerSGDMemory:
    """Wraps ``powerSGD_hook`` for one model: keeps track of the layout each bucket's memories are in."""

    def __init__(self, state: powerSGD_hook.PowerSGDState, model: nn.Module) -> None:
        self.state = state
        self.params = list(model.parameters())
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self.layouts: dict[int, tuple[int, ...]] = {}  # bucket index -> parameter indices, in the bucket's order
        self.pieces: Pieces = {}  # restored or re-laid-out pieces not yet placed in a bucket

    def hook(self, state: powerSGD_hook.PowerSGDState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        index = bucket.index()
        layout = tuple(self._index[id(p)] for p in bucket.parameters())
        if self.layouts.get(index, layout) != layout:
            # DDP rebuilt its buckets: no bucket has run this step yet, so all are still in the old layouts.
            self.pieces.update(self._split_all(remove=True))
            self.layouts.clear()
        if index not in self.layouts:
            self._place(index, layout)
            self.layouts[index] = layout
        return powerSGD_hook.powerSGD_hook(state, bucket)

    def state_dict(self) -> Pieces:
        """Every parameter's pieces (copies), wherever they are now."""
        return {**{i: dict(piece) for i, piece in self.pieces.items()}, **self._split_all(remove=False)}

    def load_state_dict(self, pieces: Pieces, device: torch.device, keep_error: bool) -> None:
        """Take saved pieces; they are laid out at each bucket's next call. ``keep_error`` False drops the residuals."""
        skip = set() if keep_error else {"error"}
        self.pieces = {i: {k: v.to(device) for k, v in piece.items() if k not in skip} for i, piece in pieces.items()}
        self.layouts.clear()
        for memory in (self.state.error_dict, self.state.p_memory_dict, self.state.q_memory_dict):
            memory.clear()

    # -- layouts ------------------------------------------------------------------------
    def _compressed(self, layout: tuple[int, ...]) -> list[tuple[int, int, int]]:
        """(parameter, P length, Q length) of the parameters PowerSGD compresses, in the order of its P and Q memories.

        That order is the hook's: parameters grouped by shape (groups in order of first
        appearance), each group in the bucket's order; the test for compressing is its own.
        """
        groups: dict[torch.Size, list[tuple[int, int, int]]] = {}
        for i in layout:
            shape = self.params[i].shape
            n = shape[0]
            m = self.params[i].numel() // n
            rank = min(n, m, self.state.matrix_approximation_rank)
            if powerSGD_hook._should_compress(n, m, rank, self.state.min_compression_rate)[0]:
                groups.setdefault(torch.Size((n, m)), []).append((i, n * rank, m * rank))
        return [entry for group in groups.values() for entry in group]

    def _split_all(self, remove: bool) -> Pieces:
        pieces: Pieces = {}
        for index, layout in self.layouts.items():
            for i, piece in self._split(index, layout, remove).items():
                pieces.setdefault(i, {}).update(piece)
        return pieces

    def _split(self, index: int, layout: tuple[int, ...], remove: bool) -> Pieces:
        state, pieces = self.state, {}
        take = dict.pop if remove else dict.get
        error = take(state.error_dict, index, None)
        if error is not None:
            offset = 0
            for i in layout:
                numel = self.params[i].numel()
                pieces.setdefault(i, {})["error"] = error[offset : offset + numel].clone()
                offset += numel
        p_memory, q_memory = take(state.p_memory_dict, index, None), take(state.q_memory_dict, index, None)
        if p_memory is not None and q_memory is not None:
            p_offset = q_offset = 0
            for i, p_len, q_len in self._compressed(layout):
                pieces.setdefault(i, {})["p"] = p_memory[p_offset : p_offset + p_len].clone()
                pieces.setdefault(i, {})["q"] = q_memory[q_offset : q_offset + q_len].clone()
                p_offset, q_offset = p_offset + p_len, q_offset + q_len
        return pieces

    def _place(self, index: int, layout: tuple[int, ...]) -> None:
        """Lay out the pieces of this bucket's parameters as its memories, where every one of them has its piece."""
        if not self.pieces:
            return
        state, compressed = self.state, [i for i, _, _ in self._compressed(layout)]
        if all("error" in self.pieces.get(i, {}) for i in layout):
            state.error_dict[index] = torch.cat([self.pieces[i]["error"] for i in layout])
        if compressed and all({"p", "q"} <= set(self.pieces.get(i, {})) for i in compressed):
            state.p_memory_dict[index] = torch.cat([self.pieces[i]["p"] for i in compressed])
            state.q_memory_dict[index] = torch.cat([self.pieces[i]["q"] for i in compressed])
        for i in layout:
            self.pieces.pop(i, None)
