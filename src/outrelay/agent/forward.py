"""Forward mode (mini-TURN), agent side: spec 03 §8 with the [REC] fixes of §11 item 10.

Theory of operation. Under a ``relay_mode: forward`` rule the relay answers
an open with ``ALLOC_GRANTED`` on both control streams instead of
STREAM_READY. Each agent then opens a fresh UDP socket towards the relay's
forward plane, registers ``00000000 || my_alloc`` there, and prefixes every
datagram it sends with ``peer_alloc`` (the plane strips it). Over that
packet socket the two agents run their own QUIC connection (ALPN
``outrelay-fwd/1``, mTLS with the agents' certificates; consumer = client,
provider = server), so the relay forwards nothing but ciphertext. The
application's bytes travel on one stream of that connection; the relay data
stream stays open, carrying nothing, as the liveness link: when either
agent closes it the relay frees both allocations (spec 02 §6.4).

Layers here:

* :class:`PlaneWrapper` -- sans-IO: framing, the registration schedule
  (every 1 s until the first inbound datagram, then every 15 s as a NAT
  refresh) and the idle watchdog. Time is an argument.
* :class:`PlaneSocket` -- the UDP shell; it is a
  :class:`outrelay.transport.PacketEndpoint`, so the QUIC layer runs on it.
* :func:`run_forward_consumer` / :func:`run_forward_provider` -- bring-up
  (spec 03 §8.4) and the bridge.

Ours beyond the reference: an unspecified endpoint host is replaced by the
relay's address; the provider's accept is bounded (35 s) and aborted when
the relay data stream ends; streams are announced with an empty STREAM
frame, so server-speaks-first backends work; forward streams are never
resumed (there is nothing on the relay to resume).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from outrelay.observe import kv, ms
from outrelay.pki import ClientVerifier, load_certificates
from outrelay.splice import splice
from outrelay.transport import (
    BrokenResourceError,
    Connection,
    QuicTlsConfig,
    Stream,
    TransportError,
    accept_quic_on,
    connect_quic_on,
)
from outrelay.wire import discard

if TYPE_CHECKING:
    from outrelay.orp import AllocGranted

__all__ = [
    "FORWARD_ACCEPT_TIMEOUT",
    "PlaneSocket",
    "PlaneWrapper",
    "parse_forward_endpoint",
    "run_forward_consumer",
    "run_forward_provider",
]

log = logging.getLogger("outrelay.agent.forward")

REGISTRATION_RETRY = 1.0  # spec 03 §8.2 [REC]: until the first inbound datagram
REGISTRATION_REFRESH = 15.0  # spec 03 §8.2 [REC]: NAT refresh afterwards
IDLE_TIMEOUT = 20.0  # spec 03 §8.2 / §10: socket idle watchdog
HANDSHAKE_TIMEOUT = 30.0  # spec 03 §8.3 / §10
QUIC_IDLE_TIMEOUT = 45.0  # spec 03 §8.3 / §10
KEEPALIVE_INTERVAL = 15.0  # spec 03 §8.3 / §10
FORWARD_ACCEPT_TIMEOUT = 35.0  # spec 03 §8.4 [REC]
DRAIN_TIMEOUT = 5.0
"""Ours: after the bridge, how long unacknowledged bytes may take to reach the
peer before the end-to-end connection is closed."""
LIVENESS_GRACE = 5.0
"""Ours: once the relay data stream ended (the peer is done), how long our
bridge may still take to deliver what is in flight."""


class InvalidGrant(ValueError):
    """ALLOC_GRANTED cannot be used (zero ids, or an endpoint that is not ip:port)."""


def parse_forward_endpoint(endpoint: str, relay_host: str) -> tuple[str, int]:
    """``forward_endpoint`` as ``(ip, port)``; an unspecified host becomes ``relay_host``.

    Spec 03 §8.2: the endpoint must be a literal ``ip:port`` (IPv6 in
    brackets); [REC]: ``0.0.0.0``/``::`` is the relay's bound wildcard, so the
    relay connection's remote address is used instead.

    Raises:
        InvalidGrant: not a literal ``ip:port``.
    """
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) <= 65535:
        raise InvalidGrant(f"forward endpoint {endpoint!r} is not ip:port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        raise InvalidGrant(f"forward endpoint {endpoint!r} is not a literal ip:port") from exc
    if ip.is_unspecified and relay_host:
        return relay_host, int(port)
    return str(ip), int(port)


@dataclass(frozen=True)
class WrapperStatistics:
    sent_datagrams: int
    received_datagrams: int
    registrations_sent: int
    first_inbound: bool


class PlaneWrapper:
    """The packet-socket wrapper's logic (spec 03 §8.2), without a socket or a clock.

    Call :meth:`poll` at :meth:`next_deadline` (and after :meth:`start`); it
    returns the registration datagrams to send now. :meth:`wrap` frames an
    outgoing QUIC datagram; :meth:`received` notes an inbound one (payload
    passed up unchanged). :meth:`idle_expired` says when the watchdog fires.
    """

    def __init__(
        self,
        my_allocation: int,
        peer_allocation: int,
        *,
        retry: float = REGISTRATION_RETRY,
        refresh: float = REGISTRATION_REFRESH,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        if not my_allocation or not peer_allocation:
            raise InvalidGrant("forward: alloc ids must be non-zero")
        if not (0 < my_allocation <= 0xFFFFFFFF and 0 < peer_allocation <= 0xFFFFFFFF):
            raise InvalidGrant("forward: alloc ids must fit in 32 bits")
        self.my_allocation = my_allocation
        self.peer_allocation = peer_allocation
        self._prefix = peer_allocation.to_bytes(4, "big")
        self._registration = b"\x00\x00\x00\x00" + my_allocation.to_bytes(4, "big")
        self.retry = retry
        self.refresh = refresh
        self.idle_timeout = idle_timeout
        self._next_registration: float | None = None
        self._last_rx = 0.0
        self._first_inbound = False
        self._sent = 0
        self._received = 0
        self._registrations = 0

    @property
    def registration(self) -> bytes:
        """``00 00 00 00 || my_allocation`` (8 bytes, spec 02 §8)."""
        return self._registration

    def start(self, now: float) -> None:
        """The socket is open: register at once, and start the idle watchdog."""
        self._next_registration = now
        self._last_rx = now

    def poll(self, now: float) -> list[bytes]:
        """Registrations due at ``now`` (zero or one datagram)."""
        if self._next_registration is None or now < self._next_registration:
            return []
        self._registrations += 1
        period = self.refresh if self._first_inbound else self.retry
        self._next_registration = now + period
        return [self._registration]

    def next_deadline(self) -> float | None:
        """When :meth:`poll` next has something to send."""
        return self._next_registration

    def wrap(self, payload: bytes) -> bytes:
        """``peer_allocation || payload`` (spec 02 §8)."""
        self._sent += 1
        return self._prefix + payload

    def received(self, data: bytes, now: float) -> bytes:
        """An inbound datagram; returns what goes up (unchanged: the relay stripped the prefix)."""
        self._received += 1
        self._last_rx = now
        if not self._first_inbound:
            self._first_inbound = True
            # The plane knows us now: from here on only NAT refreshes.
            if self._next_registration is not None:
                self._next_registration = min(self._next_registration, now + self.refresh)
                self._next_registration = max(self._next_registration, now + self.retry)
        return data

    @property
    def watchdog_period(self) -> float:
        """``clamp(idle/4, 1 s, 5 s)`` (spec 03 §8.2)."""
        return min(max(self.idle_timeout / 4, 1.0), 5.0)

    def idle_expired(self, now: float) -> bool:
        """No datagram for longer than the idle timeout (≤ 0 disables the watchdog)."""
        return self.idle_timeout > 0 and now - self._last_rx > self.idle_timeout

    def statistics(self) -> WrapperStatistics:
        return WrapperStatistics(
            self._sent, self._received, self._registrations, self._first_inbound
        )


class _UpperTransport(asyncio.DatagramTransport):
    """What the QUIC layer sends through: every datagram goes to the plane, prefixed."""

    def __init__(self, socket_: PlaneSocket) -> None:
        super().__init__()
        self._socket = socket_

    def sendto(self, data: Any, addr: Any = None) -> None:
        self._socket.send(bytes(data))

    def close(self) -> None:
        self._socket.close()

    def abort(self) -> None:
        self._socket.close()

    def is_closing(self) -> bool:
        return self._socket.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sockname":
            return self._socket.sockname
        if name == "peername":
            return self._socket.remote
        return default


class PlaneSocket(asyncio.DatagramProtocol):
    """A UDP socket to the relay's plane that a QUIC connection runs over."""

    def __init__(self, core: PlaneWrapper, relay: tuple[str, int]) -> None:
        self.core = core
        self.relay = relay
        self._transport: asyncio.DatagramTransport | None = None
        self._upper: asyncio.DatagramProtocol | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._next_watchdog = 0.0
        self.closed = False
        self.idle = asyncio.Event()
        """Set when the watchdog closed the socket."""
        self.sockname: tuple[str, int] = ("", 0)

    @classmethod
    async def open(cls, core: PlaneWrapper, relay: tuple[str, int]) -> PlaneSocket:
        """Bind an ephemeral UDP socket and start registering (spec 03 §8.2).

        Raises:
            BrokenResourceError: the socket could not be opened.
        """
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in relay[0] else socket.AF_INET
        try:
            _, protocol = await loop.create_datagram_endpoint(
                lambda: cls(core, relay),
                local_addr=("::" if family == socket.AF_INET6 else "0.0.0.0", 0),
                family=family,
            )
        except OSError as exc:
            raise BrokenResourceError(f"forward: cannot open a UDP socket: {exc}") from exc
        return protocol

    @property
    def remote(self) -> tuple[str, int]:
        return self.relay

    def attach(self, protocol: asyncio.DatagramProtocol) -> asyncio.DatagramTransport:
        self._upper = protocol
        return _UpperTransport(self)

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a datagram transport
        name = transport.get_extra_info("sockname")
        self.sockname = (str(name[0]), int(name[1]))
        now = self._loop.time()
        self.core.start(now)
        self._next_watchdog = now + self.core.watchdog_period
        self._tick()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.closed:
            return
        # The real source is not checked (spec 03 §8.2); the QUIC layer sees the relay.
        payload = self.core.received(data, self._loop.time())
        if self._upper is not None:
            self._upper.datagram_received(payload, self.relay)

    def error_received(self, exc: Exception) -> None:
        log.debug("forward socket error", extra=kv(err=str(exc)))

    # -- sending and timers ------------------------------------------------------------

    def send(self, payload: bytes) -> None:
        if self._transport is not None and not self.closed:
            self._transport.sendto(self.core.wrap(payload), self.relay)

    def _tick(self) -> None:
        self._timer = None
        if self.closed or self._transport is None:
            return
        now = self._loop.time()
        for datagram in self.core.poll(now):
            self._transport.sendto(datagram, self.relay)
        if now >= self._next_watchdog:
            self._next_watchdog = now + self.core.watchdog_period
            if self.core.idle_expired(now):
                log.info("forward socket idle; closing", extra=kv(relay=f"{self.relay}"))
                self.idle.set()
                self.close()
                return
        deadline = self._next_watchdog
        registration = self.core.next_deadline()
        if registration is not None:
            deadline = min(deadline, registration)
        self._timer = self._loop.call_at(deadline, self._tick)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.close()
        upper, self._upper = self._upper, None
        if upper is not None:
            with contextlib.suppress(Exception):
                upper.connection_lost(None)


# -- bring-up and bridge (spec 03 §8.4) ---------------------------------------------------


async def _open_plane(grant: AllocGranted, relay_host: str) -> PlaneSocket:
    endpoint = parse_forward_endpoint(grant.forward_endpoint, relay_host)
    core = PlaneWrapper(grant.my_allocation, grant.peer_allocation)
    return await PlaneSocket.open(core, endpoint)


async def _bridge(
    app: Stream,
    conn: Connection,
    fwd: Stream,
    relay_stream: Stream,
    plane: PlaneSocket,
    fields: dict[str, Any],
    app_prefix: bytes = b"",
) -> None:
    """Bridge ``app`` with the end-to-end stream; the relay stream is the liveness link.

    ``app_prefix``: bytes already read from ``app``, sent on ``fwd`` first.
    """
    async with asyncio.TaskGroup() as tg:
        bridge = tg.create_task(splice(app, fwd, a_to_b_prefix=app_prefix, abort_a_on_b_error=True))
        liveness = tg.create_task(discard(relay_stream))
        idle = tg.create_task(plane.idle.wait())
        done, _ = await asyncio.wait({bridge, liveness, idle}, return_when="FIRST_COMPLETED")
        if bridge not in done:
            # The peer (or the relay) ended the session: let in-flight bytes land, then stop.
            reason = "relay data stream ended" if liveness in done else "plane idle"
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LIVENESS_GRACE):
                    await asyncio.shield(bridge)
            if not bridge.done():
                log.info("forward session aborted", extra=kv(**fields, reason=reason))
                app.abort()
                fwd.abort()
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DRAIN_TIMEOUT):
                    await fwd.wait_send_buffer_empty()
        liveness.cancel()
        idle.cancel()
    if bridge.done() and not bridge.cancelled():
        result = bridge.result()
        log.debug(
            "forward bridge teardown",
            extra=kv(**fields, sent=result.a_to_b.bytes, received=result.b_to_a.bytes),
        )


async def run_forward_consumer(
    grant: AllocGranted,
    relay_stream: Stream,
    local: Stream,
    *,
    tls: QuicTlsConfig,
    relay_host: str,
    service: str,
    replay: bytes = b"",
) -> None:
    """Consumer side of a forward session; closes ``local`` and ``relay_stream`` at the end.

    ``replay``: application bytes the consumer pipelined onto ``relay_stream`` before it
    knew the mode (``orp.CAP_PIPELINE``). The relay discarded them (spec 02 §6.4), so they
    go first on the end-to-end stream.
    """
    sid = grant.stream_id
    fields: dict[str, Any] = {"svc": service, "stream_id": sid, "role": "consumer"}
    plane: PlaneSocket | None = None
    conn: Connection | None = None
    try:
        try:
            plane = await _open_plane(grant, relay_host)
            conn = await connect_quic_on(
                plane,
                tls,
                handshake_timeout=HANDSHAKE_TIMEOUT,
                idle_timeout=QUIC_IDLE_TIMEOUT,
                keepalive_interval=KEEPALIVE_INTERVAL,
                silence_timeout=IDLE_TIMEOUT,
            )
            fwd = await conn.open_stream()
        except (InvalidGrant, TransportError) as exc:
            log.warning("forward: dial peer over plane failed", extra=kv(**fields, err=str(exc)))
            local.abort()
            return
        log.info(
            "forward session",
            extra=kv(
                **fields,
                endpoint=f"{plane.relay[0]}:{plane.relay[1]}",
                alloc=grant.my_allocation,
                peer_alloc=grant.peer_allocation,
                rtt_ms=ms(conn.rtt, "?"),
            ),
        )
        await _bridge(local, conn, fwd, relay_stream, plane, fields, replay)
    finally:
        if conn is not None:
            conn.close(0, "")
        if plane is not None:
            plane.close()
        await relay_stream.aclose()


async def run_forward_provider(
    grant: AllocGranted,
    relay_stream: Stream,
    backend: Stream,
    *,
    tls: QuicTlsConfig,
    relay_host: str,
    fields: dict[str, Any],
    accept_timeout: float = FORWARD_ACCEPT_TIMEOUT,
) -> None:
    """Provider side: accept the consumer's QUIC over the plane, bridge the backend."""
    fields = {**fields, "role": "provider"}
    plane: PlaneSocket | None = None
    conn: Connection | None = None
    try:
        try:
            plane = await _open_plane(grant, relay_host)
            verifier = ClientVerifier(load_certificates(tls.ca_file))
            loop = asyncio.get_running_loop()
            accepted = loop.create_task(_accept(plane, tls, verifier, accept_timeout))
            watch = loop.create_task(discard(relay_stream))
            try:
                await asyncio.wait({accepted, watch}, return_when="FIRST_COMPLETED")
            finally:
                watch.cancel()
                if not accepted.done():
                    accepted.cancel()
                    with contextlib.suppress(asyncio.CancelledError, TransportError):
                        await accepted
                    raise BrokenResourceError("relay data stream ended before the peer dialled")
            conn, fwd = accepted.result()
        except (InvalidGrant, TransportError, TimeoutError, OSError, ValueError) as exc:
            log.warning(
                "agent: forward accept failed; tearing down stream",
                extra=kv(**fields, err=str(exc)),
            )
            backend.abort()
            return
        log.info(
            "forward session",
            extra=kv(
                **fields,
                endpoint=f"{plane.relay[0]}:{plane.relay[1]}",
                alloc=grant.my_allocation,
                peer_alloc=grant.peer_allocation,
                rtt_ms=ms(conn.rtt, "?"),
            ),
        )
        await _bridge(backend, conn, fwd, relay_stream, plane, fields)
    finally:
        if conn is not None:
            conn.close(0, "")
        if plane is not None:
            plane.close()
        await relay_stream.aclose()


async def _accept(
    plane: PlaneSocket, tls: QuicTlsConfig, verifier: ClientVerifier, budget: float
) -> tuple[Connection, Stream]:
    """One connection, then its first stream, both within ``budget`` s (spec 03 §8.4 [REC])."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    conn = await accept_quic_on(
        plane,
        tls,
        verify_client=verifier.verify,
        accept_timeout=budget,
        idle_timeout=QUIC_IDLE_TIMEOUT,
        keepalive_interval=KEEPALIVE_INTERVAL,
        silence_timeout=IDLE_TIMEOUT,
    )
    try:
        async with asyncio.timeout(max(deadline - loop.time(), 0.1)):
            stream = await conn.accept_stream()
    except BaseException:
        conn.close(0, "")
        raise
    return conn, stream
