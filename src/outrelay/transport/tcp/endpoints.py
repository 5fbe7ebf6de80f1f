"""Dialling and listening on TLS + yamux over TCP, with the server's handshake caps."""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

from outrelay.transport.addresses import fold_address
from outrelay.transport.admission import HalfOpen
from outrelay.transport.base import BrokenResourceError, CertificateError
from outrelay.transport.tcp.connection import TcpConn
from outrelay.transport.tcp.settings import (
    HANDSHAKE_TIMEOUT,
    MAX_TLS_HANDSHAKES,
    MAX_TLS_HANDSHAKES_PER_SOURCE,
)
from outrelay.transport.tcp.tls_shell import YamuxProtocol
from outrelay.transport.tls import ALPN, QuicTlsConfig
from outrelay.transport.yamux import YamuxConfig

if TYPE_CHECKING:
    from cryptography import x509

    VerifyClient = Callable[[x509.Certificate | None, tuple[x509.Certificate, ...]], str]

__all__ = [
    "TcpServerHandle",
    "connect_tcp",
    "connect_yamux_plaintext",
    "serve_tcp",
    "serve_yamux_plaintext",
]

log = logging.getLogger("outrelay.transport.tcp")


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
    made: list[YamuxProtocol] = []

    def factory() -> YamuxProtocol:
        protocol = YamuxProtocol(
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


class TcpServerHandle:
    """A bound TCP listener; :meth:`close` stops it and every connection."""

    def __init__(
        self,
        server: asyncio.Server,
        protocols: set[YamuxProtocol],
        tasks: set[asyncio.Task[None]],
        contexts: list[ssl.SSLContext | None] | None = None,
    ) -> None:
        self._server = server
        self._protocols = protocols
        self._tasks = tasks
        self._contexts = contexts if contexts is not None else []

    def reload_tls(self, tls: QuicTlsConfig) -> None:
        """New handshakes use ``tls`` (certificate reload); open connections keep theirs.

        Raises:
            ssl.SSLError, OSError: the files cannot be loaded (the old context stays).
        """
        ctx = _server_context(tls)
        if self._contexts:
            self._contexts[0] = ctx
        else:
            self._contexts.append(ctx)

    @property
    def address(self) -> tuple[str, int]:
        return fold_address(self._server.sockets[0].getsockname())

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
    return await _serve(
        host,
        port,
        _server_context(tls),
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
    protocols: set[YamuxProtocol] = set()
    tasks: set[asyncio.Task[None]] = set()
    contexts = [ctx]  # [0] is replaced by TcpServerHandle.reload_tls (certificate reload)
    over_cap = [0]
    """Sockets closed for the caps since the last one that fitted (for one warning per episode)."""

    def refuse(protocol: YamuxProtocol, reason: str) -> None:
        log.debug("TCP client %s refused: %s", protocol.address, reason)
        if on_refused is not None:
            try:
                on_refused(protocol.address, reason)
            except Exception:
                log.exception("on_refused callback failed")

    async def admit(protocol: YamuxProtocol) -> None:
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
        if conn.terminated:
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

    def on_made(protocol: YamuxProtocol) -> None:
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
        protocol.conn.add_close_callback(lambda: protocols.discard(protocol))
        task = loop.create_task(admit(protocol), name=f"tcp-admit {protocol.address}")
        tasks.add(task)
        task.add_done_callback(task_done)
        # The task ends right after the handshake (verification and hand-over
        # are synchronous), also when it is cancelled before it ever ran.
        task.add_done_callback(lambda _: half_open.close(source))

    def factory() -> YamuxProtocol:
        return YamuxProtocol(tls=contexts[0], server_side=True, config=config, on_made=on_made)

    server = await loop.create_server(factory, host, port)
    return TcpServerHandle(server, protocols, tasks, contexts)
