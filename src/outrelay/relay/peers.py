"""Connections to peer relays: the pool (spec 02 §10.2 step 2, with the [REC] of §15 item 6).

:class:`PeerPool` keeps one QUIC connection per peer relay id. It dials the endpoint the
shared registry gives for that id (``RelayRecord.endpoint``) with the relay's own certificate
as client certificate (a ``relay`` URI, so the peer treats us as a relay, not an agent),
RootCAs ``--ca``, server name ``localhost`` and ALPN ``orp/1`` (the transport's defaults), a
dial bounded by :data:`DIAL_TIMEOUT`. Concurrent opens to one peer share one dial; a failed
dial is not cached (the next open dials again); a connection found closed is dropped and
redialled on next use. A rejected forward never drops the connection (the [REC]): only a
transport error on the connection itself does, and it drops only that connection.

Each new connection's first stream is its PEER_CONTROL stream (:mod:`.peer_control`),
opened by the dial itself, so it exists before any forward on the connection; the
connection and that stream are then handed to ``on_connection`` (the relay serves both,
:mod:`.peer_server`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Final

from outrelay.observe import kv
from outrelay.orp import FrameType, encode_message
from outrelay.relay.state import log
from outrelay.transport import Connection, QuicTlsConfig, Stream, TransportError, connect_quic

__all__ = ["DIAL_TIMEOUT", "PeerPool", "PeerUnreachable", "split_endpoint"]

DIAL_TIMEOUT: Final = 5.0
"""Ours: the longest a dial to a peer relay may take (resolution and QUIC handshake)."""

Connect = Callable[..., Awaitable[Connection]]


class PeerUnreachable(Exception):
    """No connection to the peer relay (unknown id, bad endpoint, dial failed)."""


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as a tuple.

    Raises:
        ValueError: not ``host:port``.
    """
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"not host:port: {endpoint!r}")
    return host.strip("[]"), int(port)


class PeerPool:
    """One pooled connection per peer relay id (module docstring).

    Args:
        tls: The relay's certificate, key and CA (``--cert``, ``--key``, ``--ca``).
        endpoint_of: The advertised ``host:port`` of a relay id, or None if unknown.
        on_connection: Called once with each new connection's peer relay id, the
            connection and its PEER_CONTROL stream.
        dial_timeout: Bound of one dial.
        connect: The QUIC dialler (tests may pass another).
    """

    def __init__(
        self,
        tls: QuicTlsConfig,
        endpoint_of: Callable[[str], str | None],
        on_connection: Callable[[str, Connection, Stream], None],
        *,
        dial_timeout: float = DIAL_TIMEOUT,
        connect: Connect = connect_quic,
    ) -> None:
        self._tls = tls
        self._endpoint_of = endpoint_of
        self._on_connection = on_connection
        self._dial_timeout = dial_timeout
        self._connect = connect
        self._conns: dict[str, Connection] = {}
        self._dialing: dict[str, asyncio.Task[Connection]] = {}
        self._closed = False
        self.dials = 0
        """Dials started (tests and statistics: a pooled connection is dialled once)."""

    def __len__(self) -> int:
        return len(self._conns)

    def pooled(self, relay_id: str) -> Connection | None:
        """The live pooled connection to ``relay_id``, if any."""
        conn = self._conns.get(relay_id)
        if conn is not None and conn.is_closed:
            del self._conns[relay_id]
            return None
        return conn

    async def connection(self, relay_id: str) -> Connection:
        """The pooled connection to ``relay_id``, dialled if there is none.

        Raises:
            PeerUnreachable: the id is unknown or the dial failed.
        """
        conn = self.pooled(relay_id)
        if conn is not None:
            return conn
        if self._closed:
            raise PeerUnreachable("the relay is stopping")
        dial = self._dialing.get(relay_id)
        if dial is None:
            dial = asyncio.get_running_loop().create_task(self._dial(relay_id))
            self._dialing[relay_id] = dial
            dial.add_done_callback(lambda done: self._dial_done(relay_id, done))
        return await asyncio.shield(dial)

    def _dial_done(self, relay_id: str, dial: asyncio.Task[Connection]) -> None:
        if self._dialing.get(relay_id) is dial:
            del self._dialing[relay_id]
        if not dial.cancelled():
            dial.exception()  # retrieved: a failed dial is not cached, nor logged twice

    async def _dial(self, relay_id: str) -> Connection:
        endpoint = self._endpoint_of(relay_id)
        if endpoint is None:
            raise PeerUnreachable(f"relay {relay_id!r} is not in the registry")
        try:
            host, port = split_endpoint(endpoint)
        except ValueError as exc:
            raise PeerUnreachable(str(exc)) from exc
        self.dials += 1
        try:
            async with asyncio.timeout(self._dial_timeout):
                conn = await self._connect(
                    host, port, self._tls, handshake_timeout=self._dial_timeout
                )
        except (TransportError, TimeoutError, OSError) as exc:
            log.warning(
                "peer relay dial failed", extra=kv(relay=relay_id, endpoint=endpoint, err=str(exc))
            )
            raise PeerUnreachable(f"dial {endpoint}: {exc}") from exc
        try:
            control = await conn.open_stream()
            await control.send_all(encode_message(FrameType.PEER_CONTROL))
        except TransportError as exc:
            conn.close(0, "")
            raise PeerUnreachable(f"peer control stream: {exc}") from exc
        if self._closed:
            conn.close(0, "relay stopping")
            raise PeerUnreachable("the relay is stopping")
        log.info("peer relay connected", extra=kv(relay=relay_id, endpoint=endpoint))
        self._conns[relay_id] = conn
        self._on_connection(relay_id, conn, control)
        return conn

    def drop(self, relay_id: str, conn: Connection, reason: str) -> None:
        """Close ``conn`` and forget it if it is the pooled one (a transport error on it)."""
        if self._conns.get(relay_id) is conn:
            del self._conns[relay_id]
        if not conn.is_closed:
            log.info("peer relay connection dropped", extra=kv(relay=relay_id, err=reason))
            conn.close(0, reason)

    def close(self) -> None:
        """Close every pooled connection and cancel dials in flight."""
        self._closed = True
        for dial in list(self._dialing.values()):
            dial.cancel()
        for relay_id, conn in list(self._conns.items()):
            with contextlib.suppress(Exception):
                conn.close(0, "relay stopping")
            del self._conns[relay_id]
