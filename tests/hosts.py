"""Test hosts on one machine: each is a network, UTS and mount namespace of its own.

To the trainer (and to torchrun, gloo, Slurm) a host is what ``hostname``, the network and
``/dev/shm`` say, so each test host gets:

- a network namespace with one interface ``eth0`` and an address ``10.77.0.N/24``, plugged
  into a bridge that lives in a "switch" namespace of its own (any number of hosts, and no
  interface or route is added to the machine's own namespace);
- a host name ``node0``, ``node1``, ... (UTS namespace), so the trainer's shared-memory path
  (``trainer.sync.shm.host_key``) sees distinct hosts and gradients cross the link through gloo;
- a private mount namespace with its own empty ``/dev/shm`` (tmpfs) and an ``/etc/hosts`` that
  names every test host, so host names resolve as on a cluster (torchrun finds by itself which
  node hosts the rendezvous).

The PID namespace, the file systems other than ``/dev/shm`` and ``/etc/hosts`` (so run
directories are "shared storage") and the boot are the machine's.

Reuse: ``make_hosts(n, workdir)`` makes them and removes them afterwards; ``Host.prefix()`` is
the command prefix that runs a command "on" a host (for daemons started some other way), and
``Host.run`` starts one as a ``Launched``; ``Host.runs(pid)`` says whether a process runs on it.
Needs root and iproute2; ``HostsUnavailable`` says why not where the machine refuses. Outside
pytest (benchmarks.hierarchical) import it as ``tests.hosts``; ``Host.run`` is for the tests only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:  # conftest needs pytest and a sys.path that only a test session has
    from conftest import Launched

ETCD_PORT = 2379
SUBNET = "10.77.0"  # namespaces have addresses of their own: no clash with the machine's or other tests'
IFNAME = "eth0"  # every host's link, named as on a real machine (each namespace has its own names)

# Run on the host: set the host name, mount a private /dev/shm and /etc/hosts, then exec the command.
_ENTER = (
    'hostname "$0" && mount -t tmpfs -o mode=1777 tmpfs /dev/shm && mount --bind "$1" /etc/hosts && shift && exec "$@"'
)


class HostsUnavailable(RuntimeError):
    """The machine refused to make namespaces (not root, no iproute2 or util-linux, a sandbox)."""


@dataclass(frozen=True)
class Host:
    name: str  # its host name, resolvable on every test host
    netns: str  # the network namespace under /var/run/netns
    addr: str
    hosts_file: Path  # the /etc/hosts the host sees

    def prefix(self) -> list[str]:
        """The command prefix that runs a command on this host: ``[*host.prefix(), "slurmd", "-D"]``.

        nsenter, not ``ip netns exec``, which would remount /sys; the UTS and mount namespaces
        are new for every command, and alike for all of one host's commands.
        """
        return [
            "nsenter",
            f"--net=/var/run/netns/{self.netns}",
            "--",
            "unshare",
            "--uts",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            _ENTER,
            self.name,
            str(self.hosts_file),
        ]

    def runs(self, pid: int) -> bool:
        """Whether process ``pid`` runs on this host: all of its processes, and only they, share its
        network namespace (each command has UTS and mount namespaces of its own)."""
        try:
            return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/var/run/netns/{self.netns}").st_ino
        except OSError:  # the process has ended, or the host is gone
            return False

    def env(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` for a process on this host: gloo must use the link, not the loopback."""
        return dict(env, GLOO_SOCKET_IFNAME=IFNAME)

    def run(self, cmd: Sequence[str], env: dict[str, str], log: Path) -> Launched:
        """Start ``cmd`` on this host, its output in ``log``."""
        from conftest import Launched

        return Launched([*self.prefix(), *cmd], self.env(env), log)


def host_processes(host: Host) -> list[psutil.Process]:
    """Every live process on ``host`` (all of them share its network namespace)."""
    found = []
    for proc in psutil.process_iter(["status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and host.runs(proc.pid):
            found.append(proc)
    return found


def kill_host(host: Host) -> list[str]:
    """The host dies: SIGKILL to every process on it at once (its torchrun agent and the workers,
    which torchrun starts in sessions of their own); the command lines killed."""
    doomed, killed = [], []
    for proc in host_processes(host):  # every command line first: some die with their parent
        with contextlib.suppress(psutil.Error):
            killed.append(" ".join(proc.cmdline()))
            doomed.append(proc)
    for proc in doomed:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(doomed, timeout=10)
    return killed


def rank_zero_host(hosts: Sequence[Host]) -> Host | None:
    """The host whose trainer runs as rank 0 now, if any."""
    for host in hosts:
        for proc in host_processes(host):
            with contextlib.suppress(psutil.Error):
                cmdline = proc.cmdline()
                if (
                    proc.environ().get("RANK") == "0"
                    and "trainer.distributed.agent" not in cmdline
                    and "trainer" in cmdline
                ):
                    return host
    return None


def etcd_command(host: Host, data_dir: Path) -> list[str]:
    """etcd serving clients at ``host``'s address with the v2 API that torchrun's ``etcd-v2``
    rendezvous needs (Debian's ``etcd-server``, 3.4); run it with ``host.prefix()``."""
    url = f"http://{host.addr}:{ETCD_PORT}"
    return [
        "etcd",
        "--enable-v2",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={url}",
        f"--advertise-client-urls={url}",
        "--listen-peer-urls=http://127.0.0.1:2380",  # a cluster of one: no peer leaves the host
    ]


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise HostsUnavailable(f"ip {' '.join(args)}: {result.stderr.strip()}")


@contextmanager
def make_hosts(count: int, workdir: Path) -> Iterator[list[Host]]:
    """``count`` hosts on one link, removed afterwards whatever happened.

    Names are unique to this process, so several test sessions can make hosts at once.
    """
    missing = [tool for tool in ("ip", "nsenter", "unshare") if shutil.which(tool) is None]
    if missing:
        raise HostsUnavailable(f"{', '.join(missing)} missing (Debian: apt-get install -y iproute2 util-linux)")
    tag = f"trn{os.getpid() % 100000}"
    switch = f"{tag}sw"
    hosts_file = workdir / "hosts"
    hosts = [Host(f"node{i}", f"{tag}n{i}", f"{SUBNET}.{i + 1}", hosts_file) for i in range(count)]
    hosts_file.write_text("127.0.0.1 localhost\n" + "".join(f"{h.addr} {h.name}\n" for h in hosts))
    made: list[str] = []
    try:
        _ip("netns", "add", switch)
        made.append(switch)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        for i, host in enumerate(hosts):
            _ip("netns", "add", host.netns)
            made.append(host.netns)
            port = f"port{i}"
            # Both ends are made in the switch; one moves to the host and is renamed there.
            _ip("-n", switch, "link", "add", port, "type", "veth", "peer", "name", f"host{i}")
            _ip("-n", switch, "link", "set", f"host{i}", "netns", host.netns)
            _ip("-n", host.netns, "link", "set", f"host{i}", "name", IFNAME)
            _ip("-n", switch, "link", "set", port, "master", "br0", "up")
            _ip("-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", IFNAME)
            _ip("-n", host.netns, "link", "set", IFNAME, "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
        probe = subprocess.run([*hosts[0].prefix(), "true"], capture_output=True, text=True, timeout=30)
        if probe.returncode != 0:  # e.g. a container that may not make UTS or mount namespaces
            raise HostsUnavailable(f"cannot enter a test host: {probe.stderr.strip()}")
        yield hosts
    finally:
        for netns in reversed(made):  # deleting a namespace deletes the veth ends inside it
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)
