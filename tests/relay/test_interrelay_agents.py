"""Real agents on different in-process relays sharing a MemoryMesh (issue 18).

A consumer agent's TCP listener on one relay, a provider agent with a TCP echo backend on
another: bytes go consumer -> relay -> peer relay -> provider -> echo and back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from etcd_cluster import EtcdCluster

from outrelay.agent.agent import Agent, AgentConfig
from outrelay.agent.session import SessionConfig

from .meshrelays import MeshRelays, free_udp_port, mesh_relays, until
from .rawagent import Pki

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def etcd1(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A one-member etcd for one test (tests/etcd_cluster.py); skipped without etcd."""
    if not os.access("/usr/bin/etcd", os.X_OK):
        pytest.skip("/usr/bin/etcd is missing (install Debian etcd-server)")
    cluster = EtcdCluster(tmp_path, members=1)
    try:
        yield cluster
    finally:
        cluster.close()


CHUNK = 64 << 10


@contextlib.asynccontextmanager
async def echo_backend() -> AsyncIterator[int]:
    """A TCP echo server; it half-closes after the client's EOF."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(CHUNK):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@contextlib.asynccontextmanager
async def agent(
    mesh: MeshRelays,
    ports: tuple[int, ...],
    *,
    provides: dict[str, str] | None = None,
    consumes: list[tuple[str, str]] | None = None,
) -> AsyncIterator[Agent]:
    identity = mesh.pki.dev.issue_agent()
    config = AgentConfig(
        SessionConfig(
            relays=tuple(("127.0.0.1", port) for port in ports),
            uri=identity.uri,
            tls=mesh.pki.dev.tls(identity),
            services=provides or {},
            backoff_initial=0.2,
            backoff_max=0.5,
        ),
        consumes=consumes or [],
        shutdown_grace=1.0,
    )
    running = Agent(config)
    await running.start()
    try:
        yield running
    finally:
        await running.shutdown()


async def _registered(mesh: MeshRelays, relay_id: str, service: str) -> None:
    await until(lambda: mesh.sees(relay_id, service))


async def _transfer(port: int, payload: bytes, *, midway: asyncio.Event | None = None) -> bytes:
    """Send ``payload`` through the consumer listener, half-close, read the echo to EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()

    async def read_all() -> None:
        while data := await reader.read(CHUNK):
            received.extend(data)
            if midway is not None and len(received) >= len(payload) // 2:
                midway.set()

    async def write_all() -> None:
        for at in range(0, len(payload), CHUNK):
            writer.write(payload[at : at + CHUNK])
            await writer.drain()
        writer.write_eof()

    try:
        await asyncio.gather(read_all(), write_all())
    finally:
        writer.close()
    return bytes(received)


async def test_echo_and_mebibytes_through_a_forwarded_path(pki: Pki) -> None:
    async with (
        mesh_relays(pki, "r1", "r2") as mesh,
        echo_backend() as backend,
        agent(mesh, (mesh.ports["r2"],), provides={"echo": f"127.0.0.1:{backend}"}) as p,
    ):
        await _registered(mesh, "r2", "echo")
        async with agent(mesh, (mesh.ports["r1"],), consumes=[("echo", "127.0.0.1:0")]) as c:
            port = c.bound[0][2]
            async with asyncio.timeout(20):
                assert await _transfer(port, b"hello through two relays") == (
                    b"hello through two relays"
                )
                payload = os.urandom(6 << 20)
                echoed = await _transfer(port, payload)
            assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
            # A clean close finishes at once on both agents (the close-ack checkpoints
            # crossed the relays), not after the 30 s resume window they would wait out.
            await until(
                lambda: not c.session.stats.active() and not p.session.stats.active(), limit=10
            )
            for relay in mesh.relays.values():
                assert relay.state.peer_controls.posted > 0  # checkpoints crossed both ways
            assert not c.session.stats.resumes and not p.session.stats.resumes


@pytest.mark.parametrize("registry", ["memory", "etcd"])
async def test_provider_relay_killed_mid_transfer_the_stream_resumes(
    pki: Pki, registry: str, request: pytest.FixtureRequest
) -> None:
    """Consumer on r1, provider on r3; r3 dies mid-transfer; the provider fails over to
    r2, re-registers, and the stream resumes through r1 -> r2 with nothing lost.
    With ``etcd``: the same over a real one-member etcd (the halves meet through it)."""
    etcd: tuple[tuple[str, int], ...] = ()
    if registry == "etcd":
        cluster = request.getfixturevalue("etcd1")
        etcd = tuple(("127.0.0.1", int(h.rpartition(":")[2])) for h in cluster.hostports)
    async with mesh_relays(pki, "r1", "r3", etcd=etcd) as mesh, echo_backend() as backend:
        r2_port = free_udp_port()  # r2 starts later: the provider must land on r3 first
        async with agent(
            mesh,
            (mesh.ports["r3"], r2_port),
            provides={"echo": f"127.0.0.1:{backend}"},
        ) as provider:
            await _registered(mesh, "r3", "echo")
            await mesh.start("r2", port=r2_port)
            async with agent(
                mesh, (mesh.ports["r1"],), consumes=[("echo", "127.0.0.1:0")]
            ) as consumer:
                payload = os.urandom(16 << 20)
                midway = asyncio.Event()
                transfer = asyncio.create_task(
                    _transfer(consumer.bound[0][2], payload, midway=midway)
                )
                async with asyncio.timeout(30):
                    await midway.wait()
                await mesh.stop("r3")
                async with asyncio.timeout(60):
                    echoed = await transfer
                assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
                await _registered(mesh, "r2", "echo")
                r1_remote = mesh.relays["r1"]._resume.remote
                r2_remote = mesh.relays["r2"]._resume.remote
                assert r1_remote is not None and r2_remote is not None
                assert r1_remote.forwarded + r2_remote.forwarded >= 1
                # Both agents resumed the stream (it broke, it was not reopened).
                assert sum(consumer.session.stats.resume_stall_buckets) >= 1
                assert sum(provider.session.stats.resume_stall_buckets) >= 1
                assert consumer.session.stats.opened[("echo", "consumer")] == 1
