"""Issue 19 item 1: the public asyncio API against real relay and agent processes.

    API Agent (this process) =QUIC=> outrelay-relay =QUIC=> outrelay-agent -TCP-> backend

and the other way round (``serve``/``expose`` here, a sidecar consumer there).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from pathlib import Path

import pytest
from devpki import DevPki
from e2e.harness import Backends, Cluster, Relay, write_policy

import outrelay
import outrelay.sync

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

MiB = 1 << 20
STEP = 30.0
"""Bound on every single await in these tests."""


def _provider(cluster: Cluster, backends: Backends, relay: Relay) -> None:
    echo = backends.echo()
    cluster.start_agent(cluster.pki.agent(0), relay, name="provider", expose={"echo": echo.addr})


async def _echo_sha(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int, pause: float = 0.0
) -> tuple[str, str]:
    """Send ``size`` random bytes (then EOF), read the echo; sha256 of both."""
    data = os.urandom(size)

    async def send() -> None:
        for i in range(0, size, 64 * 1024):
            writer.write(data[i : i + 64 * 1024])
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        writer.write_eof()

    sender = asyncio.create_task(send())
    got = hashlib.sha256()
    n = 0
    while n < size:
        chunk = await asyncio.wait_for(reader.read(256 * 1024), STEP)
        if not chunk:
            break
        got.update(chunk)
        n += len(chunk)
    await asyncio.wait_for(sender, STEP)
    return hashlib.sha256(data).hexdigest(), got.hexdigest()


def test_identity_uri_read_from_the_certificate(dev_pki: DevPki) -> None:
    agent = dev_pki.agent(1)
    identity = outrelay.Identity.from_files(agent.cert, agent.key, dev_pki.ca_cert)
    assert identity.uri == agent.uri
    with pytest.raises(outrelay.OutRelayError):
        outrelay.Identity.from_files(dev_pki.dir / "missing.crt", agent.key, dev_pki.ca_cert)


async def test_open_connection_echoes_4_mib(
    cluster: Cluster, backends: Backends, api_identity: outrelay.Identity
) -> None:
    relay = cluster.start_relay()
    _provider(cluster, backends, relay)
    async with outrelay.Agent(relays=[relay.addr], identity=api_identity) as agent:
        reader, writer = await agent.open_connection("echo")
        sent, got = await _echo_sha(reader, writer, 4 * MiB)
        assert got == sent
        assert await asyncio.wait_for(reader.read(), STEP) == b""
        writer.close()
        await writer.wait_closed()


async def test_unknown_service_raises_404(
    cluster: Cluster, api_identity: outrelay.Identity
) -> None:
    relay = cluster.start_relay()
    async with outrelay.Agent(relays=[relay.addr], identity=api_identity) as agent:
        with pytest.raises(outrelay.OpenRejected) as info:
            await agent.open_connection("nope")
    assert info.value.code == 404, info.value
    assert info.value.reason, info.value
    assert info.value.service == "nope"


async def test_policy_deny_raises_403(
    cluster: Cluster, backends: Backends, api_identity: outrelay.Identity, tmp_path: Path
) -> None:
    policy = write_policy(
        tmp_path / "policy.json",
        [
            {"id": "deny-echo", "caller": "*", "target": "echo", "decision": "deny"},
            {"id": "callee", "caller": "*", "target": "outrelay://*", "decision": "allow"},
        ],
    )
    relay = cluster.start_relay(policy=policy)
    _provider(cluster, backends, relay)
    async with outrelay.Agent(relays=[relay.addr], identity=api_identity) as agent:
        with pytest.raises(outrelay.OpenRejected) as info:
            await agent.open_connection("echo")
    assert info.value.code == 403, info.value


async def test_relay_unreachable_raises_within_the_timeout(
    api_identity: outrelay.Identity,
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"  # bound, never answers
        agent = outrelay.Agent(relays=[addr], identity=api_identity, connect_timeout=2.0)
        with pytest.raises(outrelay.RelayUnreachable):
            await asyncio.wait_for(agent.start(), STEP)
    with pytest.raises(outrelay.AgentClosed):
        await agent.open_connection("echo")


def _own_listening_sockets() -> set[str]:
    """The socket inodes this process listens on (TCP, IPv4 and IPv6), from /proc."""
    listening: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    listening.add(fields[9])
    own = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                own.add(link[len("socket:[") : -1])
    return listening & own


async def test_serve_handler_reached_by_a_sidecar_consumer(
    cluster: Cluster, api_identity: outrelay.Identity
) -> None:
    relay = cluster.start_relay()
    seen: list[bytes] = []

    async def upper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the consumer's half-close
        seen.append(data)
        writer.write(data.upper())
        await writer.drain()

    async with outrelay.Agent(relays=[relay.addr], identity=api_identity) as agent:
        listening = _own_listening_sockets()
        await agent.serve("upper", upper)
        assert _own_listening_sockets() == listening, "serve() must not open a port"
        consumer = await asyncio.to_thread(
            cluster.start_agent, cluster.pki.agent(0), relay, name="consumer", consume=["upper"]
        )
        reply = await asyncio.to_thread(_tcp_roundtrip, consumer.port("upper"), b"hello api")
    assert reply == b"HELLO API"
    assert seen == [b"hello api"]


async def test_expose_bridges_to_a_backend(
    cluster: Cluster, backends: Backends, api_identity: outrelay.Identity
) -> None:
    relay = cluster.start_relay()
    echo = backends.echo()
    async with outrelay.Agent(relays=[relay.addr], identity=api_identity) as agent:
        await agent.expose("echo2", echo.addr)
        consumer = await asyncio.to_thread(
            cluster.start_agent, cluster.pki.agent(0), relay, name="consumer", consume=["echo2"]
        )
        reply = await asyncio.to_thread(_tcp_roundtrip, consumer.port("echo2"), b"x" * 100_000)
    assert reply == b"x" * 100_000


def _tcp_roundtrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=STEP) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = bytearray()
        while chunk := s.recv(65536):
            out += chunk
    return bytes(out)


async def test_stream_resumes_across_a_relay_restart(
    cluster: Cluster, backends: Backends, api_identity: outrelay.Identity
) -> None:
    relay = cluster.start_relay()
    _provider(cluster, backends, relay)
    async with outrelay.Agent(relays=[relay.addr], identity=api_identity) as agent:
        reader, writer = await agent.open_connection("echo")
        # ~4 MiB paced over a few seconds, so the restart lands mid-transfer.
        transfer = asyncio.create_task(_echo_sha(reader, writer, 4 * MiB, pause=0.05))
        await asyncio.sleep(1.0)
        assert not transfer.done()
        relay.kill()
        await asyncio.sleep(1.0)
        await asyncio.to_thread(cluster.start_relay, port=relay.port, name="relay")
        sent, got = await asyncio.wait_for(transfer, 90)
        assert got == sent
        writer.close()
    provider = next(p for p in cluster.procs if p.name == "provider")
    assert provider.find("session: stream resumed"), cluster.log_tail(20)


async def test_closing_the_agent_ends_its_streams(
    cluster: Cluster, backends: Backends, api_identity: outrelay.Identity
) -> None:
    relay = cluster.start_relay()
    _provider(cluster, backends, relay)
    agent = outrelay.Agent(relays=[relay.addr], identity=api_identity, shutdown_grace=1.0)
    await agent.start()
    reader, writer = await agent.open_connection("echo")
    writer.write(b"ping")
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(4), STEP) == b"ping"
    await asyncio.wait_for(agent.close(), STEP)
    # The stream is over: EOF (or a reset) on the caller's side, never a hang.
    try:
        rest = await asyncio.wait_for(reader.read(), STEP)
    except ConnectionError:
        rest = b""
    assert rest == b""
    with pytest.raises(outrelay.AgentClosed):
        await agent.open_connection("echo")
    await agent.close()  # idempotent


def test_sync_helper(cluster: Cluster, backends: Backends, api_identity: outrelay.Identity) -> None:
    relay = cluster.start_relay()
    _provider(cluster, backends, relay)
    with outrelay.sync.open_connection("echo", relays=[relay.addr], identity=api_identity) as s:
        s.settimeout(STEP)
        s.sendall(b"sync hello")
        s.shutdown(socket.SHUT_WR)
        out = bytearray()
        while chunk := s.recv(65536):
            out += chunk
    assert out == b"sync hello"
    with outrelay.sync.SyncAgent(relays=[relay.addr], identity=api_identity) as agent:
        with pytest.raises(outrelay.OpenRejected) as info:
            agent.open_connection("nope")
        assert info.value.code == 404
        s2 = agent.open_connection("echo")
        s2.settimeout(STEP)
        s2.sendall(b"again")
        assert s2.recv(5) == b"again"
        s2.close()


async def test_writer_close_mid_transfer_is_an_application_close(
    cluster: Cluster, backends: Backends, api_identity: outrelay.Identity
) -> None:
    """As with the sidecar: closing while bytes still flow resets with APPLICATION_CLOSED."""
    relay = cluster.start_relay()
    _provider(cluster, backends, relay)
    provider = next(p for p in cluster.procs if p.name == "provider")
    async with outrelay.Agent(relays=[relay.addr], identity=api_identity) as agent:
        reader, writer = await agent.open_connection("echo")
        writer.write(os.urandom(1 * MiB))
        await writer.drain()
        await asyncio.wait_for(reader.readexactly(1000), STEP)  # echo is flowing, unread
        writer.close()
        rec = await asyncio.to_thread(provider.wait_for, "stream", svc="echo", timeout=STEP)
    assert rec["outcome"] == "reset_by_peer_application_closed", rec


async def test_a_failing_handler_aborts_only_its_stream(
    cluster: Cluster, api_identity: outrelay.Identity
) -> None:
    relay = cluster.start_relay()
    calls: list[bytes] = []

    async def picky(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        calls.append(data)
        if data == b"boom":
            raise RuntimeError("handler failed")
        writer.write(b"ok:" + data)

    async with outrelay.Agent(relays=[relay.addr], identity=api_identity) as agent:
        await agent.serve("picky", picky)
        consumer = await asyncio.to_thread(
            cluster.start_agent, cluster.pki.agent(0), relay, name="consumer", consume=["picky"]
        )
        port = consumer.port("picky")
        try:
            failed = await asyncio.to_thread(_tcp_roundtrip, port, b"boom")
        except ConnectionError:
            failed = b""
        assert failed == b""
        assert await asyncio.to_thread(_tcp_roundtrip, port, b"fine") == b"ok:fine"
    assert calls == [b"boom", b"fine"]


async def test_bad_addresses_are_value_errors(api_identity: outrelay.Identity) -> None:
    with pytest.raises(ValueError):
        outrelay.Agent(relays=["no-port"], identity=api_identity)
    with pytest.raises(ValueError):
        outrelay.Agent(relays=[], identity=api_identity)
