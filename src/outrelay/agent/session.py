"""The agent's session with the relay set: connect, HELLO, REGISTER, reconnect.

Spec 03 §3 with its [REC]s:

* every relay in ``--relay`` is dialled at once and the first to answer
  HELLO wins; a silent endpoint cannot hang start-up (§3.2);
* HELLO_ACK and REGISTER_ACK have timeouts (§3.1, §3.3);
* one control-stream reader for the connection's whole life, started right
  after HELLO_ACK; REGISTER_ACK is matched in order and OBSERVED_ADDR_RESP
  by request id, with futures (§3.7);
* every control-stream write goes through one lock (:class:`ControlChannel`);
* a lost connection is re-established with capped exponential backoff and
  jitter, and every service is registered again with its ``local_addr``
  (§4.5, §11 item 12).

With TLS 1.3 the client sees its handshake complete before the relay has
judged its certificate, so only HELLO_ACK means "accepted": a connection
closed before it is a refusal (:class:`RelayRefused`), whose reason is the
relay's CONNECTION_CLOSE reason phrase (ours gives one, a reference relay an
empty one).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from outrelay.agent.p2p import RequestIds
from outrelay.agent.resumable import RESUME_WINDOW, ResumableStream, ResumeFailed, exchange_resume
from outrelay.observe import kv, ms
from outrelay.orp import (
    CAP_INSTANCE,
    CAP_P2P_MODE,
    CAP_P2P_RESUME_V2,
    CAP_RESUME_PEER,
    MESSAGE_TYPES,
    CandidateAnswer,
    CandidateOffer,
    FrameType,
    Hello,
    MalformedPayload,
    ObservedAddrQuery,
    ObservedAddrResp,
    OpenStream,
    OrpError,
    Register,
    RegisterAck,
    StreamCheckpoint,
    StreamEndCode,
    StreamReady,
    decode_message,
    encode_message,
)
from outrelay.orp import AllocGranted as AllocGrantedMessage
from outrelay.resume import ResumeError, new_stream_id
from outrelay.transport import (
    BrokenResourceError,
    CertificateError,
    Connection,
    OtherFamily,
    QuicTlsConfig,
    SharedUdpEndpoint,
    Stream,
    TransportError,
    connect_tcp,
    select_quic_backend,
)
from outrelay.wire import ControlChannel, FrameReader, frame_name

__all__ = [
    "NotConnected",
    "RelayRefused",
    "RelaySession",
    "SessionConfig",
    "StreamMode",
]

log = logging.getLogger("outrelay.agent.session")

HELLO_TIMEOUT = 10.0  # spec 03 §3.1 [REC]
REGISTER_TIMEOUT = 10.0  # spec 03 §3.3 [REC]
BACKOFF_INITIAL = 1.0  # spec 03 §4.5
BACKOFF_MAX = 30.0  # spec 03 §4.5
CHECKPOINT_PERIOD = 0.1  # spec 01 / spec 03 §4.3
RESUME_SLACK = 5.0
"""A resume gets the stream's window plus this (35 s in all, spec 03 §4.6 [REC])."""
PING_INTERVAL = 10.0  # spec 03 §2.2 [REC]: TCP path liveness
HANDSHAKE_TIMEOUT = 5.0  # spec 01: QUIC handshake
TCP_HANDSHAKE_TIMEOUT = 10.0
SRFLX_TIMEOUT = 3.0  # spec 03 §7.2 / §10
OPEN_TIMEOUT = 10.0
HELLO_CAPABILITIES = (CAP_P2P_MODE, CAP_P2P_RESUME_V2)
"""What ``--p2p-listen`` adds to HELLO (see ``orp.extensions``); ``instance`` is always sent."""
GOODBYE_FLUSH = 0.2
"""At shutdown, how long the stream resets (``AGENT_GONE``) get to leave before the
connection closes: aioquic sends nothing but CONNECTION_CLOSE once closing."""


class NotConnected(Exception):
    """No relay connection right now (reconnect in progress)."""


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


def _refusal(address: str, close_reason: str) -> RelayRefused:
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


class StreamMode:
    SPLICE = "splice"
    FORWARD = "forward"


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
    (see :mod:`outrelay.transport.quic_backend`)."""
    capabilities: tuple[str, ...] = ()
    """HELLO capabilities (:data:`HELLO_CAPABILITIES` with ``--p2p-listen``); the
    reference sends none, and neither do we without P2P."""
    quic_attempt_timeout: float = 3.0
    """In ``auto`` mode with TCP endpoints, how long a QUIC handshake may take
    before the TCP fallback is tried."""


@dataclass(eq=False)
class _Link:
    """One live relay connection and its control stream."""

    address: str
    conn: Connection
    ctrl: ControlChannel
    reader: FrameReader
    kind: str = "quic"
    shared: bool = False
    """QUIC from the shared UDP socket (``--p2p-listen``): srflx is meaningful."""
    register_waiters: deque[asyncio.Future[str]] = field(default_factory=deque)
    last_pong: float = field(default_factory=time.monotonic)


class RelaySession:
    """Keeps one relay connection alive and multiplexes the control stream.

    ``run()`` owns everything it starts. Relay-opened streams go to
    ``on_incoming``, which the caller runs as its own task.
    """

    def __init__(
        self,
        config: SessionConfig,
        *,
        on_incoming: Callable[[Stream], None],
        on_refused: Callable[[RelayRefused], Awaitable[bool]] | None = None,
        on_fatal: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self._connect_quic = select_quic_backend(config.quic_backend).connect
        self._on_incoming = on_incoming
        self._on_refused = on_refused
        """Called when the relay refuses us before we were ever accepted; True: stop
        dialling (the owner is exiting), so nothing says "retrying"."""
        self._on_fatal = on_fatal
        """Called when start-up cannot succeed (registration refused before first contact)."""
        self._link: _Link | None = None
        self._mode_waiters: dict[int, asyncio.Future[str]] = {}
        self._addr_waiters: dict[int, asyncio.Future[tuple[str, int]]] = {}
        self._request_ids = RequestIds()
        self._grants: dict[int, AllocGrantedMessage] = {}
        """ALLOC_GRANTED delivered to a waiter, until :meth:`take_grant`."""
        self._peers: dict[int, str] = {}
        """Stream id -> the peer agent's URI, when known (provider side)."""
        self.on_candidates: Callable[[int, object], None] | None = None
        """P2P (off by default): receives CANDIDATE_OFFER/ANSWER messages."""
        self.promoter: Callable[[ResumableStream], Coroutine[Any, Any, None]] | None = None
        """P2P (off by default): the consumer runs this beside each spliced stream."""
        self._active_ids: set[int] = set()
        self._streams: dict[int, ResumableStream] = {}
        self._to_resume: set[ResumableStream] = set()
        self._resume_wakeup = asyncio.Event()
        self.connected = asyncio.Event()
        self.resume_window = config.resume_window
        self._ever_connected = False
        self._closing = False
        self._accepting = True
        self._on_tcp = False
        self._connections = 0
        self.udp_endpoint: SharedUdpEndpoint | None = None
        """``--p2p-listen``: QUIC to the relay leaves from this socket (spec 03 §2.3)."""
        self._p2p_modes: dict[int, int] = {}
        """Stream id -> p2p mode told by our relay in STREAM_READY (P2PMode number + 1)."""
        self.instance = secrets.token_hex(8)
        """This process's id in HELLO (``orp.CAP_INSTANCE``): a restarted agent has
        another, so our relay ends the old one's streams at once instead of
        parking them for the resume window."""

    @property
    def link_generation(self) -> int:
        """How many relay connections have been established (changes on reconnect)."""
        return self._connections

    @property
    def on_shared_socket(self) -> bool:
        """The current relay connection runs on the shared UDP socket."""
        link = self._link
        return link is not None and link.shared and not link.conn.is_closed

    def p2p_mode(self, stream_id: int) -> int:
        """The relay's word on P2P for ``stream_id``: 0 (not told) or P2PMode number + 1."""
        return self._p2p_modes.get(stream_id, 0)

    @property
    def link_address(self) -> str | None:
        return self._link.address if self._link is not None else None

    def stop_accepting(self) -> None:
        """Graceful shutdown: relay-opened streams are refused from now on."""
        self._accepting = False

    # -- connection loop ----------------------------------------------------------------

    async def run(self) -> None:
        """Connect, serve, reconnect, resume; returns only when cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._resume_supervisor(), name="resume")
            tg.create_task(self._checkpoint_emitter(), name="checkpoints")
            await self._connection_loop()

    async def _connection_loop(self) -> None:
        attempt = 0
        backoff = self.config.backoff_initial
        while True:
            attempt += 1
            try:
                link = await self._connect_any()
            except _AllFailed as exc:
                refused = exc.refused if not self._ever_connected else None
                if refused is not None and self._on_refused and await self._on_refused(refused):
                    return  # the owner stops; run() ends when it cancels us
                delay = backoff * random.uniform(0.8, 1.2)
                loud = attempt <= 3 or attempt % 10 == 0 or exc.certificate
                level = logging.WARNING if loud else logging.DEBUG
                log.log(
                    level,
                    "session: no relay reachable; retrying",
                    extra=kv(attempt=attempt, backoff=f"{delay:.1f}s", err=str(exc)),
                )
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, self.config.backoff_max)
                continue
            try:
                established = await self._serve_link(link, attempt)
            finally:
                self._link = None
                self.connected.clear()
                link.conn.close(0, "")
                # Streams nobody is reading (finished, waiting for the peer's
                # last acknowledgement) would not notice the loss by themselves.
                for stream in list(self._streams.values()):
                    if stream.path == "relay" and not stream.is_broken:
                        stream.mark_broken(f"relay connection lost ({link.conn.close_reason})")
            if self._closing:
                return  # close() said goodbye: no reconnect
            if not established:
                if not self._ever_connected and self._on_fatal is not None:
                    await self._on_fatal(
                        f"the relay {link.address} did not accept our service registration"
                    )
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, self.config.backoff_max)
                continue
            log.warning(
                "session: lost; reconnecting",
                extra=kv(relay=link.address, reason=link.conn.close_reason),
            )
            attempt = 0
            backoff = self.config.backoff_initial

    async def _serve_link(self, link: _Link, attempt: int) -> bool:
        """Register, then serve relay-opened streams until the link dies.

        Returns:
            False if the services could not be registered (nothing was served).
        """
        async with asyncio.TaskGroup() as tg:
            helpers = [tg.create_task(self._control_reader(link))]
            if link.kind == "tcp":
                # No QUIC keep-alive here: PING on ctrl finds a dead TCP path
                # (spec 03 §2.2 [REC]).
                helpers.append(tg.create_task(self._ping_loop(link)))
            try:
                for name, target in self.config.services.items():
                    service_id = await self._register(link, name, target)
                    log.info(
                        "service registered",
                        extra=kv(name=name, target=target, service_id=service_id),
                    )
            except (TransportError, TimeoutError, OrpError) as exc:
                log.error(
                    "expose: registration failed",
                    extra=kv(relay=link.address, err=str(exc) or repr(exc)),
                )
                for task in helpers:
                    task.cancel()
                return False
            self._link = link
            self._ever_connected = True
            self.connected.set()
            self._resume_wakeup.set()
            if self._connections:
                log.info("session: reconnected", extra=kv(attempt=attempt, relay=link.address))
            else:
                log.info("session: connected", extra=kv(relay=link.address))
            self._connections += 1
            try:
                while True:
                    stream = await link.conn.accept_stream()
                    if self._accepting:
                        self._on_incoming(stream)
                    else:
                        stream.abort()
            except TransportError:
                pass
            finally:
                for task in helpers:
                    task.cancel()
        return True

    async def _connect_any(self) -> _Link:
        """QUIC first, then the TLS + yamux fallback, as ``transport`` says (spec 03 §1.4)."""
        cfg = self.config
        quic_error: _AllFailed | None = None
        if cfg.transport in ("auto", "quic") and cfg.relays:
            timeout = (
                cfg.quic_attempt_timeout
                if cfg.transport == "auto" and cfg.relays_tcp
                else HANDSHAKE_TIMEOUT
            )
            try:
                link = await self._connect_ordered(cfg.relays, "quic", timeout)
            except _AllFailed as exc:
                quic_error = exc
            else:
                if self._on_tcp:
                    log.info("session: back on QUIC", extra=kv(relay=link.address))
                self._on_tcp = False
                return link
        if cfg.transport in ("auto", "tcp") and cfg.relays_tcp:
            try:
                link = await self._connect_ordered(cfg.relays_tcp, "tcp", TCP_HANDSHAKE_TIMEOUT)
            except _AllFailed as exc:
                if quic_error is not None:
                    raise _AllFailed(
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
        raise _AllFailed("session: no relay addresses for this transport", None)

    async def _connect_ordered(
        self, addresses: tuple[tuple[str, int], ...], kind: str, handshake_timeout: float
    ) -> _Link:
        """Dial every relay at once; prefer the earliest healthy one in ``--relay`` order.

        All attempts run concurrently, each bounded (QUIC handshake 5 s,
        HELLO_ACK 10 s), so a silent endpoint delays start-up by at most that
        much and never hangs it (spec 03 §3.2 [REC]). Among the endpoints
        that answer, the first in list order wins: without inter-relay
        forwarding, a consumer and its provider must meet on the same relay,
        and so must both halves of a resumed stream.
        """
        if not addresses:
            raise _AllFailed("session: no relay addresses", None)
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(self._connect_one(host, port, kind, handshake_timeout))
            for host, port in addresses
        ]
        names = [f"{host}:{port}" for host, port in addresses]
        errors: list[str] = []
        refused: RelayRefused | None = None
        certificate = False
        winner: _Link | None = None
        reported: set[int] = set()
        try:
            while winner is None:
                for i, task in enumerate(tasks):
                    if not task.done():
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
                        [t for t in tasks if not t.done()], return_when=asyncio.FIRST_COMPLETED
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
            raise _AllFailed("; ".join(errors) or "no relay answered", refused, certificate)
        if len(addresses) > 1:
            log.info("session: nearest-relay selected", extra=kv(addr=winner.address))
        return winner

    async def _connect_one(
        self, host: str, port: int, kind: str, handshake_timeout: float
    ) -> _Link:
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
                    capabilities=[*self.config.capabilities, CAP_INSTANCE, CAP_RESUME_PEER],
                    outrelay_instance=self.instance,
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
        except TimeoutError as exc:
            conn.close(0, "")
            raise BrokenResourceError(
                f"no HELLO_ACK from {address} within {self.config.hello_timeout:g}s"
            ) from exc
        except TransportError as exc:
            conn.close(0, "")
            if conn.close_reason and "closed locally" not in conn.close_reason:
                raise _refusal(address, conn.close_reason) from exc
            raise
        except BaseException:
            conn.close(0, "")
            raise
        return _Link(
            address=address,
            conn=conn,
            ctrl=channel,
            reader=reader,
            kind=kind,
            shared=kind == "quic" and shared,
        )

    async def _dial_quic(
        self, host: str, port: int, handshake_timeout: float
    ) -> tuple[Connection, bool]:
        """QUIC to a relay: from the shared socket when there is one and it can reach it.

        The shared socket runs aioquic whatever ``--quic-backend`` says: it
        also serves direct dials, and only aioquic can verify client certificates.
        """
        endpoint = self.udp_endpoint
        if endpoint is not None:
            try:
                return await endpoint.connect(host, port, handshake_timeout=handshake_timeout), True
            except OtherFamily as exc:
                log.debug("session: relay not on the shared socket", extra=kv(err=str(exc)))
        conn = await self._connect_quic(
            host, port, self.config.tls, handshake_timeout=handshake_timeout
        )
        return conn, False

    # -- control stream ---------------------------------------------------------------------

    async def _ping_loop(self, link: _Link) -> None:
        while not link.conn.is_closed:
            await asyncio.sleep(PING_INTERVAL)
            if time.monotonic() - link.last_pong > 2 * PING_INTERVAL + 1:
                log.warning(
                    "session: no PONG from the relay; reconnecting", extra=kv(relay=link.address)
                )
                link.conn.close(0, "")
                return
            try:
                await link.ctrl.send(FrameType.PING)
            except TransportError:
                return

    async def _register(self, link: _Link, name: str, target: str) -> str:
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        link.register_waiters.append(waiter)
        try:
            await link.ctrl.send(FrameType.REGISTER, Register(service_name=name, local_addr=target))
            async with asyncio.timeout(self.config.register_timeout):
                return await waiter
        except TimeoutError as exc:
            raise TimeoutError(
                f"no REGISTER_ACK for {name!r} within {self.config.register_timeout:g}s "
                "(the relay refused the registration)"
            ) from exc
        finally:
            if waiter in link.register_waiters:
                link.register_waiters.remove(waiter)

    async def _control_reader(self, link: _Link) -> None:
        """The sole reader of the control stream (spec 03 §3.7 [REC])."""
        try:
            while True:
                frame = await link.reader.read_frame()
                if frame is None:
                    log.warning("session: ctrl reader stopped", extra=kv(err="end of stream"))
                    break
                try:
                    message = decode_message(frame) if frame.type in MESSAGE_TYPES else None
                    self._dispatch(link, frame.type, message)
                except MalformedPayload as exc:
                    log.warning(
                        f"session: {frame_name(frame.type)} unmarshal failed",
                        extra=kv(err=str(exc)),
                    )
        except (TransportError, OrpError) as exc:
            log.warning("session: ctrl reader stopped", extra=kv(err=str(exc)))
        # The control stream is gone: the connection is no use any more.
        link.conn.close(0, "")

    def _dispatch(self, link: _Link, frame_type: int, message: object) -> None:
        if frame_type == FrameType.REGISTER_ACK:
            service_id = message.service_id if isinstance(message, RegisterAck) else ""
            while link.register_waiters:
                waiter = link.register_waiters.popleft()
                if not waiter.done():
                    waiter.set_result(service_id)
                    return
            log.warning("session: unexpected ctrl frame", extra=kv(type="REGISTER_ACK"))
        elif frame_type == FrameType.STREAM_READY:
            sid = message.stream_id if isinstance(message, StreamReady) else 0
            if (
                isinstance(message, StreamReady)
                and message.outrelay_p2p_mode
                and (sid in self._active_ids or sid in self._mode_waiters)
            ):
                self._p2p_modes[sid] = message.outrelay_p2p_mode
            if (
                isinstance(message, StreamReady)
                and message.outrelay_peer_uri
                and (sid in self._active_ids or sid in self._mode_waiters)
            ):
                self._peers[sid] = message.outrelay_peer_uri  # the consumer learns its provider
            self._deliver_mode(sid, StreamMode.SPLICE)
        elif frame_type == FrameType.ALLOC_GRANTED:
            if not isinstance(message, AllocGrantedMessage):
                return
            sid = message.stream_id
            pending = self._mode_waiters.get(sid)
            if pending is not None and not pending.done():
                self._grants[sid] = message
            self._deliver_mode(sid, StreamMode.FORWARD)
        elif frame_type == FrameType.STREAM_CHECKPOINT:
            if isinstance(message, StreamCheckpoint):
                stream = self._streams.get(message.stream_id)
                if stream is not None:
                    stream.apply_checkpoint(message.my_position, message.peer_ack_position)
        elif frame_type == FrameType.OBSERVED_ADDR_RESP:
            if isinstance(message, ObservedAddrResp):
                answer = self._addr_waiters.pop(message.request_id, None)
                if answer is None or answer.done():
                    log.debug("session: OBSERVED_ADDR_RESP for no query", extra=kv())
                    return
                try:
                    ip = str(ipaddress.ip_address(message.ip.split("%", 1)[0]))
                except ValueError:
                    answer.set_exception(OrpError(f"observed address {message.ip!r} is no ip"))
                    return
                answer.set_result((ip, message.port & 0xFFFF))
        elif frame_type in (FrameType.CANDIDATE_OFFER, FrameType.CANDIDATE_ANSWER):
            if self.on_candidates is not None and isinstance(
                message, (CandidateOffer, CandidateAnswer)
            ):
                self.on_candidates(frame_type, message)
            else:
                log.debug(
                    "session: candidates ignored (p2p off)", extra=kv(type=frame_name(frame_type))
                )
        elif frame_type == FrameType.PONG:
            link.last_pong = time.monotonic()
        else:
            log.warning("session: unexpected ctrl frame", extra=kv(type=frame_name(frame_type)))

    def _deliver_mode(self, stream_id: int, mode: str) -> None:
        waiter = self._mode_waiters.get(stream_id)
        if waiter is None or waiter.done():
            log.debug("session: stream-mode delivery dropped (no waiter)", extra=kv(id=stream_id))
            return
        waiter.set_result(mode)
        log.debug(f"session: stream mode resolved by relay ({mode})", extra=kv(id=stream_id))

    # -- streams ------------------------------------------------------------------------

    def expect_mode(self, stream_id: int) -> asyncio.Future[str]:
        """Register a waiter for STREAM_READY / ALLOC_GRANTED of ``stream_id``."""
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._mode_waiters[stream_id] = waiter
        return waiter

    async def observed_address(self, wait: float = SRFLX_TIMEOUT) -> tuple[str, int]:
        """Our address as the relay sees it (STUN-lite, spec 03 §7.2 with [REC] §3.7).

        The answer is matched by request id by the one control reader, so
        this may run at any time.

        Raises:
            NotConnected: no relay connection.
            TimeoutError: no answer within ``wait``.
            TransportError: the control stream failed.
            OrpError: the relay answered with something that is not an IP.
        """
        link = self._link
        if link is None or link.conn.is_closed:
            raise NotConnected("not connected to a relay")
        request_id = self._request_ids.next()
        waiter: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
        self._addr_waiters[request_id] = waiter
        try:
            await link.ctrl.send(
                FrameType.OBSERVED_ADDR_QUERY, ObservedAddrQuery(request_id=request_id)
            )
            async with asyncio.timeout(wait):
                return await waiter
        finally:
            self._addr_waiters.pop(request_id, None)
            if not waiter.done():
                waiter.cancel()

    def take_grant(self, stream_id: int) -> AllocGrantedMessage | None:
        """The ALLOC_GRANTED that resolved ``stream_id``'s mode as forward (once)."""
        return self._grants.pop(stream_id, None)

    @property
    def relay_host(self) -> str:
        """The current relay connection's remote IP (spec 03 §8.2 [REC]), or ""."""
        link = self._link
        return link.conn.peer.address[0] if link is not None else ""

    def forget_mode(self, stream_id: int, waiter: asyncio.Future[str]) -> None:
        if self._mode_waiters.get(stream_id) is waiter:
            del self._mode_waiters[stream_id]
        if not waiter.done():
            waiter.cancel()

    async def open_stream(self, service: str) -> tuple[Stream, int, asyncio.Future[str]]:
        """OPEN_STREAM on a fresh relay stream (spec 03 §3.4).

        Returns:
            The stream, its id, and a future resolved with the stream mode.

        Raises:
            NotConnected: no relay connection right now.
            TransportError: the relay connection failed during the open.
        """
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                # During a reconnect the application's connection waits (a stall,
                # not an error) rather than failing at once as in the reference.
                while (link := self._link) is None or link.conn.is_closed:
                    await self.connected.wait()
                    await asyncio.sleep(0.05)  # let a dying link be replaced
                stream = await link.conn.open_stream()
        except TimeoutError as exc:
            if self._link is None:
                raise NotConnected(
                    f"not connected to a relay (reconnecting for over {OPEN_TIMEOUT:g}s)"
                ) from exc
            raise BrokenResourceError("relay stream limit reached; open timed out") from exc
        sid = new_stream_id(self._active_ids | self._mode_waiters.keys())
        waiter = self.expect_mode(sid)
        try:
            await stream.send_all(
                encode_message(
                    FrameType.OPEN_STREAM, OpenStream(target_service=service, stream_id=sid)
                )
            )
        except BaseException:
            self.forget_mode(sid, waiter)
            stream.abort()
            raise
        return stream, sid, waiter

    def is_active(self, stream_id: int) -> bool:
        """A stream of ours (opened or accepted, not yet finished) has this id."""
        return stream_id in self._active_ids

    def track(self, stream_id: int) -> None:
        self._active_ids.add(stream_id)

    def untrack(self, stream_id: int) -> None:
        self._active_ids.discard(stream_id)
        self._peers.pop(stream_id, None)
        self._grants.pop(stream_id, None)
        self._p2p_modes.pop(stream_id, None)

    # -- resumable streams (spec 03 §4) ----------------------------------------------

    async def send_control(self, frame_type: FrameType, message: object) -> None:
        """Write one frame on the current control stream.

        Raises:
            NotConnected: no relay connection.
            TransportError: the write failed.
        """
        link = self._link
        if link is None or link.conn.is_closed:
            raise NotConnected("not connected to a relay")
        await link.ctrl.send(frame_type, message)  # type: ignore[arg-type]

    def resumable(self, stream_id: int) -> ResumableStream | None:
        return self._streams.get(stream_id)

    def peer_of(self, stream_id: int) -> str:
        """The peer agent's URI for ``stream_id`` ("" if unknown)."""
        return self._peers.get(stream_id, "")

    def wrap(
        self, stream_id: int, inner: Stream, prefix: bytes = b"", *, peer_uri: str = ""
    ) -> Stream:
        """Make a spliced relay stream resumable (ids 0 cannot be resumed)."""
        if stream_id == 0:
            return inner
        if peer_uri:
            self._peers[stream_id] = peer_uri
        wrapped = ResumableStream(
            stream_id, inner, on_broken=self._on_broken, prefix=prefix, window=self.resume_window
        )
        wrapped.peer_uri = self._peers.get(stream_id, "")
        previous = self._streams.get(stream_id)
        if previous is not None:
            log.warning(
                "session: stream id collision; replacing prior state", extra=kv(id=stream_id)
            )
        self._streams[stream_id] = wrapped
        return wrapped

    def unwrap(self, stream: Stream) -> None:
        """The bridge is done with ``stream``: stop checkpointing and resuming it."""
        if isinstance(stream, ResumableStream):
            if self._streams.get(stream.stream_id) is stream:
                del self._streams[stream.stream_id]
                self._peers.pop(stream.stream_id, None)
            self._to_resume.discard(stream)

    def _on_broken(self, stream: ResumableStream) -> None:
        self._to_resume.add(stream)
        self._resume_wakeup.set()

    async def _resume_supervisor(self) -> None:
        """Start one resume task per broken stream, concurrently ([REC] spec 03 §4.6)."""
        running: dict[ResumableStream, asyncio.Task[None]] = {}
        async with asyncio.TaskGroup() as tg:
            while True:
                await self._resume_wakeup.wait()
                self._resume_wakeup.clear()
                link = self._link
                if link is None or link.conn.is_closed:
                    continue
                for stream in list(self._to_resume):
                    if stream in running or stream.is_lost:
                        if stream.is_lost:
                            self._to_resume.discard(stream)
                        continue
                    running[stream] = tg.create_task(self._resume_task(link, stream, running))

    async def _resume_task(
        self,
        link: _Link,
        stream: ResumableStream,
        running: dict[ResumableStream, asyncio.Task[None]],
    ) -> None:
        try:
            await self._resume_one(link, stream)
        finally:
            running.pop(stream, None)
            self._resume_wakeup.set()  # the stream may need another try on a new link

    async def _resume_one(self, link: _Link, stream: ResumableStream) -> None:
        """STREAM_RESUME on a fresh stream, retransmit, swap (spec 03 §4.4)."""
        sid = stream.stream_id
        broken_at = stream.broken_since or time.monotonic()
        remaining = broken_at + stream_window(stream) + RESUME_SLACK - time.monotonic()
        try:
            async with asyncio.timeout(max(remaining, 0.1)):
                new, leftover, gap = await exchange_resume(link.conn, stream)
        except TransportError as exc:
            if link.conn.is_closed:
                return  # the new connection died too; the next one retries
            code = exc.code if isinstance(exc, BrokenResourceError) else None
            self._resume_failed(stream, f"resume stream failed: {exc}", code)
            return
        except (TimeoutError, ResumeFailed, OrpError, ResumeError) as exc:
            reason = str(exc) or "no STREAM_RESUME echo within the resume window"
            self._resume_failed(stream, reason)
            return
        self._to_resume.discard(stream)
        stream.install(new, leftover)
        if stream.path != "relay":
            stream.path = "relay"
            log.info(
                "p2p: demoted to relay",
                extra=kv(
                    id=sid,
                    path=link.address,
                    rtt_ms=ms(link.conn.rtt),
                    reason=stream.broken_reason,
                ),
            )
        await stream.retransmit(new, gap)
        log.info(
            "session: stream resumed",
            extra=kv(
                id=sid,
                retransmitted=len(gap),
                stall_ms=int((time.monotonic() - broken_at) * 1000),
                relay=link.address,
            ),
        )

    def _resume_failed(self, stream: ResumableStream, reason: str, code: int | None = None) -> None:
        self._to_resume.discard(stream)
        log.warning(
            "session: resume stream failed; dropping", extra=kv(id=stream.stream_id, err=reason)
        )
        stream.abandon(reason, code)

    async def _checkpoint_emitter(self) -> None:
        """STREAM_CHECKPOINT every 100 ms for streams whose read position moved."""
        reported: dict[int, int] = {}
        while True:
            await asyncio.sleep(CHECKPOINT_PERIOD)
            link = self._link
            if link is None:
                continue
            for sid in list(reported):
                if sid not in self._streams:
                    del reported[sid]
            for sid, stream in list(self._streams.items()):
                received = stream.positions.received
                if stream.is_broken or reported.get(sid) == received:
                    continue
                try:
                    await link.ctrl.send(
                        FrameType.STREAM_CHECKPOINT,
                        StreamCheckpoint(
                            stream_id=sid,
                            my_position=stream.positions.sent,
                            peer_ack_position=received,
                        ),
                    )
                except TransportError:
                    break  # the link is going away; stop this tick
                reported[sid] = received

    def end_streams(self, code: int = StreamEndCode.AGENT_GONE) -> int:
        """Reset every relay stream with a final ``code``: the peers end theirs at once.

        Returns:
            How many streams were ended.
        """
        streams = list(self._streams.values())
        for stream in streams:
            stream.abort(code)
        return len(streams)

    async def close(self) -> None:
        """End every stream (``AGENT_GONE``), then close the relay connection with that code.

        The close code tells our relay that this agent is gone for good, so it
        also ends the streams of ours that were waiting to be resumed.
        """
        self._closing = True
        link = self._link
        if link is not None and not link.conn.is_closed:
            if self.end_streams():
                await asyncio.sleep(GOODBYE_FLUSH)
            link.conn.close(StreamEndCode.AGENT_GONE, "agent shutting down")
        for waiter in self._mode_waiters.values():
            if not waiter.done():
                waiter.cancel()
        self._mode_waiters.clear()
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)


def stream_window(stream: ResumableStream) -> float:
    return stream._window


class _AllFailed(Exception):
    def __init__(
        self, message: str, refused: RelayRefused | None, certificate: bool = False
    ) -> None:
        super().__init__(message)
        self.refused = refused
        self.certificate = certificate
        """A relay's certificate did not verify: worth a warning on every retry."""
