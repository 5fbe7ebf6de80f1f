"""Inter-relay forwarding: FORWARD_STREAM on the consumer's relay (spec 02 §10.2).

A byte's way through two relays: the consumer C is on this relay (R1), the provider P on
a peer (R2). R1's open flow resolves P in the shared registry and calls
:meth:`InterRelay.forward` (§10.2): it opens a stream on the pooled connection to R2
(:mod:`.peers`) and writes FORWARD_STREAM; R2's :class:`~.peer_server.PeerServer` takes
that stream (§10.1), offers it to P with INCOMING_STREAM and answers R1 with P's
STREAM_ACCEPT or STREAM_REJECT. Then C's stream, the peer stream and P's stream are two
splices end to end.

The reference (§10.1/§10.2) leaves ``stream_id`` unset, sends no STREAM_READY, records no
pair, and drops the pooled connection on any reject. A FORWARD_STREAM that says nothing more
is still served that way (a reference relay may forward to us). Between our relays
(``IncomingStream.outrelay_p2p_mode`` non-zero) the forward carries:

* ``stream_id``, and the provider R1 resolved (``outrelay_provider_uri``);
* C's pipelined bytes right behind FORWARD_STREAM (``outrelay_spliced``), and what C
  sends meanwhile, exactly once: R2 passes them to P behind INCOMING_STREAM when P takes
  early bytes, else keeps them for the splice (docs/architecture.md "Pipelining");
* R2's callee-side policy decision too (R1 decided both sides already; R2 guards its
  provider with its own rules) and P's reject code and reason, back to C unchanged; a
  reject closes one stream, never the pooled connection (the [REC] of §15 item 6);
* STREAM_READY to both agents, and the pair recorded on both relays with the remote
  member marked (:class:`~.remote.RemoteSides`), so STREAM_CHECKPOINT and CANDIDATE_* of
  the pair travel over the connection's control stream (first frame PEER_CONTROL,
  :mod:`.peer_control`) and close-acks keep working (closed pairs, :mod:`.pairs`).

A peer stream that breaks resets the agent's stream with ``StreamEndCode.LINK`` (the agent
resumes); a final code (APPLICATION_CLOSED, AGENT_GONE) passes through across the hop
(:func:`~.splicing.splice_with_peer`). Forward mode (§6.4) and the p2p REQUIRED timer
(§7.5) do not cross relays: a forwarded stream is spliced, and its agents are told the
p2p mode in STREAM_READY.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

from outrelay.observe import kv
from outrelay.orp import (
    CAP_P2P_MODE,
    CAP_RESUME_PEER,
    FrameType,
    IncomingStream,
    OrpError,
    RejectCode,
    StreamEndCode,
    StreamReady,
    StreamReject,
    encode_message,
    encode_p2p_mode,
)
from outrelay.relay.pairs import Member
from outrelay.relay.peers import PeerUnreachable
from outrelay.relay.policy import P2PMode
from outrelay.relay.splicing import reject, splice_with_peer
from outrelay.relay.state import AgentSession, RelayState, log, now_ms
from outrelay.splice import copy_until
from outrelay.transport import Stream, TransportError
from outrelay.wire import FrameReader, expect_message

__all__ = ["PEER_ANSWER_TIMEOUT", "InterRelay", "post_ready"]

PEER_ANSWER_TIMEOUT: Final = 35.0
"""Ours: how long R1 waits for R2's answer (R2 waits 30 s for its provider's)."""


class InterRelay:
    """FORWARD_STREAM from the consumer's relay (module docstring).

    Args:
        state: The relay's tables (``state.peers`` must be set to forward).
    """

    def __init__(self, state: RelayState) -> None:
        self._state = state

    async def forward(
        self,
        consumer: AgentSession,
        c_stream: Stream,
        c_leftover: bytes,
        request: IncomingStream,
        relay_id: str,
        p2p_mode: P2PMode,
    ) -> None:
        """Forward C's stream to the provider ``request.outrelay_provider_uri`` on ``relay_id``.

        ``request`` is the FORWARD_STREAM payload but for ``outrelay_p2p_mode``.
        """
        state, sid = self._state, request.stream_id
        c_uri, p_uri = consumer.uri, request.outrelay_provider_uri
        state.counters.intra_relay_hop()
        if not state.pairs.record(sid, c_uri, p_uri):
            await self._reject(c_stream, RejectCode.STREAM_ID_COLLISION, "stream id collision")
            return
        state.remote.mark(sid, p_uri, relay_id)
        if p2p_mode == P2PMode.FORBIDDEN:
            state.p2p_forbidden.add(sid)  # before STREAM_READY: no offer may slip through
        try:
            f_stream = await self._open_forward(c_stream, c_leftover, request, relay_id, p2p_mode)
            if f_stream is not None:
                await self._forward_answer(consumer, c_stream, f_stream, sid, p_uri, p2p_mode)
        finally:
            now = now_ms()
            state.pairs.forget(sid, c_uri, p_uri, now)
            state.remote.unmark(sid, now)
            state.p2p_forbidden.discard(sid)

    async def _open_forward(
        self,
        c_stream: Stream,
        c_leftover: bytes,
        request: IncomingStream,
        relay_id: str,
        p2p_mode: P2PMode,
    ) -> Stream | None:
        """§10.2 steps 2–3: the pooled connection, a stream on it, FORWARD_STREAM and C's
        pipelined bytes. None: C got its STREAM_REJECT."""
        peers = self._state.peers
        assert peers is not None
        try:
            conn = await peers.connection(relay_id)
        except PeerUnreachable as exc:
            log.warning(
                "peer relay unreachable",
                extra=kv(stream_id=request.stream_id, relay=relay_id, err=str(exc)),
            )
            await self._reject(c_stream, RejectCode.BAD_GATEWAY, "peer relay unreachable")
            return None
        request.outrelay_spliced = True
        request.outrelay_p2p_mode = encode_p2p_mode(p2p_mode)
        try:
            f_stream = await conn.open_stream()
            await f_stream.send_all(encode_message(FrameType.FORWARD_STREAM, request) + c_leftover)
        except TransportError as exc:
            # The [REC]: the pooled connection goes only when it failed itself, not
            # when this one stream did.
            if conn.is_closed:
                peers.drop(relay_id, conn, f"forward failed: {exc}")
            await self._reject(c_stream, RejectCode.BAD_GATEWAY, "peer relay forward failed")
            return None
        return f_stream

    async def _forward_answer(
        self,
        consumer: AgentSession,
        c_stream: Stream,
        f_stream: Stream,
        sid: int,
        p_uri: str,
        p2p_mode: P2PMode,
    ) -> None:
        """R2's answer (C's bytes flow on meanwhile), then STREAM_READY to C and splice."""
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[None] = loop.create_future()
        pump = loop.create_task(copy_until(c_stream, f_stream, answered))
        f_reader = FrameReader(f_stream)
        try:
            async with asyncio.timeout(PEER_ANSWER_TIMEOUT):
                answer = await f_reader.read_frame()
        except (TimeoutError, TransportError, OrpError) as exc:
            log.info("peer relay did not answer", extra=kv(stream_id=sid, err=repr(exc)))
            answer = None
        finally:
            answered.set_result(None)
            await pump
        if answer is None or answer.type not in (FrameType.STREAM_ACCEPT, FrameType.STREAM_REJECT):
            f_stream.abort(StreamEndCode.LINK)
            await self._reject(c_stream, RejectCode.BAD_GATEWAY, "peer relay forward failed")
            return
        if answer.type == FrameType.STREAM_REJECT:
            code, reason = int(RejectCode.BAD_GATEWAY), "peer relay forward failed"
            with contextlib.suppress(OrpError):
                rejected = expect_message(answer, FrameType.STREAM_REJECT, StreamReject)
                code, reason = rejected.code or code, rejected.reason or reason
            log.info("forward rejected by peer", extra=kv(stream_id=sid, code=code, reason=reason))
            await f_stream.aclose()
            await self._reject(c_stream, code, reason)
            return
        post_ready(consumer, sid, p2p_mode, p_uri)
        await splice_with_peer(
            self._state,
            sid,
            consumer,
            c_stream,
            Member(p_uri, ""),
            f_stream,
            b"",
            f_reader.take_leftover(),
        )

    async def _reject(self, stream: Stream, code: int, reason: str) -> None:
        self._state.counters.rejected(int(code))
        await reject(stream, code, reason)


def post_ready(agent: AgentSession, sid: int, p2p_mode: P2PMode, peer_uri: str) -> None:
    """STREAM_READY with our extensions the agent asked for (as the open flow's, §6.3)."""
    ready = StreamReady(stream_id=sid)
    if CAP_P2P_MODE in agent.capabilities:
        ready.outrelay_p2p_mode = encode_p2p_mode(p2p_mode)
    if CAP_RESUME_PEER in agent.capabilities:
        ready.outrelay_peer_uri = peer_uri
    agent.ctrl.post(FrameType.STREAM_READY, ready)
