"""tests/cpu_profile.py, the suite's own profiler: a test's CPU seconds include its processes', and
its Python starts are counted, theirs included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO, clean_env

PROFILED = """
import subprocess, sys, time

def test_starts_three_processes():
    # Two Python processes, one of which starts a third; each spends a little CPU.
    code = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'sum(range(3_000_000))'], check=True)"
    subprocess.run([sys.executable, "-c", code], check=True)
    subprocess.run([sys.executable, "-c", "sum(range(3_000_000))"], check=True)

def test_starts_none():
    time.sleep(0.2)
"""


def test_the_profile_counts_each_tests_processes_and_their_cpu(tmp_path: Path) -> None:
    (tmp_path / "test_profiled.py").write_text(PROFILED)
    out = tmp_path / "profile.jsonl"
    cmd = [sys.executable, "-m", "pytest", "-p", "tests.cpu_profile", "--cpu-profile-out", str(out)]
    cmd += ["-p", "no:cacheprovider", "-q", str(tmp_path / "test_profiled.py")]
    result = subprocess.run(cmd, env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = {line.split("::")[-1]: line for line in result.stdout.splitlines() if "::test_starts" in line}
    assert "   3 starts" in lines["test_starts_three_processes"], result.stdout
    assert "   0 starts" in lines["test_starts_none"], result.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines() if line]
    cpu = {row["test"].split("::")[-1]: row["cpu_s"] for row in rows}
    assert cpu["test_starts_three_processes"] > 0.1 > cpu["test_starts_none"], cpu
