"""How to start the trainer, or any module, as a fresh job: the torchrun command line and an
environment free of launcher variables.

The tests and the benchmarks start real jobs from a process that may itself run under a
launcher; both build the command and the environment here, so the two cannot drift apart.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from trainer.distributed.env import without_launcher_vars


def torchrun_command(
    nproc: int,
    module: str,
    args: Sequence[str] = (),
    launcher_args: Sequence[str] = (),
    *,
    standalone: bool = True,
    python: str = sys.executable,
) -> list[str]:
    """``python -m torch.distributed.run [--standalone] --nproc_per_node=N [launcher_args] -m MODULE ARGS``.

    ``torch.distributed.run`` through ``python``, not the ``torchrun`` script: the job then runs
    on the same interpreter (and so the same torch) as its caller whatever ``PATH`` says.
    ``standalone`` gives the job a private rendezvous on this host; pass ``False`` with
    ``--nnodes`` and ``--rdzv-*`` in ``launcher_args`` for a job that meets other nodes.
    """
    return [
        python,
        "-m",
        "torch.distributed.run",
        *(["--standalone"] if standalone else []),
        f"--nproc_per_node={nproc}",
        *launcher_args,
        "-m",
        module,
        *args,
    ]


def fresh_job_env(
    base: Mapping[str, str] | None = None,
    *,
    pythonpath: Path | None = None,
    hide_gpus: bool = True,
    **extra: str,
) -> dict[str, str]:
    """``base`` (default: this process's environment) fit to start a new job from, plus ``extra``.

    No launcher variable is kept: a job started from inside a launched worker would otherwise
    take that worker's rank and rendezvous for its own. ``pythonpath`` goes first on
    ``PYTHONPATH`` so that the job imports the same code as its caller (a checkout that is not
    installed). ``hide_gpus`` sets ``CUDA_VISIBLE_DEVICES`` empty, so the job takes the CPU path
    even on a host with GPUs; with ``False`` the job sees what ``base`` shows it.
    """
    env = without_launcher_vars(os.environ if base is None else base)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(pythonpath), env.get("PYTHONPATH"))))
    if hide_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra)
    return env
