"""The OPEN_STREAM flow for a provider on this relay (spec 02 §6.1 steps 2–9, §6.2, §6.6, §7.5).

Theory of operation
-------------------
The decision is pure: :func:`decide_open` takes the request, a policy callable and a
registry lookup, and returns a value, either :class:`RejectOpen` (a reject code and reason,
plus the log line) or :class:`AdmitOpen` (the provider, the effective p2p mode and how to
carry the stream: splice, or forward sessions). It follows spec 02 §6.1:

1. caller side: ``decide(consumer, target_service, method)``; a deny is 403
   ``"denied: <reason>"``;
2. the registry resolves the target to a connected provider, else 404 ``"service not found"``;
3. callee side: ``decide(provider, consumer, method)``; a deny is 403
   ``"denied (callee): <reason>"``;
4. the p2p mode is both sides' :func:`~.policy.combine_p2p` (§6.2.4); the relay mode is the
   caller side's, and forward only when the relay has a forward plane.

Without a policy (``decide`` returns None) everything is allowed, p2p ALLOWED, splice.

Resolution (issue 18): a live provider on this relay first (the registry), else, in a mesh,
the best provider on another relay (``mesh.remote_providers()[0]``: same region first, then
the newest binding). Both policy sides are decided here for a remote provider too (the
reference's §10.2 skips the callee side); the stream then goes to
:meth:`.interrelay.InterRelay.forward`.

:class:`OpenFlow` is the shell: it runs the decision, writes INCOMING_STREAM to the provider,
records the pair (§6.1 step 6), waits (bounded) for STREAM_ACCEPT/REJECT, then sends
STREAM_READY to both agents and splices (§6.3), or hands over to a forward session (§6.4).
Under p2p REQUIRED it arms the enforcer (§7.5): the consumer gets a FIN unless MIGRATE_TO_P2P
for the stream arrives within the promotion timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

from outrelay.identity import InvalidIdentity, parse_identity
from outrelay.observe import hop, hop_marks, kv
from outrelay.orp import (
    CAP_P2P_MODE,
    CAP_PIPELINE,
    CAP_RESUME_PEER,
    FrameType,
    IncomingStream,
    OpenStream,
    OrpError,
    RejectCode,
    StreamReady,
    StreamReject,
    encode_message,
    encode_p2p_mode,
)
from outrelay.relay.audit import AuditEvent
from outrelay.relay.forward import forward_session
from outrelay.relay.interrelay import InterRelay
from outrelay.relay.mesh import ProviderRecord
from outrelay.relay.policy import P2PMode, PolicyResult, RelayMode, combine_p2p
from outrelay.relay.splicing import reject, splice_pair
from outrelay.relay.state import AgentSession, RelayState, log, now_ms
from outrelay.splice import copy_until
from outrelay.transport import Stream, TransportError
from outrelay.wire import FrameReader, expect_message

__all__ = [
    "PROVIDER_ANSWER_TIMEOUT",
    "AdmitOpen",
    "Decide",
    "OpenDecision",
    "OpenFlow",
    "OpenRequest",
    "RejectOpen",
    "Resolve",
    "decide_open",
    "early_to_provider",
]

PROVIDER_ANSWER_TIMEOUT = 30.0
"""Ours: the reference waits for ever for STREAM_ACCEPT/REJECT (§6.6)."""


@dataclass(frozen=True, slots=True)
class OpenRequest:
    """What :func:`decide_open` needs from an OPEN_STREAM and its sender."""

    consumer_uri: str
    tenant: str
    """The consumer's tenant: the registry is looked up in it."""
    target: str
    """``OPEN_STREAM.target_service``."""
    method: str = ""


@dataclass(frozen=True, slots=True)
class RejectOpen:
    """Refuse the stream with STREAM_REJECT{code, reason} (spec 02 §13)."""

    code: RejectCode
    reason: str
    """Sent to the consumer."""
    log_message: str
    """The relay's log line (operators and tests look for it)."""
    policy_reason: str | None = None
    """The deciding rule's id for the log line (None: not a policy decision)."""


@dataclass(frozen=True, slots=True)
class AdmitOpen:
    """Offer the stream to the provider; carry it as ``relay_mode`` says."""

    provider_uri: str
    p2p_mode: P2PMode = P2PMode.ALLOWED
    """Both sides' modes combined (spec 02 §6.2.4)."""
    relay_mode: RelayMode = RelayMode.SPLICE
    """FORWARD only when the caller-side rule says so and the relay has a forward plane."""


OpenDecision: TypeAlias = RejectOpen | AdmitOpen

Decide: TypeAlias = Callable[[str, str, str, str], PolicyResult | None]
"""``decide(caller, target, method, side)``: a policy result, or None without a policy."""
Resolve: TypeAlias = Callable[[str, str], str | None]
"""``resolve(tenant, service)``: the URI of a connected provider, or None."""


def decide_open(
    request: OpenRequest, *, decide: Decide, resolve: Resolve, forward_plane: bool
) -> OpenDecision:
    """Spec 02 §6.1 steps 2–4 and §6.2.4 (see the module docstring).

    ``decide`` is called for the caller side, then (only when that allows and a provider is
    found) for the callee side, so its audit events come in the reference's order.
    """
    consumer, target, method = request.consumer_uri, request.target, request.method
    caller_side = decide(consumer, target, method, "caller")
    if caller_side is not None and not caller_side.allowed:
        return RejectOpen(
            RejectCode.FORBIDDEN,
            f"denied: {caller_side.reason}",
            "open denied",
            caller_side.reason,
        )
    provider = resolve(request.tenant, target)
    if provider is None:
        return RejectOpen(
            RejectCode.NOT_FOUND, "service not found", "open rejected: service not found"
        )
    callee_side = decide(provider, consumer, method, "callee")
    if callee_side is not None and not callee_side.allowed:
        return RejectOpen(
            RejectCode.FORBIDDEN,
            f"denied (callee): {callee_side.reason}",
            "open denied (callee)",
            callee_side.reason,
        )
    p2p_mode = P2PMode.ALLOWED
    if caller_side is not None and callee_side is not None:
        p2p_mode = combine_p2p(caller_side.p2p_mode, callee_side.p2p_mode)
    relay_mode = caller_side.relay_mode if caller_side is not None else RelayMode.SPLICE
    if not forward_plane:
        relay_mode = RelayMode.SPLICE  # a forward rule without --listen-forward splices
    return AdmitOpen(provider, p2p_mode, relay_mode)


def early_to_provider(decision: AdmitOpen, provider_capabilities: frozenset[str]) -> bool:
    """Does the provider get the consumer's pipelined bytes right behind INCOMING_STREAM
    (``IncomingStream.outrelay_spliced``), before it accepts? Only for a stream we will
    splice, and only a provider that announced ``orp.CAP_PIPELINE``: a reference agent
    expects nothing but its answer's reply before STREAM_READY, and in forward mode the
    consumer's bytes are discarded (the consumer sends them again end to end)."""
    return decision.relay_mode == RelayMode.SPLICE and CAP_PIPELINE in provider_capabilities


class OpenFlow:
    """The shell of the open flow (module docstring).

    Args:
        state: The relay's tables.
        required_promotion_timeout: How long a p2p REQUIRED stream may stay on the relay
            before the consumer gets a FIN (spec 02 §7.5).
    """

    def __init__(self, state: RelayState, required_promotion_timeout: float) -> None:
        self._state = state
        self._required_timeout = required_promotion_timeout
        self.inter = InterRelay(state)
        """Forwarding to providers on peer relays (spec 02 §10, :mod:`.interrelay`)."""

    async def _reject(self, c_stream: Stream, code: int, reason: str) -> None:
        """STREAM_REJECT + FIN, counted (``stream_rejects``, by code)."""
        self._state.counters.rejected(int(code))
        await reject(c_stream, code, reason)

    def decide(self, caller: str, target: str, method: str, side: str) -> PolicyResult | None:
        """One audited policy evaluation (spec 02 §6.2.7); None without a policy."""
        policy = self._state.policy
        if policy is None:
            return None
        now = now_ms()
        started = time.perf_counter_ns()
        result = policy.decide(caller, target, method, now)
        self._state.counters.policy_eval_duration.observe(time.perf_counter_ns() - started)
        try:
            tenant = parse_identity(caller).authority
        except InvalidIdentity:
            tenant = ""
        self._state.audit.emit(
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

    def _resolve(self, tenant: str, service: str) -> ProviderRecord | str | None:
        """A connected provider on this relay first, else the mesh's best remote one
        (same region first, then the newest binding; issue 18's resolution rule)."""
        state = self._state
        agents = state.agents
        binding = state.registry.resolve(tenant, service, agents.__contains__)
        if binding is not None and binding.agent_uri in agents:
            return binding.agent_uri
        if state.mesh is not None and state.peers is not None:
            remote = state.mesh.remote_providers(tenant, service)
            if remote:
                return remote[0]
        return None

    async def run(
        self, consumer: AgentSession, c_stream: Stream, msg: OpenStream, c_leftover: bytes
    ) -> None:
        """Spec 02 §6.1, steps 2–9, for a provider on this relay."""
        state = self._state
        sid = msg.stream_id
        hop("r_open", sid, early=len(c_leftover))
        target, method = msg.target_service, msg.method
        c_uri = consumer.uri
        fields = kv(stream_id=sid, svc=target, consumer=c_uri)

        remote: list[ProviderRecord] = []

        def resolve(tenant: str, service: str) -> str | None:
            found = self._resolve(tenant, service)
            if isinstance(found, ProviderRecord):
                remote.append(found)
                return found.agent_uri
            return found

        decision = decide_open(
            OpenRequest(c_uri, consumer.tenant, target, method),
            decide=self.decide,
            resolve=resolve,
            forward_plane=state.plane is not None,
        )
        if isinstance(decision, RejectOpen):
            extra = fields
            if decision.policy_reason is not None:
                extra = kv(**fields["attrs"], reason=decision.policy_reason)
            log.info(decision.log_message, extra=extra)
            await self._reject(c_stream, decision.code, decision.reason)
            return
        if remote:
            # The provider is on a peer relay (issue 18): both sides' policy was decided
            # here; forward mode and REQUIRED enforcement do not cross relays.
            request = IncomingStream(
                target_service=target,
                method=method,
                source_agent_uri=c_uri,
                stream_id=sid,
                outrelay_provider_uri=remote[0].agent_uri,
            )
            await self.inter.forward(
                consumer, c_stream, c_leftover, request, remote[0].relay_id, decision.p2p_mode
            )
            return
        provider = state.agents[decision.provider_uri]
        p_uri = provider.uri
        early = early_to_provider(decision, provider.capabilities)

        try:
            p_stream = await provider.conn.open_stream()
            incoming = encode_message(
                FrameType.INCOMING_STREAM,
                IncomingStream(
                    target_service=target,
                    method=method,
                    source_agent_uri=c_uri,
                    stream_id=sid,
                    outrelay_spliced=early,
                ),
            )
            # One write: the pipelined bytes leave in INCOMING_STREAM's packet.
            await p_stream.send_all(incoming + c_leftover if early else incoming)
        except TransportError as exc:
            log.warning("provider stream open failed", extra=kv(**fields["attrs"], err=str(exc)))
            await self._reject(c_stream, RejectCode.BAD_GATEWAY, "provider stream open failed")
            return

        hop("r_incoming_sent", sid)
        if not state.pairs.record(sid, c_uri, p_uri):
            log.warning("stream id collision rejected", extra=fields)
            await p_stream.aclose()
            await self._reject(c_stream, RejectCode.STREAM_ID_COLLISION, "stream id collision")
            return
        if decision.p2p_mode == P2PMode.FORBIDDEN:
            state.p2p_forbidden.add(sid)  # before STREAM_READY: no offer may slip through
        enforcer: asyncio.Task[None] | None = None
        promoted: asyncio.Future[None] | None = None
        if decision.p2p_mode == P2PMode.REQUIRED:
            # Spec 02 §7.5: armed once INCOMING_STREAM is out, before the provider answers.
            promoted = state.migrations.watch(sid)
            enforcer = asyncio.get_running_loop().create_task(
                self._enforce_required(sid, c_stream, promoted)
            )
        try:
            await self._answer_and_carry(
                consumer, c_stream, c_leftover, provider, p_stream, sid, decision, early=early
            )
        finally:
            state.pairs.forget(sid, c_uri, p_uri, now_ms())
            state.p2p_forbidden.discard(sid)
            if enforcer is not None and promoted is not None:
                enforcer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await enforcer
                state.migrations.unwatch(sid, promoted)

    async def _answer_and_carry(
        self,
        consumer: AgentSession,
        c_stream: Stream,
        c_leftover: bytes,
        provider: AgentSession,
        p_stream: Stream,
        sid: int,
        decision: AdmitOpen,
        *,
        early: bool = False,
    ) -> None:
        """§6.1 steps 7–9: the provider's answer, then splice (§6.3) or forward (§6.4).

        ``early``: ``c_leftover`` already went to the provider behind INCOMING_STREAM
        (:func:`early_to_provider`); what the consumer sends meanwhile follows it.
        """
        state = self._state
        p_reader = FrameReader(p_stream)
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[None] = loop.create_future()
        # Pipelining (module docstring): the consumer's bytes go on to the provider
        # while it makes up its mind.
        pump = loop.create_task(copy_until(c_stream, p_stream, answered)) if early else None
        early_bytes = len(c_leftover) if early else 0
        try:
            async with asyncio.timeout(PROVIDER_ANSWER_TIMEOUT):
                answer = await p_reader.read_frame()
        except (TimeoutError, TransportError, OrpError) as exc:
            log.info("provider did not answer", extra=kv(stream_id=sid, err=repr(exc)))
            answer = None
        finally:
            answered.set_result(None)
            if pump is not None:
                early_bytes += await pump
        hop("r_answer", sid)
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

        if decision.relay_mode == RelayMode.FORWARD and state.plane is not None:
            await forward_session(state, consumer, c_stream, provider, p_stream, sid, state.plane)
            return
        # Splice mode (spec 02 §6.3).
        current_provider = state.agents.get(provider.uri)
        for agent in (consumer, current_provider):
            if agent is None:
                continue
            ready = StreamReady(stream_id=sid)
            if CAP_P2P_MODE in agent.capabilities:
                ready.outrelay_p2p_mode = encode_p2p_mode(decision.p2p_mode)
            if CAP_RESUME_PEER in agent.capabilities:
                ready.outrelay_peer_uri = provider.uri if agent is consumer else consumer.uri
            agent.ctrl.post(FrameType.STREAM_READY, ready)
        # Queued, not waited for: the outbox writers run before the splice's copy
        # tasks (asyncio runs ready callbacks in order), so STREAM_READY is still written
        # first (§6.3) unless a backlog holds it back, and no agent may rely on the
        # order across streams anyway. Waiting for both writes cost ~0.9 ms of every
        # stream's time to first byte (bench/hops.py).
        hop("r_ready_sent", sid)
        # A source that breaks (not a clean EOF) resets the other side, so
        # its agent resumes instead of taking a FIN for a finished stream.
        # (REQUIRED enforcement runs beside the splice, armed by run().)
        result = await splice_pair(
            state.ended,
            sid,
            consumer,
            c_stream,
            provider,
            p_stream,
            b"" if early else c_leftover,
            p_reader.take_leftover(),
            on_first_bytes=hop_marks(sid, "r_c2p_first", "r_p2c_first"),
        )
        log.debug(
            "splice ended",
            extra=kv(
                stream_id=sid,
                c_to_p=result.a_to_b.bytes + early_bytes,
                p_to_c=result.b_to_a.bytes,
            ),
        )

    async def _enforce_required(
        self, sid: int, c_stream: Stream, promoted: asyncio.Future[None]
    ) -> None:
        """Spec 02 §7.5: FIN the consumer if no MIGRATE_TO_P2P arrives in time.

        Waits on ``promoted`` (resolved by control dispatch when MIGRATE_TO_P2P for ``sid``
        arrives) rather than polling the migrated cache; a note already in the cache counts.
        The caller unwatches ``promoted``.
        """
        if self._state.migrated.lookup(sid, now_ms()) is not None:
            return
        try:
            async with asyncio.timeout(self._required_timeout):
                await promoted
            return
        except TimeoutError:
            pass
        log.warning("required p2p promotion timeout — closing splice", extra=kv(stream_id=sid))
        with contextlib.suppress(TransportError):
            await c_stream.send_eof()
