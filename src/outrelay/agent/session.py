"""The agent's session with the relay set: connect, HELLO, REGISTER, reconnect (the shell).

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

The parts live beside it: dialling and refusals in :mod:`.dial`, what each
control frame settles in :mod:`.control` (sans-IO), resuming broken streams in
:mod:`.resume_supervisor`. This module holds the futures, the tasks and the
public API the consumer, provider and P2P roles use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from outrelay.agent.control import (
    PING_INTERVAL,
    Action,
    AddressInvalid,
    AddressObserved,
    CandidatesReceived,
    CheckpointReceived,
    ControlState,
    ModeResolved,
    Registered,
    StreamMode,
    Unexpected,
)
from outrelay.agent.dial import AllFailed, Link, RelayDialer, RelayRefused, SessionConfig
from outrelay.agent.resumable import ResumableStream
from outrelay.agent.resume_supervisor import ResumeSupervisor, emit_checkpoints
from outrelay.agent.stats import StreamStats
from outrelay.observe import kv
from outrelay.orp import (
    CAP_CLOSE_ACK,
    CAP_PIPELINE,
    MESSAGE_TYPES,
    AllocGranted,
    CandidateAnswer,
    CandidateOffer,
    FrameType,
    MalformedPayload,
    ObservedAddrQuery,
    OpenStream,
    OrpError,
    P2PMode,
    Register,
    StreamEndCode,
    decode_message,
    encode_message,
)
from outrelay.resume import new_stream_id
from outrelay.transport import (
    BrokenResourceError,
    Stream,
    TransportError,
    select_quic_backend,
)
from outrelay.wire import frame_name

if TYPE_CHECKING:
    from outrelay.transport import SharedUdpEndpoint

__all__ = [
    "OPEN_TIMEOUT",
    "NotConnected",
    "P2PHooks",
    "RelayRefused",
    "RelaySession",
    "SessionConfig",
    "StreamMode",
    "may_pipeline",
]

log = logging.getLogger("outrelay.agent.session")

SRFLX_TIMEOUT = 3.0  # spec 03 §7.2 / §10
OPEN_TIMEOUT = 10.0
GOODBYE_FLUSH = 0.2
"""At shutdown, how long the stream resets (``AGENT_GONE``) get to leave before the
connection closes: aioquic sends nothing but CONNECTION_CLOSE once closing."""


def may_pipeline(accepted: frozenset[str]) -> bool:
    """May a consumer write application bytes right behind OPEN_STREAM on a relay link that
    echoed ``accepted`` in HELLO_ACK? Only if the relay is ours and said so
    (``orp.CAP_PIPELINE``): a reference relay echoes nothing and discards pipelined bytes
    in forward mode, so against it we wait for the answer as the reference agent does."""
    return CAP_PIPELINE in accepted


class NotConnected(Exception):
    """No relay connection right now (reconnect in progress)."""


class P2PHooks(Protocol):
    """What the session needs from P2P (``--p2p-listen``), given at construction."""

    @property
    def endpoint(self) -> SharedUdpEndpoint | None:
        """The shared UDP socket: QUIC to the relay leaves from it (spec 03 §2.3)."""

    def on_candidates(self, frame_type: int, message: CandidateOffer | CandidateAnswer) -> None:
        """CANDIDATE_OFFER / CANDIDATE_ANSWER from the control stream."""

    async def promote(self, stream: ResumableStream) -> None:
        """The consumer runs this beside each spliced stream; never raises."""


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
        p2p: P2PHooks | None = None,
    ) -> None:
        self.config = config
        self.p2p = p2p
        """P2P (off by default): the shared socket, candidates, promotion."""
        self.instance = secrets.token_hex(8)
        """This process's id in HELLO (``orp.CAP_INSTANCE``): a restarted agent has
        another, so our relay ends the old one's streams at once instead of
        parking them for the resume window."""
        self._dialer = RelayDialer(
            config,
            instance=self.instance,
            connect_quic=select_quic_backend(config.quic_backend).connect,
            endpoint=lambda: p2p.endpoint if p2p is not None else None,
        )
        self._control = ControlState()
        self._on_incoming = on_incoming
        self._on_refused = on_refused
        """Called when the relay refuses us before we were ever accepted; True: stop
        dialling (the owner is exiting), so nothing says "retrying"."""
        self._on_fatal = on_fatal
        """Called when start-up cannot succeed (registration refused before first contact)."""
        self._link: Link | None = None
        self._registers: dict[int, asyncio.Future[str]] = {}
        self._mode_waiters: dict[int, asyncio.Future[str]] = {}
        self._addr_waiters: dict[int, asyncio.Future[tuple[str, int]]] = {}
        self._streams: dict[int, ResumableStream] = {}
        self.stats = StreamStats()
        """Stream counters the bridges and the resume supervisor update (``/metrics``)."""
        self._resumes = ResumeSupervisor(lambda: self._link, self.stats)
        self.connected = asyncio.Event()
        self.datagram_handler: Callable[[bytes], None] | None = None
        """Called with each QUIC DATAGRAM frame from the relay (UDP services, issue 19)."""
        """Set while a relay link is up and every ``--expose`` got its REGISTER_ACK."""
        self.resume_window = config.resume_window
        self._ever_connected = False
        self._closing = False
        self._planned_reconnect = False
        """The current link was closed by :meth:`reconnect`, not lost."""
        self._accepting = True
        self._connections = 0

    @property
    def link_generation(self) -> int:
        """How many relay connections have been established (changes on reconnect)."""
        return self._connections

    @property
    def on_shared_socket(self) -> bool:
        """The current relay connection runs on the shared UDP socket."""
        link = self._link
        return link is not None and link.shared and not link.conn.is_closed

    def p2p_mode(self, stream_id: int) -> P2PMode | None:
        """The relay's word on P2P for ``stream_id`` (None: not told)."""
        return self._control.p2p_mode(stream_id)

    def send_datagram(self, data: bytes) -> bool:
        """One QUIC DATAGRAM frame to the relay; False when the link cannot carry it."""
        link = self._link
        if link is None or link.conn.is_closed:
            return False
        return link.conn.send_datagram(data)

    def _on_datagram(self, data: bytes) -> None:
        handler = self.datagram_handler
        if handler is not None:
            handler(data)

    @property
    def current_link(self) -> Link | None:
        """The relay link in use (None while there is none)."""
        return self._link

    @property
    def connections(self) -> int:
        """Relay links established so far (the first and every reconnect)."""
        return self._connections

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
            tg.create_task(self._resumes.run(), name="resume")
            tg.create_task(emit_checkpoints(self._streams, lambda: self._link), name="checkpoints")
            await self._connection_loop()

    async def _connection_loop(self) -> None:
        attempt = 0
        backoff = self.config.backoff_initial
        while True:
            attempt += 1
            try:
                link = await self._dialer.connect_any()
            except AllFailed as exc:
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
            planned, self._planned_reconnect = self._planned_reconnect, False
            log.log(
                logging.INFO if planned else logging.WARNING,  # a reload's reconnect is no fault
                "session: lost; reconnecting",
                extra=kv(relay=link.address, reason=link.conn.close_reason),
            )
            attempt = 0
            backoff = self.config.backoff_initial

    async def _serve_link(self, link: Link, attempt: int) -> bool:
        """Register, then serve relay-opened streams until the link dies.

        Returns:
            False if the services could not be registered (nothing was served).
        """
        self._control.new_link(time.monotonic())
        async with asyncio.TaskGroup() as tg:
            helpers = [tg.create_task(self._control_reader(link))]
            if link.kind == "tcp":
                # No QUIC keep-alive here: PING on ctrl finds a dead TCP path
                # (spec 03 §2.2 [REC]).
                helpers.append(tg.create_task(self._ping_loop(link)))
            try:
                for name, target in list(self.config.services.items()):
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
            link.conn.on_datagram = self._on_datagram
            self._link = link
            self._ever_connected = True
            self.connected.set()
            self._resumes.wake()
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

    # -- control stream ---------------------------------------------------------------------

    async def _ping_loop(self, link: Link) -> None:
        while not link.conn.is_closed:
            await asyncio.sleep(PING_INTERVAL)
            if self._control.pong_overdue(time.monotonic()):
                log.warning(
                    "session: no PONG from the relay; reconnecting", extra=kv(relay=link.address)
                )
                link.conn.close(0, "")
                return
            try:
                await link.ctrl.send(FrameType.PING)
            except TransportError:
                return

    async def add_service(self, name: str, target: str) -> None:
        """Expose ``name`` -> ``target`` from now on (the Python API's ``serve``/``expose``).

        The service joins :attr:`SessionConfig.services`, so every later link registers it
        too; if a link is up it is registered there at once (spec 03 §3.3).

        Raises:
            TimeoutError: no REGISTER_ACK within ``register_timeout`` (the relay refused).
            TransportError: the link failed during the registration (the next link
                registers the service again).
        """
        self.config.services[name] = target
        link = self._link
        if link is not None and not link.conn.is_closed:
            await self._register(link, name, target)

    async def _register(self, link: Link, name: str, target: str) -> str:
        token = self._control.register()
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._registers[token] = waiter
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
            del self._registers[token]
            self._control.forget_register(token)

    async def _control_reader(self, link: Link) -> None:
        """The sole reader of the control stream (spec 03 §3.7 [REC])."""
        try:
            while True:
                frame = await link.reader.read_frame()
                if frame is None:
                    log.warning("session: ctrl reader stopped", extra=kv(err="end of stream"))
                    break
                try:
                    message = decode_message(frame) if frame.type in MESSAGE_TYPES else None
                except MalformedPayload as exc:
                    log.warning(
                        f"session: {frame_name(frame.type)} unmarshal failed",
                        extra=kv(err=str(exc)),
                    )
                    continue
                for action in self._control.receive(frame.type, message, time.monotonic()):
                    self._apply(action)
        except (TransportError, OrpError) as exc:
            log.warning("session: ctrl reader stopped", extra=kv(err=str(exc)))
        # The control stream is gone: the connection is no use any more.
        link.conn.close(0, "")

    def _apply(self, action: Action) -> None:
        """Settle the future (or call the hook) that ``action`` is about."""
        if isinstance(action, Registered):
            registered = self._registers.get(action.token)
            if registered is not None and not registered.done():
                registered.set_result(action.service_id)
        elif isinstance(action, ModeResolved):
            mode = self._mode_waiters.get(action.stream_id)
            if mode is None or mode.done():
                log.debug(
                    "session: stream-mode delivery dropped (no waiter)",
                    extra=kv(id=action.stream_id),
                )
                return
            mode.set_result(action.mode)
            log.debug(
                f"session: stream mode resolved by relay ({action.mode})",
                extra=kv(id=action.stream_id),
            )
        elif isinstance(action, (AddressObserved, AddressInvalid)):
            answer = self._addr_waiters.pop(action.request_id, None)
            if answer is None or answer.done():
                log.debug("session: OBSERVED_ADDR_RESP for no query", extra=kv())
            elif isinstance(action, AddressObserved):
                answer.set_result((action.ip, action.port))
            else:
                answer.set_exception(OrpError(action.reason))
        elif isinstance(action, CheckpointReceived):
            stream = self._streams.get(action.stream_id)
            if stream is not None:
                stream.apply_checkpoint(action.my_position, action.peer_ack_position)
        elif isinstance(action, CandidatesReceived):
            if self.p2p is not None:
                self.p2p.on_candidates(action.frame_type, action.message)
            else:
                log.debug(
                    "session: candidates ignored (p2p off)",
                    extra=kv(type=frame_name(action.frame_type)),
                )
        elif isinstance(action, Unexpected):
            if action.quiet:
                log.debug(f"session: {action.detail}", extra=kv(type=frame_name(action.frame_type)))
            else:
                log.warning(
                    "session: unexpected ctrl frame", extra=kv(type=frame_name(action.frame_type))
                )

    # -- streams ------------------------------------------------------------------------

    def expect_mode(self, stream_id: int) -> asyncio.Future[str]:
        """Register a waiter for STREAM_READY / ALLOC_GRANTED of ``stream_id``."""
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._mode_waiters[stream_id] = waiter
        self._control.expect_mode(stream_id)
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
        request_id = self._control.query_address()
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
            self._control.forget_query(request_id)
            if not waiter.done():
                waiter.cancel()

    def take_grant(self, stream_id: int) -> AllocGranted | None:
        """The ALLOC_GRANTED that resolved ``stream_id``'s mode as forward (once)."""
        return self._control.take_grant(stream_id)

    @property
    def relay_host(self) -> str:
        """The current relay connection's remote IP (spec 03 §8.2 [REC]), or ""."""
        link = self._link
        return link.conn.peer.address[0] if link is not None else ""

    def forget_mode(self, stream_id: int, waiter: asyncio.Future[str]) -> None:
        """Stop waiting for ``stream_id``'s mode (the open is answered or given up)."""
        if self._mode_waiters.get(stream_id) is waiter:
            del self._mode_waiters[stream_id]
            self._control.forget_mode(stream_id)
        if not waiter.done():
            waiter.cancel()

    async def open_stream(self, service: str) -> tuple[Stream, int, asyncio.Future[str], bool]:
        """OPEN_STREAM on a fresh relay stream (spec 03 §3.4).

        Returns:
            The stream, its id, a future resolved with the stream mode, and whether the
            application's bytes may follow OPEN_STREAM at once (:func:`may_pipeline`).

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
        sid = new_stream_id(self._control.ids_in_use())
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
        return stream, sid, waiter, may_pipeline(link.accepted)

    def is_active(self, stream_id: int) -> bool:
        """A stream of ours (opened or accepted, not yet finished) has this id."""
        return self._control.is_active(stream_id)

    def track(self, stream_id: int) -> None:
        self._control.track(stream_id)

    def untrack(self, stream_id: int) -> None:
        self._control.untrack(stream_id)

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
        return self._control.peer_of(stream_id)

    def wrap(
        self,
        stream_id: int,
        inner: Stream,
        prefix: bytes = b"",
        *,
        peer_uri: str = "",
        sent: bytes = b"",
    ) -> Stream:
        """Make a spliced relay stream resumable (ids 0 cannot be resumed).

        ``prefix``: bytes already read from ``inner``; ``sent``: bytes already written to
        it (pipelined, see :class:`ResumableStream`).
        """
        if stream_id == 0:
            return inner
        self._control.remember_peer(stream_id, peer_uri)
        wrapped = ResumableStream(
            stream_id,
            inner,
            on_broken=self._resumes.on_broken,
            prefix=prefix,
            sent=sent,
            window=self.resume_window,
        )
        wrapped.peer_uri = self._control.peer_of(stream_id)
        link = self._link
        wrapped.close_ack = link is not None and CAP_CLOSE_ACK in link.accepted
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
                self._control.forget_peer(stream.stream_id)
            self._resumes.forget(stream)

    def end_streams(self, code: int = StreamEndCode.AGENT_GONE) -> int:
        """Reset every relay stream with a final ``code``: the peers end theirs at once.

        Returns:
            How many streams were ended.
        """
        streams = list(self._streams.values())
        for stream in streams:
            stream.abort(code)
        return len(streams)

    def reconnect(self, reason: str) -> bool:
        """Drop the relay link as a link failure so a new one is dialled (certificate reload).

        The close code is 0, not AGENT_GONE: the relay parks every spliced half
        for resume, and our streams resume on the next link exactly as after a
        network failure, so nothing is lost. Returns False when there is no
        link (the next dial presents the new certificate anyway).
        """
        link = self._link
        if link is None or self._closing:
            return False
        log.info("session: reconnecting", extra=kv(relay=link.address, reason=reason))
        self._planned_reconnect = True
        link.conn.close(0, reason)
        return True

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
        for sid, waiter in self._mode_waiters.items():
            self._control.forget_mode(sid)
            if not waiter.done():
                waiter.cancel()
        self._mode_waiters.clear()
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)
