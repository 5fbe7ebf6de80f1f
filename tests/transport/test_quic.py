"""The QUIC backend on loopback: streams, half-close, backpressure, limits, mTLS.

DESIGN.md asks for proof that a missing client certificate, one from another
CA, an expired one and one without a URI SAN are all refused by the server.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aioquic.asyncio.client import connect
from aioquic.quic.configuration import QuicConfiguration

from outrelay.pki import ClientVerifier, create_ca, issue_agent, write_identity
from outrelay.transport import (
    BrokenResourceError,
    Connection,
    QuicTlsConfig,
    Stream,
    TransportError,
    select_quic_backend,
    serve_quic,
)
from outrelay.transport import quic as quic_module
from outrelay.transport.quic import QuicConn

from .tlspki import Pki

pytestmark = pytest.mark.timeout(60)

try:
    import qh3  # noqa: F401

    HAVE_QH3 = True
except ImportError:  # pragma: no cover - qh3 is a dev dependency
    HAVE_QH3 = False

BACKENDS = [
    "aioquic",
    pytest.param("qh3", marks=pytest.mark.skipif(not HAVE_QH3, reason="qh3 is not installed")),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The client's QUIC library (the server is always aioquic)."""
    return str(request.param)


async def _connect(backend: str, port: int, tls: QuicTlsConfig, **kwargs: float) -> Connection:
    connect = select_quic_backend(backend).connect
    return await connect("127.0.0.1", port, tls, **kwargs)


@dataclass
class Server:
    port: int
    conns: asyncio.Queue[QuicConn] = field(default_factory=asyncio.Queue)
    refused: list[str] = field(default_factory=list)


@pytest.fixture
async def server(pki: Pki) -> AsyncIterator[Server]:
    verifier = ClientVerifier([pki.ca.cert])
    state = Server(port=0)
    handle = await serve_quic(
        "127.0.0.1",
        0,
        pki.relay,
        verify_client=lambda leaf, chain: verifier.verify(leaf, chain),
        on_connection=state.conns.put_nowait,
        on_refused=lambda addr, reason: state.refused.append(reason),
    )
    state.port = handle.address[1]
    yield state
    handle.close()


async def _pair(pki: Pki, server: Server, backend: str = "aioquic") -> tuple[Connection, QuicConn]:
    client = await _connect(backend, server.port, pki.agent)
    async with asyncio.timeout(5):
        peer = await server.conns.get()
    return client, peer


async def _read_all(stream: Stream) -> bytes:
    out = bytearray()
    while chunk := await stream.receive_some():
        out += chunk
    return bytes(out)


async def test_identity_and_echo_with_half_close(pki: Pki, server: Server, backend: str) -> None:
    client, peer = await _pair(pki, server, backend)
    assert peer.identity == pki.agent_uri
    assert peer.peer.address[0] == "127.0.0.1"
    stream = await client.open_stream()
    await stream.send_all(b"ping")
    await stream.send_eof()
    remote = await peer.accept_stream()
    assert await _read_all(remote) == b"ping"
    # Our FIN did not close the other direction.
    await remote.send_all(b"pong")
    await remote.send_eof()
    assert await _read_all(stream) == b"pong"
    client.close()


async def test_slow_reader_pushes_back_on_the_writer(pki: Pki, server: Server) -> None:
    client, peer = await _pair(pki, server)
    stream = await client.open_stream()
    await stream.send_all(b"x")
    remote = await peer.accept_stream()
    sent = 0
    chunk = b"y" * 65536

    async def flood() -> None:
        nonlocal sent
        while True:
            await stream.send_all(chunk)
            sent += len(chunk)

    task = asyncio.create_task(flood())
    await asyncio.sleep(1.0)
    assert not task.done()
    bound = quic_module.STREAM_WINDOW + quic_module.SEND_BUFFER + 2 * len(chunk)
    assert sent <= bound, f"writer got {sent} bytes out to a reader that reads nothing"
    assert stream.unsent_bytes <= quic_module.SEND_BUFFER + len(chunk)
    # The receiver buffers at most one window beyond what it consumed.
    assert remote.statistics().buffered <= quic_module.STREAM_WINDOW + 1
    # Reading releases the writer.
    before = sent
    received = 0
    while received < 4 << 20:
        received += len(await remote.receive_some())
    assert sent > before
    task.cancel()
    client.close()


async def test_slow_client_reader_pushes_back_on_the_server(
    pki: Pki, server: Server, backend: str
) -> None:
    """The agent's side of receive backpressure, on each client backend.

    aioquic returns credit per stream as bytes are consumed; qh3 returns it
    when its core's events are popped, so the qh3 backend stops popping while
    a stream holds a window of unread bytes (quic_qh3.py). Either way a reader
    that reads nothing caps what the writer gets out.
    """
    client, peer = await _pair(pki, server, backend)
    stream = await client.open_stream()
    await stream.send_all(b"x")
    remote = await peer.accept_stream()
    assert await remote.receive_some() == b"x"
    sent = 0
    chunk = b"y" * 65536

    async def flood() -> None:
        nonlocal sent
        while True:
            await remote.send_all(chunk)
            sent += len(chunk)

    task = asyncio.create_task(flood())
    try:
        await asyncio.sleep(1.0)
        assert not task.done()
        window = quic_module.STREAM_WINDOW
        # qh3: one more window may wait in its core, plus one read batch popped
        # before the hold (64 datagrams of at most 1350 bytes).
        slack = 0 if backend == "aioquic" else window + 64 * quic_module.MAX_DATAGRAM_SIZE
        bound = window + slack + quic_module.SEND_BUFFER + 2 * len(chunk)
        assert sent <= bound, f"server got {sent} bytes out to a client that reads nothing"
        buffered = stream.statistics().buffered  # type: ignore[attr-defined]
        assert buffered <= window + slack + 1
        # Reading releases the writer.
        before = sent
        received = 0
        while received < 4 << 20:
            received += len(await stream.receive_some())
        assert sent > before
    finally:
        task.cancel()
        client.close()


async def test_a_held_qh3_connection_resumes_every_stream(pki: Pki, server: Server) -> None:
    """qh3 only: while one stream is full, the others wait (documented
    head-of-line coupling); once it is read they all flow again."""
    if not HAVE_QH3:
        pytest.skip("qh3 is not installed")
    client, peer = await _pair(pki, server, "qh3")
    slow = await client.open_stream()
    await slow.send_all(b"s")
    other = await client.open_stream()
    await other.send_all(b"o")
    remotes = {}
    for _ in range(2):
        r = await peer.accept_stream()
        remotes[await r.receive_some()] = r
    big = b"z" * (3 * quic_module.STREAM_WINDOW)

    async def push_big() -> None:
        await remotes[b"s"].send_all(big)
        await remotes[b"s"].send_eof()

    task = asyncio.create_task(push_big())
    try:
        async with asyncio.timeout(10):
            while slow.statistics().buffered < quic_module.STREAM_WINDOW:  # type: ignore[attr-defined]  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        await remotes[b"o"].send_all(b"hello")
        await remotes[b"o"].send_eof()
        reader = asyncio.create_task(_read_all(other))
        assert await _read_all(slow) == big
        async with asyncio.timeout(5):
            assert await reader == b"hello"
        await task
    finally:
        task.cancel()
        client.close()


async def test_opening_past_the_peer_stream_limit_waits(
    pki: Pki, server: Server, backend: str
) -> None:
    client, peer = await _pair(pki, server, backend)
    streams = []
    for _ in range(quic_module.MAX_INCOMING_STREAMS):
        s = await client.open_stream()
        await s.send_all(b"hi")
        streams.append(s)
    extra = asyncio.create_task(client.open_stream())
    await asyncio.sleep(0.5)
    assert not extra.done(), "the 101st stream must wait for the peer's MAX_STREAMS"
    # The server finishes one stream completely: both directions closed.
    remote = await peer.accept_stream()
    await remote.send_eof()
    await streams[0].send_eof()
    assert await _read_all(remote) == b"hi"
    assert await _read_all(streams[0]) == b""
    await remote.aclose()
    await streams[0].aclose()
    async with asyncio.timeout(5):
        await extra
    client.close()


async def test_connection_loss_breaks_streams(pki: Pki, server: Server, backend: str) -> None:
    client, peer = await _pair(pki, server, backend)
    stream = await client.open_stream()
    await stream.send_all(b"a")
    remote = await peer.accept_stream()
    await remote.receive_some()
    reader = asyncio.create_task(remote.receive_some())
    client.close()
    with pytest.raises(TransportError):
        async with asyncio.timeout(15):
            await reader
    with pytest.raises(TransportError):
        await peer.accept_stream()


async def _refused(pki: Pki, server: Server, tls: QuicTlsConfig, backend: str) -> str:
    client = await _connect(backend, server.port, tls)
    # TLS 1.3: the client finishes first; the server then closes the connection.
    async with asyncio.timeout(10):
        await client.wait_closed()
    assert server.conns.empty()
    assert server.refused
    return server.refused[-1]


async def test_refuses_client_from_another_ca(
    pki: Pki, server: Server, tmp_path: Path, backend: str
) -> None:
    other = create_ca()
    leaf, _ = issue_agent(other, tenant="acme")
    crt, key = write_identity(tmp_path, "stranger", leaf)
    reason = await _refused(pki, server, QuicTlsConfig(str(crt), str(key), pki.ca_file), backend)
    assert "does not verify" in reason


async def test_refuses_expired_client(
    pki: Pki, server: Server, tmp_path: Path, backend: str
) -> None:
    now = dt.datetime.now(dt.UTC)
    leaf, _ = issue_agent(
        pki.ca,
        tenant="acme",
        not_before=now - dt.timedelta(days=10),
        not_after=now - dt.timedelta(days=1),
    )
    crt, key = write_identity(tmp_path, "expired", leaf)
    reason = await _refused(pki, server, QuicTlsConfig(str(crt), str(key), pki.ca_file), backend)
    assert "expired" in reason


async def test_refuses_client_without_uri_san(
    pki: Pki, server: Server, tmp_path: Path, backend: str
) -> None:
    leaf, _ = issue_agent(pki.ca, tenant="acme", uri_sans=[])
    crt, key = write_identity(tmp_path, "nouri", leaf)
    reason = await _refused(pki, server, QuicTlsConfig(str(crt), str(key), pki.ca_file), backend)
    assert "no URI SAN" in reason


async def test_refuses_client_without_certificate(pki: Pki, server: Server) -> None:
    config = QuicConfiguration(is_client=True, alpn_protocols=["orp/1"], server_name="localhost")
    config.load_verify_locations(cafile=pki.ca_file)
    async with connect("127.0.0.1", server.port, configuration=config) as protocol:
        async with asyncio.timeout(10):
            await protocol.wait_closed()
    assert server.conns.empty()
    assert server.refused == ["no client certificate"]


async def test_refuses_other_alpn(pki: Pki, server: Server) -> None:
    config = QuicConfiguration(is_client=True, alpn_protocols=["h3"], server_name="localhost")
    config.load_verify_locations(cafile=pki.ca_file)
    config.load_cert_chain(pki.agent.cert_file, pki.agent.key_file)
    with pytest.raises(ConnectionError):
        async with asyncio.timeout(10):
            async with connect("127.0.0.1", server.port, configuration=config):
                pass  # pragma: no cover
    assert server.conns.empty()


async def test_client_checks_the_server_name(pki: Pki, server: Server, backend: str) -> None:
    tls = QuicTlsConfig(pki.agent.cert_file, pki.agent.key_file, pki.ca_file, "relay.example")
    with pytest.raises(BrokenResourceError, match="handshake"):
        await _connect(backend, server.port, tls)
    assert server.conns.empty()


async def test_client_refuses_a_server_from_another_ca(
    pki: Pki, server: Server, tmp_path: Path, backend: str
) -> None:
    other = create_ca()
    ca_file, _ = write_identity(tmp_path, "other-ca", other)
    tls = QuicTlsConfig(pki.agent.cert_file, pki.agent.key_file, str(ca_file))
    with pytest.raises(BrokenResourceError, match="handshake"):
        await _connect(backend, server.port, tls)
    assert server.conns.empty()


async def test_unreachable_server_times_out(pki: Pki, backend: str) -> None:
    with pytest.raises(BrokenResourceError, match="timed out"):
        await _connect(backend, 9, pki.agent, handshake_timeout=0.5)
