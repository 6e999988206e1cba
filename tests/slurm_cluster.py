"""A real Slurm cluster of two nodes on this machine, for the tests of launch/slurm.sbatch.

``munged``, ``slurmctld`` and one ``slurmd`` per node, each node a test host of its own
(tests/hosts.py: network namespace, address, host name ``node0``/``node1`` and ``/dev/shm``). The
daemons run as root from a ``slurm.conf`` written here, with Slurm's timers shortened so that
requeues and node failures play out in seconds. They daemonise (they are not children of the test
process); ``stop`` ends them by their pid files and removes the hosts, whatever state the tests left.

A node's ``slurmd`` is started on its host, so the job steps it starts share its host name, its
``/dev/shm`` and the hosts' ``/etc/hosts``. Slurm reaches the nodes by address (``NodeAddr``), as
launch/slurm.sbatch does.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from conftest import wait_until
from hosts import Host, HostsUnavailable, make_hosts

CPUS = 2  # per node, as the machine has
# Marks every process of the cluster's jobs: set for sbatch only, which passes it on to the job.
TAG_VAR = "TRAINER_SLURM_TEST"
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

SLURM_CONF = """\
ClusterName={tag}
SlurmctldHost={first.name}({first.addr})
AuthInfo=socket={dir}/munge/socket,cred_expire={cred_expire}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool-%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={dir}/jobcomp.txt
# A node that comes back is usable again at once.
ReturnToService=2
# Pending jobs are looked at every 2 s, not every 60.
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
# A dead slurmd is noticed within seconds; processes get this long from SIGTERM to SIGKILL.
SlurmdTimeout=10
KillWait={kill_wait}
MessageTimeout=5
# Finished jobs stay visible to scontrol (no accounting database here).
MinJobAge=600
{nodes}
PartitionName=main Nodes=ALL Default=YES State=UP MaxTime=INFINITE
"""
NODE = "NodeName={host.name} NodeAddr={host.addr} CPUs={cpus} RealMemory=1000"
# A requeued job may start again cred_expire + 1 s after it ended (default 120 s).
CRED_EXPIRE = 5
KILL_WAIT = 30


class SlurmCluster:
    """Two nodes, the controller on the first; Slurm's commands run inside the first node."""

    def __init__(self, hosts: list[Host], workdir: Path, tag: str) -> None:
        self.hosts, self.dir, self.tag = hosts, workdir, tag
        self.conf = workdir / "slurm.conf"

    # --- commands -------------------------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of Slurm's daemons and commands: this cluster's slurm.conf."""
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        env.update(extra)
        return env

    def command(
        self, *args: str, env: dict[str, str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """A Slurm command, run on the first node (where slurmctld listens)."""
        result = subprocess.run(
            [*self.hosts[0].prefix(), *args],
            env=env or self.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def sbatch(self, args: list[str], env: dict[str, str]) -> int:
        """Submit; the job id. ``env`` is the job's environment (sbatch passes it on)."""
        out = self.command("sbatch", "--parsable", *args, env=self.env(**env, **{TAG_VAR: self.tag})).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job``'s fields, e.g. ``JobState``, ``Restarts``, ``ExitCode``."""
        text = self.command("scontrol", "show", "job", "--oneliner", str(job_id)).stdout
        return dict(re.findall(r"(\w[\w/:]*)=(\S*)", text))

    def wait_job(
        self, job_id: int, done: Callable[[dict[str, str]], bool], timeout: float, what: str
    ) -> dict[str, str]:
        """The job's fields once ``done(fields)`` holds (polled twice a second: each poll asks slurmctld)."""
        found: dict[str, str] = {}

        def reached() -> bool:
            found.update(self.job(job_id))
            return done(found)

        wait_until(reached, timeout, f"job {job_id} {what} (last seen: {found.get('JobState')})", every=0.5)
        return found

    def wait_ended(self, job_id: int, timeout: float) -> dict[str, str]:
        """The job's fields once it has ended, whichever way."""
        return self.wait_job(job_id, lambda job: job["JobState"] in ENDED, timeout, "to end")

    def squeue(self, job_id: int) -> str:
        """``squeue``'s state of the job, finished ones included (kept for MinJobAge)."""
        return self.command("squeue", "--noheader", "--states=all", "--jobs", str(job_id), "--format=%T").stdout.strip()

    def job_processes(self) -> list[psutil.Process]:
        """Live processes started by this cluster's jobs, on any node."""
        found = []
        for proc in psutil.process_iter(["status"]):
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            with contextlib.suppress(psutil.Error):
                if proc.environ().get(TAG_VAR) == self.tag:
                    found.append(proc)
        return found

    def node_of(self, proc: psutil.Process) -> Host | None:
        """The node ``proc`` runs on, or None."""
        return next((host for host in self.hosts if host.runs(proc.pid)), None)

    def node_processes(self, host: Host) -> list[psutil.Process]:
        """Every live process on node ``host``: its slurmd, slurmstepd and the jobs' processes."""
        found = []
        for proc in psutil.process_iter(["status"]):
            if proc.info["status"] != psutil.STATUS_ZOMBIE and host.runs(proc.pid):
                found.append(proc)
        return found

    def shm(self, host: Host) -> Path:
        """``/dev/shm`` as the jobs on node ``host`` see it: its slurmd's (every command on a host
        has a /dev/shm of its own, and job steps inherit slurmd's)."""
        (pid,) = self.pids(f"slurmd-{host.name}.pid")
        return Path(f"/proc/{pid}/root/dev/shm")

    # --- daemons --------------------------------------------------------------------------------

    def start(self) -> None:
        munge = self.dir / "munge"
        munge.mkdir(mode=0o700)
        key = munge / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        nodes = "\n".join(NODE.format(host=host, cpus=CPUS) for host in self.hosts)
        self.conf.write_text(
            SLURM_CONF.format(
                tag=self.tag,
                first=self.hosts[0],
                dir=self.dir,
                nodes=nodes,
                cred_expire=CRED_EXPIRE,
                kill_wait=KILL_WAIT,
            )
        )
        (self.dir / "state").mkdir()
        self._daemon(
            [
                "munged",
                "--force",
                f"--key-file={key}",
                f"--socket={munge}/socket",
                f"--pid-file={munge}/munged.pid",
                f"--log-file={munge}/munged.log",
                f"--seed-file={munge}/munged.seed",
            ]
        )
        self._daemon(["slurmctld"], self.hosts[0])
        for host in self.hosts:
            self.start_slurmd(host)
        self.wait_idle()

    def start_slurmd(self, host: Host) -> None:
        self._daemon(["slurmd", "-N", host.name], host)

    def kill_node(self, host: Host) -> list[str]:
        """The node dies: SIGKILL to its slurmd, slurmstepd and job processes at once (not the
        controller, which lives on the first node); returns the command lines killed."""
        spared = set(self.pids("slurmctld.pid"))
        doomed, killed = [], []
        for proc in self.node_processes(host):
            with contextlib.suppress(psutil.Error):
                if proc.pid not in spared and proc.ppid() not in spared:
                    doomed.append(proc)
                    killed.append(" ".join(proc.cmdline()))
        for proc in doomed:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        return killed

    def wait_idle(self, timeout: float = 60) -> None:
        """Until both nodes are up and free."""
        wait_until(self._nodes_idle, timeout, "both slurmd to register with slurmctld, idle", every=0.5)

    def _daemon(self, cmd: list[str], host: Host | None = None) -> None:
        """Start a daemon that forks into the background (on ``host``, if given); its start-up errors are raised."""
        prefix = host.prefix() if host else []
        result = subprocess.run([*prefix, *cmd], env=self.env(), capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{cmd[0]}: {result.stderr.strip()}")

    def node_state(self, host: Host) -> str:
        """``sinfo``'s short state of a node: idle, alloc, down*, ..."""
        result = self.command("sinfo", "--noheader", "--Node", f"--nodes={host.name}", "--format=%t", check=False)
        return result.stdout.strip()  # empty while slurmctld is not answering yet

    def _nodes_idle(self) -> bool:
        return all(self.node_state(host) == "idle" for host in self.hosts)

    def pids(self, pattern: str) -> list[int]:
        """Pids recorded in the daemons' pid files matching ``pattern`` (in the cluster's directory)."""
        pids = []
        for path in self.dir.glob(pattern):
            with contextlib.suppress(ValueError, OSError):
                pids.append(int(path.read_text().split()[0]))
        return pids

    def stop(self) -> None:
        """Cancel every job, end every daemon and job process; safe to call in any state."""
        if self.conf.exists() and self.pids("slurmctld.pid"):
            self.command("scancel", "--user=root", check=False)
            with contextlib.suppress(Exception):
                deadline = time.monotonic() + KILL_WAIT + 15
                while self.job_processes() and time.monotonic() < deadline:
                    time.sleep(0.2)
        daemons = []
        for pattern in ("slurmd-*.pid", "slurmctld.pid", "munge/munged.pid"):
            for pid in self.pids(pattern):
                with contextlib.suppress(psutil.Error):
                    daemons.append(psutil.Process(pid))
        for proc in daemons:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        deadline = time.monotonic() + 15
        while not all(map(gone, daemons)) and time.monotonic() < deadline:
            time.sleep(0.1)
        for proc in [*daemons, *self.job_processes(), *self.strays()]:
            with contextlib.suppress(psutil.Error):
                proc.kill()

    def strays(self) -> list[psutil.Process]:
        """Daemons of this cluster left without pid file (e.g. slurmstepd of a killed node)."""
        found = []
        for proc in psutil.process_iter(["status"]):
            with contextlib.suppress(psutil.Error):
                daemon = proc.info["status"] != psutil.STATUS_ZOMBIE and proc.name() in ("slurmstepd", "slurmd")
                if daemon and proc.environ().get("SLURM_CONF") == str(self.conf):
                    found.append(proc)
        return found


def seconds(duration: str) -> int:
    """Slurm's ``[D-]HH:MM:SS`` (or ``MM:SS``) in seconds."""
    days, _, clock = duration.rpartition("-")
    total = 0
    for part in clock.split(":"):
        total = total * 60 + int(part)
    return total + 86400 * int(days or 0)


def gone(proc: psutil.Process) -> bool:
    """Whether ``proc`` has ended (a daemon's zombie may linger: init here does not reap them)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def cluster_unavailable() -> str | None:
    """Why this machine cannot run the cluster, or None."""
    if os.geteuid() != 0:
        return "the Slurm tests need root (namespaces, and Slurm's daemons run as root here)"
    missing = [name for name in ("munged", "slurmctld", "slurmd", "sbatch", "srun") if shutil.which(name) is None]
    if missing:
        names = ", ".join(missing)
        return f"Slurm or munge is not installed ({names} missing; Debian: apt-get install -y slurm-wlm munge)"
    return None


@contextlib.contextmanager
def slurm_cluster(workdir: Path) -> Iterator[SlurmCluster]:
    """A running two-node cluster in ``workdir``, stopped and removed afterwards whatever happened.

    Skips the tests, with the reason, where this machine cannot run it (no root, no Slurm or
    munge, no namespaces, or a daemon that refuses to start here).
    """
    reason = cluster_unavailable()
    if reason:
        pytest.skip(reason)
    tag = f"trs{os.getpid() % 100000}"
    with contextlib.ExitStack() as stack:
        try:
            hosts = stack.enter_context(make_hosts(2, workdir))
        except HostsUnavailable as exc:
            pytest.skip(f"cannot make test hosts (root, iproute2 and util-linux needed): {exc}")
        cluster = SlurmCluster(hosts, workdir, tag)
        stack.callback(cluster.stop)
        try:
            cluster.start()
        except RuntimeError as exc:
            pytest.skip(f"Slurm's daemons would not start here: {exc}")
        yield cluster
