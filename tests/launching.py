"""Helpers for the launch tests: start the real scripts in the background, wait with a deadline."""

from __future__ import annotations

import sys
from pathlib import Path

import psutil
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
