"""The QUIC backend on loopback: streams, half-close, backpressure, limits, TLS.

Which clients the server refuses (another CA, expired, no URI SAN, no certificate)
is tested for both transports in ``test_mtls.py``; here: ALPN and what the client
checks of the server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aioquic.asyncio.client import connect
from aioquic.quic.configuration import QuicConfiguration
from quicbackends import HAVE_QH3, QUIC_BACKEND_PARAMS

from outrelay.pki import create_ca, write_identity
from outrelay.transport import BrokenResourceError, Connection, QuicTlsConfig, TransportError
from outrelay.transport import quic as quic_module
from outrelay.transport.quic import QuicConn

from .listeners import (
    Flood,
    Listener,
    dial_quic,
    listen_quic,
    open_and_accept,
    ping_pong,
    read_all,
)
from .tlspki import Pki

pytestmark = pytest.mark.timeout(60)

Server = Listener[QuicConn]


@pytest.fixture(params=QUIC_BACKEND_PARAMS)
def backend(request: pytest.FixtureRequest) -> str:
    """The client's QUIC library (the server is always aioquic)."""
    return str(request.param)


@pytest.fixture
async def server(pki: Pki) -> AsyncIterator[Server]:
    listener = await listen_quic(pki)
    yield listener
    await listener.close()


async def _pair(pki: Pki, server: Server, backend: str = "aioquic") -> tuple[Connection, QuicConn]:
    client = await dial_quic(backend, server.port, pki.agent)
    return client, await server.accepted()


async def test_identity_and_echo_with_half_close(pki: Pki, server: Server, backend: str) -> None:
    client, peer = await _pair(pki, server, backend)
    assert peer.identity == pki.agent_uri
    assert peer.peer.address[0] == "127.0.0.1"
    await ping_pong(await client.open_stream(), peer.accept_stream)
    client.close()


async def test_slow_reader_pushes_back_on_the_writer(pki: Pki, server: Server) -> None:
    client, peer = await _pair(pki, server)
    stream, remote = await open_and_accept(client, peer)
    flood = Flood(stream)
    chunk = flood.chunk
    await asyncio.sleep(1.0)
    assert not flood.task.done()
    bound = quic_module.STREAM_WINDOW + quic_module.SEND_BUFFER + 2 * len(chunk)
    sent = flood.sent
    assert sent <= bound, f"writer got {sent} bytes out to a reader that reads nothing"
    assert stream.unsent_bytes <= quic_module.SEND_BUFFER + len(chunk)
    # The receiver buffers at most one window beyond what it consumed.
    assert remote.statistics().buffered <= quic_module.STREAM_WINDOW + 1
    # Reading releases the writer.
    await flood.released_by_reading(remote)
    flood.task.cancel()
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
    stream, remote = await open_and_accept(client, peer)
    assert await remote.receive_some() == b"x"
    flood = Flood(remote)
    chunk = flood.chunk
    try:
        await asyncio.sleep(1.0)
        assert not flood.task.done()
        window = quic_module.STREAM_WINDOW
        # qh3: one more window may wait in its core, plus one read batch popped
        # before the hold (64 datagrams of the size the server sends it).
        slack = 0 if backend == "aioquic" else window + 64 * peer.datagram_size
        bound = window + slack + quic_module.SEND_BUFFER + 2 * len(chunk)
        sent = flood.sent
        assert sent <= bound, f"server got {sent} bytes out to a client that reads nothing"
        buffered = stream.statistics().buffered  # type: ignore[attr-defined]
        assert buffered <= window + slack + 1
        # Reading releases the writer.
        await flood.released_by_reading(stream)
    finally:
        flood.task.cancel()
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
        reader = asyncio.create_task(read_all(other))
        assert await read_all(slow) == big
        async with asyncio.timeout(5):
            assert await reader == b"hello"
        await task
    finally:
        task.cancel()
        client.close()


async def test_a_held_qh3_connection_still_sees_the_peer_close(pki: Pki, server: Server) -> None:
    """qh3 only: while the core's events are held (a stream is full and unread),
    the peer closing the connection must still end it at once: the close event
    sits in the same queue (before: only the keep-alive found out, raising)."""
    if not HAVE_QH3:
        pytest.skip("qh3 is not installed")
    client, peer = await _pair(pki, server, "qh3")
    slow, remote = await open_and_accept(client, peer)
    flood = Flood(remote)
    try:
        async with asyncio.timeout(10):
            while slow.statistics().buffered < quic_module.STREAM_WINDOW:  # type: ignore[attr-defined]  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        peer.close(0, "bye")
        with pytest.raises(TransportError):
            async with asyncio.timeout(2):
                await client.accept_stream()
        assert client.terminated
    finally:
        flood.task.cancel()
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
    assert await read_all(remote) == b"hi"
    assert await read_all(streams[0]) == b""
    await remote.aclose()
    await streams[0].aclose()
    async with asyncio.timeout(5):
        await extra
    client.close()


async def test_the_relay_side_opens_as_many_streams_as_the_client_allows(
    pki: Pki, server: Server, backend: str
) -> None:
    """The server opens ``MAX_INCOMING_STREAMS`` (> 100) streams to the client at
    once, on qh3 too (qh3 itself allows 100: ``_qh3`` raises its core's limit and
    its transport parameter); the next waits until one is done, then gets through."""
    limit = quic_module.MAX_INCOMING_STREAMS
    assert limit > 100
    client, peer = await _pair(pki, server, backend)
    opened = []
    for i in range(limit):
        s = await peer.open_stream()
        await s.send_all(b"%d" % i)
        opened.append(s)
    accepted = []
    async with asyncio.timeout(10):
        for _ in range(limit):
            s = await client.accept_stream()
            assert await s.receive_some()
            accepted.append(s)
    extra = asyncio.create_task(peer.open_stream())
    await asyncio.sleep(0.5)
    assert not extra.done(), "the stream past the client's limit must wait"
    await opened[0].send_eof()
    await accepted[0].send_eof()
    assert await read_all(accepted[0]) == b""
    assert await read_all(opened[0]) == b""
    await accepted[0].aclose()
    await opened[0].aclose()
    async with asyncio.timeout(5):
        late = await extra
    await late.send_all(b"late")
    async with asyncio.timeout(5):
        assert await (await client.accept_stream()).receive_some() == b"late"
    client.close()


async def test_connection_loss_breaks_streams(pki: Pki, server: Server, backend: str) -> None:
    client, peer = await _pair(pki, server, backend)
    _stream, remote = await open_and_accept(client, peer, b"a")
    await remote.receive_some()
    reader = asyncio.create_task(remote.receive_some())
    client.close()
    with pytest.raises(TransportError):
        async with asyncio.timeout(15):
            await reader
    with pytest.raises(TransportError):
        await peer.accept_stream()


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
        await dial_quic(backend, server.port, tls)
    assert server.conns.empty()


async def test_client_refuses_a_server_from_another_ca(
    pki: Pki, server: Server, tmp_path: Path, backend: str
) -> None:
    other = create_ca()
    ca_file, _ = write_identity(tmp_path, "other-ca", other)
    tls = QuicTlsConfig(pki.agent.cert_file, pki.agent.key_file, str(ca_file))
    with pytest.raises(BrokenResourceError, match="handshake"):
        await dial_quic(backend, server.port, tls)
    assert server.conns.empty()


async def test_unreachable_server_times_out(pki: Pki, backend: str) -> None:
    with pytest.raises(BrokenResourceError, match="timed out"):
        await dial_quic(backend, 9, pki.agent, handshake_timeout=0.5)


async def test_a_late_frame_for_a_closed_peer_stream_is_not_a_new_stream(
    pki: Pki, server: Server, backend: str
) -> None:
    """We close a stream the peer opened before its last bytes and FIN arrive: those must
    not come back to us as a new incoming stream (the next real one must)."""
    client, peer = await _pair(pki, server, backend)
    remote, stream = await open_and_accept(peer, client, b"first")
    assert await stream.receive_some() == b"first"
    await stream.aclose()  # STOP_SENDING; the peer has not seen it yet
    await remote.send_all(b"late")
    await remote.send_eof()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            phantom = await client.accept_stream()
            pytest.fail(f"a closed stream came back as stream {phantom.stream_id}")
    _, real = await open_and_accept(peer, client, b"second")
    assert real.stream_id != stream.stream_id
    assert await real.receive_some() == b"second"
    client.close()
