"""The tproxy listener: REDIRECTed connections back to their service (spec 03 §6.3).

Theory of operation. The documented rule

    iptables -t nat -A OUTPUT -p tcp -d 100.64.0.0/10 -j REDIRECT --to-port 15001

rewrites every outgoing TCP connection to a VIP so that it lands on this
listener. Conntrack remembers the destination the application dialled, and
``getsockopt(SOL_IP, SO_ORIGINAL_DST)`` returns it (no capability needed; only
installing the rule needs NET_ADMIN). For each accepted connection:

1. read the original destination. On failure (no NAT entry: somebody dialled
   the listener directly, or conntrack is not loaded) warn
   ``intercept: SO_ORIGINAL_DST failed`` and close;
2. reverse-look up the address in the VIP table, ignoring the port. On a miss
   warn ``intercept: VIP lookup miss`` (peer, dst) and close with a FIN;
3. hand ``(connection, service, original destination)`` to the owner.

IPv6: a socket of family AF_INET6 is asked with ``IP6T_SO_ORIGINAL_DST`` (80 on
SOL_IPV6, an ip6tables REDIRECT) and falls back to SOL_IP for IPv4-mapped
peers of a dual-stack listener. There are no IPv6 VIPs, so an IPv6 original
destination is always a lookup miss; only IPv4-mapped ones can hit.

The accept loop is ours, not ``asyncio.start_server``'s, so that an accept
error (EMFILE, ENOBUFS, ECONNABORTED, ...) is logged as
``intercept: tproxy accept failed`` and the loop keeps going after a short
sleep ([REC] spec 03 §6.1, §11 item 7; the reference stops intercepting for
good).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from outrelay.observe import kv
from outrelay.transport import SocketStream

__all__ = [
    "ACCEPT_ERROR_PAUSE",
    "IP6T_SO_ORIGINAL_DST",
    "SO_ORIGINAL_DST",
    "OriginalDstError",
    "TproxyListener",
    "TproxyStatistics",
    "original_dst",
    "parse_sockaddr",
]

log = logging.getLogger("outrelay.agent.intercept")

SO_ORIGINAL_DST = 80
"""``linux/netfilter_ipv4.h``; level SOL_IP."""
IP6T_SO_ORIGINAL_DST = 80
"""``linux/netfilter_ipv6/ip6_tables.h``; level SOL_IPV6."""
SOL_IP = getattr(socket, "SOL_IP", 0)
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)

SOCKADDR_IN_SIZE = 16
SOCKADDR_IN6_SIZE = 28

ACCEPT_ERROR_PAUSE = 0.1
"""Seconds to wait after a failed accept before the next one: long enough not
to spin on EMFILE, short enough that service resumes quickly."""

ACCEPT_BACKLOG = 1024

Handler = Callable[[SocketStream, str, tuple[str, int]], None]
"""Called with (connection, service name, original destination). It owns the
connection from then on and must not block (spawn a task)."""
Resolver = Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], str | None]


@dataclass(frozen=True)
class TproxyStatistics:
    accepted: int
    """Connections accepted (hits, misses and failures)."""
    misses: int
    """Closed because the original destination is no VIP of ours."""
    accept_errors: int
    """Failed accept() calls (each logged, none fatal)."""


class OriginalDstError(Exception):
    """The original destination could not be read (no NAT mapping, bad family)."""


def parse_sockaddr(raw: bytes) -> tuple[str, int]:
    """Decode a ``sockaddr_in`` or ``sockaddr_in6`` as returned by getsockopt.

    ``sockaddr_in``: family (host order, 2 bytes), port (big-endian, bytes
    2-3), IPv4 address (bytes 4-7), 8 bytes of padding. ``sockaddr_in6``:
    family, port, flowinfo (4), address (16), scope id (4).

    Raises:
        OriginalDstError: too short, or not AF_INET/AF_INET6.
    """
    if len(raw) < 8:
        raise OriginalDstError(f"sockaddr too short ({len(raw)} bytes)")
    family = struct.unpack_from("=H", raw)[0]
    port = struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6:
        if len(raw) < 24:
            raise OriginalDstError(f"sockaddr_in6 too short ({len(raw)} bytes)")
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raise OriginalDstError(f"unexpected address family {family}")


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The destination the client dialled before the REDIRECT (Linux only).

    Raises:
        OriginalDstError: no NAT mapping for this connection, or not Linux.
    """
    attempts: list[tuple[int, int, int]] = []
    if sock.family == socket.AF_INET6:
        attempts.append((SOL_IPV6, IP6T_SO_ORIGINAL_DST, SOCKADDR_IN6_SIZE))
    attempts.append((SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_SIZE))
    errors: list[str] = []
    for level, option, size in attempts:
        try:
            return parse_sockaddr(sock.getsockopt(level, option, size))
        except OSError as exc:
            errors.append(exc.strerror or str(exc))
    raise OriginalDstError("; ".join(errors))


class TproxyListener:
    """Accepts REDIRECTed connections at ``host:port`` and resolves their service.

    Args:
        host, port: ``--tproxy-listen``.
        resolve: VIP -> service name, or ``None`` (``VipAllocator.reverse``).
        handler: receives each resolved connection (see :data:`Handler`).
        get_original_dst: how to read the original destination; tests
            substitute it. Default: :func:`original_dst`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        resolve: Resolver,
        handler: Handler,
        get_original_dst: Callable[[socket.socket], tuple[str, int]] | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._resolve = resolve
        self._handler = handler
        self._get_original_dst = get_original_dst
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self.address: tuple[str, int] | None = None
        self.accepted = 0
        self.misses = 0
        self.accept_errors = 0

    def statistics(self) -> TproxyStatistics:
        return TproxyStatistics(self.accepted, self.misses, self.accept_errors)

    async def start(self) -> None:
        """Bind and start accepting.

        Raises:
            OSError: the bind failed; ``strerror`` says why.
        """
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, socktype, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, socktype, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(ACCEPT_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        name = sock.getsockname()
        self.address = (str(name[0]), int(name[1]))
        self._task = loop.create_task(self._accept_loop(sock), name="tproxy-accept")

    async def close(self) -> None:
        """Stop accepting. Connections already handed over are unaffected."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(sock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                self.accept_errors += 1
                log.warning(
                    "intercept: tproxy accept failed",
                    extra=kv(err=exc.strerror or str(exc), errno=exc.errno or 0),
                )
                await asyncio.sleep(ACCEPT_ERROR_PAUSE)
                continue
            try:
                await self._on_accepted(conn, peer)
            except asyncio.CancelledError:
                conn.close()
                raise
            except Exception:  # a bug must not stop intercepting ([REC] §6.1)
                log.exception("intercept: tproxy connection setup failed")
                conn.close()

    async def _on_accepted(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        self.accepted += 1
        peer_text = _fmt(peer)
        if conn.type != socket.SOCK_STREAM:  # pragma: no cover - a TCP listener's children
            log.warning("intercept: tproxy non-TCP conn dropped", extra=kv(peer=peer_text))
            conn.close()
            return
        try:
            dst = (self._get_original_dst or original_dst)(conn)
        except (OriginalDstError, OSError) as exc:
            log.warning("intercept: SO_ORIGINAL_DST failed", extra=kv(peer=peer_text, err=str(exc)))
            conn.close()
            return
        try:
            address = ipaddress.ip_address(dst[0])
        except ValueError:
            address = None
        service = self._resolve(address) if address is not None else None
        if service is None:
            self.misses += 1
            log.warning("intercept: VIP lookup miss", extra=kv(peer=peer_text, dst=_fmt(dst)))
            _close_gracefully(conn)
            return
        conn.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=conn)
        local = SocketStream(reader, writer)
        log.debug("intercept: new conn accepted", extra=kv(svc=service, orig_dst=_fmt(dst)))
        self._handler(local, service, dst)


def _close_gracefully(conn: socket.socket) -> None:
    """Close with a FIN rather than an RST (the client sees a clean end of stream)."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
    # Unread bytes in the receive queue make close() send RST; drain what is
    # already there without blocking.
    conn.setblocking(False)
    with contextlib.suppress(OSError):
        for _ in range(16):
            if not conn.recv(65536):
                break
    conn.close()


def _fmt(addr: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
