"""The TLS + yamux backend on loopback: streams, half-close, backpressure, ALPN, robustness.

Which clients the server refuses (another CA, expired, no URI SAN, no certificate)
is tested for both transports in ``test_mtls.py``. Spec 02 §9.3 [REC]: port scans,
garbage and stalled handshakes do not stop the listener.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from collections.abc import AsyncIterator

import pytest
from clienthello import client_hello

from outrelay.transport import BrokenResourceError, ClosedResourceError
from outrelay.transport import tcp as tcp_module
from outrelay.transport.tcp import IncompleteClientHello, TcpConn, client_hello_alpn, connect_tcp
from outrelay.transport.yamux import INITIAL_STREAM_WINDOW, MAX_INCOMING_STREAMS

from .listeners import (
    YAMUX_SYN,
    Flood,
    Listener,
    listen_tcp,
    open_and_accept,
    ping_pong,
    raw_tls_exchange,
    read_all,
)
from .tlspki import Pki

pytestmark = pytest.mark.timeout(60)

Server = Listener[TcpConn]


@pytest.fixture
async def server(pki: Pki) -> AsyncIterator[Server]:
    listener = await listen_tcp(pki)
    yield listener
    await listener.close()


async def _pair(pki: Pki, server: Server) -> tuple[TcpConn, TcpConn]:
    client = await connect_tcp("127.0.0.1", server.port, pki.agent)
    return client, await server.accepted()


# --------------------------------------------------------------------------- streams


async def test_identity_and_echo_with_half_close(pki: Pki, server: Server) -> None:
    client, peer = await _pair(pki, server)
    assert peer.identity == pki.agent_uri
    assert peer.peer.address[0] == "127.0.0.1"
    assert peer.peer.certificate is not None
    assert client.peer.certificate is not None  # the relay's
    stream = await client.open_stream()
    assert stream.stream_id == 1  # spec 02 §9.2: the agent's first stream (ctrl) is 1
    await ping_pong(stream, peer.accept_stream)
    # Relay-opened streams are even.
    down = await peer.open_stream()
    assert down.stream_id % 2 == 0
    client.close()
    async with asyncio.timeout(5):
        await peer.wait_closed()
    assert "closed" in peer.close_reason
    with pytest.raises(ClosedResourceError):
        await client.open_stream()


async def test_slow_reader_pushes_back_on_the_writer(pki: Pki, server: Server) -> None:
    client, peer = await _pair(pki, server)
    stream, remote = await open_and_accept(client, peer)
    assert await remote.receive_some() == b"x"
    flood = Flood(stream)
    await asyncio.sleep(0.5)
    assert not flood.task.done()
    # Nothing was read, so no credit came back: one window is all that left.
    sent = flood.sent
    assert sent <= INITIAL_STREAM_WINDOW, (
        f"writer got {sent} bytes out to a reader that reads nothing"
    )
    assert stream.unsent_bytes == INITIAL_STREAM_WINDOW
    assert client.write_buffer_size < tcp_module.WRITE_BUFFER_HIGH
    assert remote.statistics().buffered <= INITIAL_STREAM_WINDOW  # bounded by the window
    # Reading releases the writer; a slow reader never buffers past its window.

    def within_window() -> None:
        assert remote.statistics().buffered <= peer.receive_window(remote.stream_id)

    await flood.released_by_reading(remote, 16384, within_window)
    flood.task.cancel()
    client.close()


async def test_aclose_lets_a_still_sending_peer_finish(pki: Pki, server: Server) -> None:
    client, peer = await _pair(pki, server)
    stream, remote = await open_and_accept(client, peer, b"hi")
    await stream.aclose()  # FIN, and stop reading
    assert await read_all(remote) == b"hi"
    # The peer keeps writing well past one window: discarded, credited, no hang.
    async with asyncio.timeout(10):
        await remote.send_all(b"z" * (2 << 20))
        await remote.send_eof()
    await asyncio.sleep(0.1)
    assert not client.has_stream(stream.stream_id)
    client.close()


async def test_incoming_stream_limit_queues_the_rest(pki: Pki, server: Server) -> None:
    client, peer = await _pair(pki, server)
    streams = []
    for _ in range(MAX_INCOMING_STREAMS + 1):
        s = await client.open_stream()  # never waits: every SYN is ACKed at once
        await s.send_all(b"hi")
        streams.append(s)
    accepted = [await peer.accept_stream() for _ in range(MAX_INCOMING_STREAMS)]
    extra = asyncio.create_task(peer.accept_stream())
    await asyncio.sleep(0.3)
    assert not extra.done(), "the 101st stream waits until an open one ends"
    first = accepted[0]
    await first.send_eof()
    await streams[0].send_eof()
    assert await read_all(first) == b"hi"
    assert await read_all(streams[0]) == b""
    async with asyncio.timeout(5):
        late = await extra
    assert late.stream_id == streams[-1].stream_id
    assert await late.receive_some() == b"hi"  # its early bytes were kept
    client.close()


async def test_go_away_and_ping(pki: Pki, server: Server) -> None:
    client, peer = await _pair(pki, server)
    old = await client.open_stream()
    rtt = await client.ping()
    assert 0 <= rtt < 1
    peer.go_away()
    await peer.ping()  # the GO_AWAY was sent before this reply
    with pytest.raises(BrokenResourceError, match="GO_AWAY"):
        await client.open_stream()
    await old.send_all(b"still works")
    remote = await peer.accept_stream()
    assert await remote.receive_some() == b"still works"
    client.close()


async def test_dead_socket_breaks_every_waiter(pki: Pki, server: Server) -> None:
    client, peer = await _pair(pki, server)
    stream, remote = await open_and_accept(client, peer)
    await remote.receive_some()
    reader = asyncio.create_task(stream.receive_some())
    acceptor = asyncio.create_task(client.accept_stream())
    await asyncio.sleep(0.05)
    peer._protocol.abort()  # the relay process "dies": RST, no GO_AWAY, no close_notify
    async with asyncio.timeout(5):
        with pytest.raises(BrokenResourceError):
            await reader
        with pytest.raises(BrokenResourceError):
            await acceptor
    with pytest.raises(BrokenResourceError):
        await stream.send_all(b"y")
    assert client.is_closed
    assert client.close_reason


async def test_server_close_ends_connections(pki: Pki) -> None:
    state = await listen_tcp(pki)
    client, _peer = await _pair(pki, state)
    state.handle.close()
    async with asyncio.timeout(5):
        await client.wait_closed()
    with pytest.raises(BrokenResourceError):
        await client.open_stream()


async def test_one_stream_throughput(
    pki: Pki, server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    client, peer = await _pair(pki, server)
    total = 256 << 20
    block = os.urandom(1 << 20)
    stream = await client.open_stream()

    async def writer() -> None:
        for _ in range(total // len(block)):
            await stream.send_all(block)
        await stream.send_eof()

    task = asyncio.create_task(writer())
    remote = await peer.accept_stream()
    start = time.perf_counter()
    got = 0
    while data := await remote.receive_some(1 << 20):
        got += len(data)
    elapsed = time.perf_counter() - start
    await task
    assert got == total
    gbits = got * 8 / elapsed / 1e9
    with capsys.disabled():
        print(
            f"\n[tcp] one yamux stream over TLS 1.3, loopback, one process: "
            f"{got >> 20} MiB in {elapsed:.2f}s = {gbits:.2f} Gbit/s "
            f"(receive window {peer.receive_window(remote.stream_id) >> 10} KiB)"
        )
    client.close()


async def test_window_overrun_ends_the_session_with_go_away() -> None:
    """A peer that sends past its window gets GO_AWAY(protocol error) and is cut off."""
    conns: asyncio.Queue[TcpConn] = asyncio.Queue()
    handle = await tcp_module.serve_yamux_plaintext("127.0.0.1", 0, on_connection=conns.put_nowait)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", handle.address[1])
        syn = YAMUX_SYN
        too_long = (INITIAL_STREAM_WINDOW + 1).to_bytes(4, "big")
        writer.write(syn + bytes.fromhex("00 00 0000 00000001") + too_long)
        await writer.drain()
        async with asyncio.timeout(5):
            conn = await conns.get()
            reply = await reader.read()  # until EOF
            await conn.wait_closed()
        ack = bytes.fromhex("00 01 0002 00000001 00000000")
        go_away = bytes.fromhex("00 03 0000 00000000 00000001")
        assert reply == ack + go_away
        assert "exceed the receive window" in conn.close_reason
        writer.close()
    finally:
        handle.close()


# --------------------------------------------------------------------------- admission


async def test_alpn_none_is_accepted_other_only_is_refused(pki: Pki, server: Server) -> None:
    def ctx(alpn: list[str] | None) -> ssl.SSLContext:
        c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        c.load_verify_locations(pki.ca_file)
        c.load_cert_chain(pki.agent.cert_file, pki.agent.key_file)
        if alpn is not None:
            c.set_alpn_protocols(alpn)
        return c

    # No ALPN at all: accepted (spec 02 §9.1); the ACK of our SYN comes back.
    assert await raw_tls_exchange(server.port, ctx(None)) == "data"
    async with asyncio.timeout(5):
        conn = await server.conns.get()
    assert conn.identity == pki.agent_uri
    # Only other protocols: refused during the handshake.
    outcome = await raw_tls_exchange(server.port, ctx(["h2", "http/1.1"]))
    assert outcome.startswith("handshake failed"), outcome
    assert "NO APPLICATION PROTOCOL" in outcome.upper()
    reasons = await server.refusals(1)
    assert "offered ALPN 'h2', 'http/1.1'" in reasons[0]
    # orp/1 among others: fine.
    assert await raw_tls_exchange(server.port, ctx(["h2", "orp/1"])) == "data"


async def test_port_scans_garbage_and_stalls_do_not_stop_the_listener(pki: Pki) -> None:
    state = await listen_tcp(pki, handshake_timeout=1.0)
    try:
        # connect + close, as a port scanner does
        for _ in range(5):
            _, writer = await asyncio.open_connection("127.0.0.1", state.port)
            writer.close()
        # garbage instead of a ClientHello
        _, writer = await asyncio.open_connection("127.0.0.1", state.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        # a client that connects and says nothing holds no one up
        _, stalled = await asyncio.open_connection("127.0.0.1", state.port)
        client, peer = await _pair(pki, state)
        assert peer.identity == pki.agent_uri
        reasons = await state.refusals(7)
        assert any("timed out" in r for r in reasons), reasons
        assert any("WRONG_VERSION_NUMBER" in r.upper() or "HTTP" in r.upper() for r in reasons)
        assert sum("closed" in r or "lost" in r for r in reasons) >= 5, reasons
        # and later clients still get in
        client2, _ = await _pair(pki, state)
        client.close()
        client2.close()
        writer.close()
        stalled.close()
    finally:
        await state.close()


# --------------------------------------------------------------------------- ClientHello parser


def test_client_hello_alpn_parser() -> None:
    hello = client_hello(["orp/1", "h2"])
    assert client_hello_alpn(hello) == [b"orp/1", b"h2"]
    assert client_hello_alpn(client_hello(None)) is None
    for cut in (0, 3, 5, 40, len(hello) - 1):
        with pytest.raises(IncompleteClientHello):
            client_hello_alpn(hello[:cut])
    # The same hello split over two TLS records.
    body = hello[5:]
    split = b"\x16\x03\x01" + (100).to_bytes(2, "big") + body[:100]
    split += b"\x16\x03\x01" + (len(body) - 100).to_bytes(2, "big") + body[100:]
    assert client_hello_alpn(split) == [b"orp/1", b"h2"]
    with pytest.raises(ValueError):
        client_hello_alpn(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(ValueError):
        client_hello_alpn(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00")  # ServerHello type


def test_tls_yamux_runs_on_uvloop(pki: Pki) -> None:
    """The agent may run on uvloop (bench: TLS+yamux is faster there), whose TCP
    transports implement asyncio.Transport without subclassing it."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        server = await listen_tcp(pki)
        try:
            client, peer = await _pair(pki, server)
            stream = await client.open_stream()
            data = os.urandom(4 << 20)

            async def write() -> None:
                await stream.send_all(data)
                await stream.send_eof()

            writer = asyncio.create_task(write())
            remote = await peer.accept_stream()
            assert await read_all(remote) == data
            await writer
            await remote.send_all(b"pong")
            await remote.send_eof()
            assert await read_all(stream) == b"pong"
            client.close()
        finally:
            await server.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(main(), 30))
