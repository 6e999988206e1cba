"""Start-up without Python's cyclic garbage collector.

Importing torch, and the compiler stack that every ``torch.optim`` optimiser imports when it is
built, makes over a million objects that live as long as the process and almost no garbage. The
collector, triggered by allocation counts, walks those objects again and again while they are
made. Paused for those imports and then frozen (``gc.freeze``: never walked again, neither while
the process runs nor by Python's final collection at exit), a rank starts and ends on about a
fifth less CPU (``python -m benchmarks.startup``). Training runs with the collector on.

Only module-level state, the run's configuration and its task object are frozen: the training
command imports the compiler stack once its input is checked (bad input ends first, without it),
before the job has a process group, a model or data. Frozen objects in reference cycles are
never freed; objects that hold threads or native resources are made after the freeze and are
collected and torn down as usual.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused(freeze: bool = False) -> Iterator[None]:
    """No cyclic collection inside the block; the collector is on again after it if it was before.

    ``freeze`` moves every object alive at the end into the collector's permanent generation, which
    no collection walks. Only for a process's own set-up: a garbage cycle made before then would
    never be freed. Without it the block leaves nothing behind, and the first collection after it
    walks what the block made.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if was_enabled:
            gc.enable()
