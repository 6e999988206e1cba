"""A real etcd server on a test host (tests/hosts.py), with the v2 API that torchrun's
``etcd-v2`` rendezvous needs: Debian's ``etcd-server`` (3.4) started with ``--enable-v2``."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import wait_until
from hosts import ETCD_PORT, Host, etcd_command
from launching import launch_env


@contextmanager
def etcd_on(host: Host, workdir: Path) -> Iterator[str]:
    """etcd serving clients at ``host``'s address; yields that ``host:port``; stopped afterwards.

    Skips the test, with the reason, where etcd or the python-etcd client is missing.
    """
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (Debian: apt-get install -y etcd-server)")
    pytest.importorskip("etcd", reason="python-etcd is not installed (pip install -e '.[etcd]')")
    server = host.run(etcd_command(host, workdir / "etcd"), launch_env(), workdir / "etcd.log")
    try:
        wait_until(lambda: "ready to serve client requests" in server.output(), 60, "etcd to serve", server)
        yield f"{host.addr}:{ETCD_PORT}"
    finally:
        server.kill()
