"""The relay's asyncio shell: accept agents, run their control streams, splice.

Behaviour follows spec 02 §2–§6 and §13, with the [REC] fixes of §15:
every control-stream write is serialised (item 4), a disconnect only tears
down the agent-map entry and registrations that still belong to that
connection (item 2), and policy rules keep a deterministic order (item 5).
Our additions: a HELLO that never comes is dropped after ``hello_timeout``;
a data stream whose first frame never completes, and a provider that never
answers INCOMING_STREAM, are closed after bounded waits.

The control plane is embedded (DESIGN.md): :class:`ServiceRegistry`, the
policy engine fed from a file, and audit lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from cryptography import x509

from outrelay.identity import AgentIdentity, InvalidIdentity, RelayIdentity, parse_identity
from outrelay.observe import kv
from outrelay.orp import (
    CAP_INSTANCE,
    CAP_P2P_MODE,
    CAP_RESUME_PEER,
    RELAY_CAPABILITIES,
    AllocGranted,
    CandidateAnswer,
    Frame,
    FrameType,
    HelloAck,
    IncomingStream,
    MigrateToP2P,
    MigrateToRelay,
    ObservedAddrQuery,
    ObservedAddrResp,
    OpenStream,
    OrpError,
    Register,
    RegisterAck,
    RejectCode,
    StreamEndCode,
    StreamReady,
    StreamReject,
    StreamResume,
    decode_message,
    encode_frame,
    encode_message,
    is_final,
)
from outrelay.orp import Hello as HelloMessage
from outrelay.pki import ClientVerifier, load_certificates
from outrelay.relay.audit import AuditEvent, AuditLog
from outrelay.relay.limits import (
    CONTROL_BURST,
    CONTROL_FRAMES_PER_SECOND,
    MAX_CONTROL_FRAME,
    MAX_PARKED_HALVES_PER_AGENT,
    MAX_REGISTRATIONS_PER_AGENT,
    MAX_SERVICE_NAME,
)
from outrelay.relay.outbox import ControlOutbox
from outrelay.relay.pairs import AgentInstances, EndedPairs, Member, MigratedCache, PairTable
from outrelay.relay.plane import ForwardPlane
from outrelay.relay.policy import (
    P2PMode,
    PolicyResult,
    PolicyService,
    ProvideResult,
    RelayMode,
    combine_p2p,
)
from outrelay.relay.registry import RegistrationRejected, ServiceRegistry
from outrelay.relay.resume_matcher import Half, HalfKind, ResumeMatcher
from outrelay.splice import SpliceResult, splice
from outrelay.transport import (
    BrokenResourceError,
    Connection,
    QuicServerHandle,
    QuicTlsConfig,
    RetryMode,
    Stream,
    TcpServerHandle,
    TokenBucket,
    TransportError,
    close_phrase,
    serve_quic,
    serve_tcp,
)
from outrelay.wire import FrameReader, expect_message, frame_name

__all__ = ["Relay", "RelayConfig"]

log = logging.getLogger("outrelay.relay")

HELLO_TIMEOUT = 10.0
"""Ours: the reference has none (spec 02 §2.3); a silent client is dropped."""
FIRST_FRAME_TIMEOUT = 60.0
"""Ours: the reference waits for ever for a data stream's first frame (§6.0)."""
PROVIDER_ANSWER_TIMEOUT = 30.0
"""Ours: the reference waits for ever for STREAM_ACCEPT/REJECT (§6.6)."""
REJECT_DRAIN_TIMEOUT = 5.0
"""After a STREAM_REJECT we read (and drop) what the consumer still sends, so
it never gets STOP_SENDING (the reference leaves C's direction untouched)."""
REQUIRED_PROMOTION_TIMEOUT = 10.0  # spec 02 §7.5
REQUIRED_POLL_INTERVAL = 0.25  # spec 02 §7.5


def _resume_echo(stream_id: int, peer: Half[_HalfHandle]) -> bytes:
    """STREAM_RESUME carrying the *peer* half's positions (spec 02 §7.4)."""
    return encode_message(
        FrameType.STREAM_RESUME,
        StreamResume(
            stream_id=stream_id,
            my_position=peer.my_position,
            peer_ack_position=peer.peer_ack_position,
        ),
    )


async def _discard(stream: Stream) -> None:
    """Read and drop until EOF or an error (spec 02 §6.4 step 5)."""
    with contextlib.suppress(TransportError):
        while await stream.receive_some():
            pass


def _registration_refusal(session: AgentSession, name: str) -> str:
    """Why a REGISTER of ``name`` is refused ("" if it is not); bounds in ``relay.limits``."""
    if len(name.encode()) > MAX_SERVICE_NAME:
        return f"service name longer than {MAX_SERVICE_NAME} bytes"
    if name not in session.registrations and len(session.registrations) >= (
        MAX_REGISTRATIONS_PER_AGENT
    ):
        return f"more than {MAX_REGISTRATIONS_PER_AGENT} services on one connection"
    return ""


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class RelayConfig:
    """Everything the relay needs to start (mirrors the CLI flags)."""

    cert_file: str
    key_file: str
    ca_file: str
    listen_host: str = "127.0.0.1"
    listen_port: int = 7443
    listen_tcp: tuple[str, int] | None = None
    """TLS + yamux fallback listener (spec 02 §9); None: off."""
    relay_id: str = ""
    """Defaults to the listen address, as the reference's ``--relay-id`` does."""
    region: str = "local"
    policy: PolicyService | None = None
    """None means no enforcement (the reference without ``--tenant``)."""
    audit_file: str | None = None
    listen_forward: tuple[str, int] | None = None
    """UDP forward plane (spec 02 §8); None: off, forward rules are spliced."""
    hello_timeout: float = HELLO_TIMEOUT
    required_promotion_timeout: float = REQUIRED_PROMOTION_TIMEOUT
    quic_retry: RetryMode = RetryMode.AUTO
    """``--quic-retry``: when new QUIC clients must answer a Retry first."""


@dataclass(eq=False)
class _HalfHandle:
    """What a parked resume half needs: its stream, surplus bytes, a done flag."""

    session: AgentSession
    stream: Stream
    leftover: bytes
    done: asyncio.Future[bool]
    """True: matched (the other handler splices); False: replaced by a newer half."""
    end_code: int = 0
    """The code the half's stream is reset with when ``done`` is False: ``AGENT_GONE``
    when its peer's process is gone for good, else 0."""


@dataclass(eq=False)
class AgentSession:
    """One connected agent: its identity, connection and control channel."""

    uri: str
    tenant: str
    conn: Connection
    ctrl: ControlOutbox
    """Every write to this agent's control stream goes through its bounded queue."""
    reader: FrameReader
    """Reads the control stream; it may already hold bytes after HELLO."""
    connected_at: float = field(default_factory=time.monotonic)
    capabilities: frozenset[str] = frozenset()
    """HELLO capabilities we act on (``orp.RELAY_CAPABILITIES``); a reference agent sends none."""
    instance: str = ""
    """The agent's process id from HELLO (``orp.CAP_INSTANCE``), "" if it sent none."""
    superseded: bool = False
    """A new process of the same agent said HELLO: this one's streams end for good."""
    registrations: set[str] = field(default_factory=set)
    """Service names this connection registered (bounded by MAX_REGISTRATIONS_PER_AGENT)."""

    @property
    def member(self) -> Member:
        return Member(self.uri, self.instance)

    @property
    def gone(self) -> bool:
        """The agent's process is gone for good (replaced, or said goodbye)."""
        return self.superseded or self.conn.peer_close_code == StreamEndCode.AGENT_GONE


class Relay:
    """A relay with an embedded control plane. ``await relay.start()``, then ``run``."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.relay_id = config.relay_id or f"{config.listen_host}:{config.listen_port}"
        self.agents: dict[str, AgentSession] = {}
        self.registry = ServiceRegistry(self.relay_id)
        self.pairs = PairTable()
        self.migrated = MigratedCache()
        self.p2p_forbidden: set[int] = set()
        """Stream ids of live splices whose policy forbids P2P: their offers are not forwarded."""
        self.matcher: ResumeMatcher[_HalfHandle] = ResumeMatcher()
        self.ended = EndedPairs()
        self._parked: Counter[str] = Counter()
        """Parked resume halves per agent URI (bounded by MAX_PARKED_HALVES_PER_AGENT)."""
        self.refused_not_owner = 0
        """Frames naming a stream of other agents (resume, checkpoint, migrate, candidates)."""
        self.instances = AgentInstances()
        self.audit = AuditLog(config.audit_file, logger=log)
        self._verifier = ClientVerifier(load_certificates(config.ca_file))
        self._server: QuicServerHandle | None = None
        self._tcp_server: TcpServerHandle | None = None
        self.tcp_address: tuple[str, int] | None = None
        self.plane: ForwardPlane | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._audit_task: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        """Bind the QUIC listener; returns the bound address.

        Raises:
            OSError: the listen address could not be bound.
        """
        tls = QuicTlsConfig(self.config.cert_file, self.config.key_file, self.config.ca_file)
        self._server = await serve_quic(
            self.config.listen_host,
            self.config.listen_port,
            tls,
            verify_client=self._verify_client,
            on_connection=self._on_connection,
            on_refused=self._on_refused,
            retry=self.config.quic_retry,
        )
        if self.config.listen_tcp is not None:
            try:
                self._tcp_server = await serve_tcp(
                    self.config.listen_tcp[0],
                    self.config.listen_tcp[1],
                    tls,
                    verify_client=self._verify_client,
                    on_connection=self._on_connection,
                    on_refused=self._on_refused,
                )
            except OSError:
                self._server.close()
                raise
            self.tcp_address = self._tcp_server.address
        if self.config.listen_forward is not None:
            try:
                self.plane = await ForwardPlane.bind(*self.config.listen_forward)
            except OSError:
                self._server.close()
                if self._tcp_server is not None:
                    self._tcp_server.close()
                raise
        self._audit_task = asyncio.get_running_loop().create_task(self.audit.run())
        return self._server.address

    async def run(self) -> None:
        """Serve until :meth:`stop` is called."""
        await self._stopping.wait()

    async def stop(self) -> None:
        """Close the listener and every connection; wait for handlers to finish."""
        self._stopping.set()
        if self._server is not None:
            self._server.close()
        if self._tcp_server is not None:
            self._tcp_server.close()
        if self.plane is not None:
            self.plane.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        await self.audit.aclose()
        if self._audit_task is not None:
            self._audit_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._audit_task

    def _spawn(self, coro: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("relay task failed", extra=kv(task=task.get_name(), err=repr(exc)))

    # -- acceptance (spec 02 §2) ----------------------------------------------------------

    def _verify_client(
        self, leaf: x509.Certificate | None, chain: tuple[x509.Certificate, ...]
    ) -> str:
        return self._verifier.verify(leaf, chain)

    def _on_refused(self, address: tuple[str, int], reason: str) -> None:
        log.warning(
            "reject conn: client certificate refused",
            extra=kv(remote=f"{address[0]}:{address[1]}", reason=reason),
        )

    def _on_connection(self, conn: Connection) -> None:
        self._spawn(self._handle_connection(conn), "connection")

    async def _handle_connection(self, conn: Connection) -> None:
        uri = getattr(conn, "identity", None) or ""
        remote = f"{conn.peer.address[0]}:{conn.peer.address[1]}"
        try:
            identity = parse_identity(uri)
        except InvalidIdentity as exc:
            log.warning("reject conn: bad identity URI", extra=kv(remote=remote, err=str(exc)))
            conn.close(0, close_phrase(f"bad client certificate: identity URI: {exc}"))
            return
        if isinstance(identity, RelayIdentity):
            # Inter-relay forwarding (spec 02 §10) is not part of this relay yet.
            log.warning("peer relay connections are not supported", extra=kv(uri=uri))
            conn.close(0, "peer relay connections are not supported")
            return
        session = await self._hello(conn, uri, identity, remote)
        if session is None:
            return
        try:
            async with asyncio.TaskGroup() as tg:
                writer = tg.create_task(session.ctrl.run())
                control = tg.create_task(self._control_loop(session))
                try:
                    while True:
                        stream = await conn.accept_stream()
                        tg.create_task(self._handle_data_stream(session, stream))
                except TransportError:
                    pass
                finally:
                    control.cancel()
                    session.ctrl.close()
                    writer.cancel()
                    self._teardown(session)
        finally:
            conn.close(0, "")

    async def _hello(
        self, conn: Connection, uri: str, identity: AgentIdentity, remote: str
    ) -> AgentSession | None:
        """Spec 02 §2.3: one HELLO whose agent_uri equals the certificate's URI SAN."""
        try:
            async with asyncio.timeout(self.config.hello_timeout):
                ctrl = await conn.accept_stream()
                reader = FrameReader(ctrl, max_frame=MAX_CONTROL_FRAME)
                frame = await reader.read_frame()
        except TimeoutError:
            log.warning("HELLO timeout; closing", extra=kv(uri=uri, remote=remote))
            conn.close(0, f"no HELLO within {self.config.hello_timeout:g}s")
            return None
        except (TransportError, OrpError) as exc:
            log.info("connection lost before HELLO", extra=kv(uri=uri, err=str(exc)))
            conn.close(0, "")
            return None
        try:
            if frame is None:
                raise OrpError("control stream ended before HELLO")
            hello = expect_message(frame, FrameType.HELLO, HelloMessage)
        except OrpError as exc:
            log.warning("first ctrl frame is not HELLO; closing", extra=kv(uri=uri, err=str(exc)))
            conn.close(0, "the first control frame is not HELLO")
            return None
        if hello.agent_uri != uri:
            log.warning(
                "HELLO uri mismatch",
                extra=kv(cert_uri=uri, hello_uri=hello.agent_uri, remote=remote),
            )
            conn.close(
                0,
                close_phrase(
                    f"HELLO uri mismatch: HELLO says {hello.agent_uri}, "
                    f"the certificate's URI SAN is {uri}"
                ),
            )
            return None

        def overflow(reason: str) -> None:
            log.warning(
                "agent not reading its control stream; closing", extra=kv(uri=uri, err=reason)
            )
            conn.close(0, close_phrase(reason))

        def dropping(reason: str) -> None:
            log.warning("agent slow to read its control stream", extra=kv(uri=uri, err=reason))

        channel = ControlOutbox(ctrl, on_overflow=overflow, on_drop=dropping)
        accepted = RELAY_CAPABILITIES.intersection(hello.capabilities)
        session = AgentSession(
            uri=uri,
            tenant=identity.tenant,
            conn=conn,
            ctrl=channel,
            reader=reader,
            capabilities=accepted,
            instance=hello.outrelay_instance if CAP_INSTANCE in accepted else "",
        )
        # Empty, like the reference's, unless the agent asked for something we do.
        ack = HelloAck(accepted_features=sorted(accepted)) if accepted else None
        channel.post(FrameType.HELLO_ACK, ack)  # written once the connection's tasks run
        previous = self.agents.get(uri)
        self.agents[uri] = session
        log.info("agent connected", extra=kv(uri=uri, remote=remote))
        replaced = self.instances.hello(uri, session.instance)
        if replaced:
            # Ours: a new process of this agent. The old one's streams can never
            # resume: end them (and halves waiting for them) now, not in 30 s.
            log.info("agent restarted; ending its old streams", extra=kv(uri=uri, old=replaced))
            if previous is not None and previous.instance == replaced:
                previous.superseded = True
            self._end_orphans(Member(uri, replaced))
        if previous is not None and not previous.conn.is_closed:
            # Ours (the reference keeps it): the agent reconnected, so its old
            # connection is dead or dying. Closing it resets the splices it
            # carried, and their peers resume instead of waiting for a timeout.
            log.info("closing the agent's previous connection", extra=kv(uri=uri))
            previous.conn.close(0, "")
        return session

    def _teardown(self, session: AgentSession) -> None:
        """Spec 02 §2.4 with the [REC] of §15 item 2."""
        if session.conn.peer_close_code == StreamEndCode.AGENT_GONE:
            # The agent shut down cleanly: nothing of it will come back to resume.
            self.instances.departed(session.member)
            self._end_orphans(session.member)
        if self.agents.get(session.uri) is session:
            del self.agents[session.uri]
            removed = self.registry.deregister_agent(session.tenant, session.uri)
            log.info(
                "agent disconnected",
                extra=kv(
                    uri=session.uri, services=",".join(removed), reason=session.conn.close_reason
                ),
            )
        else:
            log.info("stale agent connection closed", extra=kv(uri=session.uri))

    def _end_orphans(self, gone: Member) -> None:
        """End every parked resume half whose peer is ``gone`` (reset ``AGENT_GONE``)."""
        now = _now_ms()
        for half in self.matcher.halves():
            if self.ended.peer_of(half.stream_id, half.agent_uri, now) != gone:
                continue
            if self.matcher.withdraw(half):
                log.info(
                    "resume half ended: its peer agent is gone",
                    extra=kv(stream_id=half.stream_id, uri=half.agent_uri, peer=gone.uri),
                )
                half.handle.end_code = StreamEndCode.AGENT_GONE
                half.handle.done.set_result(False)

    def _owners(self, stream_id: int) -> tuple[str, str] | None:
        """The URIs of a stream's two agents, if the relay knows them (live or broken splice)."""
        pair = self.pairs.get(stream_id)
        if pair is not None:
            return pair.consumer_uri, pair.provider_uri
        members = self.ended.members(stream_id, _now_ms())
        if members is not None:
            return members[0].uri, members[1].uri
        return None

    def _not_owner(self, session: AgentSession, frame_type: FrameType, stream_id: int) -> None:
        """A frame naming a stream that ``session``'s agent is not a party to: log, count, drop."""
        self.refused_not_owner += 1
        log.warning(
            "frame for another agent's stream refused",
            extra=kv(uri=session.uri, type=frame_name(frame_type), stream_id=stream_id),
        )

    def _end_code(self, broken: AgentSession, error: TransportError) -> int:
        """The code for resetting the other half of a splice when ``broken``'s half broke.

        An application's close (a final code) passes through, so the other agent
        ends its stream too; a gone agent ends it with ``AGENT_GONE``; anything
        else is a link failure (code 0), and the other agent resumes.
        """
        if broken.gone:
            return StreamEndCode.AGENT_GONE
        code = error.code if isinstance(error, BrokenResourceError) else None
        return code if code is not None and is_final(code) else StreamEndCode.LINK

    async def _splice_pair(
        self,
        sid: int,
        a: AgentSession,
        a_stream: Stream,
        b: AgentSession,
        b_stream: Stream,
        a_prefix: bytes,
        b_prefix: bytes,
    ) -> SpliceResult:
        """Splice two agents' streams (spec 02 §6.5 with our close semantics).

        A source that breaks resets the other side -- with the code from
        :meth:`_end_code` -- so its agent resumes, or ends the stream when the
        application or the agent at the broken end is gone. A splice that broke
        is remembered with both ends (:class:`EndedPairs`).
        """
        result = await splice(
            a_stream,
            b_stream,
            a_to_b_prefix=a_prefix,
            b_to_a_prefix=b_prefix,
            abort_a_on_b_error=lambda exc: self._end_code(b, exc),
            abort_b_on_a_error=lambda exc: self._end_code(a, exc),
            abort_source_on_write_error=True,
        )
        if not (result.a_to_b.clean and result.b_to_a.clean):
            self.ended.note(sid, a.member, b.member, _now_ms())
        return result

    # -- control stream (spec 02 §3) ------------------------------------------------------

    async def _control_loop(self, session: AgentSession) -> None:
        """Serve the control stream; when it ends, so does the connection.

        Ours: the reference keeps serving data streams without a control loop
        (spec 02 §2.4), which leaves PINGs unanswered and STREAM_READY writes
        stalled; our agents reconnect instead.
        """
        try:
            await self._serve_control(session)
        finally:
            session.conn.close(0, "")

    async def _serve_control(self, session: AgentSession) -> None:
        reader = session.reader
        loop = asyncio.get_running_loop()
        bucket = TokenBucket.full(CONTROL_FRAMES_PER_SECOND, CONTROL_BURST, loop.time())
        while True:
            try:
                frame = await reader.read_frame()
            except (TransportError, OrpError) as exc:
                log.debug("ctrl reader stopped", extra=kv(uri=session.uri, err=str(exc)))
                if isinstance(exc, OrpError):
                    session.conn.close(0, close_phrase(f"bad control frame: {exc}"))
                return
            if frame is None:
                return
            if not bucket.take(loop.time()):
                reason = f"more than {CONTROL_FRAMES_PER_SECOND:g} control frames/s"
                log.warning("agent control flood; closing", extra=kv(uri=session.uri, err=reason))
                session.conn.close(0, reason)
                return
            try:
                await self._dispatch_control(session, frame.type, frame)
            except OrpError as exc:
                log.debug("ctrl frame ignored", extra=kv(uri=session.uri, err=str(exc)))
            except TransportError as exc:
                log.debug("ctrl write failed", extra=kv(uri=session.uri, err=str(exc)))
                return

    async def _dispatch_control(self, session: AgentSession, frame_type: int, frame: Frame) -> None:
        if frame_type == FrameType.PING:
            session.ctrl.post(FrameType.PONG)
        elif frame_type == FrameType.REGISTER:
            register = expect_message(frame, FrameType.REGISTER, Register)
            name = register.service_name
            refusal = _registration_refusal(session, name)
            if refusal:
                log.warning(
                    "register rejected", extra=kv(uri=session.uri, name=name[:64], err=refusal)
                )
                return
            try:
                self.registry.validate(session.tenant, name, session.uri)
            except RegistrationRejected as exc:
                log.warning("register rejected", extra=kv(uri=session.uri, err=str(exc)))
                return
            provide = self._decide_provide(session, name)
            if provide is not None and not provide.allowed:
                # Ours: provide rules (the reference lets any agent of the tenant take
                # a name over). Like any refused registration: no REGISTER_ACK.
                log.warning(
                    "register refused by policy",
                    extra=kv(uri=session.uri, name=name, reason=provide.reason),
                )
                return
            before = self.registry.resolve(session.tenant, name)
            previous = before.agent_uri if before is not None else ""
            service_id = self.registry.register(
                session.tenant, name, session.uri, register.local_addr
            )
            session.registrations.add(name)
            session.ctrl.post(FrameType.REGISTER_ACK, RegisterAck(service_id=service_id))
            log.info(
                "registered",
                extra=kv(
                    name=name,
                    agent=session.uri,
                    providers=len(self.registry.providers(session.tenant, name)),
                    took_over="" if previous == session.uri else previous,
                ),
            )
        elif frame_type == FrameType.OBSERVED_ADDR_QUERY:
            query = expect_message(frame, FrameType.OBSERVED_ADDR_QUERY, ObservedAddrQuery)
            host, port = session.conn.peer.address
            session.ctrl.post(
                FrameType.OBSERVED_ADDR_RESP,
                ObservedAddrResp(request_id=query.request_id, ip=host, port=port),
            )
        elif frame_type in (
            FrameType.STREAM_CHECKPOINT,
            FrameType.CANDIDATE_OFFER,
            FrameType.CANDIDATE_ANSWER,
        ):
            await self._forward_to_pair(session, frame)
        elif frame_type == FrameType.MIGRATE_TO_P2P:
            migrate = expect_message(frame, FrameType.MIGRATE_TO_P2P, MigrateToP2P)
            pair = self.pairs.get(migrate.stream_id)
            if pair is not None and session.uri not in pair:
                self._not_owner(session, FrameType.MIGRATE_TO_P2P, migrate.stream_id)
                return
            consumer, provider = pair if pair is not None else (session.uri, "")
            if migrate.stream_id in self.p2p_forbidden:
                log.warning(
                    "migration reported although p2p_mode is forbidden",
                    extra=kv(stream_id=migrate.stream_id, uri=session.uri),
                )
            self.migrated.note(migrate.stream_id, consumer, provider, _now_ms())
            log.info("stream migrated to p2p", extra=kv(stream_id=migrate.stream_id))
        else:
            log.debug("ignored ctrl frame", extra=kv(uri=session.uri, type=frame_name(frame_type)))

    async def _forward_to_pair(self, session: AgentSession, frame: Frame) -> None:
        """Spec 02 §5: blind-forward to the other half of a live pair."""
        message = decode_message(frame)
        stream_id = int(getattr(message, "stream_id", 0))
        target_uri = self.pairs.route(stream_id, session.uri)
        if (
            frame.type == FrameType.CANDIDATE_OFFER
            and stream_id in self.p2p_forbidden
            and target_uri
        ):
            # Ours (spec 02 §7.6 has no effect): the policy forbids a direct
            # path, so the offer goes no further and the offerer gets an
            # empty answer at once -- a reference agent then stays on the relay.
            log.info("p2p offer refused (p2p_mode forbidden)", extra=kv(stream_id=stream_id))
            session.ctrl.post(FrameType.CANDIDATE_ANSWER, CandidateAnswer(stream_id=stream_id))
            return
        if target_uri is None and self.pairs.get(stream_id) is not None:
            # Ours: a stream belongs to its two agents; nobody else may speak for it.
            self._not_owner(session, FrameType(frame.type), stream_id)
            return
        target = self.agents.get(target_uri) if target_uri else None
        if target is None:
            if frame.type != FrameType.STREAM_CHECKPOINT:
                log.debug("candidate forward: no peer", extra=kv(stream_id=stream_id))
            return
        data = encode_frame(frame.type, frame.payload, version=frame.version, flags=frame.flags)
        # Never waits on the other agent: a full queue drops checkpoints (the next
        # one supersedes) or closes *that* agent's connection.
        target.ctrl.post_raw(data, droppable=frame.type == FrameType.STREAM_CHECKPOINT)

    # -- data streams (spec 02 §6) --------------------------------------------------------

    async def _handle_data_stream(self, session: AgentSession, stream: Stream) -> None:
        reader = FrameReader(stream)
        try:
            async with asyncio.timeout(FIRST_FRAME_TIMEOUT):
                frame = await reader.read_frame()
        except (TimeoutError, TransportError, OrpError) as exc:
            log.debug("data stream closed before its first frame", extra=kv(err=repr(exc)))
            await stream.aclose()
            return
        if frame is None:
            await stream.aclose()
            return
        if frame.type in (FrameType.STREAM_RESUME, FrameType.MIGRATE_TO_RELAY):
            await self._resume_flow(session, stream, frame, reader.take_leftover())
        elif frame.type == FrameType.OPEN_STREAM:
            try:
                open_msg = expect_message(frame, FrameType.OPEN_STREAM, OpenStream)
            except OrpError:
                await stream.aclose()
                return
            await self._open_flow(session, stream, open_msg, reader.take_leftover())
        else:
            log.warning(
                "first frame not OPEN_STREAM",
                extra=kv(uri=session.uri, type=frame_name(frame.type)),
            )
            await stream.aclose()

    async def _resume_flow(
        self, session: AgentSession, stream: Stream, frame: Frame, leftover: bytes
    ) -> None:
        """Spec 02 §7.4 with the [REC]: echo to each STREAM_RESUME half, one splice."""
        try:
            if frame.type == FrameType.STREAM_RESUME:
                kind = HalfKind.RESUME
                msg: StreamResume | MigrateToRelay = expect_message(
                    frame, FrameType.STREAM_RESUME, StreamResume
                )
            else:
                kind = HalfKind.MIGRATE
                msg = expect_message(frame, FrameType.MIGRATE_TO_RELAY, MigrateToRelay)
        except OrpError:
            await stream.aclose()
            return
        sid = msg.stream_id
        owners = self._owners(sid)
        if owners is not None and session.uri not in owners:
            # Ours: only the stream's own two agents may resume it (spec 02 §7.4
            # pairs any two halves); the owners' streams are left untouched.
            self._not_owner(session, FrameType(frame.type), sid)
            stream.abort()
            return
        if self._parked[session.uri] >= MAX_PARKED_HALVES_PER_AGENT:
            log.warning(
                "resume half refused: too many parked halves",
                extra=kv(stream_id=sid, uri=session.uri, limit=MAX_PARKED_HALVES_PER_AGENT),
            )
            stream.abort()
            return
        peer_end = self.ended.peer_of(sid, session.uri, _now_ms())
        if peer_end is not None and self.instances.is_gone(peer_end):
            # Ours: the peer's process is gone; no half of it will ever come.
            log.info(
                "resume half ended: its peer agent is gone",
                extra=kv(stream_id=sid, uri=session.uri, peer=peer_end.uri),
            )
            stream.abort(StreamEndCode.AGENT_GONE)
            return
        if kind is HalfKind.MIGRATE:
            log.info(
                "migrate-to-relay arrived",
                extra=kv(stream_id=sid, reason=getattr(msg, "reason", ""), uri=session.uri),
            )
        handle = _HalfHandle(session, stream, leftover, asyncio.get_running_loop().create_future())
        half: Half[_HalfHandle] = Half(
            sid,
            kind,
            msg.my_position,
            msg.peer_ack_position,
            session.uri,
            handle,
            expected_peer=getattr(msg, "outrelay_peer_uri", ""),
        )
        stale = self.matcher.pending(sid)
        if stale is not None and stale.handle.session.tenant != session.tenant:
            # Ours: the reference pairs any two halves with the same id; we never
            # splice two tenants' streams together.
            log.warning(
                "resume half refused: stream id pending for another tenant",
                extra=kv(stream_id=sid, uri=session.uri),
            )
            await stream.aclose()
            return
        if stale is not None and (
            stale.handle.session.conn.is_closed
            or (stale.agent_uri == session.uri and stale.handle.session is not session)
        ):
            # Its agent lost that connection and came back: the new half replaces
            # it. Pairing an agent's half with its own older one would echo the
            # agent its own positions.
            self.matcher.withdraw(stale)
            stale.handle.done.set_result(False)
        elif stale is not None and not stale.fits(half):
            # Ours: the halves name other peers, so one of them is not the stream's.
            if stale.expected_peer and stale.expected_peer != session.uri:
                self._not_owner(session, FrameType(frame.type), sid)  # the parked one stays
                stream.abort()
                return
            # The parked half named nobody, or named us while we name someone
            # else: it is the intruder (or a reference agent's); ours replaces it.
            self._not_owner(stale.handle.session, FrameType(frame.type), sid)
            self.matcher.withdraw(stale)
            stale.handle.done.set_result(False)
        peer = self.matcher.submit(half, _now_ms())
        if peer is None:
            log.debug("resume half parked", extra=kv(stream_id=sid, uri=session.uri))
            self._parked[session.uri] += 1
            try:
                async with asyncio.timeout(self.matcher.window_ms / 1000):
                    await asyncio.shield(handle.done)
            except TimeoutError:
                if self.matcher.withdraw(half):
                    log.info("resume half expired unmatched", extra=kv(stream_id=sid))
                    await stream.aclose()
                return
            except asyncio.CancelledError:
                if self.matcher.withdraw(half):
                    stream.abort()
                raise
            finally:
                self._parked[session.uri] -= 1
                if not self._parked[session.uri]:
                    del self._parked[session.uri]
            if handle.done.result() is False:
                stream.abort(handle.end_code)
            return  # matched: the other half's handler owns both streams now
        peer.handle.done.set_result(True)
        if kind is HalfKind.MIGRATE or peer.kind is HalfKind.MIGRATE:
            self.migrated.discard(sid)
        mine, theirs = half.handle, peer.handle
        try:
            if half.kind is HalfKind.RESUME:
                await stream.send_all(_resume_echo(sid, peer))
            if peer.kind is HalfKind.RESUME:
                await theirs.stream.send_all(_resume_echo(sid, half))
        except TransportError as exc:
            log.info("resume echo failed", extra=kv(stream_id=sid, err=str(exc)))
            stream.abort()
            theirs.stream.abort()
            return
        log.info("stream resumed", extra=kv(stream_id=sid, a=peer.agent_uri, b=half.agent_uri))
        # Ours: keep checkpoints flowing for the resumed stream (the reference
        # stops forwarding them after a resume, spec 02 §5).
        recorded = sid != 0 and self.pairs.record(sid, peer.agent_uri, half.agent_uri)
        try:
            await self._splice_pair(
                sid,
                theirs.session,
                theirs.stream,
                mine.session,
                mine.stream,
                theirs.leftover,
                mine.leftover,
            )
        finally:
            if recorded:
                self.pairs.forget(sid, peer.agent_uri, half.agent_uri)

    def _decide(self, caller: str, target: str, method: str, side: str) -> PolicyResult | None:
        policy = self.config.policy
        if policy is None:
            return None
        now = _now_ms()
        result = policy.decide(caller, target, method, now)
        try:
            tenant = parse_identity(caller).authority
        except InvalidIdentity:
            tenant = ""
        self.audit.emit(
            AuditEvent(
                ts_unix_ms=now,
                tenant=tenant,
                caller=caller,
                target=target,
                method=method,
                decision="DECISION_ALLOW" if result.allowed else "DECISION_DENY",
                reason=result.reason,
                stream_id="",
                side=side,
            )
        )
        return result

    def _decide_provide(self, session: AgentSession, service: str) -> ProvideResult | None:
        """May ``session``'s agent register ``service``? None without a policy (allowed)."""
        policy = self.config.policy
        if policy is None:
            return None
        result = policy.may_provide(session.uri, session.tenant, service)
        if not result.covered:
            return result  # open by default: no rule involved, nothing to audit
        self.audit.emit(
            AuditEvent(
                ts_unix_ms=_now_ms(),
                tenant=session.tenant,
                caller=session.uri,
                target=service,
                method="",
                decision=result.decision.proto_name,
                reason=result.reason,
                side="provide",
            )
        )
        return result

    async def _reject(self, stream: Stream, code: int, reason: str) -> None:
        """STREAM_REJECT then FIN (spec 02 §13).

        What the consumer still sends is read and dropped for a few seconds
        instead of answered with STOP_SENDING: the reference leaves the
        consumer's direction untouched.
        """
        try:
            await stream.send_all(
                encode_message(FrameType.STREAM_REJECT, StreamReject(code=int(code), reason=reason))
            )
            await stream.send_eof()
            async with asyncio.timeout(REJECT_DRAIN_TIMEOUT):
                while await stream.receive_some():
                    pass
        except (TransportError, TimeoutError):
            pass
        await stream.aclose()

    async def _open_flow(
        self, consumer: AgentSession, c_stream: Stream, msg: OpenStream, c_leftover: bytes
    ) -> None:
        """Spec 02 §6.1, steps 2–9, for a provider on this relay."""
        sid = msg.stream_id
        target, method = msg.target_service, msg.method
        c_uri = consumer.uri
        fields = kv(stream_id=sid, svc=target, consumer=c_uri)

        caller_side = self._decide(c_uri, target, method, "caller")
        if caller_side is not None and not caller_side.allowed:
            log.info("open denied", extra=kv(**fields["attrs"], reason=caller_side.reason))
            await self._reject(c_stream, RejectCode.FORBIDDEN, f"denied: {caller_side.reason}")
            return

        binding = self.registry.resolve(consumer.tenant, target, self.agents.__contains__)
        provider = self.agents.get(binding.agent_uri) if binding is not None else None
        if provider is None:
            log.info("open rejected: service not found", extra=fields)
            await self._reject(c_stream, RejectCode.NOT_FOUND, "service not found")
            return
        p_uri = provider.uri

        callee_side = self._decide(p_uri, c_uri, method, "callee")
        if callee_side is not None and not callee_side.allowed:
            log.info("open denied (callee)", extra=kv(**fields["attrs"], reason=callee_side.reason))
            await self._reject(
                c_stream, RejectCode.FORBIDDEN, f"denied (callee): {callee_side.reason}"
            )
            return
        p2p_mode = P2PMode.ALLOWED
        if caller_side is not None and callee_side is not None:
            p2p_mode = combine_p2p(caller_side.p2p_mode, callee_side.p2p_mode)
        relay_mode = caller_side.relay_mode if caller_side is not None else RelayMode.SPLICE

        try:
            p_stream = await provider.conn.open_stream()
            await p_stream.send_all(
                encode_message(
                    FrameType.INCOMING_STREAM,
                    IncomingStream(
                        target_service=target, method=method, source_agent_uri=c_uri, stream_id=sid
                    ),
                )
            )
        except TransportError as exc:
            log.warning("provider stream open failed", extra=kv(**fields["attrs"], err=str(exc)))
            await self._reject(c_stream, RejectCode.BAD_GATEWAY, "provider stream open failed")
            return

        if not self.pairs.record(sid, c_uri, p_uri):
            log.warning("stream id collision rejected", extra=fields)
            await p_stream.aclose()
            await self._reject(c_stream, RejectCode.STREAM_ID_COLLISION, "stream id collision")
            return
        if p2p_mode == P2PMode.FORBIDDEN:
            self.p2p_forbidden.add(sid)  # before STREAM_READY: no offer may slip through
        enforcer: asyncio.Task[None] | None = None
        if p2p_mode == P2PMode.REQUIRED:
            # Spec 02 §7.5: armed once INCOMING_STREAM is out, before the provider answers.
            enforcer = asyncio.get_running_loop().create_task(self._enforce_required(sid, c_stream))
        try:
            await self._answer_and_splice(
                consumer, c_stream, c_leftover, provider, p_stream, sid, p2p_mode, relay_mode
            )
        finally:
            self.pairs.forget(sid, c_uri, p_uri)
            self.p2p_forbidden.discard(sid)
            if enforcer is not None:
                enforcer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await enforcer

    async def _answer_and_splice(
        self,
        consumer: AgentSession,
        c_stream: Stream,
        c_leftover: bytes,
        provider: AgentSession,
        p_stream: Stream,
        sid: int,
        p2p_mode: P2PMode,
        relay_mode: RelayMode,
    ) -> None:
        p_reader = FrameReader(p_stream)
        try:
            async with asyncio.timeout(PROVIDER_ANSWER_TIMEOUT):
                answer = await p_reader.read_frame()
        except (TimeoutError, TransportError, OrpError) as exc:
            log.info("provider did not answer", extra=kv(stream_id=sid, err=repr(exc)))
            answer = None
        if answer is None or answer.type not in (FrameType.STREAM_ACCEPT, FrameType.STREAM_REJECT):
            await asyncio.gather(c_stream.aclose(), p_stream.aclose())
            return
        if answer.type == FrameType.STREAM_REJECT:
            # [REC] spec 02 §13: the reference tells the consumer "503 provider
            # rejected"; we pass the provider's code and reason on unchanged.
            code, reason = int(RejectCode.UNAVAILABLE), "provider rejected"
            with contextlib.suppress(OrpError):
                rejected = expect_message(answer, FrameType.STREAM_REJECT, StreamReject)
                log.info(
                    "provider rejected",
                    extra=kv(stream_id=sid, code=rejected.code, reason=rejected.reason),
                )
                code, reason = rejected.code or code, rejected.reason or reason
            await p_stream.aclose()
            await self._reject(c_stream, code, reason)
            return

        if relay_mode == RelayMode.FORWARD and self.plane is not None:
            await self._forward_session(consumer, c_stream, provider, p_stream, sid, self.plane)
            return
        # Splice mode (spec 02 §6.3); a forward rule without --listen-forward splices too.
        current_provider = self.agents.get(provider.uri)
        for agent in (consumer, current_provider):
            if agent is None:
                continue
            ready = StreamReady(stream_id=sid)
            if CAP_P2P_MODE in agent.capabilities:
                ready.outrelay_p2p_mode = int(p2p_mode) + 1
            if CAP_RESUME_PEER in agent.capabilities:
                ready.outrelay_peer_uri = provider.uri if agent is consumer else consumer.uri
            await agent.ctrl.send(FrameType.STREAM_READY, ready)
        # A source that breaks (not a clean EOF) resets the other side, so
        # its agent resumes instead of taking a FIN for a finished stream.
        # (REQUIRED enforcement runs beside the splice, armed by the caller.)
        result = await self._splice_pair(
            sid, consumer, c_stream, provider, p_stream, c_leftover, p_reader.take_leftover()
        )
        log.debug(
            "splice ended",
            extra=kv(stream_id=sid, c_to_p=result.a_to_b.bytes, p_to_c=result.b_to_a.bytes),
        )

    async def _forward_session(
        self,
        consumer: AgentSession,
        c_stream: Stream,
        provider: AgentSession,
        p_stream: Stream,
        sid: int,
        plane: ForwardPlane,
    ) -> None:
        """Spec 02 §6.4: allocations instead of a splice; the data streams are liveness only."""
        current_provider = self.agents.get(provider.uri)
        if current_provider is None:
            await p_stream.aclose()
            await self._reject(
                c_stream, RejectCode.BAD_GATEWAY, "forward: provider control channel unavailable"
            )
            return
        a_c, a_p = plane.allocate_pair()
        endpoint = plane.endpoint
        try:
            for agent, mine, theirs in ((consumer, a_c, a_p), (current_provider, a_p, a_c)):
                grant = AllocGranted(
                    stream_id=sid,
                    my_allocation=mine,
                    peer_allocation=theirs,
                    forward_endpoint=endpoint,
                )
                if agent.ctrl.post(FrameType.ALLOC_GRANTED, grant) is None:
                    log.info(
                        "alloc granted write failed",
                        extra=kv(stream_id=sid, err=agent.ctrl.dead or "queue full"),
                    )
                    return
            log.info(
                "forward session",
                extra=kv(stream_id=sid, consumer_alloc=a_c, provider_alloc=a_p, endpoint=endpoint),
            )
            # Under REQUIRED only C's FIN happens here (spec 02 §7.5; armed by the caller).
            async with asyncio.TaskGroup() as tg:
                drains = [tg.create_task(_discard(c_stream)), tg.create_task(_discard(p_stream))]
                await asyncio.wait(drains, return_when=asyncio.FIRST_COMPLETED)
                for task in drains:
                    task.cancel()
        finally:
            plane.release(a_c, a_p)
            log.info("allocation reclaimed", extra=kv(stream_id=sid, allocations=f"{a_c},{a_p}"))
            await asyncio.gather(p_stream.aclose(), c_stream.aclose())

    async def _enforce_required(self, sid: int, c_stream: Stream) -> None:
        """Spec 02 §7.5: FIN the consumer if no MIGRATE_TO_P2P arrives in time."""
        deadline = time.monotonic() + self.config.required_promotion_timeout
        while time.monotonic() < deadline:
            if self.migrated.lookup(sid, _now_ms()) is not None:
                return
            await asyncio.sleep(REQUIRED_POLL_INTERVAL)
        log.warning("required p2p promotion timeout — closing splice", extra=kv(stream_id=sid))
        with contextlib.suppress(TransportError):
            await c_stream.send_eof()
