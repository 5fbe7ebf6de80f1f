"""The resume flow: STREAM_RESUME and MIGRATE_TO_RELAY halves (spec 02 §7.4, [REC] §15).

A data stream whose first frame is STREAM_RESUME or MIGRATE_TO_RELAY is a *half*. The pure
:class:`~.resume_matcher.ResumeMatcher` pairs two halves of the same stream id; this shell
parks a half until its peer comes (bounded by the matcher's window and by
``MAX_PARKED_HALVES_PER_AGENT``), echoes to each STREAM_RESUME half the *peer's* positions,
and splices the two streams once.

Ownership and instances (ours; the reference pairs any two halves with the same id):

* only the stream's own two agents may resume it (:meth:`RelayState.owners`): an intruder's
  half is aborted and counted, the owners' streams are untouched;
* halves of two tenants are never paired;
* a half that names its expected peer (``outrelay_peer_uri``) is paired only with that peer;
* a half of an agent that came back on a new connection replaces its older half;
* when the peer's process is gone for good (restarted as another instance, or said goodbye)
  the half is ended at once with ``AGENT_GONE`` instead of waiting out the window
  (:meth:`ResumeFlow.end_orphans`).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass

from outrelay.observe import kv
from outrelay.orp import (
    Frame,
    FrameType,
    MigrateToRelay,
    OrpError,
    StreamEndCode,
    StreamResume,
    encode_message,
    is_final,
)
from outrelay.relay.limits import MAX_PARKED_HALVES_PER_AGENT
from outrelay.relay.mesh import HalfRecord
from outrelay.relay.pairs import Member
from outrelay.relay.remote_resume import RemoteResume
from outrelay.relay.resume_matcher import Half, HalfKind, ResumeMatcher
from outrelay.relay.splicing import splice_pair
from outrelay.relay.state import AgentSession, RelayState, log, now_ms
from outrelay.transport import BrokenResourceError, Stream, TransportError
from outrelay.wire import expect_message

__all__ = ["HalfHandle", "ResumeFlow"]


@dataclass(eq=False)
class HalfHandle:
    """What a parked resume half needs: its stream, surplus bytes, a done flag."""

    session: AgentSession
    stream: Stream
    leftover: bytes
    done: asyncio.Future[bool]
    """True: matched (the other handler splices); False: replaced by a newer half."""
    end_code: int = 0
    """The code the half's stream is reset with when ``done`` is False: ``AGENT_GONE``
    when its peer's process is gone for good, else 0."""
    forward_to: HalfRecord | None = None
    """Set with ``done`` True: the peer half is parked on that relay, and this half's
    handler forwards it there (:mod:`.remote_resume`)."""


def _resume_echo(stream_id: int, peer: Half[HalfHandle]) -> bytes:
    """STREAM_RESUME carrying the *peer* half's positions (spec 02 §7.4)."""
    return encode_message(
        FrameType.STREAM_RESUME,
        StreamResume(
            stream_id=stream_id,
            my_position=peer.my_position,
            peer_ack_position=peer.peer_ack_position,
        ),
    )


def _parse_half(frame: Frame) -> tuple[HalfKind, StreamResume | MigrateToRelay]:
    """The half's kind and message.

    Raises:
        OrpError: The payload does not decode.
    """
    if frame.type == FrameType.STREAM_RESUME:
        return HalfKind.RESUME, expect_message(frame, FrameType.STREAM_RESUME, StreamResume)
    return HalfKind.MIGRATE, expect_message(frame, FrameType.MIGRATE_TO_RELAY, MigrateToRelay)


class ResumeFlow:
    """Parks, matches and splices resume halves (module docstring)."""

    def __init__(self, state: RelayState) -> None:
        self._state = state
        self._matcher: ResumeMatcher[HalfHandle] = ResumeMatcher()
        self._parked: Counter[str] = Counter()
        """Parked resume halves per agent URI (bounded by MAX_PARKED_HALVES_PER_AGENT)."""
        self.remote: RemoteResume | None = None
        """Halves meeting their peer on another relay (with a mesh, :mod:`.remote_resume`)."""

    def attach_mesh(self) -> RemoteResume:
        """The relay joined a mesh (``state.mesh`` and ``state.peers`` are set): park
        halves there too (:mod:`.remote_resume`)."""
        self.remote = RemoteResume(self._state, self._matcher)
        return self.remote

    @property
    def parked(self) -> int:
        """Halves parked now, over every agent."""
        return self._parked.total()

    def end_orphans(self, gone: Member) -> None:
        """End every parked resume half whose peer is ``gone`` (reset ``AGENT_GONE``)."""
        now = now_ms()
        for half in self._matcher.halves():
            if self._state.ended.peer_of(half.stream_id, half.agent_uri, now) != gone:
                continue
            if self._matcher.withdraw(half):
                log.info(
                    "resume half ended: its peer agent is gone",
                    extra=kv(stream_id=half.stream_id, uri=half.agent_uri, peer=gone.uri),
                )
                half.handle.end_code = StreamEndCode.AGENT_GONE
                half.handle.done.set_result(False)

    def _admissible(self, session: AgentSession, stream: Stream, frame: Frame, sid: int) -> bool:
        """The checks before a half may park; a refused half's stream is aborted."""
        state = self._state
        owners = state.owners(sid)
        if owners is not None and session.uri not in owners:
            # Ours: only the stream's own two agents may resume it (spec 02 §7.4
            # pairs any two halves); the owners' streams are left untouched.
            state.not_owner(session, FrameType(frame.type), sid)
            stream.abort(StreamEndCode.REFUSED)
            return False
        if self._parked[session.uri] >= MAX_PARKED_HALVES_PER_AGENT:
            log.warning(
                "resume half refused: too many parked halves",
                extra=kv(stream_id=sid, uri=session.uri, limit=MAX_PARKED_HALVES_PER_AGENT),
            )
            stream.abort(StreamEndCode.REFUSED)
            return False
        peer_end = state.ended.peer_of(sid, session.uri, now_ms())
        if peer_end is not None and state.instances.is_gone(peer_end):
            # Ours: the peer's process is gone; no half of it will ever come.
            log.info(
                "resume half ended: its peer agent is gone",
                extra=kv(stream_id=sid, uri=session.uri, peer=peer_end.uri),
            )
            stream.abort(StreamEndCode.AGENT_GONE)
            return False
        return True

    async def run(
        self, session: AgentSession, stream: Stream, frame: Frame, leftover: bytes
    ) -> None:
        """Spec 02 §7.4 with the [REC]: echo to each STREAM_RESUME half, one splice."""
        try:
            kind, msg = _parse_half(frame)
        except OrpError:
            await stream.aclose()
            return
        sid = msg.stream_id
        if not self._admissible(session, stream, frame, sid):
            return
        if kind is HalfKind.MIGRATE:
            log.info(
                "migrate-to-relay arrived",
                extra=kv(stream_id=sid, reason=getattr(msg, "reason", ""), uri=session.uri),
            )
        handle = HalfHandle(session, stream, leftover, asyncio.get_running_loop().create_future())
        half: Half[HalfHandle] = Half(
            sid,
            kind,
            msg.my_position,
            msg.peer_ack_position,
            session.uri,
            handle,
            expected_peer=getattr(msg, "outrelay_peer_uri", ""),
        )
        if not await self._settle_stale(session, stream, frame, half):
            return
        peer = self._matcher.submit(half, now_ms())
        if peer is None:
            await self._park(session, half)
            return
        await self._splice_matched(half, peer)

    async def _settle_stale(
        self, session: AgentSession, stream: Stream, frame: Frame, half: Half[HalfHandle]
    ) -> bool:
        """Deal with a half already parked under the same id; False: ``half`` is refused."""
        sid = half.stream_id
        stale = self._matcher.pending(sid)
        if stale is None:
            return True
        if stale.handle.session.tenant != session.tenant:
            # Ours: the reference pairs any two halves with the same id; we never
            # splice two tenants' streams together.
            log.warning(
                "resume half refused: stream id pending for another tenant",
                extra=kv(stream_id=sid, uri=session.uri),
            )
            await stream.aclose()
            return False
        if stale.handle.session.conn.is_closed or (
            stale.agent_uri == session.uri and stale.handle.session is not session
        ):
            # Its agent lost that connection and came back: the new half replaces
            # it. Pairing an agent's half with its own older one would echo the
            # agent its own positions.
            self._matcher.withdraw(stale)
            stale.handle.done.set_result(False)
        elif not stale.fits(half):
            # Ours: the halves name other peers, so one of them is not the stream's.
            if stale.expected_peer and stale.expected_peer != session.uri:
                self._state.not_owner(session, FrameType(frame.type), sid)  # the parked one stays
                stream.abort(StreamEndCode.REFUSED)
                return False
            # The parked half named nobody, or named us while we name someone
            # else: it is the intruder (or a reference agent's); ours replaces it.
            self._state.not_owner(stale.handle.session, FrameType(frame.type), sid)
            self._matcher.withdraw(stale)
            stale.handle.end_code = StreamEndCode.REFUSED
            stale.handle.done.set_result(False)
        return True

    async def _park(self, session: AgentSession, half: Half[HalfHandle]) -> None:
        """Wait for the peer half; the matching handler then owns both streams."""
        sid, handle, stream = half.stream_id, half.handle, half.handle.stream
        log.debug("resume half parked", extra=kv(stream_id=sid, uri=session.uri))
        self._parked[session.uri] += 1
        if self.remote is not None:
            self.remote.published(half)
        try:
            async with asyncio.timeout(self._matcher.window_ms / 1000):
                await asyncio.shield(handle.done)
        except TimeoutError:
            if self._matcher.withdraw(half):
                log.info("resume half expired unmatched", extra=kv(stream_id=sid))
                await stream.aclose()
            return
        except asyncio.CancelledError:
            if self._matcher.withdraw(half):
                stream.abort()
            raise
        finally:
            self._parked[session.uri] -= 1
            if not self._parked[session.uri]:
                del self._parked[session.uri]
            if self.remote is not None:
                self.remote.withdrawn(sid)
        if handle.done.result() is False:
            stream.abort(handle.end_code)
        elif handle.forward_to is not None and self.remote is not None:
            await self.remote.forward(half)

    async def _splice_matched(self, half: Half[HalfHandle], peer: Half[HalfHandle]) -> None:
        sid = half.stream_id
        peer.handle.done.set_result(True)
        if half.kind is HalfKind.MIGRATE or peer.kind is HalfKind.MIGRATE:
            self._state.migrated.discard(sid)
        mine, theirs = half.handle, peer.handle
        try:
            if half.kind is HalfKind.RESUME:
                await mine.stream.send_all(_resume_echo(sid, peer))
            if peer.kind is HalfKind.RESUME:
                await theirs.stream.send_all(_resume_echo(sid, half))
        except TransportError as exc:
            # A half whose agent ended the stream meanwhile passes its final code on;
            # anything else is one more link failure, and both agents try again.
            raw = exc.code if isinstance(exc, BrokenResourceError) else None
            code = raw if raw is not None and is_final(raw) else StreamEndCode.LINK
            log.info("resume echo failed", extra=kv(stream_id=sid, err=str(exc), code=code))
            mine.stream.abort(code)
            theirs.stream.abort(code)
            return
        log.info("stream resumed", extra=kv(stream_id=sid, a=peer.agent_uri, b=half.agent_uri))
        # Ours: keep checkpoints flowing for the resumed stream (the reference
        # stops forwarding them after a resume, spec 02 §5).
        pairs = self._state.pairs
        recorded = sid != 0 and pairs.record(sid, peer.agent_uri, half.agent_uri)
        try:
            await splice_pair(
                self._state.ended,
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
                pairs.forget(sid, peer.agent_uri, half.agent_uri, now_ms())
