"""Serving peer relays: their connections and FORWARD_STREAM, the provider's side (spec 02 §10.1).

A connection whose client certificate carries a relay URI is a peer relay's (no HELLO,
never in the agent map, :mod:`.edge`); a connection this relay dialled (the pool's,
:mod:`.peers`) is served the same way. Each stream is dispatched on its first frame:
FORWARD_STREAM (the provider's side of a forward, below), PEER_CONTROL (the control
channel of split pairs, :mod:`.peer_control`) or PEER_RESUME (a resume half parked on the
peer, :mod:`.remote_resume`); anything else is closed (§10.1 step 1).

FORWARD_STREAM from a reference relay (``stream_id`` 0, no extensions) is served as §10.1:
no policy, ``503 no local provider for forwarded stream``, INCOMING_STREAM with stream id
0, ``503 provider rejected`` or an empty STREAM_ACCEPT, splice; no STREAM_READY, no pair.
From one of ours (``outrelay_p2p_mode`` non-zero, :mod:`.interrelay`): the named provider
if it still serves the name (else the local resolution), ``404 service not found``, our
own callee-side rules, the pipelined bytes exactly once, the provider's reject code and
reason back unchanged, STREAM_READY to the provider, and the pair recorded with the
consumer marked remote (:class:`~.remote.RemoteSides`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Final

from outrelay.identity import InvalidIdentity, parse_identity
from outrelay.observe import kv
from outrelay.orp import (
    CAP_PIPELINE,
    Frame,
    FrameType,
    IncomingStream,
    OrpError,
    RejectCode,
    StreamEndCode,
    StreamReject,
    decode_p2p_mode,
    encode_message,
)
from outrelay.relay.interrelay import post_ready
from outrelay.relay.limits import MAX_CONTROL_FRAME
from outrelay.relay.pairs import Member
from outrelay.relay.peer_control import serve_peer_control
from outrelay.relay.policy import P2PMode, PolicyResult
from outrelay.relay.splicing import peer_end_code, reject, splice_with_peer
from outrelay.relay.state import AgentSession, RelayState, log, now_ms
from outrelay.splice import copy_until
from outrelay.transport import Connection, Stream, TransportError
from outrelay.wire import FrameReader, expect_message

__all__ = ["PeerServer"]

FIRST_FRAME_TIMEOUT: Final = 30.0
"""Ours: how long a peer stream may take to send its first frame."""

Decide = Callable[[str, str, str, str], PolicyResult | None]
PeerResumeHandler = Callable[[str, Stream, Frame, bytes], Awaitable[None]]


class PeerServer:
    """Serves peer relays' connections (module docstring).

    Args:
        state: The relay's tables.
        decide: One audited policy evaluation (``OpenFlow.decide``).
        answer_timeout: How long to wait for a provider's answer.
    """

    def __init__(self, state: RelayState, decide: Decide, answer_timeout: float) -> None:
        self._state = state
        self._decide = decide
        self._answer_timeout = answer_timeout
        self.on_peer_resume: PeerResumeHandler | None = None
        """Serves a peer stream whose first frame is PEER_RESUME (cross-relay resume)."""

    async def _reject(self, stream: Stream, code: int, reason: str) -> None:
        self._state.counters.rejected(int(code))
        await reject(stream, code, reason)

    async def serve_connection(
        self, relay_id: str, conn: Connection, control: Stream | None = None
    ) -> None:
        """Serve one peer connection's streams until it closes.

        Args:
            relay_id: The link's key: the peer's relay id for a pooled connection, the
                certificate's relay id and the remote address for an accepted one. Pairs
                the connection carries are marked with it, and its PEER_CONTROL channel
                is registered under it (:class:`~.remote.PeerControls`).
            control: A pooled connection's PEER_CONTROL stream, which the pool opened
                before any forward (:mod:`.peers`); an accepted connection's comes as
                one of its streams.
        """
        async with asyncio.TaskGroup() as tg:
            if control is not None:
                reader = FrameReader(control)
                tg.create_task(serve_peer_control(self._state, relay_id, conn, control, reader))
            try:
                while True:
                    stream = await conn.accept_stream()
                    tg.create_task(self._serve_stream(relay_id, conn, stream))
            except TransportError:
                pass
        if self._state.peers is not None:
            self._state.peers.drop(relay_id, conn, "connection closed")

    async def _serve_stream(self, relay_id: str, conn: Connection, stream: Stream) -> None:
        reader = FrameReader(stream, max_frame=MAX_CONTROL_FRAME)
        try:
            async with asyncio.timeout(FIRST_FRAME_TIMEOUT):
                frame = await reader.read_frame()
        except (TimeoutError, TransportError, OrpError):
            frame = None
        if frame is None:
            await stream.aclose()  # §10.1 step 1: FIN and stop
        elif frame.type == FrameType.FORWARD_STREAM:
            await self._serve_forward(relay_id, stream, frame, reader.take_leftover())
        elif frame.type == FrameType.PEER_CONTROL:
            await serve_peer_control(self._state, relay_id, conn, stream, reader)
        elif frame.type == FrameType.PEER_RESUME and self.on_peer_resume is not None:
            await self.on_peer_resume(relay_id, stream, frame, reader.take_leftover())
        else:
            await stream.aclose()

    async def _serve_forward(
        self, relay_id: str, f_stream: Stream, frame: Frame, leftover: bytes
    ) -> None:
        """§10.1 steps 2–7; between our relays with the extensions (module docstring)."""
        state = self._state
        try:
            msg = expect_message(frame, FrameType.FORWARD_STREAM, IncomingStream)
            tenant = parse_identity(msg.source_agent_uri).authority
        except (OrpError, InvalidIdentity):
            await f_stream.aclose()
            return
        ours = msg.outrelay_p2p_mode != 0
        sid = msg.stream_id if ours else 0
        c_uri, target = msg.source_agent_uri, msg.target_service
        provider = state.agents.get(msg.outrelay_provider_uri) if ours else None
        if provider is not None and (
            provider.tenant != tenant or target not in provider.registrations
        ):
            provider = None  # not that agent's service (any more): resolve here
        if provider is None:
            binding = state.registry.resolve(tenant, target, state.agents.__contains__)
            provider = state.agents.get(binding.agent_uri) if binding is not None else None
        if provider is None:
            log.info("forwarded stream: no local provider", extra=kv(stream_id=sid, svc=target))
            if ours:
                await self._reject(f_stream, RejectCode.NOT_FOUND, "service not found")
            else:
                await self._reject(
                    f_stream, RejectCode.UNAVAILABLE, "no local provider for forwarded stream"
                )
            return
        if ours:
            callee = self._decide(provider.uri, c_uri, msg.method, "callee")
            if callee is not None and not callee.allowed:
                log.info(
                    "forwarded stream denied (callee)",
                    extra=kv(stream_id=sid, reason=callee.reason),
                )
                await self._reject(
                    f_stream, RejectCode.FORBIDDEN, f"denied (callee): {callee.reason}"
                )
                return
        early = ours and msg.outrelay_spliced and CAP_PIPELINE in provider.capabilities
        incoming = IncomingStream(
            target_service=target,
            method=msg.method,
            source_agent_uri=c_uri,
            stream_id=sid,
            outrelay_spliced=early,
        )
        try:
            p_stream = await provider.conn.open_stream()
            data = encode_message(FrameType.INCOMING_STREAM, incoming)
            await p_stream.send_all(data + leftover if early else data)
        except TransportError as exc:
            log.warning("provider open failed", extra=kv(stream_id=sid, err=str(exc)))
            await self._reject(f_stream, RejectCode.BAD_GATEWAY, "provider open failed")
            return
        if not ours:
            await self._answer_reference(f_stream, p_stream, provider, leftover)
            return
        if not state.pairs.record(sid, c_uri, provider.uri):
            p_stream.abort(StreamEndCode.REFUSED)
            await self._reject(f_stream, RejectCode.STREAM_ID_COLLISION, "stream id collision")
            return
        state.remote.mark(sid, c_uri, relay_id)
        told = decode_p2p_mode(msg.outrelay_p2p_mode)
        p2p_mode = P2PMode(int(told)) if told is not None else P2PMode.ALLOWED
        if p2p_mode == P2PMode.FORBIDDEN:
            state.p2p_forbidden.add(sid)
        try:
            await self._provider_answer(
                f_stream,
                b"" if early else leftover,
                provider,
                p_stream,
                sid,
                c_uri,
                p2p_mode,
                early=early,
            )
        finally:
            now = now_ms()
            state.pairs.forget(sid, c_uri, provider.uri, now)
            state.remote.unmark(sid, now)
            state.p2p_forbidden.discard(sid)

    async def _provider_answer(
        self,
        f_stream: Stream,
        f_prefix: bytes,
        provider: AgentSession,
        p_stream: Stream,
        sid: int,
        c_uri: str,
        p2p_mode: P2PMode,
        *,
        early: bool,
    ) -> None:
        """P's answer goes back to R1 as is; on STREAM_ACCEPT, STREAM_READY to P and splice."""
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[None] = loop.create_future()
        pump = loop.create_task(copy_until(f_stream, p_stream, answered)) if early else None
        p_reader = FrameReader(p_stream)
        try:
            async with asyncio.timeout(self._answer_timeout):
                answer = await p_reader.read_frame()
        except (TimeoutError, TransportError, OrpError) as exc:
            log.info("provider did not answer", extra=kv(stream_id=sid, err=repr(exc)))
            answer = None
        finally:
            answered.set_result(None)
            if pump is not None:
                await pump
        if answer is None or answer.type not in (FrameType.STREAM_ACCEPT, FrameType.STREAM_REJECT):
            p_stream.abort(StreamEndCode.LINK)
            await self._reject(f_stream, RejectCode.UNAVAILABLE, "provider rejected")
            return
        if answer.type == FrameType.STREAM_REJECT:
            code, reason = int(RejectCode.UNAVAILABLE), "provider rejected"
            with contextlib.suppress(OrpError):
                rejected = expect_message(answer, FrameType.STREAM_REJECT, StreamReject)
                code, reason = rejected.code or code, rejected.reason or reason
            await p_stream.aclose()
            await self._reject(f_stream, code, reason)
            return
        accept = encode_message(FrameType.STREAM_ACCEPT) + p_reader.take_leftover()
        try:
            await f_stream.send_all(accept)
        except TransportError as exc:
            p_stream.abort(peer_end_code(exc))
            f_stream.abort(StreamEndCode.LINK)
            return
        current = self._state.agents.get(provider.uri)
        if current is not None:
            post_ready(current, sid, p2p_mode, c_uri)
        await splice_with_peer(
            self._state, sid, provider, p_stream, Member(c_uri, ""), f_stream, b"", f_prefix
        )

    async def _answer_reference(
        self, f_stream: Stream, p_stream: Stream, provider: AgentSession, leftover: bytes
    ) -> None:
        """§10.1 steps 6–7 for a reference relay: ``503 provider rejected`` or an empty
        STREAM_ACCEPT, then splice; no STREAM_READY, no pair."""
        p_reader = FrameReader(p_stream)
        try:
            async with asyncio.timeout(self._answer_timeout):
                answer = await p_reader.read_frame()
        except (TimeoutError, TransportError, OrpError):
            answer = None
        if answer is None or answer.type != FrameType.STREAM_ACCEPT:
            if answer is None:
                p_stream.abort(StreamEndCode.LINK)
            else:
                await p_stream.aclose()
            await self._reject(f_stream, RejectCode.UNAVAILABLE, "provider rejected")
            return
        try:
            await f_stream.send_all(
                encode_message(FrameType.STREAM_ACCEPT) + p_reader.take_leftover()
            )
        except TransportError:
            p_stream.abort(StreamEndCode.LINK)
            return
        await splice_with_peer(
            self._state, 0, provider, p_stream, Member("", ""), f_stream, b"", leftover
        )
