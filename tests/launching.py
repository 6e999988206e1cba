"""Helpers for the launch tests: start the real scripts in the background, wait with a deadline."""

from __future__ import annotations

import sys
from pathlib import Path

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
