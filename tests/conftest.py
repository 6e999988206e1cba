"""Shared helpers: run the real trainer as real processes, and leave none behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
DIST_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
    "ROLE_RANK",
    "TORCHELASTIC_RESTART_COUNT",
)
# Small, fast runs: short logs, few steps.
QUICK = ("--epochs", "1", "--log-every", "20")


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without launcher variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_process(cmd: Sequence[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in its own session; on timeout kill the whole session, then fail."""
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd} did not finish in {timeout}s\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_trainer(args: Sequence[str], timeout: float = 180, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m trainer ARGS`` as one plain process (no launcher variables)."""
    return run_process([sys.executable, "-m", "trainer", *args], clean_env(**env), timeout)


def torchrun_cmd(nproc: int, args: Sequence[str], launcher_args: Sequence[str] = ()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *launcher_args,
        "-m",
        "trainer",
        *args,
    ]


def run_torchrun(
    nproc: int, args: Sequence[str], launcher_args: Sequence[str] = (), timeout: float = 180, **env: str
) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node=N [launcher_args] -m trainer ARGS``."""
    return run_process(torchrun_cmd(nproc, args, launcher_args), clean_env(**env), timeout)


def free_port() -> int:
    """A port that was free a moment ago (bind-then-release can race; fine for tests on loopback)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-6000:]}"
    )


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Every test must leave no trainer or torchrun process behind."""
    yield
    leftovers = psutil.Process().children(recursive=True)
    for child in leftovers:
        child.kill()
    psutil.wait_procs(leftovers, timeout=5)
    assert not leftovers, f"processes left running: {[p.pid for p in leftovers]}"
