"""Issue 19: every program in ``examples/`` runs against a real relay (so they keep working).

Each example is started as its own process with the ``OUTRELAY_*`` environment its
header documents, pointed at a relay from :class:`~e2e.harness.Cluster`.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from devpki import DevPki
from e2e.harness import Backends, Cluster, Relay, child_env

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RUN_TIMEOUT = 60.0


def _env(pki: DevPki, relay: Relay) -> dict[str, str]:
    me = pki.agent(1)
    return {
        **child_env(),
        "OUTRELAY_RELAY": relay.addr,
        "OUTRELAY_CERT": str(me.cert),
        "OUTRELAY_KEY": str(me.key),
        "OUTRELAY_CA": str(pki.ca_cert),
    }


def _run(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


@contextmanager
def _background(script: str, env: dict[str, str], *args: str) -> Iterator[str]:
    """Start a long-running example, wait for its first line, stop it afterwards."""
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / script), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded by the test timeout
        assert line, proc.stderr.read() if proc.stderr else ""
        yield line
    finally:
        proc.terminate()
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
            raise
    assert code == 0, proc.stderr.read() if proc.stderr else code


def _roundtrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = bytearray()
        while chunk := s.recv(65536):
            out += chunk
    return bytes(out)


def test_every_example_is_tested() -> None:
    tested = {"open_connection.py", "serve.py", "expose.py", "sync_client.py"}
    tested.add("udp_ping.py")  # run by tests/e2e/test_udp.py::test_udp_ping_example
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


@pytest.mark.parametrize("script", ["open_connection.py", "sync_client.py"])
def test_client_examples(cluster: Cluster, backends: Backends, script: str) -> None:
    relay = cluster.start_relay()
    echo = backends.echo()
    cluster.start_agent(cluster.pki.agent(0), relay, name="provider", expose={"echo": echo.addr})
    env = _env(cluster.pki, relay)
    result = _run(script, env, "echo", "hello from the example")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from the example"
    rejected = _run(script, env, "nope", "x")
    assert rejected.returncode == 1, rejected.stderr
    assert "rejected: 404" in rejected.stderr


def test_serve_example(cluster: Cluster) -> None:
    relay = cluster.start_relay()
    with _background("serve.py", _env(cluster.pki, relay), "upper") as first:
        assert "serving 'upper'" in first
        consumer = cluster.start_agent(
            cluster.pki.agent(0), relay, name="consumer", consume=["upper"]
        )
        assert _roundtrip(consumer.port("upper"), b"hello") == b"HELLO"


def test_expose_example(cluster: Cluster, backends: Backends) -> None:
    relay = cluster.start_relay()
    echo = backends.echo()
    with _background("expose.py", _env(cluster.pki, relay), "echo3", echo.addr) as first:
        assert "exposing 'echo3'" in first
        consumer = cluster.start_agent(
            cluster.pki.agent(0), relay, name="consumer", consume=["echo3"]
        )
        assert _roundtrip(consumer.port("echo3"), b"ping" * 1000) == b"ping" * 1000


def test_headers_say_how_to_run() -> None:
    for path in EXAMPLES.glob("*.py"):
        head = path.read_text().split('"""')[1]
        assert "python examples/" + path.name in head, path.name
        assert "README" in head, path.name
