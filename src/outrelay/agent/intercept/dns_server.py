"""The embedded DNS server: an asyncio UDP shell around :class:`.dns.DnsResponder`.

Theory of operation. One UDP socket at ``--dns-listen``. Every datagram is
handed to the responder; a :class:`~.dns.Reply` is sent back at once, ``None``
is dropped, and a :class:`~.dns.Forward` becomes one upstream exchange:

* a fresh connected UDP socket per query (random source port) and a random
  query ID, so an off-path spoofer has to guess both; only a response from the
  upstream address with that ID and QR=1 is accepted, then the client's ID is
  put back and the reply relayed verbatim (a truncated reply keeps TC=1);
* at most :data:`UPSTREAM_TIMEOUT` seconds; on timeout or error the client
  gets SERVFAIL (it retries by itself; we do not);
* at most :data:`MAX_UPSTREAM_INFLIGHT` exchanges at once; beyond that a query
  is answered SERVFAIL at once rather than queued, so a flood of names we do
  not own cannot grow memory or tasks without bound.

Nothing a client sends can stop the server: the responder never raises on any
input, and the shell still catches anything unexpected per datagram, logs it
at debug and drops the datagram. UDP only (spec 03 §6.5); no TCP listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from dataclasses import dataclass
from typing import Any

import dns.rcode

from outrelay.agent.intercept.dns import DnsResponder, Forward, Reply
from outrelay.observe import kv

__all__ = [
    "MAX_UPSTREAM_INFLIGHT",
    "UPSTREAM_TIMEOUT",
    "DnsServer",
    "DnsServerStatistics",
]

log = logging.getLogger("outrelay.agent.intercept")

UPSTREAM_TIMEOUT = 2.0
"""Seconds to wait for the upstream's answer. glibc's first retry comes after
5 s (``options timeout``), so a SERVFAIL at 2 s arrives before it gives up."""

MAX_UPSTREAM_INFLIGHT = 64
"""Concurrent upstream exchanges. A pod's resolver rarely has more than a few
lookups in flight; 64 leaves room for bursts and bounds sockets and tasks."""


@dataclass(frozen=True)
class DnsServerStatistics:
    queries: int
    replies: int
    dropped: int
    forwarded: int
    upstream_failures: int
    upstream_inflight: int
    upstream_rejected: int
    """Forwards answered SERVFAIL at once because the in-flight bound was reached."""


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self._server = server

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._server._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier replies (client went away): nothing to do.
        log.debug("intercept: dns socket error", extra=kv(err=str(exc)))


class _UpstreamProtocol(asyncio.DatagramProtocol):
    def __init__(self, query_id: int) -> None:
        self._id = query_id
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # A connected socket only receives from the upstream's address; still
        # check ID and QR so a stray or spoofed datagram is ignored.
        if len(data) < 12 or self.reply.done():
            return
        if int.from_bytes(data[0:2], "big") != self._id or not data[2] & 0x80:
            return
        self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc or ConnectionError("upstream socket closed"))


class DnsServer:
    """Serves ``responder`` on UDP ``host:port``; forwards to ``upstream`` if given.

    Use :meth:`start`, then :meth:`close`. :attr:`address` is the bound address.
    """

    def __init__(
        self,
        responder: DnsResponder,
        host: str,
        port: int,
        *,
        upstream: tuple[str, int] | None = None,
        upstream_timeout: float = UPSTREAM_TIMEOUT,
        max_inflight: int = MAX_UPSTREAM_INFLIGHT,
    ) -> None:
        if upstream is not None and not responder.forwarding:
            raise ValueError("an upstream needs a responder created with forwarding=True")
        self.responder = responder
        self._host = host
        self._port = port
        self.upstream = upstream
        self._upstream_timeout = upstream_timeout
        self._max_inflight = max_inflight
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.address: tuple[str, int] | None = None
        self._queries = 0
        self._replies = 0
        self._dropped = 0
        self._forwarded = 0
        self._upstream_failures = 0
        self._upstream_rejected = 0

    async def start(self) -> None:
        """Bind the UDP socket.

        Raises:
            OSError: the bind failed (address in use, port below 1024 without
                CAP_NET_BIND_SERVICE, address not local, ...).
        """
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self), local_addr=(self._host, self._port)
        )
        self._transport = transport
        sockname = transport.get_extra_info("sockname")
        self.address = (str(sockname[0]), int(sockname[1]))

    async def close(self) -> None:
        """Stop serving; cancel upstream exchanges in flight."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)

    def statistics(self) -> DnsServerStatistics:
        return DnsServerStatistics(
            queries=self._queries,
            replies=self._replies,
            dropped=self._dropped,
            forwarded=self._forwarded,
            upstream_failures=self._upstream_failures,
            upstream_inflight=len(self._tasks),
            upstream_rejected=self._upstream_rejected,
        )

    # -- datagrams ------------------------------------------------------------------------

    def _on_datagram(self, data: bytes, addr: Any) -> None:
        self._queries += 1
        try:
            result = self.responder.route(data)
        except Exception:  # pragma: no cover - the responder promises not to raise
            log.debug("intercept: dns query failed", exc_info=True, extra=kv(client=addr))
            result = None
        if result is None:
            self._dropped += 1
            log.debug("intercept: dns query dropped", extra=kv(client=_fmt(addr), size=len(data)))
            return
        if isinstance(result, Reply):
            log.debug(
                "intercept: dns answer",
                extra=kv(
                    client=_fmt(addr),
                    name=result.qname,
                    type=result.qtype,
                    rcode=dns.rcode.to_text(dns.rcode.Rcode.make(result.rcode)),
                ),
            )
            self._send(result.wire, addr)
            return
        self._forward(result, addr)

    def _send(self, wire: bytes, addr: Any) -> None:
        if self._transport is None:
            return
        try:
            self._transport.sendto(wire, addr)
            self._replies += 1
        except OSError as exc:  # pragma: no cover - asyncio reports most send errors itself
            log.debug("intercept: dns reply failed", extra=kv(client=_fmt(addr), err=str(exc)))

    # -- upstream -------------------------------------------------------------------------

    def _forward(self, fwd: Forward, addr: Any) -> None:
        if self.upstream is None:  # pragma: no cover - route() yields Forward only with one
            self._send(fwd.fallback, addr)
            return
        if len(self._tasks) >= self._max_inflight:
            self._upstream_rejected += 1
            log.debug(
                "intercept: dns upstream busy; SERVFAIL",
                extra=kv(client=_fmt(addr), name=fwd.qname, inflight=len(self._tasks)),
            )
            self._send(fwd.fallback, addr)
            return
        self._forwarded += 1
        task = asyncio.get_running_loop().create_task(self._exchange(fwd, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _exchange(self, fwd: Forward, addr: Any) -> None:
        assert self.upstream is not None
        client_id = fwd.query[0:2]
        query_id = secrets.randbits(16)
        query = query_id.to_bytes(2, "big") + fwd.query[2:]
        loop = asyncio.get_running_loop()
        transport: asyncio.DatagramTransport | None = None
        try:
            async with asyncio.timeout(self._upstream_timeout):
                host, port = self.upstream
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                transport, proto = await loop.create_datagram_endpoint(
                    lambda: _UpstreamProtocol(query_id), remote_addr=(host, port), family=family
                )
                transport.sendto(query)
                reply = await proto.reply
        except (OSError, TimeoutError, ConnectionError) as exc:
            self._upstream_failures += 1
            log.debug(
                "intercept: dns upstream failed; SERVFAIL",
                extra=kv(
                    upstream=_fmt(self.upstream),
                    name=fwd.qname,
                    err=str(exc) or type(exc).__name__,
                ),
            )
            self._send(fwd.fallback, addr)
            return
        finally:
            if transport is not None:
                transport.close()
        log.debug(
            "intercept: dns forwarded",
            extra=kv(client=_fmt(addr), name=fwd.qname, type=fwd.qtype, size=len(reply)),
        )
        self._send(client_id + reply[2:], addr)


def _fmt(addr: Any) -> str:
    with contextlib.suppress(Exception):
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)
