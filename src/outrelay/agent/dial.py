"""Dialling the relay set: QUIC or TLS + yamux, all endpoints at once, HELLO (spec 03 §3.1-2).

:class:`SessionConfig` says what to dial (and what the session then registers).

:class:`RelayDialer` returns one :class:`Link` (a relay connection whose
HELLO was acknowledged, with its control stream) or raises :class:`AllFailed`
with every endpoint's error. The session's connection loop owns the backoff
between attempts.

With TLS 1.3 the client sees its handshake complete before the relay has
judged its certificate, so only HELLO_ACK means "accepted": a connection
closed before it is a refusal (:class:`RelayRefused`), whose reason is the
relay's CONNECTION_CLOSE reason phrase (ours gives one, a reference relay an
empty one).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from outrelay.agent.resumable import RESUME_WINDOW
from outrelay.observe import kv
from outrelay.orp import (
    CAP_CLOSE_ACK,
    CAP_INSTANCE,
    CAP_MESH,
    CAP_P2P_MODE,
    CAP_P2P_RESUME_V2,
    CAP_PIPELINE,
    CAP_RESUME_PEER,
    Frame,
    FrameType,
    Hello,
    HelloAck,
    MalformedPayload,
    decode_message,
)
from outrelay.transport import (
    BrokenResourceError,
    CertificateError,
    Connection,
    OtherFamily,
    QuicTlsConfig,
    TransportError,
    connect_tcp,
)
from outrelay.wire import ControlChannel, FrameReader, frame_name

if TYPE_CHECKING:
    from outrelay.transport import SharedUdpEndpoint

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "HELLO_CAPABILITIES",
    "AllFailed",
    "Link",
    "RelayDialer",
    "RelayRefused",
    "SessionConfig",
    "refusal",
]

log = logging.getLogger("outrelay.agent.session")

HELLO_TIMEOUT: Final = 10.0  # spec 03 §3.1 [REC]
REGISTER_TIMEOUT: Final = 10.0  # spec 03 §3.3 [REC]
BACKOFF_INITIAL: Final = 1.0  # spec 03 §4.5
BACKOFF_MAX: Final = 30.0  # spec 03 §4.5
HELLO_CAPABILITIES: Final = (CAP_P2P_MODE, CAP_P2P_RESUME_V2)
"""What ``--p2p-listen`` adds to HELLO (see ``orp.extensions``); ``instance`` is always sent."""
HANDSHAKE_TIMEOUT: Final = 5.0  # spec 01: QUIC handshake
TCP_HANDSHAKE_TIMEOUT: Final = 10.0
MESH_PREFERENCE_GRACE: Final = 0.25
"""After losing a relay of a mesh (``orp.CAP_MESH``): once a later relay of the list
answered, how long an earlier one that has not answered yet is still waited for."""

QuicConnect = Callable[..., Awaitable[Connection]]


class RelayRefused(Exception):
    """The relay accepted the QUIC handshake but closed before HELLO_ACK.

    ``str()`` is ``relay refused us: <why>``, ``why`` being the relay's close
    reason (e.g. ``bad client certificate: certificate expired (notAfter ...)``)
    or, when it gave none, what it usually means.
    """

    def __init__(self, reason: str, address: str = "") -> None:
        super().__init__(f"relay refused us: {reason}")
        self.reason = reason
        self.address = address


def refusal(address: str, close_reason: str) -> RelayRefused:
    """The refusal for a relay connection closed before HELLO_ACK with ``close_reason``."""
    if close_reason.startswith("code 0") and not close_reason.startswith("code 0:"):
        return RelayRefused(
            "it closed the connection before HELLO_ACK without saying why (a reference "
            "relay never does): it did not accept our certificate or our HELLO uri; its "
            "log says which",
            address,
        )
    reason = close_reason.removeprefix("code 0: ")
    return RelayRefused(reason, address)


@dataclass(frozen=True)
class SessionConfig:
    relays: tuple[tuple[str, int], ...]
    uri: str
    tls: QuicTlsConfig
    services: dict[str, str] = field(default_factory=dict)
    """Exposed service name -> backend ``host:port`` (sent as local_addr)."""
    hello_timeout: float = HELLO_TIMEOUT
    register_timeout: float = REGISTER_TIMEOUT
    backoff_initial: float = BACKOFF_INITIAL
    backoff_max: float = BACKOFF_MAX
    relays_tcp: tuple[tuple[str, int], ...] = ()
    """TLS + yamux fallback endpoints (``--relay-tcp``)."""
    transport: str = "auto"
    """``auto``: QUIC first, TCP when QUIC cannot connect; ``quic``; ``tcp``."""
    resume_window: float = RESUME_WINDOW
    """How long a broken stream waits to be resumed before it is dropped."""
    quic_backend: str = "aioquic"
    """QUIC client library for relay connections: ``aioquic``, ``qh3`` or ``auto``
    (see :mod:`outrelay.transport.quic.backend`)."""
    capabilities: tuple[str, ...] = ()
    """HELLO capabilities (:data:`HELLO_CAPABILITIES` with ``--p2p-listen``); the
    reference sends none, and neither do we without P2P."""
    quic_attempt_timeout: float = 3.0
    """In ``auto`` mode with TCP endpoints, how long a QUIC handshake may take
    before the TCP fallback is tried."""


class AllFailed(Exception):
    """No endpoint of the relay set answered HELLO; the message lists each one's error."""

    def __init__(
        self, message: str, refused: RelayRefused | None, certificate: bool = False
    ) -> None:
        super().__init__(message)
        self.refused = refused
        """A relay closed on us before HELLO_ACK (it judged us), if one did."""
        self.certificate = certificate
        """A relay's certificate did not verify: worth a warning on every retry."""


@dataclass(eq=False)
class Link:
    """One live relay connection and its control stream."""

    address: str
    conn: Connection
    ctrl: ControlChannel
    reader: FrameReader
    kind: str = "quic"
    shared: bool = False
    """QUIC from the shared UDP socket (``--p2p-listen``): srflx is meaningful."""
    accepted: frozenset[str] = frozenset()
    """``HelloAck.accepted_features``: the extensions this relay echoed (none from a
    reference relay, whose HELLO_ACK is empty)."""


def accepted_features(frame: Frame, address: str = "") -> frozenset[str]:
    """The extensions a HELLO_ACK echoes; an undecodable one echoes none."""
    try:
        ack = decode_message(frame)
    except MalformedPayload as exc:
        log.warning("session: HELLO_ACK unmarshal failed", extra=kv(relay=address, err=str(exc)))
        return frozenset()
    return frozenset(ack.accepted_features) if isinstance(ack, HelloAck) else frozenset()


class RelayDialer:
    """Dials the relay set as ``config`` says; remembers whether we are on the TCP fallback."""

    def __init__(
        self,
        config: SessionConfig,
        *,
        instance: str,
        connect_quic: QuicConnect,
        endpoint: Callable[[], SharedUdpEndpoint | None],
    ) -> None:
        self.config = config
        self._instance = instance
        self._connect_quic = connect_quic
        self._endpoint = endpoint
        """``--p2p-listen``: QUIC to the relay leaves from this socket (spec 03 §2.3)."""
        self._on_tcp = False
        self._mesh = False
        """The last relay shares a registry (``orp.CAP_MESH``): any relay will do."""

    async def connect_any(self) -> Link:
        """QUIC first, then the TLS + yamux fallback, as ``transport`` says (spec 03 §1.4)."""
        link = await self._connect_any()
        self._mesh = CAP_MESH in link.accepted
        return link

    async def _connect_any(self) -> Link:
        cfg = self.config
        quic_error: AllFailed | None = None
        if cfg.transport in ("auto", "quic") and cfg.relays:
            timeout = (
                cfg.quic_attempt_timeout
                if cfg.transport == "auto" and cfg.relays_tcp
                else HANDSHAKE_TIMEOUT
            )
            try:
                link = await self._connect_ordered(cfg.relays, "quic", timeout)
            except AllFailed as exc:
                quic_error = exc
            else:
                if self._on_tcp:
                    log.info("session: back on QUIC", extra=kv(relay=link.address))
                self._on_tcp = False
                return link
        if cfg.transport in ("auto", "tcp") and cfg.relays_tcp:
            try:
                link = await self._connect_ordered(cfg.relays_tcp, "tcp", TCP_HANDSHAKE_TIMEOUT)
            except AllFailed as exc:
                if quic_error is not None:
                    raise AllFailed(
                        f"QUIC: {quic_error}; TCP: {exc}",
                        exc.refused or quic_error.refused,
                        exc.certificate or quic_error.certificate,
                    ) from exc
                raise
            if not self._on_tcp and cfg.transport == "auto":
                log.info(
                    "agent on TCP+TLS fallback (UDP/QUIC unreachable)",
                    extra=kv(relay=link.address),
                )
            self._on_tcp = True
            return link
        if quic_error is not None:
            raise quic_error
        raise AllFailed("session: no relay addresses for this transport", None)

    async def _connect_ordered(
        self, addresses: tuple[tuple[str, int], ...], kind: str, handshake_timeout: float
    ) -> Link:
        """Dial every relay at once; prefer the earliest healthy one in ``--relay`` order.

        All attempts run concurrently, each bounded (QUIC handshake 5 s,
        HELLO_ACK 10 s), so a silent endpoint delays start-up by at most that
        much and never hangs it (spec 03 §3.2 [REC]). Among the endpoints
        that answer, the first in list order wins: without inter-relay
        forwarding, a consumer and its provider must meet on the same relay,
        and so must both halves of a resumed stream. Once the relay we had
        shared a registry with others (``orp.CAP_MESH``), they need not meet:
        a later endpoint that answered wins if the earlier ones still have not
        answered :data:`MESH_PREFERENCE_GRACE` later (a dead relay would
        otherwise hold the reconnect for its whole handshake timeout).
        """
        if not addresses:
            raise AllFailed("session: no relay addresses", None)
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(self._connect_one(host, port, kind, handshake_timeout))
            for host, port in addresses
        ]
        names = [f"{host}:{port}" for host, port in addresses]
        errors: list[str] = []
        refused: RelayRefused | None = None
        certificate = False
        winner: Link | None = None
        reported: set[int] = set()
        grace_until: float | None = None
        try:
            while winner is None:
                for i, task in enumerate(tasks):
                    if not task.done():
                        later = self._later_answer(tasks, i) if self._mesh else None
                        if later is not None:
                            now = loop.time()
                            if grace_until is None:
                                grace_until = now + MESH_PREFERENCE_GRACE
                            if now >= grace_until:
                                winner = later
                        break
                    exc = task.exception()
                    if exc is None:
                        winner = task.result()
                        break
                    if i not in reported:
                        reported.add(i)
                        if isinstance(exc, RelayRefused):
                            refused = exc
                        certificate = certificate or isinstance(exc, CertificateError)
                        errors.append(f"{names[i]}: {exc}")
                        if len(addresses) > 1:
                            log.warning(
                                "session: relay endpoint unhealthy",
                                extra=kv(addr=names[i], err=str(exc)),
                            )
                else:
                    break  # every attempt failed
                if winner is None:
                    await asyncio.wait(
                        [t for t in tasks if not t.done()],
                        timeout=None if grace_until is None else grace_until - loop.time(),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for task in tasks:
                if not task.cancelled() and task.exception() is None:
                    link = task.result()
                    if link is not winner:
                        link.conn.close(0, "")
        if winner is None:
            raise AllFailed("; ".join(errors) or "no relay answered", refused, certificate)
        if len(addresses) > 1:
            log.info("session: nearest-relay selected", extra=kv(addr=winner.address))
        return winner

    @staticmethod
    def _later_answer(tasks: list[asyncio.Task[Link]], after: int) -> Link | None:
        """The first relay after index ``after`` whose HELLO was acknowledged, if any."""
        for task in tasks[after + 1 :]:
            if task.done() and not task.cancelled() and task.exception() is None:
                return task.result()
        return None

    async def _connect_one(self, host: str, port: int, kind: str, handshake_timeout: float) -> Link:
        address = f"{host}:{port}"
        conn: Connection
        if kind == "tcp":
            address = f"tcp://{address}"
            conn = await connect_tcp(
                host, port, self.config.tls, handshake_timeout=handshake_timeout
            )
        else:
            conn, shared = await self._dial_quic(host, port, handshake_timeout)
        try:
            ctrl = await conn.open_stream()
            channel = ControlChannel(ctrl)
            await channel.send(
                FrameType.HELLO,
                Hello(
                    protocol_version="orp/1",
                    agent_uri=self.config.uri,
                    capabilities=[
                        *self.config.capabilities,
                        CAP_INSTANCE,
                        CAP_RESUME_PEER,
                        CAP_PIPELINE,
                        CAP_CLOSE_ACK,
                        CAP_MESH,
                    ],
                    outrelay_instance=self._instance,
                ),
            )
            reader = FrameReader(ctrl)
            async with asyncio.timeout(self.config.hello_timeout):
                frame = await reader.read_frame()
            if frame is None:
                raise RelayRefused("it closed the control stream before HELLO_ACK", address)
            if frame.type != FrameType.HELLO_ACK:
                raise BrokenResourceError(
                    f"relay {address} answered HELLO with {frame_name(frame.type)}"
                )
            accepted = accepted_features(frame, address)
        except TimeoutError as exc:
            conn.close(0, "")
            raise BrokenResourceError(
                f"no HELLO_ACK from {address} within {self.config.hello_timeout:g}s"
            ) from exc
        except TransportError as exc:
            conn.close(0, "")
            if conn.close_reason and "closed locally" not in conn.close_reason:
                raise refusal(address, conn.close_reason) from exc
            raise
        except BaseException:
            conn.close(0, "")
            raise
        return Link(
            address=address,
            conn=conn,
            ctrl=channel,
            reader=reader,
            kind=kind,
            shared=kind == "quic" and shared,
            accepted=accepted,
        )

    async def _dial_quic(
        self, host: str, port: int, handshake_timeout: float
    ) -> tuple[Connection, bool]:
        """QUIC to a relay: from the shared socket when there is one and it can reach it.

        The shared socket runs aioquic whatever ``--quic-backend`` says: it
        also serves direct dials, and only aioquic can verify client certificates.
        """
        endpoint = self._endpoint()
        if endpoint is not None:
            try:
                return await endpoint.connect(host, port, handshake_timeout=handshake_timeout), True
            except OtherFamily as exc:
                log.debug("session: relay not on the shared socket", extra=kv(err=str(exc)))
        conn = await self._connect_quic(
            host, port, self.config.tls, handshake_timeout=handshake_timeout
        )
        return conn, False
