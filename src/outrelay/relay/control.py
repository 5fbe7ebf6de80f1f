"""Control-stream dispatch: one loop per agent, one handler per frame type (spec 02 §3–§5, §7).

The loop reads frames (bounded by ``MAX_CONTROL_FRAME``), rate-limits them with a token
bucket (``CONTROL_FRAMES_PER_SECOND``, ours) and dispatches: PING → PONG (§3), REGISTER →
REGISTER_ACK (§4, with our bounds and provide rules), OBSERVED_ADDR_QUERY → RESP (§7.1),
STREAM_CHECKPOINT and CANDIDATE_* → the other agent of the pair (§5, §7.2, §7.6), and
MIGRATE_TO_P2P → the migrated cache (§7.3), which also wakes a REQUIRED enforcer (§7.5).
Every write goes through the agent's :class:`~.outbox.ControlOutbox` and never waits on
another agent. When the loop ends, so does the agent's connection.
"""

from __future__ import annotations

import asyncio

from outrelay.observe import kv
from outrelay.orp import (
    CandidateAnswer,
    Frame,
    FrameType,
    MigrateToP2P,
    ObservedAddrQuery,
    ObservedAddrResp,
    OrpError,
    Register,
    RegisterAck,
    decode_message,
    encode_frame,
)
from outrelay.relay.audit import AuditEvent
from outrelay.relay.limits import (
    CONTROL_BURST,
    CONTROL_FRAMES_PER_SECOND,
    MAX_REGISTRATIONS_PER_AGENT,
    MAX_SERVICE_NAME,
)
from outrelay.relay.policy import ProvideResult
from outrelay.relay.registry import RegistrationRejected
from outrelay.relay.state import AgentSession, RelayState, log, now_ms
from outrelay.transport import TokenBucket, TransportError, close_phrase
from outrelay.wire import expect_message, frame_name

__all__ = ["ControlDispatch", "registration_refusal"]


def registration_refusal(session: AgentSession, name: str) -> str:
    """Why a REGISTER of ``name`` is refused ("" if it is not); bounds in ``relay.limits``."""
    if len(name.encode()) > MAX_SERVICE_NAME:
        return f"service name longer than {MAX_SERVICE_NAME} bytes"
    if name not in session.registrations and len(session.registrations) >= (
        MAX_REGISTRATIONS_PER_AGENT
    ):
        return f"more than {MAX_REGISTRATIONS_PER_AGENT} services on one connection"
    return ""


class ControlDispatch:
    """Serves agents' control streams against the relay's tables."""

    def __init__(self, state: RelayState) -> None:
        self._state = state
        self.datagrams_forwarded = 0
        self.datagrams_dropped = 0

    async def serve(self, session: AgentSession) -> None:
        """Serve the control stream; when it ends, so does the connection.

        Ours: the reference keeps serving data streams without a control loop
        (spec 02 §2.4), which leaves PINGs unanswered and STREAM_READY writes
        stalled; our agents reconnect instead.
        """
        session.conn.on_datagram = lambda data: self._forward_datagram(session, data)
        try:
            await self._serve(session)
        finally:
            session.conn.on_datagram = None
            session.conn.close(0, "")

    def _forward_datagram(self, session: AgentSession, data: bytes) -> None:
        """Ours (issue 19, UDP services): a QUIC DATAGRAM frame (RFC 9221) whose first 8
        bytes are a relay stream id goes, unchanged, to the other agent of that stream's
        pair, if it is connected here; otherwise it is dropped (the agents then keep
        the flow on its stream). Nothing is queued beyond the connection's bounded
        datagram queue."""
        if len(data) < 8:
            self.datagrams_dropped += 1
            return
        state = self._state
        target_uri = state.pairs.route(int.from_bytes(data[:8], "big"), session.uri)
        target = state.agents.get(target_uri) if target_uri else None
        if target is None or not target.conn.send_datagram(data):
            self.datagrams_dropped += 1
            return
        self.datagrams_forwarded += 1

    async def _serve(self, session: AgentSession) -> None:
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
                self.dispatch(session, frame)
            except OrpError as exc:
                log.debug("ctrl frame ignored", extra=kv(uri=session.uri, err=str(exc)))

    def dispatch(self, session: AgentSession, frame: Frame) -> None:
        """Handle one control frame (spec 02 §3); never waits.

        Raises:
            OrpError: The frame's payload does not decode; the caller ignores the frame.
        """
        frame_type = frame.type
        if frame_type == FrameType.PING:
            session.ctrl.post(FrameType.PONG)
        elif frame_type == FrameType.REGISTER:
            self._register(session, expect_message(frame, FrameType.REGISTER, Register))
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
            self._forward_to_pair(session, frame)
        elif frame_type == FrameType.MIGRATE_TO_P2P:
            self._migrated(session, expect_message(frame, FrameType.MIGRATE_TO_P2P, MigrateToP2P))
        else:
            log.debug("ignored ctrl frame", extra=kv(uri=session.uri, type=frame_name(frame_type)))

    def _register(self, session: AgentSession, register: Register) -> None:
        """Spec 02 §4, with our bounds and provide rules; a refusal sends no REGISTER_ACK."""
        registry = self._state.registry
        name = register.service_name
        refusal = registration_refusal(session, name)
        if refusal:
            log.warning("register rejected", extra=kv(uri=session.uri, name=name[:64], err=refusal))
            return
        try:
            registry.validate(session.tenant, name, session.uri)
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
        before = registry.resolve(session.tenant, name)
        previous = before.agent_uri if before is not None else ""
        service_id = registry.register(session.tenant, name, session.uri, register.local_addr)
        session.registrations.add(name)
        if self._state.mesh is not None:  # shared with the other relays (issue 18)
            self._state.mesh.publish_binding(session.tenant, name, session.uri, register.local_addr)
        session.ctrl.post(FrameType.REGISTER_ACK, RegisterAck(service_id=service_id))
        log.info(
            "registered",
            extra=kv(
                name=name,
                agent=session.uri,
                providers=len(registry.providers(session.tenant, name)),
                took_over="" if previous == session.uri else previous,
            ),
        )

    def _decide_provide(self, session: AgentSession, service: str) -> ProvideResult | None:
        """May ``session``'s agent register ``service``? None without a policy (allowed)."""
        policy = self._state.policy
        if policy is None:
            return None
        result = policy.may_provide(session.uri, session.tenant, service)
        if not result.covered:
            return result  # open by default: no rule involved, nothing to audit
        self._state.audit.emit(
            AuditEvent(
                ts_unix_ms=now_ms(),
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

    def _migrated(self, session: AgentSession, migrate: MigrateToP2P) -> None:
        """Spec 02 §7.3: note the stream in the migrated cache (only from one of its agents)."""
        state = self._state
        sid = migrate.stream_id
        pair = state.pairs.get(sid)
        if pair is not None and session.uri not in pair:
            state.not_owner(session, FrameType.MIGRATE_TO_P2P, sid)
            return
        consumer, provider = pair if pair is not None else (session.uri, "")
        if sid in state.p2p_forbidden:
            log.warning(
                "migration reported although p2p_mode is forbidden",
                extra=kv(stream_id=sid, uri=session.uri),
            )
        state.migrated.note(sid, consumer, provider, now_ms())
        state.migrations.fire(sid)
        log.info("stream migrated to p2p", extra=kv(stream_id=sid))

    def _forward_to_pair(self, session: AgentSession, frame: Frame) -> None:
        """Spec 02 §5: blind-forward to the other half of a live pair."""
        state = self._state
        message = decode_message(frame)
        stream_id = int(getattr(message, "stream_id", 0))
        target_uri = state.pairs.route(stream_id, session.uri)
        if target_uri is None and frame.type == FrameType.STREAM_CHECKPOINT:
            # Ours (orp.CAP_CLOSE_ACK): the last checkpoints come after the splice ended.
            target_uri = state.pairs.route_closed(stream_id, session.uri, now_ms())
        if (
            frame.type == FrameType.CANDIDATE_OFFER
            and stream_id in state.p2p_forbidden
            and target_uri
        ):
            # Ours (spec 02 §7.6 has no effect): the policy forbids a direct
            # path, so the offer goes no further and the offerer gets an
            # empty answer at once -- a reference agent then stays on the relay.
            log.info("p2p offer refused (p2p_mode forbidden)", extra=kv(stream_id=stream_id))
            session.ctrl.post(FrameType.CANDIDATE_ANSWER, CandidateAnswer(stream_id=stream_id))
            return
        if target_uri is None and state.pairs.get(stream_id) is not None:
            # Ours: a stream belongs to its two agents; nobody else may speak for it.
            state.not_owner(session, FrameType(frame.type), stream_id)
            return
        target = state.agents.get(target_uri) if target_uri else None
        data = encode_frame(frame.type, frame.payload, version=frame.version, flags=frame.flags)
        checkpoint = frame.type == FrameType.STREAM_CHECKPOINT
        if target is None and target_uri:
            # Ours (issue 18): the other agent is on a peer relay; its PEER_CONTROL
            # stream carries the frame, and that relay delivers it.
            relay_id = state.remote.relay_of(stream_id, target_uri, now_ms())
            if relay_id is not None:
                state.peer_controls.post_raw(relay_id, data, droppable=checkpoint)
                return
        if target is None:
            if not checkpoint:
                log.debug("candidate forward: no peer", extra=kv(stream_id=stream_id))
            return
        # Never waits on the other agent: a full queue drops checkpoints (the next
        # one supersedes) or closes *that* agent's connection.
        target.ctrl.post_raw(data, droppable=checkpoint)
