"""Shared helpers: run the real trainer as real processes, and leave none behind."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest

from trainer.distributed.jobs import fresh_job_env, torchrun_command

REPO = Path(__file__).resolve().parents[1]
# Small, fast runs: short logs, few steps.
QUICK = ("--epochs", "1", "--log-every", "20")
# Every process the suite starts carries this variable, so that one of ours is told apart from other
# users' trainers on a shared machine even after it has left this process tree (torchrun puts its
# workers in sessions of their own; an orphan is reparented).
SESSION_VAR = "TRAINER_TEST_SESSION"
SESSION = str(os.getpid())  # the same in both copies of this module (imported as conftest and as tests.conftest)
# The temporary files of every process the suite starts (torchrun's log directories, above all):
# one directory per test process, removed when it ends, instead of a hundred left in /tmp a run.
SESSION_TMP = Path(tempfile.gettempdir()) / f"trainer-tests-{SESSION}"
# The name the trainer gives its unnamed shared memory (memfd_create; trainer/sync/shm.py).
MEMFD_NAME = "/memfd:trainer-"


def clean_env(gpu: bool = False, **extra: str) -> dict[str, str]:
    """A fresh job's environment for a test, plus ``extra``: this checkout importable, output unbuffered.

    The suite tests the CPU path on any host, GPU or not: the processes it starts see no GPU
    unless a test asks for them (``gpu=True``; tests/test_cuda.py), and then see the host's own.
    Unbuffered, so that a job killed or timed out still leaves its last words in its log; its
    temporary files in ``SESSION_TMP``.

    The suite runs several test files at once on few cores, so each process gets one intra-op
    thread (``extra`` may say otherwise; tests of the trainer's own choice remove the variable;
    torchrun gives each of several ranks per host one anyway), and the threads of a process that
    asks for more (tests/comm_worker.py's two) sleep when idle instead of spinning against the
    other files' processes (OMP_WAIT_POLICY changes how an idle thread waits, not what it computes).
    """
    SESSION_TMP.mkdir(exist_ok=True)
    env = {SESSION_VAR: SESSION, "TMPDIR": str(SESSION_TMP), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    env |= extra
    return fresh_job_env(pythonpath=REPO, hide_gpus=not gpu, PYTHONUNBUFFERED="1", **env)


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


def run_trainer(
    args: Sequence[str], timeout: float = 180, gpu: bool = False, **env: str
) -> subprocess.CompletedProcess[str]:
    """``python -m trainer ARGS`` as one plain process (no launcher variables)."""
    return run_process([sys.executable, "-m", "trainer", *args], clean_env(gpu, **env), timeout)


def run_torchrun(
    nproc: int,
    args: Sequence[str],
    launcher_args: Sequence[str] = (),
    timeout: float = 180,
    gpu: bool = False,
    **env: str,
) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node=N [launcher_args] -m trainer ARGS``."""
    return run_process(torchrun_command(nproc, "trainer", args, launcher_args), clean_env(gpu, **env), timeout)


def ephemeral_low() -> int:
    """The lowest port the kernel hands out on its own (bind to port 0, a client's source port)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


PORTS_PER_WORKER = 200  # a worker takes a few dozen; 8 workers stay above Slurm's 29400-30399
_port_offsets = itertools.count()


def free_port() -> int:
    """A port nothing listens on, for a rendezvous that binds it a few seconds later.

    Chosen below the kernel's ephemeral range, so no socket that asks the kernel for a port (gloo's
    connections, torchrun's stores, any client) can take it in those seconds; each xdist worker has
    a slice of its own, so no two tests running at once share one either. (Each of this module's
    two copies counts on its own, so a worker may hand a port out again, to a later test: the
    bind, without SO_REUSEADDR, skips it while connections to it are still closing.)
    """
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    start = ephemeral_low() - PORTS_PER_WORKER * (worker + 1)
    while (offset := next(_port_offsets)) < PORTS_PER_WORKER:
        with socket.socket() as sock:
            try:
                sock.bind(("", start + offset))
            except OSError:
                continue  # another program listens there
            return start + offset
    raise AssertionError(f"xdist worker {worker} used up its {PORTS_PER_WORKER} ports; raise PORTS_PER_WORKER")


def read_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-6000:]}"
    )


class Launched:
    """A command in its own session, stdout and stderr in one log file (no pipe can fill up)."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str], log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        """Exit status; on timeout kill the whole tree and fail the test."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.proc.args} did not finish in {timeout}s\n{self.output()[-6000:]}")

    def kill(self) -> None:
        """SIGKILL the process and everything under it, as if its host had died (safe if it has exited).

        torchrun starts its workers in sessions of their own, so the tree is gathered first: once
        the agent is gone its workers no longer hang below it.
        """
        try:
            root = psutil.Process(self.proc.pid)
            tree = [root, *root.children(recursive=True)] if self.proc.poll() is None else []
        except psutil.NoSuchProcess:
            tree = []
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        if tree:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        psutil.wait_procs(tree, timeout=10)


def wait_all_ok(jobs: Sequence[Launched], timeout: float) -> None:
    """Each of ``jobs`` must exit 0 within ``timeout``; afterwards all are killed, pass or fail.

    The jobs of one test are peers: when one fails the others may wait on it for ever.
    """
    try:
        for job in jobs:
            assert job.wait(timeout) == 0, job.output()[-4000:]
    finally:
        for job in jobs:
            job.kill()


def wait_until(
    condition: Callable[[], object], timeout: float, what: str, proc: Launched | None = None, every: float = 0.05
) -> object:
    """Poll ``condition`` every ``every`` s until truthy (returned); fail on timeout or if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.proc.poll() is not None:
            pytest.fail(f"process exited ({proc.proc.returncode}) before {what}\n{proc.output()[-6000:]}")
        time.sleep(every)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def trainer_memory(pid: int) -> set[int]:
    """The inodes of the trainer's shared memory that process ``pid`` maps or holds open (empty if gone).

    The kernel frees a memfd's pages when the last mapping and the last descriptor are gone, so
    "no process holds it" is "the memory is back", however the job ended.
    """
    inodes: set[int] = set()
    with contextlib.suppress(OSError):  # the process ended, or is not ours to read
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith(MEMFD_NAME):
                inodes.add(int(fields[4]))
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(MEMFD_NAME):
                    inodes.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
    return inodes


def holders_of_trainer_memory(inodes: set[int] | None = None, session_only: bool = False) -> dict[int, set[int]]:
    """pid -> inodes, over every process on the machine that holds the trainer's shared memory.

    ``inodes`` narrows it to those; ``session_only`` to the processes this test session started.
    """
    found: dict[int, set[int]] = {}
    for pid in psutil.pids():
        if pid == os.getpid():
            continue
        if session_only:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if f"{SESSION_VAR}={SESSION}".encode() not in environ.split(b"\0"):
                continue
        held = trainer_memory(pid)
        if inodes is not None:
            held &= inodes
        if held:
            found[pid] = held
    return found


# A skip whose reason names one of these is a missing system component (.ci/system-packages installs
# them as root on Debian). On a developer's machine it stays a skip with its reason; under CI=true it
# is a failure, so that CI cannot be green with the Slurm, browser, shellcheck or multi-host tests
# not run. A missing GPU is not among them: CI has none, and tests/test_cuda.py says so.
MISSING_COMPONENT = re.compile(
    r"shellcheck|chromium|slurm|munge|test hosts|namespace|iproute2|util-linux|etcd|strace|\broot\b", re.IGNORECASE
)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under CI=true, a skip for a missing system component becomes a failure naming the component."""
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and in_ci() and isinstance(report.longrepr, tuple)):
        return
    reason = str(report.longrepr[2])
    if MISSING_COMPONENT.search(reason):
        report.outcome = "failed"
        report.longrepr = f"CI=true: this test may not skip for a missing system component: {reason}"


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(SESSION_TMP, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Every test must leave no trainer or torchrun process behind."""
    yield
    leftovers = psutil.Process().children(recursive=True)
    for child in leftovers:
        child.kill()
    psutil.wait_procs(leftovers, timeout=5)
    assert not leftovers, f"processes left running: {[p.pid for p in leftovers]}"
    # Nor one, anywhere (an orphan too), that still holds the trainer's shared memory: when the last
    # rank has exited, by any end, kill -9 included, the memory must be free.
    holders = holders_of_trainer_memory(session_only=True)
    for pid in holders:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    assert not holders, f"processes of this test still hold the trainer's shared memory: {holders}"


# The order in which `make test` (pytest-xdist, one file per test process, three processes) takes
# the files: the longest first, so that the short ones fill the end; and the files that mostly
# wait (on Slurm, on test hosts, on timeouts: slurm, multinode, drills, elastic) each started
# beside files that compute, so that two cores stay busy. Started together at the head of the
# queue, the waiting files kept only 1.2 of the 2 cores busy for the first two minutes.
FIRST = (
    "test_benchmarks.py",
    "test_slurm.py",
    "test_shm_trainer.py",
    "test_comm.py",
    "test_multinode.py",
    "test_tasks.py",
    "test_resume.py",
    "test_drills.py",
    "test_shakespeare.py",
    "test_lifecycle.py",
    "test_elastic.py",
    "test_launch.py",
    "test_train.py",
    "test_watching.py",
    "test_inputs.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: the rest keep their order
