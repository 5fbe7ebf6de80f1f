"""The relay's edge: listeners, identity, HELLO, agent sessions, teardown (spec 02 §2, §6.0).

Behaviour follows spec 02 §2–§6 and §13, with the [REC] fixes of §15:
every control-stream write is serialised (item 4), a disconnect only tears
down the agent-map entry and registrations that still belong to that
connection (item 2), and policy rules keep a deterministic order (item 5).
Our additions: a HELLO that never comes is dropped after ``hello_timeout``;
a data stream whose first frame never completes, and a provider that never
answers INCOMING_STREAM, are closed after bounded waits.

Each accepted connection runs in one TaskGroup: the control outbox's writer, the control
loop (:mod:`.control`) and one task per data stream, dispatched on its first frame (§6.0)
to the open flow (:mod:`.open_flow`) or the resume flow (:mod:`.resume_flow`). The control
plane is embedded (DESIGN.md): the registry, the policy engine fed from a file, and audit
lines, all in :class:`~.state.RelayState`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509

from outrelay.identity import AgentIdentity, InvalidIdentity, RelayIdentity, parse_identity
from outrelay.observe import kv
from outrelay.orp import (
    CAP_INSTANCE,
    RELAY_CAPABILITIES,
    FrameType,
    HelloAck,
    OpenStream,
    OrpError,
    StreamEndCode,
)
from outrelay.orp import Hello as HelloMessage
from outrelay.pki import ClientVerifier, load_certificates
from outrelay.relay.audit import AuditLog
from outrelay.relay.control import ControlDispatch
from outrelay.relay.limits import MAX_CONTROL_FRAME
from outrelay.relay.mesh import MemoryMesh, Mesh
from outrelay.relay.mesh.cache import RegistryOptions
from outrelay.relay.mesh.policy import TenantPolicy
from outrelay.relay.open_flow import PROVIDER_ANSWER_TIMEOUT, OpenFlow
from outrelay.relay.outbox import ControlOutbox
from outrelay.relay.pairs import Member
from outrelay.relay.peer_server import PeerServer
from outrelay.relay.peers import DIAL_TIMEOUT, PeerPool
from outrelay.relay.plane import ForwardPlane
from outrelay.relay.policy import PolicyDocument, PolicyService
from outrelay.relay.resume_flow import ResumeFlow
from outrelay.relay.state import AgentSession, RelayState, RelayStatistics, log
from outrelay.transport import (
    Connection,
    QuicServerHandle,
    QuicTlsConfig,
    RetryMode,
    Stream,
    TcpServerHandle,
    TransportError,
    close_phrase,
    serve_quic,
    serve_tcp,
)
from outrelay.wire import FrameReader, expect_message, frame_name

if TYPE_CHECKING:
    from outrelay.relay.mesh.etcd import EtcdMesh

__all__ = ["Relay", "RelayConfig"]

HELLO_TIMEOUT = 10.0
"""Ours: the reference has none (spec 02 §2.3); a silent client is dropped."""
FIRST_FRAME_TIMEOUT = 60.0
"""Ours: the reference waits for ever for a data stream's first frame (§6.0)."""
REQUIRED_PROMOTION_TIMEOUT = 10.0
"""How long a p2p REQUIRED stream may stay on the relay (spec 02 §7.5, §12)."""
STOP_TIMEOUT = 5.0
"""How long :meth:`Relay.stop` waits for cancelled handlers to finish."""


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
    registry: RegistryOptions | None = None
    """``--registry etcd://...``: join the mesh on etcd at :meth:`Relay.start`; None: memory."""
    mesh: Mesh | None = None
    """A mesh to use as is (an in-process :class:`~.mesh.MemoryMesh` view, tests). With a
    mesh, ``cert_file`` must be a relay-role certificate: it is also the client
    certificate to peer relays (spec 02 §10.2)."""
    peer_dial_timeout: float = DIAL_TIMEOUT
    """Bound of one dial to a peer relay (:mod:`.peers`)."""


_HANDLER_KINDS = {
    FrameType.OPEN_STREAM: "open",
    FrameType.STREAM_RESUME: "resume",
    FrameType.MIGRATE_TO_RELAY: "migrate",
}
"""First frames that start a data-stream handler (spec 02 §11.1 ``stream_active``)."""


class Relay:
    """A relay with an embedded control plane. ``await relay.start()``, then ``run``."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.relay_id = config.relay_id or f"{config.listen_host}:{config.listen_port}"
        self.state = RelayState(
            self.relay_id, config.policy, AuditLog(config.audit_file, logger=log)
        )
        self._etcd: EtcdMesh | None = None
        self._control = ControlDispatch(self.state)
        self._open = OpenFlow(self.state, config.required_promotion_timeout)
        self._resume = ResumeFlow(self.state)
        self._peers = PeerServer(self.state, self._open.decide, PROVIDER_ANSWER_TIMEOUT)
        if config.mesh is not None:
            self._attach_mesh(config.mesh)
        self._verifier = ClientVerifier(load_certificates(config.ca_file))
        self._server: QuicServerHandle | None = None
        self._tcp_server: TcpServerHandle | None = None
        self.tcp_address: tuple[str, int] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._audit_task: asyncio.Task[None] | None = None

    @property
    def plane(self) -> ForwardPlane | None:
        """The UDP forward plane (spec 02 §8), once :meth:`start` bound it."""
        return self.state.plane

    @property
    def listening(self) -> bool:
        """True while the listeners are bound and :meth:`stop` has not begun."""
        return self._server is not None and not self._stopping.is_set()

    def statistics(self) -> RelayStatistics:
        """A snapshot of the relay's tables and counters."""
        state = self.state
        return RelayStatistics(
            agents=len(state.agents),
            services=len(state.registry),
            pairs=len(state.pairs),
            migrated=len(state.migrated),
            p2p_forbidden=len(state.p2p_forbidden),
            parked_halves=self._resume.parked,
            refused_not_owner=state.refused_not_owner,
        )

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
                self.state.plane = await ForwardPlane.bind(*self.config.listen_forward)
            except OSError:
                self._server.close()
                if self._tcp_server is not None:
                    self._tcp_server.close()
                raise
        mesh = self.state.mesh
        if isinstance(mesh, MemoryMesh) and not mesh.endpoint:
            bound = self._server.address
            mesh.advertise(f"{bound[0]}:{bound[1]}")
        if self.config.registry is not None:
            try:
                await self._join_mesh(self.config.registry, self._server.address)
            except BaseException:
                self._close_listeners()
                raise
        audit = self.state.audit
        self._audit_task = asyncio.get_running_loop().create_task(audit.run())
        return self._server.address

    def _close_listeners(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._tcp_server is not None:
            self._tcp_server.close()
        if self.state.plane is not None:
            self.state.plane.close()

    async def _join_mesh(self, options: RegistryOptions, bound: tuple[str, int]) -> None:
        """``--registry etcd://``: the relay record, the cache, and registry policy.

        Raises:
            RegistryError: the id is held by a live relay, or etcd is unreachable.
        """
        from outrelay.relay.mesh.etcd import EtcdMesh  # grpc is loaded only for a mesh

        if not options.advertise and bound[0] in ("0.0.0.0", "::", ""):
            log.warning(
                "registry: listening on an unspecified address; peer relays cannot dial it: "
                "set --advertise HOST:PORT",
                extra=kv(listen=f"{bound[0]}:{bound[1]}"),
            )

        mesh = EtcdMesh(
            options.endpoints,
            relay_id=self.relay_id,
            region=self.config.region,
            advertise=options.advertise or f"{bound[0]}:{bound[1]}",
            prefix=options.prefix,
            lease_ttl=options.lease_ttl,
        )
        policy = self.state.policy
        if isinstance(policy, TenantPolicy):
            mesh.on_policy(lambda documents: _install_policy(policy, documents))
        # Set first: an agent may REGISTER while the mesh joins; its binding is queued and
        # written with everything else once the lease is granted.
        self.state.mesh = mesh
        try:
            await mesh.start(options.start_timeout)
        except BaseException:
            self.state.mesh = self.config.mesh
            raise
        self._etcd = mesh
        self._attach_mesh(mesh)

    def _attach_mesh(self, mesh: Mesh) -> None:
        """Resolve through ``mesh``, forward to peer relays (spec 02 §10, :mod:`.interrelay`)
        and resume across relays (:mod:`.remote_resume`)."""
        self.state.mesh = mesh

        def endpoint_of(relay_id: str) -> str | None:
            record = mesh.relay(relay_id)
            return record.endpoint if record is not None else None

        config = self.config
        self.state.peers = PeerPool(
            QuicTlsConfig(config.cert_file, config.key_file, config.ca_file),
            endpoint_of,
            self._on_peer_dialled,
            dial_timeout=config.peer_dial_timeout,
        )
        self._peers.on_peer_resume = self._resume.attach_mesh().serve

    @property
    def mesh_ready_reasons(self) -> list[str]:
        """Why the shared registry makes this relay not ready (``/readyz``); [] if fine."""
        mesh = self.state.mesh
        return [] if mesh is None else mesh.not_ready_reasons()

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
        if self.state.plane is not None:
            self.state.plane.close()
        if self.state.peers is not None:
            self.state.peers.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT)
        if self._etcd is not None:  # a clean stop leaves the mesh at once (lease revoked)
            await self._etcd.aclose()
        await self.state.audit.aclose()
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

    def reload_tls(self) -> None:
        """Re-read the configured cert, key and CA files for new handshakes.

        The relay runs on an :class:`~outrelay.pki.reload.IdentitySnapshot`: the
        CLI validates and installs new files first, then calls this. New QUIC and
        TCP handshakes present the new server certificate and verify clients
        against the new CA; established agent connections are not touched.

        Raises:
            OSError, ValueError, PkiError, ssl.SSLError: a file cannot be loaded.
        """
        tls = QuicTlsConfig(self.config.cert_file, self.config.key_file, self.config.ca_file)
        verifier = ClientVerifier(load_certificates(self.config.ca_file))
        if self._server is not None:
            self._server.reload_tls(tls)
        if self._tcp_server is not None:
            self._tcp_server.reload_tls(tls)
        self._verifier = verifier

    def _verify_client(
        self, leaf: x509.Certificate | None, chain: tuple[x509.Certificate, ...]
    ) -> str:
        return self._verifier.verify(leaf, chain)

    def _on_refused(self, address: tuple[str, int], reason: str) -> None:
        self.state.counters.refused(reason)
        log.warning(
            "reject conn: client certificate refused",
            extra=kv(remote=f"{address[0]}:{address[1]}", reason=reason),
        )

    def _on_connection(self, conn: Connection) -> None:
        self._spawn(self._handle_connection(conn), "connection")

    def _on_peer_dialled(self, relay_id: str, conn: Connection, control: Stream) -> None:
        self._spawn(self._peers.serve_connection(relay_id, conn, control), "peer")

    async def _handle_connection(self, conn: Connection) -> None:
        uri = getattr(conn, "identity", None) or ""
        remote = f"{conn.peer.address[0]}:{conn.peer.address[1]}"
        try:
            identity = parse_identity(uri)
        except InvalidIdentity as exc:
            self.state.counters.refused("bad identity uri")
            log.warning("reject conn: bad identity URI", extra=kv(remote=remote, err=str(exc)))
            conn.close(0, close_phrase(f"bad client certificate: identity URI: {exc}"))
            return
        if isinstance(identity, RelayIdentity):
            # Spec 02 §10.1: a peer relay; no HELLO, never in the agent map.
            log.info("peer relay connected", extra=kv(uri=uri, remote=remote))
            # Keyed by connection, not by the certificate's relay id alone: the pairs a
            # connection carries route their control frames back over that very
            # connection, even when several peers present the same certificate.
            link = f"{identity.relay_id}@{remote}"
            try:
                await self._peers.serve_connection(link, conn)
            finally:
                conn.close(0, "")
            return
        session = await self._hello(conn, uri, identity, remote)
        if session is None:
            return
        try:
            async with asyncio.TaskGroup() as tg:
                writer = tg.create_task(session.ctrl.run())
                control = tg.create_task(self._control.serve(session))
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
        agents = self.state.agents
        previous = agents.get(uri)
        agents[uri] = session
        leaf = conn.peer.certificate
        log.info(
            "agent connected",
            extra=kv(  # the serial shows which certificate a (rotated) agent presented
                uri=uri, remote=remote, serial=f"{leaf.serial_number:x}" if leaf else "-"
            ),
        )
        replaced = self.state.instances.hello(uri, session.instance)
        if replaced:
            # Ours: a new process of this agent. The old one's streams can never
            # resume: end them (and halves waiting for them) now, not in 30 s.
            log.info("agent restarted; ending its old streams", extra=kv(uri=uri, old=replaced))
            if previous is not None and previous.instance == replaced:
                previous.superseded = True
            self._resume.end_orphans(Member(uri, replaced))
        if previous is not None and not previous.conn.is_closed:
            # Ours (the reference keeps it): the agent reconnected, so its old
            # connection is dead or dying. Closing it resets the splices it
            # carried, and their peers resume instead of waiting for a timeout.
            log.info("closing the agent's previous connection", extra=kv(uri=uri))
            previous.conn.close(0, "")
        return session

    def _teardown(self, session: AgentSession) -> None:
        """Spec 02 §2.4 with the [REC] of §15 item 2."""
        state = self.state
        if session.conn.peer_close_code == StreamEndCode.AGENT_GONE:
            # The agent shut down cleanly: nothing of it will come back to resume.
            state.instances.departed(session.member)
            self._resume.end_orphans(session.member)
        if state.agents.get(session.uri) is session:
            del state.agents[session.uri]
            removed = state.registry.deregister_agent(session.tenant, session.uri)
            if state.mesh is not None:  # its bindings in the shared registry too (issue 18)
                state.mesh.withdraw_agent(session.tenant, session.uri)
            log.info(
                "agent disconnected",
                extra=kv(
                    uri=session.uri, services=",".join(removed), reason=session.conn.close_reason
                ),
            )
        else:
            log.info("stale agent connection closed", extra=kv(uri=session.uri))

    # -- data streams (spec 02 §6.0) ------------------------------------------------------

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
        if frame.type in (
            FrameType.STREAM_RESUME,
            FrameType.MIGRATE_TO_RELAY,
            FrameType.OPEN_STREAM,
        ):
            kind = {
                FrameType.STREAM_RESUME: "resume",
                FrameType.MIGRATE_TO_RELAY: "migrate",
                FrameType.OPEN_STREAM: "open",
            }[FrameType(frame.type)]
            counters = self.state.counters
            counters.handler_started(kind)
            started = time.perf_counter_ns()
            try:
                if kind == "open":
                    try:
                        open_msg = expect_message(frame, FrameType.OPEN_STREAM, OpenStream)
                    except OrpError:
                        await stream.aclose()
                        return
                    await self._open.run(session, stream, open_msg, reader.take_leftover())
                else:
                    await self._resume.run(session, stream, frame, reader.take_leftover())
            finally:
                counters.handler_ended(time.perf_counter_ns() - started)
        else:
            log.warning(
                "first frame not OPEN_STREAM",
                extra=kv(uri=session.uri, type=frame_name(frame.type)),
            )
            await stream.aclose()


def _install_policy(policy: TenantPolicy, documents: dict[str, PolicyDocument]) -> None:
    """The registry's rules changed: swap them in (as a SIGHUP reload of the file does)."""
    policy.replace(documents)
    log.info(
        "registry policy installed",
        extra=kv(tenants=",".join(sorted(policy.tenants)) or "-", rules=policy.statistics().rules),
    )
