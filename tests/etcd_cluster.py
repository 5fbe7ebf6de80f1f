"""A real etcd cluster on loopback for the mesh tests (issue 18).

:class:`EtcdCluster` starts 1 or 3 ``/usr/bin/etcd`` members (Debian etcd-server 3.4) on
free 127.0.0.1 ports, each with its own data directory under ``tmp_path`` and its log in
``member-<i>.log``, and waits (bounded) until the cluster answers ``/health``.
``.endpoints`` is the relay's ``--registry`` value (``etcd://127.0.0.1:p1,...``).
``.kill(i)`` SIGKILLs a member, ``.stop_all()`` stops them all (SIGTERM, then SIGKILL),
``.start(i)`` restarts one on its data directory and ports, ``.start_all()`` restarts the
stopped ones and waits healthy, ``.close()`` kills everything and removes the data dirs
(also registered with atexit, so a crashed test leaves no etcd behind).

Fixtures (re-exported by tests/conftest.py): ``etcd_cluster`` (module scope, 3 members;
tests must not kill its members) and ``etcd3`` (function scope, 3 members, for destructive
tests). Both skip with a clear reason only if /usr/bin/etcd is missing.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

__all__ = ["ETCD", "ETCDCTL", "EtcdCluster", "etcd3", "etcd_cluster", "free_ports"]

ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"
HEALTHY_TIMEOUT_S = 30.0
"""Bound on waiting for a (re)started cluster to answer /health (elections take ~1 s)."""
STOP_GRACE_S = 5.0


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (bound together, then released)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class EtcdCluster:
    """1 or 3 real etcd members on loopback (see the module docstring)."""

    def __init__(self, tmp_path: Path, members: int = 3, *, wait: bool = True) -> None:
        if members < 1:
            raise ValueError("members must be >= 1")
        self.root = Path(tmp_path) / f"etcd-{os.getpid()}-{time.monotonic_ns()}"
        self.root.mkdir(parents=True)
        ports = free_ports(2 * members)
        self.client_ports = ports[:members]
        self.peer_ports = ports[members:]
        self.names = [f"m{i}" for i in range(members)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * members
        self._logs: list[IO[bytes] | None] = [None] * members
        self._initial_cluster = ",".join(
            f"{name}=http://127.0.0.1:{port}"
            for name, port in zip(self.names, self.peer_ports, strict=True)
        )
        self._closed = False
        atexit.register(self.close)
        try:
            for i in range(members):
                self.start(i)
            if wait:
                self.wait_healthy()
        except BaseException:
            self.close()
            raise

    # Addresses ---------------------------------------------------------------------------

    @property
    def hostports(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.client_ports]

    @property
    def endpoints(self) -> str:
        """The relay's ``--registry`` value: ``etcd://127.0.0.1:p1,127.0.0.1:p2,...``."""
        return "etcd://" + ",".join(self.hostports)

    def log_path(self, i: int) -> Path:
        return self.root / f"member-{i}.log"

    # Lifecycle ---------------------------------------------------------------------------

    def start(self, i: int) -> None:
        """Start member ``i`` (again) on its data directory and ports; does not wait."""
        if self.running(i):
            return
        name = self.names[i]
        client = f"http://127.0.0.1:{self.client_ports[i]}"
        peer = f"http://127.0.0.1:{self.peer_ports[i]}"
        argv = [
            ETCD,
            f"--name={name}",
            f"--data-dir={self.root / name}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={self._initial_cluster}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token=outrelay-test-{self.root.name}",
            "--heartbeat-interval=100",
            "--election-timeout=1000",
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        old = self._logs[i]
        if old is not None:
            old.close()
        log = open(self.log_path(i), "ab")  # noqa: SIM115 - closed in close()/next start
        self._logs[i] = log
        self.procs[i] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def running(self, i: int) -> bool:
        proc = self.procs[i]
        return proc is not None and proc.poll() is None

    def kill(self, i: int) -> None:
        """SIGKILL member ``i`` and reap it."""
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=STOP_GRACE_S)

    def stop(self, i: int) -> None:
        """SIGTERM member ``i`` (SIGKILL after a grace) and reap it."""
        proc = self.procs[i]
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_GRACE_S)

    def stop_all(self) -> None:
        for i in range(len(self.procs)):
            self.stop(i)

    def start_all(self, *, wait: bool = True) -> None:
        """Restart every stopped member, then (by default) wait until the cluster is healthy."""
        for i in range(len(self.procs)):
            self.start(i)
        if wait:
            self.wait_healthy()

    def healthy(self, i: int) -> bool:
        """Member ``i`` answers ``/health`` with ``"health": "true"`` (it has a leader)."""
        url = f"http://127.0.0.1:{self.client_ports[i]}/health"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                body = json.loads(resp.read())
        except (OSError, urllib.error.URLError, ValueError):
            return False
        return str(body.get("health")) == "true"

    def wait_healthy(self, timeout: float = HEALTHY_TIMEOUT_S) -> None:
        """Wait until every running member is healthy; raise with the logs' tails if not."""
        deadline = time.monotonic() + timeout
        while True:
            running = [i for i in range(len(self.procs)) if self.running(i)]
            if running and all(self.healthy(i) for i in running):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"etcd cluster not healthy within {timeout} s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def log_tail(self, lines: int = 15) -> str:
        out = []
        for i in range(len(self.procs)):
            path = self.log_path(i)
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- etcd member {i} ---\n" + "\n".join(tail))
        return "\n".join(out)

    def etcdctl(self, *args: str, timeout: float = 10.0) -> str:
        """Run etcdctl (API v3) against the running members; return stdout, raise on failure.

        Only running members are named (etcdctl 3.4 may pin a dead endpoint until its
        command timeout); with none running, every member is named (and it fails).
        """
        env = dict(os.environ, ETCDCTL_API="3")
        live = [hp for i, hp in enumerate(self.hostports) if self.running(i)] or self.hostports
        result = subprocess.run(
            [ETCDCTL, f"--endpoints={','.join(live)}", "--command-timeout=5s", *args],
            env=env,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"etcdctl {args} failed: {result.stderr.decode(errors='replace')}")
        return result.stdout.decode()

    def close(self) -> None:
        """Kill every member and remove the data directories. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for i in range(len(self.procs)):
            with contextlib.suppress(Exception):
                self.kill(i)
        for log in self._logs:
            if log is not None:
                log.close()
        shutil.rmtree(self.root, ignore_errors=True)
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)


def _require_etcd() -> None:
    if not os.access(ETCD, os.X_OK):
        pytest.skip(f"{ETCD} is missing (install Debian etcd-server)")


@pytest.fixture(scope="module")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """A 3-member cluster shared by a module's tests; they must not kill its members."""
    _require_etcd()
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), members=3)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A fresh 3-member cluster for one test, which may kill and restart members."""
    _require_etcd()
    cluster = EtcdCluster(tmp_path, members=3)
    try:
        yield cluster
    finally:
        cluster.close()
