"""Helpers for the launch tests: start the real scripts in the background, wait with a deadline."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil
import pytest
from conftest import REPO, clean_env, read_summary

LAUNCH = REPO / "launch"
STEPS = ("--max-steps", "30", "--epochs", "1", "--log-every", "10")
# One intra-op thread everywhere, so runs with different ranks per host give identical weights.
THREADS = {"OMP_NUM_THREADS": "1"}


def launch_env(**extra: str) -> dict[str, str]:
    """The test's environment for a launch script: this interpreter as PYTHON, one thread per rank."""
    return clean_env(PYTHON=sys.executable, **THREADS, **extra)


def read_sha(run_dir: Path) -> str:
    return read_summary(run_dir)["params_sha256"]


class Background:
    """A command in its own session with output in a file; killed with its session on close."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.cmd, self.log = list(cmd), log
        self._out = log.open("w")
        self.proc = subprocess.Popen(
            self.cmd, env=env, cwd=REPO, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            pytest.fail(f"{self.cmd} did not finish in {timeout}s\n{self.output()[-4000:]}")

    def output(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        """Kill the command and everything under it at once, as if its host had died.

        torchrun puts its workers in sessions of their own, so the tree is gathered first:
        once the agent is gone its workers no longer hang below it.
        """
        if self.proc.poll() is None:
            try:
                tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                tree = []
            for proc in tree:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(tree, timeout=10)
            self.proc.wait()
        if not self._out.closed:
            self._out.close()


def trainer_has(flag: str) -> bool:
    """Whether this trainer offers ``flag`` (features that arrive with other parts of the package)."""
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "--help"], env=launch_env(), cwd=REPO, capture_output=True, text=True
    )
    return flag in result.stdout


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def ranks_of(root: int) -> dict[int, psutil.Process]:
    """Trainer processes under ``root`` by their RANK variable."""
    found = {}
    for proc in psutil.Process(root).children(recursive=True):
        try:
            cmdline, env = proc.cmdline(), proc.environ()
        except psutil.Error:
            continue
        if "trainer" in cmdline and "RANK" in env:
            found[int(env["RANK"])] = proc
    return found
