"""Resume across relays: two halves parked on two relays meet through the mesh (issue 18, ours).

Spec 02 §7.4 matches the two halves of a stream only when both agents come back to the same
relay. After a relay dies, the agents of its streams may reconnect to different relays;
then each relay parks one half. With a mesh (``RelayState.mesh``):

1. a half parked with no local match is published (``mesh.publish_half``: stream id, its
   agent, the peer it expects); it is withdrawn when it is matched, replaced or expires;
2. on every half record put (:meth:`RemoteResume.on_half`, own or another relay's), a relay
   holding a parked half for that id looks for another relay's half that fits
   (:meth:`~.resume_matcher.Half.fits`, the same agent never);
3. the relay whose half has the **higher revision** (the later one) forwards it: it takes
   the half from its matcher, opens a peer stream on the pooled connection to the other
   relay, writes PEER_RESUME (the StreamResume, the agent URI, whether it was a
   MIGRATE_TO_RELAY) and the agent's surplus bytes, then splices the agent's stream with
   the peer stream: a pure pipe (:meth:`RemoteResume.forward`);
4. the other relay treats the peer stream as the peer half (:meth:`RemoteResume.serve`):
   it writes each STREAM_RESUME half the other's positions (the [REC] echo, the remote
   agent's echo travels through the pipe) and splices the two.

A half record of the remote agent of a pair this relay still splices live means that
agent's side broke (its relay died, say, and our connection to it has not timed out yet):
the relay resets its own agent's stream with ``LINK`` at once, so both halves are parked
within moments instead of after the QUIC idle timeout.

Both relays record the pair with the remote member marked, so checkpoints keep crossing.
A PEER_RESUME that finds no fitting half is refused (stream reset ``REFUSED``); the
forwarding relay then resets its agent's stream with ``LINK``, and the agent resumes again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from outrelay.identity import InvalidIdentity, parse_identity
from outrelay.observe import kv
from outrelay.orp import (
    Frame,
    FrameType,
    OrpError,
    PeerResume,
    StreamEndCode,
    StreamResume,
    encode_message,
)
from outrelay.relay.mesh import HalfRecord
from outrelay.relay.pairs import Member
from outrelay.relay.peers import PeerUnreachable
from outrelay.relay.resume_matcher import Half, HalfKind, ResumeMatcher
from outrelay.relay.splicing import splice_with_peer
from outrelay.relay.state import RelayState, log, now_ms
from outrelay.transport import Stream, TransportError
from outrelay.wire import expect_message

if TYPE_CHECKING:
    from outrelay.relay.resume_flow import HalfHandle

__all__ = ["RemoteResume"]


def _echo(stream_id: int, my_position: int, peer_ack_position: int) -> bytes:
    return encode_message(
        FrameType.STREAM_RESUME,
        StreamResume(
            stream_id=stream_id, my_position=my_position, peer_ack_position=peer_ack_position
        ),
    )


def _fits(half: Half[HalfHandle], record: HalfRecord) -> bool:
    """Could the parked ``half`` and another relay's ``record`` be one stream's halves?"""
    return (
        record.agent_uri != half.agent_uri
        and (not half.expected_peer or half.expected_peer == record.agent_uri)
        and (not record.expected_peer or record.expected_peer == half.agent_uri)
    )


class RemoteResume:
    """The mesh side of the resume flow (module docstring).

    Args:
        state: The relay's tables; ``state.mesh`` and ``state.peers`` are set.
        matcher: The resume flow's matcher (parked halves).
    """

    def __init__(
        self,
        state: RelayState,
        matcher: ResumeMatcher[HalfHandle],
    ) -> None:
        self._state = state
        self._matcher = matcher
        self.forwarded = 0
        """Halves this relay forwarded to a peer relay."""
        self.served = 0
        """PEER_RESUME halves this relay matched with a parked half."""
        mesh = state.mesh
        assert mesh is not None
        mesh.on_half(self.on_half)

    # -- publishing ------------------------------------------------------------------------

    def published(self, half: Half[HalfHandle]) -> None:
        """``half`` parked with no local peer: let the other relays know."""
        assert self._state.mesh is not None
        self._state.mesh.publish_half(half.stream_id, half.agent_uri, half.expected_peer)

    def withdrawn(self, stream_id: int) -> None:
        """The parked half of ``stream_id`` is gone (matched, replaced, expired) unless
        a newer one of the same id is parked now."""
        if self._matcher.pending(stream_id) is None and self._state.mesh is not None:
            self._state.mesh.withdraw_half(stream_id)

    # -- who forwards ------------------------------------------------------------------------

    def on_half(self, record: HalfRecord) -> None:
        """A half record was put: if it meets our parked half, the later one forwards."""
        mesh = self._state.mesh
        if mesh is None:
            return
        if record.relay_id != mesh.relay_id:
            self._reset_split(record)
        half = self._matcher.pending(record.stream_id)
        if half is None:
            return
        records = mesh.halves(record.stream_id)
        mine = [r for r in records if r.relay_id == mesh.relay_id]
        theirs = [r for r in records if r.relay_id != mesh.relay_id and _fits(half, r)]
        if not mine or not theirs:
            return
        other = max(theirs, key=lambda r: r.revision)
        if max(r.revision for r in mine) < other.revision:
            return  # theirs is the later half: its relay forwards it to us
        if self._state.peers is None or not self._matcher.withdraw(half):
            return
        log.info(
            "resume half meets its peer on another relay; forwarding",
            extra=kv(stream_id=half.stream_id, uri=half.agent_uri, relay=other.relay_id),
        )
        half.handle.forward_to = other
        half.handle.done.set_result(True)  # the parked handler forwards (forward())

    def _reset_split(self, record: HalfRecord) -> None:
        """The remote agent of a live split pair parked a half on another relay: its side
        of the splice is broken (its relay may be dead, which our QUIC connection to it
        would notice only at its idle timeout). Reset our agent's stream with ``LINK``
        now, so it resumes and its half meets the other through the mesh."""
        state = self._state
        member = state.remote.live(record.stream_id)
        stream = state.split_streams.get(record.stream_id)
        if member is None or member.uri != record.agent_uri or stream is None:
            return
        log.info(
            "remote agent resuming on another relay; resetting our side",
            extra=kv(stream_id=record.stream_id, uri=record.agent_uri, relay=record.relay_id),
        )
        stream.abort(StreamEndCode.LINK)

    # -- the forwarding relay ------------------------------------------------------------------

    async def forward(self, half: Half[HalfHandle]) -> None:
        """Send ``half`` to the relay of ``half.handle.forward_to`` and become a pipe."""
        state, handle = self._state, half.handle
        target = handle.forward_to
        assert target is not None and state.peers is not None
        sid, stream = half.stream_id, handle.stream
        message = PeerResume(
            resume=StreamResume(
                stream_id=sid,
                my_position=half.my_position,
                peer_ack_position=half.peer_ack_position,
                outrelay_peer_uri=half.expected_peer,
            ),
            agent_uri=half.agent_uri,
            migrate=half.kind is HalfKind.MIGRATE,
        )
        try:
            conn = await state.peers.connection(target.relay_id)
            r_stream = await conn.open_stream()
            await r_stream.send_all(
                encode_message(FrameType.PEER_RESUME, message) + handle.leftover
            )
        except (PeerUnreachable, TransportError) as exc:
            log.info("resume half not forwarded", extra=kv(stream_id=sid, err=str(exc)))
            stream.abort(StreamEndCode.LINK)
            return
        self.forwarded += 1
        await self._carry(
            sid, handle, stream, target.agent_uri, target.relay_id, r_stream, b"", b""
        )

    async def _carry(
        self,
        sid: int,
        handle: HalfHandle,
        stream: Stream,
        remote_uri: str,
        relay_id: str,
        r_stream: Stream,
        l_prefix: bytes,
        r_prefix: bytes,
    ) -> None:
        """Record the pair (remote member marked) and splice until the stream ends."""
        state = self._state
        local_uri = handle.session.uri
        recorded = state.pairs.record(sid, local_uri, remote_uri)
        if recorded:
            state.remote.mark(sid, remote_uri, relay_id)
        try:
            await splice_with_peer(
                state,
                sid,
                handle.session,
                stream,
                Member(remote_uri, ""),
                r_stream,
                l_prefix,
                r_prefix,
            )
        finally:
            if recorded:
                now = now_ms()
                state.pairs.forget(sid, local_uri, remote_uri, now)
                state.remote.unmark(sid, now)

    # -- the receiving relay ---------------------------------------------------------------------

    async def serve(self, relay_id: str, r_stream: Stream, frame: Frame, leftover: bytes) -> None:
        """A peer stream whose first frame is PEER_RESUME: the peer half of a parked half."""
        try:
            message = expect_message(frame, FrameType.PEER_RESUME, PeerResume)
            tenant = parse_identity(message.agent_uri).authority
        except (OrpError, InvalidIdentity):
            r_stream.abort(StreamEndCode.REFUSED)
            return
        resume, remote_uri = message.resume, message.agent_uri
        sid = resume.stream_id
        half = self._matcher.pending(sid)
        record = HalfRecord(sid, relay_id, remote_uri, resume.outrelay_peer_uri, 0)
        owners = self._state.owners(sid)
        if (
            half is None
            or half.handle.session.tenant != tenant
            or not _fits(half, record)
            or (owners is not None and remote_uri not in owners)  # only the stream's agents
        ):
            log.info(
                "forwarded resume half refused: no fitting half here",
                extra=kv(stream_id=sid, uri=remote_uri, relay=relay_id),
            )
            r_stream.abort(StreamEndCode.REFUSED)
            return
        self._matcher.withdraw(half)
        handle = half.handle
        handle.done.set_result(True)  # matched: this handler owns its stream now
        self._state.migrated.discard(sid)
        try:
            if half.kind is HalfKind.RESUME:
                await handle.stream.send_all(
                    _echo(sid, resume.my_position, resume.peer_ack_position)
                )
            if not message.migrate:
                await r_stream.send_all(_echo(sid, half.my_position, half.peer_ack_position))
        except TransportError as exc:
            log.info("resume echo failed", extra=kv(stream_id=sid, err=str(exc)))
            handle.stream.abort(StreamEndCode.LINK)
            r_stream.abort(StreamEndCode.LINK)
            return
        self.served += 1
        log.info(
            "stream resumed across relays",
            extra=kv(stream_id=sid, a=remote_uri, b=half.agent_uri, relay=relay_id),
        )
        await self._carry(
            sid, handle, handle.stream, remote_uri, relay_id, r_stream, handle.leftover, leftover
        )
