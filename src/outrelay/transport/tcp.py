"""TCP fallback backend of the transport interface: TLS 1.3 + yamux.

Spec 01 "TCP fallback", spec 02 §9 and spec 03 §2.2: TLS 1.3 on TCP with
ALPN ``orp/1`` and the same certificates as QUIC, then a hashicorp yamux
session (:mod:`outrelay.transport.yamux`), the dialler being the yamux client.
Keep-alive is off on the wire, as the reference configures it.

Layers, all driven by asyncio callbacks on one :class:`asyncio.Protocol`:

* **TCP**: ``loop.create_connection``/``create_server``. SO_KEEPALIVE is on so
  the kernel finds a silently dead peer (ours: the wire is unchanged). A
  socket error or EOF breaks every stream with :class:`BrokenResourceError`.
* **TLS**: stdlib ``ssl`` over memory BIOs, not asyncio's ``start_tls``, so
  the server can read the ClientHello first: a client offering ALPN without
  ``orp/1`` gets a ``no_application_protocol`` alert, one offering no ALPN is
  accepted (spec 02 §9.1, as Go's crypto/tls does). The server requires a
  client certificate (OpenSSL checks chain, dates and EKU against the CA)
  and then calls ``verify_client`` for the identity (first URI SAN), as
  :mod:`outrelay.transport.quic` does.
* **yamux**: the sans-IO core; this module only moves its bytes and events.

Backpressure both ways (DESIGN.md):

* **Receiving**: a stream buffers at most its yamux window; credit goes back
  when the application reads (``receive_some``), so a slow reader stalls its
  writer, not the connection.
* **Sending**: ``send_all`` waits while the peer's window for the stream is
  used up, and while the socket's write buffer is over
  :data:`WRITE_BUFFER_HIGH`. A peer that stops reading the socket while we
  still owe it control frames is cut off at :data:`WRITE_BUFFER_MAX`.

Server robustness (spec 02 §9.3 [REC]): every accepted socket gets its own
task that waits for the TLS handshake at most :data:`HANDSHAKE_TIMEOUT` and
then verifies the client; failures (port scans, garbage, no or bad
certificates, stalled clients) are reported to ``on_refused`` and never
touch the accept loop. At most :data:`MAX_TLS_HANDSHAKES` handshakes run at
once, :data:`MAX_TLS_HANDSHAKES_PER_SOURCE` from one IP address; a socket
beyond either cap is closed as soon as it is accepted, before any TLS state
exists for it.

Only this module touches ``ssl`` and socket errors for the TCP path; they
come out as :mod:`outrelay.transport.base` errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from cryptography import x509

from outrelay.transport._chunks import take_chunks
from outrelay.transport.admission import HalfOpen
from outrelay.transport.base import (
    BrokenResourceError,
    BusyResourceError,
    CertificateError,
    ClosedResourceError,
    Connection,
    PeerInfo,
    SendClosedError,
    Stream,
)
from outrelay.transport.quic import ALPN, QuicTlsConfig, _fold_address
from outrelay.transport.yamux import (
    ConnectionEnded,
    DataReceived,
    GoAwayCode,
    GoAwayReceived,
    PingAcknowledged,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
    YamuxConfig,
    YamuxError,
    YamuxSession,
    YamuxStatistics,
)

if TYPE_CHECKING:
    VerifyClient = Callable[[x509.Certificate | None, tuple[x509.Certificate, ...]], str]

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "MAX_TLS_HANDSHAKES",
    "MAX_TLS_HANDSHAKES_PER_SOURCE",
    "SEND_CHUNK",
    "WRITE_BUFFER_HIGH",
    "WRITE_BUFFER_MAX",
    "IncompleteClientHello",
    "TcpConn",
    "TcpServerHandle",
    "TcpStream",
    "client_hello_alpn",
    "connect_tcp",
    "connect_yamux_plaintext",
    "serve_tcp",
    "serve_yamux_plaintext",
]

log = logging.getLogger("outrelay.transport.tcp")

HANDSHAKE_TIMEOUT = 10.0
"""Spec 02 §9.3 [REC]: TCP connect plus TLS handshake, each side. On the
server, a socket whose handshake has not completed by then is aborted."""
MAX_TLS_HANDSHAKES = 256
"""Server: TLS handshakes in progress at once, all sources together. Each one
holds a socket, an SSLObject with its BIOs and a task (~30-60 KiB) for up to
:data:`HANDSHAKE_TIMEOUT`; 256 bound that to ~15 MiB and a few hundred file
descriptors, while a handshake on a live link takes milliseconds, so agents
reconnecting after a restart do not come near it. Over it, a new socket is
closed at once (the client's reconnect loop tries again)."""
MAX_TLS_HANDSHAKES_PER_SOURCE = 32
"""Server: TLS handshakes in progress from one IP address: a host that opens
sockets and stalls them can take an eighth of :data:`MAX_TLS_HANDSHAKES`,
never all of it."""
CLOSE_TIMEOUT = 5.0
"""After ``close()``, give the socket this long to flush, then abort it."""
SEND_CHUNK = 128 * 1024
"""Largest DATA frame we write at once; smaller frames interleave streams
more fairly, larger ones cost less Python per byte."""
WRITE_BUFFER_HIGH = 1 << 20
"""Socket write buffer above which ``send_all`` waits (asyncio pause_writing)."""
WRITE_BUFFER_LOW = 256 * 1024
WRITE_BUFFER_MAX = 16 << 20
"""Hard cap: over this, the peer is not reading at all; drop the connection."""
TLS_READ_SIZE = 256 * 1024
MAX_CLIENT_HELLO = 64 * 1024
"""Bytes the server reads looking for the ClientHello's ALPN before giving
the handshake to OpenSSL regardless (real ClientHellos are under 2 KiB)."""
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 15, 5, 3
"""TCP keep-alive: a peer silent for 15 s is probed 3 times 5 s apart."""
_ALPN = ALPN.encode()
_ALERT_NO_APPLICATION_PROTOCOL = bytes.fromhex("15030300020278")
"""A plaintext fatal TLS alert 120, what Go's server sends for an ALPN mismatch."""


# --------------------------------------------------------------------------- streams


class TcpStream(Stream):
    """One yamux stream with bounded buffers both ways."""

    def __init__(self, conn: TcpConn, stream_id: int) -> None:
        self.stream_id = stream_id
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._eof_received = False
        self._reset_reason: str | None = None
        self._reset_code: int | None = None
        self._data_ready = asyncio.Event()
        self._send_ready = asyncio.Event()
        self._reading = False
        self._writing = False
        self._eof_sent = False
        self._closed = False
        self._discarding = False

    # -- events from the connection ---------------------------------------------

    def _on_data(self, data: bytes) -> None:
        if self._discarding or self._closed:
            self._conn._core.acknowledge_received(self.stream_id, len(data))
            return
        self._chunks.append(data)
        self._buffered += len(data)
        self._data_ready.set()

    def _on_eof(self) -> None:
        self._eof_received = True
        self._data_ready.set()

    def _on_reset(self, reason: str, code: int = 0) -> None:
        self._reset_reason = reason
        self._reset_code = code
        self._wake()

    def _wake(self) -> None:
        self._data_ready.set()
        self._send_ready.set()

    # -- reading ------------------------------------------------------------------

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        if self._reading:
            raise BusyResourceError("another task is reading this stream")
        self._reading = True
        try:
            while not self._chunks:
                if self._closed:
                    raise ClosedResourceError("stream closed")
                if self._reset_reason is not None:
                    raise BrokenResourceError(f"stream {self._reset_reason}", code=self._reset_code)
                if self._eof_received:
                    return b""
                self._conn._raise_if_terminated()
                self._data_ready.clear()
                await self._data_ready.wait()
            chunk = take_chunks(self._chunks, max_bytes)
            self._buffered -= len(chunk)
            self._conn._consumed(self.stream_id, len(chunk))
            return chunk
        finally:
            self._reading = False

    # -- writing ------------------------------------------------------------------

    @property
    def unsent_bytes(self) -> int:
        """Bytes sent that the peer has not credited back (read) yet."""
        return self._conn._core.unacknowledged_bytes(self.stream_id)

    def _check_writable(self) -> None:
        if self._closed:
            raise ClosedResourceError("stream closed")
        if self._eof_sent:
            raise SendClosedError("stream already closed for sending")
        if self._reset_reason is not None:
            raise BrokenResourceError(f"stream {self._reset_reason}", code=self._reset_code)
        self._conn._raise_if_terminated()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._writing:
            raise BusyResourceError("another task is writing this stream")
        self._writing = True
        try:
            view = memoryview(data).cast("B")
            core = self._conn._core
            since_yield = 0
            while True:
                self._check_writable()
                if not view:
                    return
                if not self._conn._writable.is_set():
                    await self._conn._writable.wait()
                    continue
                if core.send_window(self.stream_id) == 0:
                    self._send_ready.clear()
                    await self._send_ready.wait()
                    continue
                n = core.send_data(self.stream_id, view[:SEND_CHUNK])
                self._conn._flush()
                view = view[n:]
                since_yield += n
                if since_yield >= WRITE_BUFFER_HIGH and view:
                    # A fast socket never pauses us; let other tasks run.
                    since_yield = 0
                    await asyncio.sleep(0)
        except YamuxError as exc:  # the stream vanished between checks
            raise BrokenResourceError(f"stream {self.stream_id} is gone: {exc}") from exc
        finally:
            self._writing = False

    async def send_eof(self) -> None:
        if self._eof_sent or self._closed or self._reset_reason is not None:
            return
        self._eof_sent = True
        if self._conn._terminated:
            return
        with contextlib.suppress(YamuxError):
            self._conn._core.end_stream(self.stream_id)
        self._send_ready.set()
        self._conn._flush()
        self._conn._maybe_forget(self)

    def abort(self, error_code: int = 0) -> None:
        """Reset both directions (yamux RST, ``error_code`` in its length field)."""
        if self._closed:
            return
        self._closed = True
        if not self._conn._terminated:
            self._conn._core.reset_stream(self.stream_id, error_code)
            self._conn._flush()
        self._release()
        self._conn._streams.pop(self.stream_id, None)
        self._conn._open_ready.set()

    async def aclose(self) -> None:
        """FIN if not yet sent; then stop reading.

        yamux has no STOP_SENDING: if the peer is still sending, what it sends
        is discarded and credited back at once, so its writer finishes
        instead of hanging, until its FIN ends the stream.
        """
        if self._closed:
            return
        await self.send_eof()
        self._closed = True
        unread = self._buffered
        self._release()
        conn = self._conn
        if conn._core.stream_state(self.stream_id) is None or conn._terminated:
            conn._streams.pop(self.stream_id, None)
            return
        self._discarding = True
        conn._consumed(self.stream_id, unread)

    def _release(self) -> None:
        self._chunks.clear()
        self._buffered = 0
        self._wake()


# --------------------------------------------------------------------------- connection


class TcpConn(Connection):
    """A :class:`Connection` over one TLS (or plaintext) yamux session."""

    def __init__(self, protocol: _YamuxProtocol, *, client: bool, config: YamuxConfig | None):
        self._protocol = protocol
        self._core = YamuxSession(client=client, config=config)
        self._streams: dict[int, TcpStream] = {}
        self._accept_queue: asyncio.Queue[TcpStream | None] = asyncio.Queue()
        self._open_lock = asyncio.Lock()
        self._open_ready = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._terminated = False
        self._local_close = False
        self._close_reason = ""
        self._closed_event = asyncio.Event()
        self._peer = PeerInfo(address=("", 0))
        self._pings: dict[int, asyncio.Future[None]] = {}
        self._ping_seq = 0
        self._on_closed: list[Callable[[], None]] = []
        self.identity: str | None = None
        """Server side: the verified client identity (first URI SAN)."""

    # -- Connection API -----------------------------------------------------------

    @property
    def peer(self) -> PeerInfo:
        return self._peer

    @property
    def is_closed(self) -> bool:
        return self._terminated

    @property
    def close_reason(self) -> str:
        return self._close_reason

    async def open_stream(self) -> TcpStream:
        """Open a stream (SYN). Waits while 256 of our SYNs await the peer's ACK.

        Raises:
            BrokenResourceError: the connection died, or the peer sent GO_AWAY.
            ClosedResourceError: we closed the connection.
        """
        async with self._open_lock:
            core = self._core
            while True:
                self._raise_if_terminated()
                if core.remote_go_away is not None:
                    raise BrokenResourceError("peer sent GO_AWAY: it accepts no new streams")
                if core.can_open_stream:
                    break
                self._open_ready.clear()
                await self._open_ready.wait()
            try:
                stream_id = core.open_stream()
            except YamuxError as exc:
                raise BrokenResourceError(str(exc)) from exc
            stream = TcpStream(self, stream_id)
            self._streams[stream_id] = stream
            self._flush()
            return stream

    async def accept_stream(self) -> TcpStream:
        stream = await self._accept_queue.get()
        if stream is None:
            self._accept_queue.put_nowait(None)  # wake the next waiter too
            self._raise_if_terminated()
            raise BrokenResourceError("connection closed")
        return stream

    def close(self, error_code: int = 0, reason: str = "") -> None:
        """Send GO_AWAY (normal), TLS close_notify, and close the socket.

        yamux has no application close code; ``error_code`` and ``reason`` only
        go into :attr:`close_reason`.
        """
        if self._terminated:
            return
        if not self._core.terminated:
            self._core.go_away(GoAwayCode.NORMAL)
        self._flush()
        detail = f"code {error_code}" + (f": {reason}" if reason else "")
        self._terminate(f"closed locally ({detail})", local=True)
        self._protocol.close_transport()

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    # -- beyond the interface ------------------------------------------------------

    async def ping(self) -> float:
        """Send a yamux PING and return the round-trip time in seconds.

        Waits for the reply as long as the connection lives; bound it with
        ``asyncio.timeout``.

        Raises:
            BrokenResourceError / ClosedResourceError: the connection ended.
        """
        self._raise_if_terminated()
        loop = asyncio.get_running_loop()
        self._ping_seq = (self._ping_seq + 1) & 0xFFFF_FFFF
        opaque = self._ping_seq
        waiter: asyncio.Future[None] = loop.create_future()
        self._pings[opaque] = waiter
        start = loop.time()
        try:
            self._core.ping(opaque)
            self._flush()
            await waiter
        finally:
            self._pings.pop(opaque, None)
        self._raise_if_terminated()
        return loop.time() - start

    def go_away(self) -> None:
        """Tell the peer to open no more streams (GO_AWAY normal); ours go on."""
        if not self._terminated:
            self._core.go_away(GoAwayCode.NORMAL)
            self._flush()

    def statistics(self) -> YamuxStatistics:
        return self._core.statistics()

    # -- internals ----------------------------------------------------------------

    def _raise_if_terminated(self) -> None:
        if self._terminated:
            if self._local_close:
                raise ClosedResourceError(self._close_reason)
            raise BrokenResourceError(f"connection lost: {self._close_reason}")

    def _flush(self) -> None:
        data = self._core.data_to_send()
        if data:
            self._protocol.write(data)
            if self._protocol.write_buffer_size() > WRITE_BUFFER_MAX:
                self._fail(f"peer is not reading: over {WRITE_BUFFER_MAX} bytes unsent")

    def _consumed(self, stream_id: int, n: int) -> None:
        if n and not self._terminated:
            self._core.acknowledge_received(stream_id, n)
            self._flush()

    def _maybe_forget(self, stream: TcpStream) -> None:
        if self._core.stream_state(stream.stream_id) is None:
            self._streams.pop(stream.stream_id, None)
            self._open_ready.set()

    def _feed(self, data: bytes) -> None:
        if self._terminated:
            return
        try:
            self._core.receive_data(data)
        except YamuxError as exc:
            self._pump()
            self._fail(f"yamux protocol error: {exc}")
            return
        self._pump()

    def _pump(self) -> None:
        core = self._core
        streams = self._streams
        while (event := core.next_event()) is not None:
            if isinstance(event, DataReceived):
                stream = streams.get(event.stream_id)
                if stream is None:
                    core.acknowledge_received(event.stream_id, len(event.data))
                else:
                    stream._on_data(event.data)
            elif isinstance(event, WindowUpdated):
                if (stream := streams.get(event.stream_id)) is not None:
                    stream._send_ready.set()
            elif isinstance(event, StreamOpened):
                stream = TcpStream(self, event.stream_id)
                streams[event.stream_id] = stream
                self._accept_queue.put_nowait(stream)
            elif isinstance(event, StreamEnded):
                if (stream := streams.get(event.stream_id)) is not None:
                    stream._on_eof()
                    self._maybe_forget(stream)
            elif isinstance(event, StreamReset):
                if (stream := streams.pop(event.stream_id, None)) is not None:
                    stream._on_reset(event.reason, event.code)
            elif isinstance(event, PingAcknowledged):
                waiter = self._pings.get(event.opaque)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            elif isinstance(event, GoAwayReceived):
                if event.error_code != GoAwayCode.NORMAL:
                    self._fail(f"peer sent GO_AWAY ({_go_away_name(event.error_code)})")
            elif isinstance(event, ConnectionEnded):
                detail = self._protocol.eof_detail
                if not event.clean:
                    detail += " in the middle of a yamux frame"
                self._fail(f"peer closed the connection ({detail})")
            # StreamAcknowledged, PingReceived: nothing to do beyond waking openers.
        self._open_ready.set()
        self._flush()

    def _fail(self, reason: str) -> None:
        if self._terminated:
            return
        log.debug("yamux connection failed: %s", reason)
        self._terminate(reason, local=False)
        self._protocol.close_transport()

    def _on_connection_lost(self, exc: BaseException | None) -> None:
        if not self._terminated:
            self._terminate(f"connection lost ({exc or 'socket closed'})", local=False)

    def _terminate(self, reason: str, *, local: bool) -> None:
        if self._terminated:
            return
        self._terminated = True
        self._local_close = local
        self._close_reason = reason
        for stream in list(self._streams.values()):
            stream._wake()
        self._open_ready.set()
        self._writable.set()
        self._accept_queue.put_nowait(None)
        for waiter in self._pings.values():
            if not waiter.done():
                waiter.set_result(None)
        self._closed_event.set()
        callbacks, self._on_closed = self._on_closed, []
        for callback in callbacks:
            callback()


def _go_away_name(code: int) -> str:
    try:
        return f"{code}, {GoAwayCode(code).name.lower().replace('_', ' ')}"
    except ValueError:
        return str(code)


# --------------------------------------------------------------------------- protocol


class _HandshakeRefused(Exception):
    pass


class _YamuxProtocol(asyncio.Protocol):
    """Socket I/O, the TLS pump and the handshake for one :class:`TcpConn`."""

    def __init__(
        self,
        *,
        tls: ssl.SSLContext | None,
        server_side: bool,
        server_hostname: str | None = None,
        config: YamuxConfig | None = None,
        on_made: Callable[[_YamuxProtocol], None] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.conn = TcpConn(self, client=not server_side, config=config)
        self.handshake: asyncio.Future[None] = self._loop.create_future()
        # Nobody may be left to await a failed handshake (server closed).
        self.handshake.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.address: tuple[str, int] = ("", 0)
        self.eof_detail = "EOF"
        self._server_side = server_side
        self._on_made = on_made
        self._started = False
        self._close_timer: asyncio.TimerHandle | None = None
        self._sslobj: ssl.SSLObject | None = None
        self._in_bio = ssl.MemoryBIO()
        self._out_bio = ssl.MemoryBIO()
        self._hello: bytearray | None = None
        if tls is not None:
            self._sslobj = tls.wrap_bio(
                self._in_bio,
                self._out_bio,
                server_side=server_side,
                server_hostname=None if server_side else server_hostname,
            )
            if server_side:
                self._hello = bytearray()

    # -- asyncio callbacks --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transports implement asyncio.Transport without subclassing it.
        self.transport = tr = cast("asyncio.Transport", transport)
        peer = tr.get_extra_info("peername")
        if peer:
            self.address = _fold_address(peer)
        _tune_socket(tr)
        tr.set_write_buffer_limits(high=WRITE_BUFFER_HIGH, low=WRITE_BUFFER_LOW)
        if self._sslobj is None:
            tr.pause_reading()  # until start_session()
            self.handshake.set_result(None)
        elif not self._server_side:
            self._advance_handshake()  # sends the ClientHello
        if self._on_made is not None:
            self._on_made(self)

    def data_received(self, data: bytes) -> None:
        if self._sslobj is None:
            self.conn._feed(data)
            return
        if self._hello is not None:
            self._hello += data
            try:
                offered = client_hello_alpn(self._hello)
            except IncompleteClientHello:
                if len(self._hello) <= MAX_CLIENT_HELLO:
                    return
                offered = None
            except ValueError:
                offered = None  # not TLS: OpenSSL refuses it with a proper error
            data, self._hello = bytes(self._hello), None
            if offered is not None and _ALPN not in offered:
                names = ", ".join(repr(p.decode("ascii", "replace")) for p in offered)
                if self.transport is not None:
                    self.transport.write(_ALERT_NO_APPLICATION_PROTOCOL)
                self._fail_handshake(
                    _HandshakeRefused(f"client offered ALPN {names}, not {ALPN!r}")
                )
                return
        self._in_bio.write(data)
        if not self.handshake.done():
            self._advance_handshake()
        elif self._started:
            self._read_tls()

    def eof_received(self) -> bool | None:
        if self._sslobj is None:
            self.conn._feed(b"")
            return False
        self._in_bio.write_eof()
        if not self.handshake.done():
            self._fail_handshake(ConnectionResetError("peer closed during the TLS handshake"))
        elif self._started:
            self._read_tls()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if not self.handshake.done():
            self.handshake.set_exception(
                ConnectionResetError(f"connection lost during the TLS handshake ({exc or 'EOF'})")
            )
        self.conn._on_connection_lost(exc)

    def pause_writing(self) -> None:
        self.conn._writable.clear()

    def resume_writing(self) -> None:
        self.conn._writable.set()

    # -- TLS pump -----------------------------------------------------------------

    def _advance_handshake(self) -> None:
        assert self._sslobj is not None
        try:
            self._sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush_tls()
            return
        except (ssl.SSLError, ssl.CertificateError, OSError, ValueError) as exc:
            self._flush_tls()  # the alert
            self._fail_handshake(exc)
            return
        self._flush_tls()
        if self.transport is not None:
            # Hold application data until start_session(): the server admits
            # the client first, and nothing piles up in the BIO meanwhile.
            self.transport.pause_reading()
        self.handshake.set_result(None)

    def _fail_handshake(self, exc: BaseException) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def _read_tls(self) -> None:
        assert self._sslobj is not None
        chunks: list[bytes] = []
        error: str | None = None
        eof = False
        read = self._sslobj.read
        while True:
            try:
                chunk = read(TLS_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                eof = True
                self.eof_detail = "TLS close_notify"
                break
            except ssl.SSLEOFError:
                eof = True
                self.eof_detail = "TCP EOF without TLS close_notify"
                break
            except ssl.SSLError as exc:
                error = f"TLS error: {exc.reason or exc}"
                break
            if not chunk:  # what SSLObject.read returns after close_notify
                eof = True
                self.eof_detail = "TLS close_notify"
                break
            chunks.append(chunk)
        self._flush_tls()  # post-handshake messages, key updates
        if chunks:
            self.conn._feed(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if error is not None:
            self.conn._fail(error)
        elif eof:
            self.conn._feed(b"")

    def _flush_tls(self) -> None:
        out = self._out_bio.read()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    # -- used by TcpConn and the dial/serve functions ------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._sslobj is None:
            transport.write(data)
            return
        try:
            self._sslobj.write(data)
        except ssl.SSLError as exc:
            self.conn._fail(f"TLS write failed: {exc.reason or exc}")
            return
        self._flush_tls()

    def write_buffer_size(self) -> int:
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def start_session(self) -> None:
        """Let yamux bytes flow (after the handshake and, server side, admission)."""
        self._started = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.resume_reading()
        if self._sslobj is not None:
            self._read_tls()

    def peer_info(self) -> PeerInfo:
        leaf: x509.Certificate | None = None
        chain: tuple[x509.Certificate, ...] = ()
        if self._sslobj is not None:
            der = self._sslobj.getpeercert(binary_form=True)
            if der:
                leaf = x509.load_der_x509_certificate(der)
            chain = _intermediates(self._sslobj)
        return PeerInfo(address=self.address, certificate=leaf, chain=chain)

    def close_transport(self) -> None:
        """close_notify, flush, close; abort if the flush takes too long."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._sslobj is not None and self.handshake.done() and not self.handshake.exception():
            with contextlib.suppress(ssl.SSLError, ValueError):
                self._sslobj.unwrap()
            self._flush_tls()
        transport.close()
        self._close_timer = self._loop.call_later(CLOSE_TIMEOUT, transport.abort)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def shutdown(self) -> None:
        """Close gracefully once the session runs, abort before."""
        if self._started and not self.conn._terminated:
            self.conn.close(0, "")
        else:
            self.abort()


def _tune_socket(transport: asyncio.Transport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


def _intermediates(sslobj: ssl.SSLObject) -> tuple[x509.Certificate, ...]:
    """The certificates the peer sent after its leaf (Python >= 3.10; public in 3.13)."""
    getter: Any = getattr(sslobj, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(sslobj, "_sslobj", None), "get_unverified_chain", None)
    if getter is None:
        return ()
    try:
        items = list(getter() or ())
        ders = [item if isinstance(item, bytes) else item.public_bytes(2) for item in items[1:]]
        return tuple(x509.load_der_x509_certificate(der) for der in ders)  # 2: ENCODING_DER
    except Exception:  # an optional extra; never fail the connection over it
        return ()


# --------------------------------------------------------------------------- ClientHello


class IncompleteClientHello(Exception):
    """More bytes are needed to see the whole ClientHello."""


def client_hello_alpn(data: bytes | bytearray) -> list[bytes] | None:
    """Return the ALPN protocols a TLS ClientHello offers (``None``: no ALPN extension).

    ``data`` is what the client sent first: TLS records carrying the
    ClientHello, possibly split across several records.

    Raises:
        IncompleteClientHello: ``data`` stops before the end of the ClientHello.
        ValueError: this is not a TLS ClientHello.
    """
    handshake = bytearray()
    pos = 0
    while True:
        if len(handshake) >= 4 and len(handshake) >= 4 + int.from_bytes(handshake[1:4], "big"):
            break
        if pos + 5 > len(data):
            raise IncompleteClientHello
        if data[pos] != 22:  # handshake record
            raise ValueError(f"TLS record type {data[pos]}, not handshake")
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        fragment = data[pos + 5 : pos + 5 + length]
        handshake += fragment
        pos += 5 + length
        if len(fragment) < length and len(handshake) < 4:
            raise IncompleteClientHello
        if len(fragment) < length:
            needed = 4 + int.from_bytes(handshake[1:4], "big")
            if len(handshake) < needed:
                raise IncompleteClientHello
    if handshake[0] != 1:
        raise ValueError(f"handshake message type {handshake[0]}, not ClientHello")
    body = memoryview(handshake)[4 : 4 + int.from_bytes(handshake[1:4], "big")]
    reader = _Reader(body)
    reader.skip(2 + 32)  # legacy_version, random
    reader.skip(reader.uint(1))  # legacy_session_id
    reader.skip(reader.uint(2))  # cipher_suites
    reader.skip(reader.uint(1))  # legacy_compression_methods
    if reader.at_end():
        return None
    extensions = _Reader(reader.take(reader.uint(2)))
    while not extensions.at_end():
        ext_type = extensions.uint(2)
        ext = extensions.take(extensions.uint(2))
        if ext_type == 16:  # application_layer_protocol_negotiation
            names = _Reader(_Reader(ext).take_prefixed(2))
            protocols = []
            while not names.at_end():
                protocols.append(bytes(names.take(names.uint(1))))
            return protocols
    return None


class _Reader:
    def __init__(self, data: memoryview | bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def take(self, n: int) -> memoryview:
        if self._pos + n > len(self._data):
            raise ValueError("truncated ClientHello")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def take_prefixed(self, size: int) -> memoryview:
        return self.take(self.uint(size))

    def skip(self, n: int) -> None:
        self.take(n)

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def at_end(self) -> bool:
        return self._pos >= len(self._data)


# --------------------------------------------------------------------------- contexts


def _client_context(tls: QuicTlsConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies chain and host name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    ctx.load_verify_locations(cafile=tls.ca_file)
    ctx.set_alpn_protocols([ALPN])
    return ctx


def _server_context(tls: QuicTlsConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    ctx.load_verify_locations(cafile=tls.ca_file)
    ctx.verify_mode = ssl.CERT_REQUIRED  # spec 02 §9.1: required and verified
    ctx.set_alpn_protocols([ALPN])
    ctx.num_tickets = 0  # nobody resumes TLS sessions here
    return ctx


# --------------------------------------------------------------------------- dial


async def connect_tcp(
    host: str,
    port: int,
    tls: QuicTlsConfig,
    *,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    config: YamuxConfig | None = None,
) -> TcpConn:
    """Dial a relay over TCP, complete TLS 1.3 (ALPN ``orp/1``), start yamux as client.

    ``handshake_timeout`` bounds the TCP connect and the TLS handshake
    together (spec 03 §2.2 leaves the connect to the OS; ours is bounded).

    Raises:
        BrokenResourceError: connect, TLS handshake or the server's
            certificate check failed, or the time ran out.
        OSError, ssl.SSLError: our own certificate or key could not be loaded.
    """
    ctx = _client_context(tls)
    return await _dial(host, port, ctx, tls.server_name, handshake_timeout, config)


async def connect_yamux_plaintext(
    host: str,
    port: int,
    *,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    config: YamuxConfig | None = None,
) -> TcpConn:
    """yamux client over plain TCP, no TLS: for interop tests and trusted links only."""
    return await _dial(host, port, None, None, handshake_timeout, config)


async def _dial(
    host: str,
    port: int,
    ctx: ssl.SSLContext | None,
    server_name: str | None,
    limit: float,
    config: YamuxConfig | None,
) -> TcpConn:
    loop = asyncio.get_running_loop()
    made: list[_YamuxProtocol] = []

    def factory() -> _YamuxProtocol:
        protocol = _YamuxProtocol(
            tls=ctx, server_side=False, server_hostname=server_name, config=config
        )
        made.append(protocol)
        return protocol

    what = "TCP/TLS" if ctx is not None else "TCP"
    try:
        async with asyncio.timeout(limit):
            await loop.create_connection(factory, host, port)
            await made[0].handshake
    except TimeoutError as exc:
        for protocol in made:
            protocol.abort()
        raise BrokenResourceError(
            f"{what} connect to {host}:{port} timed out after {limit:g}s"
        ) from exc
    except ssl.SSLCertVerificationError as exc:
        for protocol in made:
            protocol.abort()
        raise CertificateError(
            f"{what} connect to {host}:{port} failed: the server's certificate does not "
            f"verify: {exc.verify_message or _describe(exc)}"
        ) from exc
    except Exception as exc:
        for protocol in made:
            protocol.abort()
        raise BrokenResourceError(
            f"{what} connect to {host}:{port} failed: {_describe(exc)}"
        ) from exc
    except BaseException:
        for protocol in made:
            protocol.abort()
        raise
    protocol = made[0]
    protocol.conn._peer = protocol.peer_info()
    protocol.start_session()
    return protocol.conn


def _describe(exc: BaseException) -> str:
    return _SSL_SOURCE_RE.sub("", str(exc)) or type(exc).__name__


_SSL_SOURCE_RE = re.compile(r"\s*\(_ssl\.c:\d+\)")


# --------------------------------------------------------------------------- serve


class TcpServerHandle:
    """A bound TCP listener; :meth:`close` stops it and every connection."""

    def __init__(
        self,
        server: asyncio.Server,
        protocols: set[_YamuxProtocol],
        tasks: set[asyncio.Task[None]],
    ) -> None:
        self._server = server
        self._protocols = protocols
        self._tasks = tasks

    @property
    def address(self) -> tuple[str, int]:
        return _fold_address(self._server.sockets[0].getsockname())

    def close(self) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for protocol in list(self._protocols):
            protocol.shutdown()

    async def wait_closed(self) -> None:
        """Wait until every handshake task has finished (after :meth:`close`)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks))


async def serve_tcp(
    host: str,
    port: int,
    tls: QuicTlsConfig,
    *,
    verify_client: VerifyClient,
    on_connection: Callable[[TcpConn], None],
    on_refused: Callable[[tuple[str, int], str], None] | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    config: YamuxConfig | None = None,
    max_handshakes: int = MAX_TLS_HANDSHAKES,
    max_handshakes_per_source: int = MAX_TLS_HANDSHAKES_PER_SOURCE,
) -> TcpServerHandle:
    """Listen for TLS + yamux connections; hand each verified one to ``on_connection``.

    Same contract as :func:`outrelay.transport.quic.serve_quic`.

    Args:
        verify_client: called with the client's leaf and intermediates after
            OpenSSL accepted the chain; returns the identity (first URI SAN)
            or raises an exception whose ``reason`` (or str) is reported.
        on_connection: called synchronously with every admitted connection;
            ``conn.identity`` is set.
        on_refused: called with (peer address, reason) for every socket that
            does not make it: TLS failure (no or bad certificate, ALPN,
            garbage, a port scan's connect-and-close), handshake timeout, or
            ``verify_client`` refusal.
        handshake_timeout: per socket, spec 02 §9.3 [REC].
        max_handshakes: handshakes in progress at once; sockets beyond it are
            closed at once (not reported to ``on_refused``: a flood would
            turn every one into a log line).
        max_handshakes_per_source: the same, per client IP address.

    Raises:
        OSError: the address could not be bound.
    """
    ctx = _server_context(tls)
    return await _serve(
        host,
        port,
        ctx,
        verify_client,
        on_connection,
        on_refused,
        handshake_timeout,
        config,
        HalfOpen(max_handshakes, max_handshakes_per_source),
    )


async def serve_yamux_plaintext(
    host: str,
    port: int,
    *,
    on_connection: Callable[[TcpConn], None],
    config: YamuxConfig | None = None,
) -> TcpServerHandle:
    """yamux server over plain TCP, no TLS: for interop tests and trusted links only."""
    return await _serve(
        host,
        port,
        None,
        None,
        on_connection,
        None,
        HANDSHAKE_TIMEOUT,
        config,
        HalfOpen(MAX_TLS_HANDSHAKES, MAX_TLS_HANDSHAKES_PER_SOURCE),
    )


async def _serve(
    host: str,
    port: int,
    ctx: ssl.SSLContext | None,
    verify_client: VerifyClient | None,
    on_connection: Callable[[TcpConn], None],
    on_refused: Callable[[tuple[str, int], str], None] | None,
    handshake_timeout: float,
    config: YamuxConfig | None,
    half_open: HalfOpen,
) -> TcpServerHandle:
    loop = asyncio.get_running_loop()
    protocols: set[_YamuxProtocol] = set()
    tasks: set[asyncio.Task[None]] = set()
    over_cap = [0]
    """Sockets closed for the caps since the last one that fitted (for one warning per episode)."""

    def refuse(protocol: _YamuxProtocol, reason: str) -> None:
        log.debug("TCP client %s refused: %s", protocol.address, reason)
        if on_refused is not None:
            try:
                on_refused(protocol.address, reason)
            except Exception:
                log.exception("on_refused callback failed")

    async def admit(protocol: _YamuxProtocol) -> None:
        try:
            async with asyncio.timeout(handshake_timeout):
                await protocol.handshake
        except TimeoutError:
            refuse(protocol, f"TLS handshake timed out after {handshake_timeout:g}s")
            protocol.abort()
            return
        except Exception as exc:
            refuse(protocol, f"TLS handshake failed: {_describe(exc)}")
            protocol.abort()
            return
        conn = protocol.conn
        conn._peer = protocol.peer_info()
        if verify_client is not None:
            try:
                conn.identity = verify_client(conn._peer.certificate, conn._peer.chain)
            except Exception as exc:
                refuse(protocol, str(getattr(exc, "reason", "") or exc))
                conn.close(0, "")
                return
        protocol.start_session()
        if conn._terminated:
            return
        try:
            on_connection(conn)
        except Exception:
            log.exception("on_connection callback failed")
            conn.close(0, "")

    def task_done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("TCP admission task failed", exc_info=task.exception())

    def on_made(protocol: _YamuxProtocol) -> None:
        source = protocol.address[0]
        if not half_open.fits(source):
            # Before any TLS byte is read: no task, no timer, RST to the client.
            if not over_cap[0]:
                log.warning(
                    "TCP handshake cap reached: closing new sockets at once",
                    extra={
                        "attrs": {
                            "source": source,
                            "in_progress": half_open.total,
                            "from_source": half_open.of(source),
                        }
                    },
                )
            over_cap[0] += 1
            protocol.abort()
            return
        if over_cap[0]:
            log.info("TCP handshake cap: %d sockets were closed at once", over_cap[0])
            over_cap[0] = 0
        half_open.open(source)
        protocols.add(protocol)
        protocol.conn._on_closed.append(lambda: protocols.discard(protocol))
        task = loop.create_task(admit(protocol), name=f"tcp-admit {protocol.address}")
        tasks.add(task)
        task.add_done_callback(task_done)
        # The task ends right after the handshake (verification and hand-over
        # are synchronous), also when it is cancelled before it ever ran.
        task.add_done_callback(lambda _: half_open.close(source))

    def factory() -> _YamuxProtocol:
        return _YamuxProtocol(tls=ctx, server_side=True, config=config, on_made=on_made)

    server = await loop.create_server(factory, host, port)
    return TcpServerHandle(server, protocols, tasks)
