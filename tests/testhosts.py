"""Test hosts on this machine: network namespaces joined by a veth pair, optionally with host names.

Each host has its own network stack (``ip netns``) and address; with ``named=True`` also its own
UTS namespace, so ``hostname`` differs between hosts as between real machines. Both namespaces
are kept by files (``/var/run/netns/<netns>``, a bind mount for the UTS one) and entered with
``nsenter``, not ``ip netns exec``: the latter remounts ``/sys``, which hides the cgroup mounts
that ``slurmd`` needs. The interface has the same name on every host, as ``eth0`` would, so one
``GLOO_SOCKET_IFNAME`` serves all. Needs root and iproute2.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from conftest import Launched

IFNAME = "tnet0"  # the link's name inside every host


@dataclass(frozen=True)
class Host:
    name: str  # its host name where it has one of its own, else the name of its network namespace
    netns: str
    addr: str
    uts: Path | None = None  # the bind-mounted UTS namespace, where the host has its own name
    ifname: str = IFNAME

    def enter(self) -> list[str]:
        """The command prefix that runs a command inside this host."""
        prefix = ["nsenter", f"--net=/var/run/netns/{self.netns}"]
        return [*prefix, f"--uts={self.uts}"] if self.uts else prefix

    def run(self, cmd: Sequence[str], env: dict[str, str], log: Path) -> Launched:
        """Start ``cmd`` inside this host; gloo must use the link, not loopback."""
        return Launched([*self.enter(), *cmd], dict(env, GLOO_SOCKET_IFNAME=self.ifname), log)


class HostsUnavailable(RuntimeError):
    """The machine refused to make test hosts (no root, no iproute2, no namespaces)."""


def _run(*cmd: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise HostsUnavailable(f"{' '.join(cmd)}: {result.stderr.strip()}")


@contextlib.contextmanager
def make_hosts(tag: str, subnet: str, named: bool = False) -> Iterator[tuple[Host, Host]]:
    """Two hosts ``<tag>a`` and ``<tag>b`` at ``<subnet>.1`` and ``.2``, removed afterwards whatever happened.

    ``tag`` must be unique to the caller (e.g. hold the test session's pid); with ``named`` each
    host also gets the host name ``<tag>n1`` / ``<tag>n2``. Raises ``HostsUnavailable`` with the
    machine's reason if they cannot be made.
    """
    if shutil.which("ip") is None or shutil.which("nsenter") is None:
        raise HostsUnavailable("the ip or nsenter command is missing (Debian: apt-get install -y iproute2 util-linux)")
    uts_dir = Path(tempfile.mkdtemp(prefix=f"{tag}-uts-")) if named else None
    pair = tuple(
        Host(
            f"{tag}n{n}" if named else f"{tag}{side}",
            f"{tag}{side}",
            f"{subnet}.{n}",
            uts_dir / f"n{n}" if uts_dir else None,
        )
        for n, side in ((1, "a"), (2, "b"))
    )
    made: list[str] = []
    mounted: list[Path] = []
    try:
        for host in pair:
            _run("ip", "netns", "add", host.netns)
            made.append(host.netns)
        # Unique names while both ends are in this namespace; renamed once each is inside its host.
        _run("ip", "link", "add", f"{tag}va", "type", "veth", "peer", "name", f"{tag}vb")
        for host, end in zip(pair, ("va", "vb"), strict=True):
            _run("ip", "link", "set", f"{tag}{end}", "netns", host.netns)
            _run("ip", "-n", host.netns, "link", "set", f"{tag}{end}", "name", host.ifname)
            _run("ip", "-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", host.ifname)
            _run("ip", "-n", host.netns, "link", "set", host.ifname, "up")
            _run("ip", "-n", host.netns, "link", "set", "lo", "up")
            if host.uts is not None:
                host.uts.touch()
                _run("unshare", f"--uts={host.uts}", "hostname", host.name)
                mounted.append(host.uts)
        yield pair
    finally:
        for path in mounted:
            subprocess.run(["umount", str(path)], capture_output=True, timeout=30)
        if uts_dir is not None:
            shutil.rmtree(uts_dir, ignore_errors=True)
        for netns in made:  # deleting a namespace deletes its end of the veth, and so the pair
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)
