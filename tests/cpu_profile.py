"""Where the suite's CPU goes: each test's CPU time, its own and that of every process it started.

    make test PYTEST_ARGS="-p tests.cpu_profile"
    python -m pytest -p tests.cpu_profile --cpu-profile-out cpu.jsonl tests/test_train.py

(each test's line in ``.pytest_cache/cpu-profile.jsonl`` unless ``--cpu-profile-out`` says where)

The suite is bound by its two cores, not by waiting, so a test's cost is its CPU seconds rather
than its duration (which counts the time other files' processes had the cores). A test's figure
is the growth of this process's own CPU time and of its reaped children's (``getrusage``: every
process it started and waited for, with theirs) from its set-up to its end, so a module fixture's
runs count in the first test that uses them. A process a test leaves to another (a daemon such as
Slurm's) is not counted.

Beside it, the Python processes each test started (its launchers, its ranks, their helpers),
counted by ``tests/cpu_profile_site/sitecustomize.py`` as each starts (one whose test gave it an
environment without this ``PYTHONPATH`` is not counted; one a daemon started for the test is, where
the environment reached it, as Slurm's jobs do): on two cores most of a
process's CPU is its import of torch (``benchmarks.startup``), so fewer starts is the first way
to a shorter suite. Each test process writes its lines to ``--cpu-profile-out``; the process that
runs the session prints the files, and the tests, that took the most.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

TOP = 20  # tests listed at the end
SITE = Path(__file__).with_name("cpu_profile_site")
STARTS_VAR, TEST_VAR = "TRAINER_CPU_PROFILE_STARTS", "TRAINER_CPU_PROFILE_TEST"
_started: dict[str, tuple[float, float]] = {}
DEFAULT_OUT = Path(".pytest_cache/cpu-profile.jsonl")
_out_path = DEFAULT_OUT


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--cpu-profile-out", default=str(DEFAULT_OUT), help="each test's CPU seconds, a JSON line each")


def pytest_configure(config: pytest.Config) -> None:
    global _out_path
    _out_path = Path(config.getoption("--cpu-profile-out")).resolve()
    if not hasattr(config, "workerinput"):  # the session's own process starts the files afresh
        _out_path.parent.mkdir(parents=True, exist_ok=True)
        _out_path.unlink(missing_ok=True)
        starts_path().unlink(missing_ok=True)
    # Every process a test starts inherits these (tests/conftest.py's clean_env keeps PYTHONPATH's entries).
    os.environ[STARTS_VAR] = str(starts_path())
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(SITE), os.environ.get("PYTHONPATH"))))


def starts_path() -> Path:
    return _out_path.with_name(_out_path.stem + "-starts.txt")


def cpu_seconds() -> float:
    """This process's CPU time and that of its reaped children, user and system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def pytest_runtest_setup(item: pytest.Item) -> None:
    os.environ[TEST_VAR] = item.nodeid
    _started[item.nodeid] = (time.monotonic(), cpu_seconds())


def pytest_runtest_logfinish(nodeid: str) -> None:
    if nodeid not in _started:
        return
    os.environ.pop(TEST_VAR, None)
    began, cpu = _started.pop(nodeid)
    line = {"test": nodeid, "cpu_s": cpu_seconds() - cpu, "wall_s": time.monotonic() - began, "pid": os.getpid()}
    with _out_path.open("a") as out:  # appends of one short line: whole lines from each test process
        out.write(json.dumps(line) + "\n")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    path = _out_path
    if hasattr(config, "workerinput") or not path.exists():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    starts = Counter(starts_path().read_text().splitlines()) if starts_path().exists() else Counter()
    by_file: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0])
    for row in rows:
        totals = by_file[row["test"].split("::")[0]]
        totals[0] += row["cpu_s"]
        totals[1] += 1
        totals[2] += starts[row["test"]]
    write = terminalreporter.write_line
    total_cpu, total_starts = sum(r["cpu_s"] for r in rows), sum(starts.values())
    terminalreporter.section(f"CPU seconds {total_cpu:.0f}, Python starts {total_starts}, {len(rows)} tests ({path})")
    for name, (cpu, count, started) in sorted(by_file.items(), key=lambda item: -item[1][0]):
        write(f"{cpu:8.1f} s  {started:4d} starts  {count:4d} tests  {name}")
    write(f"the {TOP} tests that took the most:")
    for row in sorted(rows, key=lambda r: -r["cpu_s"])[:TOP]:
        write(f"{row['cpu_s']:8.1f} s  {starts[row['test']]:4d} starts  ({row['wall_s']:.0f} s wall)  {row['test']}")
