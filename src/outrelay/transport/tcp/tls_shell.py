"""Socket I/O and the TLS pump of one TCP connection (stdlib ``ssl`` over memory BIOs).

Not asyncio's ``start_tls``, so that the server can read the ClientHello
first (:mod:`outrelay.transport.tcp.client_hello`). The protocol drives the
handshake, decrypts into :class:`~outrelay.transport.tcp.connection.TcpConn`
and encrypts what it writes. Only this module and
:mod:`outrelay.transport.tcp.endpoints` touch ``ssl`` and socket errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Any, cast

from cryptography import x509

from outrelay.transport.addresses import fold_address
from outrelay.transport.base import PeerInfo
from outrelay.transport.tcp.client_hello import IncompleteClientHello, client_hello_alpn
from outrelay.transport.tcp.connection import TcpConn
from outrelay.transport.tcp.settings import (
    CLOSE_TIMEOUT,
    KEEPALIVE_COUNT,
    KEEPALIVE_IDLE,
    KEEPALIVE_INTERVAL,
    MAX_CLIENT_HELLO,
    TLS_READ_SIZE,
    WRITE_BUFFER_HIGH,
    WRITE_BUFFER_LOW,
)
from outrelay.transport.tls import ALPN
from outrelay.transport.yamux import YamuxConfig

__all__ = ["HandshakeRefused", "YamuxProtocol"]

_ALPN = ALPN.encode()
_ALERT_NO_APPLICATION_PROTOCOL = bytes.fromhex("15030300020278")
"""A plaintext fatal TLS alert 120, what Go's server sends for an ALPN mismatch."""


class HandshakeRefused(Exception):
    pass


class YamuxProtocol(asyncio.Protocol):
    """Socket I/O, the TLS pump and the handshake for one :class:`TcpConn`."""

    def __init__(
        self,
        *,
        tls: ssl.SSLContext | None,
        server_side: bool,
        server_hostname: str | None = None,
        config: YamuxConfig | None = None,
        on_made: Callable[[YamuxProtocol], None] | None = None,
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
            self.address = fold_address(peer)
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
                self._fail_handshake(HandshakeRefused(f"client offered ALPN {names}, not {ALPN!r}"))
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
        if self._started and not self.conn.terminated:
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
