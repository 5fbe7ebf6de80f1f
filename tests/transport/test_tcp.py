"""The TLS + yamux backend on loopback: streams, half-close, backpressure, mTLS, robustness.

As for QUIC (DESIGN.md): a missing client certificate, one from another CA,
an expired one and one without a URI SAN are all refused. Spec 02 §9.3
[REC]: port scans, garbage and stalled handshakes do not stop the listener.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from outrelay.pki import ClientVerifier, create_ca, issue_agent
from outrelay.transport import BrokenResourceError, ClosedResourceError, QuicTlsConfig, Stream
from outrelay.transport import tcp as tcp_module
from outrelay.transport.tcp import (
    IncompleteClientHello,
    TcpConn,
    client_hello_alpn,
    connect_tcp,
    serve_tcp,
)
from outrelay.transport.yamux import INITIAL_STREAM_WINDOW, MAX_INCOMING_STREAMS

from .tlspki import Pki

pytestmark = pytest.mark.timeout(60)


@dataclass
class Server:
    port: int
    handle: tcp_module.TcpServerHandle | None = None
    conns: asyncio.Queue[TcpConn] = field(default_factory=asyncio.Queue)
    refused: list[str] = field(default_factory=list)
    refused_event: asyncio.Event = field(default_factory=asyncio.Event)

    async def next_refusal(self, count: int) -> list[str]:
        async with asyncio.timeout(15):
            while len(self.refused) < count:
                self.refused_event.clear()
                await self.refused_event.wait()
        return self.refused


async def _serve(pki: Pki, **kwargs: float) -> Server:
    verifier = ClientVerifier([pki.ca.cert])
    state = Server(port=0)

    def refused(addr: tuple[str, int], reason: str) -> None:
        state.refused.append(reason)
        state.refused_event.set()

    state.handle = await serve_tcp(
        "127.0.0.1",
        0,
        pki.relay,
        verify_client=lambda leaf, chain: verifier.verify(leaf, chain),
        on_connection=state.conns.put_nowait,
        on_refused=refused,
        **kwargs,  # type: ignore[arg-type]
    )
    state.port = state.handle.address[1]
    return state


@pytest.fixture
async def server(pki: Pki) -> AsyncIterator[Server]:
    state = await _serve(pki)
    yield state
    assert state.handle is not None
    state.handle.close()
    await state.handle.wait_closed()


async def _pair(pki: Pki, server: Server) -> tuple[TcpConn, TcpConn]:
    client = await connect_tcp("127.0.0.1", server.port, pki.agent)
    async with asyncio.timeout(5):
        peer = await server.conns.get()
    return client, peer


async def _read_all(stream: Stream) -> bytes:
    out = bytearray()
    while chunk := await stream.receive_some():
        out += chunk
    return bytes(out)


# --------------------------------------------------------------------------- streams


async def test_identity_and_echo_with_half_close(pki: Pki, server: Server) -> None:
    client, peer = await _pair(pki, server)
    assert peer.identity == pki.agent_uri
    assert peer.peer.address[0] == "127.0.0.1"
    assert peer.peer.certificate is not None
    assert client.peer.certificate is not None  # the relay's
    stream = await client.open_stream()
    assert stream.stream_id == 1  # spec 02 §9.2: the agent's first stream (ctrl) is 1
    await stream.send_all(b"ping")
    await stream.send_eof()
    remote = await peer.accept_stream()
    assert await _read_all(remote) == b"ping"
    # Our FIN did not close the other direction.
    await remote.send_all(b"pong")
    await remote.send_eof()
    assert await _read_all(stream) == b"pong"
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
    stream = await client.open_stream()
    await stream.send_all(b"x")
    remote = await peer.accept_stream()
    assert await remote.receive_some() == b"x"
    sent = 0
    chunk = b"y" * 65536

    async def flood() -> None:
        nonlocal sent
        while True:
            await stream.send_all(chunk)
            sent += len(chunk)

    task = asyncio.create_task(flood())
    await asyncio.sleep(0.5)
    assert not task.done()
    # Nothing was read, so no credit came back: one window is all that left.
    assert sent <= INITIAL_STREAM_WINDOW, (
        f"writer got {sent} bytes out to a reader that reads nothing"
    )
    assert stream.unsent_bytes == INITIAL_STREAM_WINDOW
    assert client._protocol.write_buffer_size() < tcp_module.WRITE_BUFFER_HIGH
    assert remote.statistics().buffered <= INITIAL_STREAM_WINDOW  # bounded by the window
    # Reading releases the writer; a slow reader never buffers past its window.
    before = sent
    received = 0
    while received < 4 << 20:
        received += len(await remote.receive_some(16384))
        assert remote.statistics().buffered <= peer._core.receive_window(remote.stream_id)
    assert sent > before
    task.cancel()
    client.close()


async def test_aclose_lets_a_still_sending_peer_finish(pki: Pki, server: Server) -> None:
    client, peer = await _pair(pki, server)
    stream = await client.open_stream()
    await stream.send_all(b"hi")
    remote = await peer.accept_stream()
    await stream.aclose()  # FIN, and stop reading
    assert await _read_all(remote) == b"hi"
    # The peer keeps writing well past one window: discarded, credited, no hang.
    async with asyncio.timeout(10):
        await remote.send_all(b"z" * (2 << 20))
        await remote.send_eof()
    await asyncio.sleep(0.1)
    assert stream.stream_id not in client._streams
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
    assert await _read_all(first) == b"hi"
    assert await _read_all(streams[0]) == b""
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
    stream = await client.open_stream()
    await stream.send_all(b"x")
    remote = await peer.accept_stream()
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
    state = await _serve(pki)
    client, _peer = await _pair(pki, state)
    assert state.handle is not None
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
            f"(receive window {peer._core.receive_window(remote.stream_id) >> 10} KiB)"
        )
    client.close()


async def test_window_overrun_ends_the_session_with_go_away() -> None:
    """A peer that sends past its window gets GO_AWAY(protocol error) and is cut off."""
    conns: asyncio.Queue[TcpConn] = asyncio.Queue()
    handle = await tcp_module.serve_yamux_plaintext("127.0.0.1", 0, on_connection=conns.put_nowait)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", handle.address[1])
        syn = bytes.fromhex("00 01 0001 00000001 00000000")
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


async def _refused_at_connect(tls: QuicTlsConfig, port: int) -> str:
    """Connect with ``tls``; the server must end it. Returns what the client saw."""
    try:
        conn = await connect_tcp("127.0.0.1", port, tls, handshake_timeout=5)
    except BrokenResourceError as exc:
        return str(exc)
    # TLS 1.3: the client finishes its handshake before the server's verdict.
    async with asyncio.timeout(5):
        await conn.wait_closed()
    assert not conn.close_reason.startswith("closed locally")
    return conn.close_reason


async def test_refused_clients(pki: Pki, server: Server, tmp_path: Path) -> None:
    other_ca = create_ca("Other CA")
    other_agent, _ = issue_agent(other_ca, tenant="acme")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    expired, _ = issue_agent(
        pki.ca, tenant="acme", not_before=past, not_after=past + dt.timedelta(days=1)
    )
    no_uri, _ = issue_agent(pki.ca, tenant="acme", uri_sans=())
    cases = {
        "other CA": pki.client("other", other_agent),
        "expired": pki.client("expired", expired),
        "no URI SAN": pki.client("nouri", no_uri),
    }
    for name, tls in cases.items():
        seen = await _refused_at_connect(tls, server.port)
        assert seen, name
    # No certificate at all, from a plain ssl client.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca_file)
    ctx.set_alpn_protocols(["orp/1"])
    outcome = await _raw_tls_exchange(server.port, ctx)
    assert outcome != "data"
    reasons = await server.next_refusal(4)
    joined = "\n".join(reasons)
    assert "certificate verify failed" in reasons[0]
    assert "expired" in reasons[1]
    assert reasons[2] == "no URI SAN"
    assert "CERTIFICATE" in reasons[3].upper(), joined
    assert server.conns.empty()
    # ... and a good client still gets in.
    client, peer = await _pair(pki, server)
    assert peer.identity == pki.agent_uri
    client.close()


async def _raw_tls_exchange(port: int, ctx: ssl.SSLContext) -> str:
    """Handshake with ``ctx``, send a yamux SYN, report what came back."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost"), 5
        )
    except (OSError, ssl.SSLError) as exc:
        return f"handshake failed: {exc}"
    try:
        writer.write(bytes.fromhex("00 01 0001 00000001 00000000"))
        data = await asyncio.wait_for(reader.read(100), 5)
        return "data" if data else "eof"
    except (OSError, ssl.SSLError) as exc:
        return f"error: {exc}"
    finally:
        writer.close()


async def test_alpn_none_is_accepted_other_only_is_refused(pki: Pki, server: Server) -> None:
    def ctx(alpn: list[str] | None) -> ssl.SSLContext:
        c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        c.load_verify_locations(pki.ca_file)
        c.load_cert_chain(pki.agent.cert_file, pki.agent.key_file)
        if alpn is not None:
            c.set_alpn_protocols(alpn)
        return c

    # No ALPN at all: accepted (spec 02 §9.1); the ACK of our SYN comes back.
    assert await _raw_tls_exchange(server.port, ctx(None)) == "data"
    async with asyncio.timeout(5):
        conn = await server.conns.get()
    assert conn.identity == pki.agent_uri
    # Only other protocols: refused during the handshake.
    outcome = await _raw_tls_exchange(server.port, ctx(["h2", "http/1.1"]))
    assert outcome.startswith("handshake failed"), outcome
    assert "NO APPLICATION PROTOCOL" in outcome.upper()
    reasons = await server.next_refusal(1)
    assert "offered ALPN 'h2', 'http/1.1'" in reasons[0]
    # orp/1 among others: fine.
    assert await _raw_tls_exchange(server.port, ctx(["h2", "orp/1"])) == "data"


async def test_port_scans_garbage_and_stalls_do_not_stop_the_listener(pki: Pki) -> None:
    state = await _serve(pki, handshake_timeout=1.0)
    assert state.handle is not None
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
        reasons = await state.next_refusal(7)
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
        state.handle.close()
        await state.handle.wait_closed()


# --------------------------------------------------------------------------- ClientHello parser


def _client_hello(alpn: list[str] | None) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_client_hello_alpn_parser() -> None:
    hello = _client_hello(["orp/1", "h2"])
    assert client_hello_alpn(hello) == [b"orp/1", b"h2"]
    assert client_hello_alpn(_client_hello(None)) is None
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
        server = await _serve(pki)
        assert server.handle is not None
        try:
            client, peer = await _pair(pki, server)
            stream = await client.open_stream()
            data = os.urandom(4 << 20)

            async def write() -> None:
                await stream.send_all(data)
                await stream.send_eof()

            writer = asyncio.create_task(write())
            remote = await peer.accept_stream()
            assert await _read_all(remote) == data
            await writer
            await remote.send_all(b"pong")
            await remote.send_eof()
            assert await _read_all(stream) == b"pong"
            client.close()
        finally:
            server.handle.close()
            await server.handle.wait_closed()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(main(), 30))
