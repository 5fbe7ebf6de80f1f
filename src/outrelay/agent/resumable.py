"""ResumableStream: a relay stream that survives the relay (spec 03 §4).

Theory of operation
-------------------
Every byte written goes into a :class:`~outrelay.resume.RingBuffer` *before*
it is handed to the transport, and counts toward ``sent`` (my_position).
Every byte handed to the reader counts toward ``received`` (the
peer_ack_position we report). The peer's STREAM_CHECKPOINTs tell us how much
it has consumed; those bytes leave the ring.

When the inner relay stream breaks (the connection died, or the relay reset
the stream because the peer's connection died), the stream goes *broken*:
the old inner stream is aborted so no byte can be read from it any more,
the session is told (``on_broken``), and readers and writers park. The
session opens a fresh relay stream, exchanges STREAM_RESUME with the peer
through the relay, retransmits ``(peer's ack, sent]`` from the ring and
calls :meth:`install`; parked calls continue on the new stream. If nothing
is installed within the resume window -- measured from the moment the break
was seen, the [REC] of spec 03 §4.2 -- the stream is *lost*: every call
raises :class:`StreamLost`, and the bridge resets the application's socket.

Memory: the ring grows only as far as the peer has not acknowledged. Once
the peer has sent checkpoints for this stream, a writer waits (up to
``ACK_WAIT``) instead of evicting unacknowledged bytes, so a resume never
meets a gap; a peer that never checkpoints (the reference agent) gets the
reference's behaviour: the oldest bytes are evicted past ``RING_MAX``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from outrelay.orp import FrameType, StreamResume, encode_message, end_code_name, is_final
from outrelay.resume import RING_MAX, RingBuffer, StreamPositions, retransmit_range
from outrelay.transport import (
    BrokenResourceError,
    BusyResourceError,
    ClosedResourceError,
    Connection,
    Stream,
    TransportError,
)
from outrelay.wire import FrameReader, expect_message

__all__ = [
    "RESUME_WINDOW",
    "ResumableStream",
    "ResumeFailed",
    "StreamLost",
    "exchange_resume",
    "resume_frame",
]

log = logging.getLogger("outrelay.agent.resume")

RESUME_WINDOW = 30.0  # spec 03 §4.2 / §10, measured from the break ([REC])
WRITE_CHUNK = 256 * 1024
RING_START = 4 * 1024
"""Rings start (and shrink back to) 4 KiB: an idle stream costs ~21 KB of agent
memory instead of ~82 KB (bench: 1,000 open streams, ``ring4k``); they grow by
doubling as unacknowledged bytes pile up."""
ACK_WAIT = 5.0
"""How long a writer waits for the peer to acknowledge before evicting."""


ABORTED = "aborted"
"""``lost_reason`` of a stream that we aborted ourselves."""


class ResumeFailed(Exception):
    """The other side did not complete a STREAM_RESUME exchange."""


def resume_frame(stream: ResumableStream) -> bytes:
    """``STREAM_RESUME{id, my_position=sent, peer_ack_position=received}`` (spec 03 §4.4)."""
    return encode_message(
        FrameType.STREAM_RESUME,
        StreamResume(
            stream_id=stream.stream_id,
            my_position=stream.positions.sent,
            peer_ack_position=stream.positions.received,
            outrelay_peer_uri=stream.peer_uri,
        ),
    )


async def exchange_resume(conn: Connection, stream: ResumableStream) -> tuple[Stream, bytes, bytes]:
    """STREAM_RESUME on a fresh stream of ``conn`` and the peer's echo (spec 03 §4.4).

    Used for a resume through the relay and for a migration onto a direct
    connection alike. The echo's positions are applied as a checkpoint.
    The caller bounds the exchange with its own timeout.

    Returns:
        (the new stream, peer bytes read after the echo, our gap to retransmit).

    Raises:
        ResumeFailed: the stream ended without an echo, or the echo's id differs.
        TransportError, OrpError, ResumeError: as they come (``BeforeRingError``:
            the peer needs bytes the ring no longer has).
        On any failure the new stream is aborted.
    """
    new = await conn.open_stream()
    try:
        await new.send_all(resume_frame(stream))
        reader = FrameReader(new)
        frame = await reader.read_frame()
        if frame is None:
            raise ResumeFailed("the resume stream ended without a STREAM_RESUME echo")
        echo = expect_message(frame, FrameType.STREAM_RESUME, StreamResume)
        if echo.stream_id != stream.stream_id:
            raise ResumeFailed("peer STREAM_RESUME stream_id mismatch")
        stream.apply_checkpoint(echo.my_position, echo.peer_ack_position)
        gap = retransmit_range(echo.peer_ack_position, stream.ring)
    except BaseException:
        new.abort()
        raise
    return new, reader.take_leftover(), gap


class StreamLost(BrokenResourceError):
    """The stream is over for good: it could not be resumed, or the peer ended it.

    ``code`` is the final end code (``orp.StreamEndCode``) when the peer's
    application or agent ended the stream, ``None`` when a resume failed.
    """


def _code_of(exc: BaseException) -> int | None:
    return exc.code if isinstance(exc, BrokenResourceError) else None


class ResumableStream(Stream):
    """A :class:`Stream` whose inner relay stream can be swapped after a break."""

    def __init__(
        self,
        stream_id: int,
        inner: Stream,
        *,
        on_broken: Callable[[ResumableStream], None],
        prefix: bytes = b"",
        sent: bytes = b"",
        window: float = RESUME_WINDOW,
        ring_max: int = RING_MAX,
    ) -> None:
        """``prefix``: bytes already read from ``inner`` (after its first frame), handed to
        the reader first. ``sent``: bytes already written to ``inner`` before this wrapper
        existed (a consumer's pipelined bytes, ``orp.CAP_PIPELINE``); they count as sent and
        stay in the ring until acknowledged, so a resume retransmits them."""
        self.stream_id = stream_id
        self.positions = StreamPositions()
        self.ring = RingBuffer(max_size=ring_max, min_size=RING_START)
        if sent:
            self.ring.write(sent)
            self.positions.on_sent(len(sent))
        self.peer_sent = 0
        """The peer's my_position from its last checkpoint (0 if none)."""
        self.checkpointed = False
        """True once the peer has acknowledged anything for this stream."""
        self.close_ack = False
        """The relay forwards checkpoints after the splice ended (``orp.CAP_CLOSE_ACK``):
        :meth:`aclose` then waits for the peer's last acknowledgement, and reports our own."""
        self.reported = -1
        """The ``received`` position our last STREAM_CHECKPOINT told the peer (-1: none yet)."""
        self.resumes = 0
        self.peer_uri = ""
        """The other agent's URI when known (``orp.CAP_RESUME_PEER``): named in STREAM_RESUME."""
        self.path = "relay"
        """``relay``, or ``direct`` after a P2P migration (for logs)."""
        self._inner: Stream | None = inner
        self._prefix = prefix
        self._on_broken = on_broken
        self._window = window
        self._changed = asyncio.Event()
        self._broken_at: float | None = None
        self._broken_reason = ""
        self._lost: str | None = None
        self._lost_code: int | None = None
        self._closed = False
        self._eof_received = False
        self._eof_requested = False
        self._reading = False
        self._writing = False
        self._flushing = False

    # -- state ------------------------------------------------------------------------

    @property
    def window(self) -> float:
        """How long this stream waits to be resumed after a break."""
        return self._window

    @property
    def is_broken(self) -> bool:
        return self._broken_at is not None

    @property
    def is_lost(self) -> bool:
        return self._lost is not None

    @property
    def is_finished(self) -> bool:
        """Both directions are done: nothing would be gained by resuming."""
        return self._closed or (self._eof_received and self._eof_requested)

    @property
    def broken_since(self) -> float | None:
        return self._broken_at

    @property
    def broken_reason(self) -> str:
        """Why the stream last broke ("" if never)."""
        return self._broken_reason

    @property
    def eof_requested(self) -> bool:
        return self._eof_requested

    @property
    def unsent_bytes(self) -> int:
        return self._inner.unsent_bytes if self._inner is not None else 0

    @property
    def end_code(self) -> int | None:
        """The final code the *peer* ended the stream with (``orp.StreamEndCode``), if any."""
        return self._lost_code

    @property
    def lost_reason(self) -> str | None:
        """Why the stream is over (:data:`ABORTED` if we aborted it), None while usable."""
        return self._lost

    def _raise_if_lost(self) -> None:
        if self._lost is not None:
            raise StreamLost(self._lost, code=self._lost_code)
        if self._closed:
            raise ClosedResourceError("stream closed")

    def mark_broken(self, reason: str) -> None:
        """The inner stream failed: stop using it and ask the session to resume."""
        if self._lost is not None or self._closed or self._broken_at is not None:
            return
        self._broken_at = time.monotonic()
        self._broken_reason = reason
        inner, self._inner = self._inner, None
        if inner is not None:
            inner.abort()
        self._prefix = b""
        self._flushing = False
        self._changed.set()
        self._on_broken(self)

    def detach(self) -> Stream | None:
        """Stop using the inner stream *without* breaking it: a P2P migration starts.

        Calls park as during a resume, and ``positions`` stay still, so they
        can be sent in STREAM_RESUME. Bytes read from the old stream after
        this are dropped; the peer retransmits them from its ring. The old
        stream is returned, still open: close it once the new one is
        installed, or hand it to :meth:`fail_migration`.

        Returns:
            The old inner stream, or None if the stream is not live (nothing
            to migrate).
        """
        if self._lost is not None or self._closed or self._broken_at is not None:
            return None
        if self._flushing:
            return None
        inner, self._inner = self._inner, None
        if inner is None:
            return None
        self._broken_at = time.monotonic()
        self._broken_reason = "migrating"
        self._prefix = b""
        self._changed.set()
        return inner

    def fail_migration(self, old: Stream | None, reason: str) -> None:
        """A migration after :meth:`detach` failed: resume through the relay instead."""
        if old is not None:
            old.abort()
        if self._lost is not None or self._closed or self._inner is not None:
            return
        self._broken_reason = f"migration failed: {reason}"
        self._broken_at = time.monotonic()  # the resume window starts now
        self._changed.set()
        self._on_broken(self)

    def install(self, inner: Stream, prefix: bytes) -> None:
        """Swap in a resumed inner stream; ``prefix`` is peer data already read.

        Reading resumes at once. Writing waits until :meth:`retransmit` has
        sent the peer's gap, so new bytes always follow the old ones.
        """
        if self._lost is not None or self._closed:
            inner.abort()
            return
        self._inner = inner
        self._prefix = prefix
        self._broken_at = None
        self._flushing = True
        self.resumes += 1
        self._changed.set()

    async def retransmit(self, inner: Stream, gap: bytes) -> None:
        """Send ``gap`` (and a FIN already asked for) on the newly installed stream.

        Runs after :meth:`install` so that both peers read while they
        retransmit: two large gaps written before either side reads would
        deadlock on flow control.
        """
        try:
            if gap:
                await inner.send_all(gap)
            if self._eof_requested:
                await inner.send_eof()
        except TransportError as exc:
            self._inner_failed(inner, exc, "retransmit")
        finally:
            if inner is self._inner or self._inner is None:
                self._flushing = False
                self._changed.set()

    def abandon(self, reason: str, code: int | None = None) -> None:
        """Give up: parked and future calls raise :class:`StreamLost`.

        ``code`` is a final end code when the peer ended the stream; the inner
        stream, if any, is reset with it.
        """
        if self._lost is not None:
            return
        self._lost = reason
        self._lost_code = code if is_final(code) else None
        inner, self._inner = self._inner, None
        if inner is not None:
            inner.abort(code or 0)
        self._changed.set()

    def _inner_failed(self, inner: Stream, exc: TransportError, what: str) -> None:
        """``inner`` raised ``exc``: end the stream if the peer ended it, else resume."""
        if inner is not self._inner:
            return
        code = _code_of(exc)
        if is_final(code):
            self.abandon(f"ended by the peer ({end_code_name(code)})", code)
        else:
            self.mark_broken(f"{what}: {exc}")

    def apply_checkpoint(self, my_position: int, peer_ack_position: int) -> None:
        """A STREAM_CHECKPOINT from the peer (spec 03 §4.3)."""
        self.peer_sent = max(self.peer_sent, my_position)
        if peer_ack_position > self.positions.sent:
            return  # the peer acknowledges bytes we never sent: ignore it
        if self.positions.apply_peer_ack(peer_ack_position):
            self.ring.discard(peer_ack_position)
            self.checkpointed = True
            self._changed.set()

    def note_reported(self, position: int) -> None:
        """A STREAM_CHECKPOINT telling the peer ``position`` (our ``received``) went out."""
        self.reported = position
        self._changed.set()

    async def wait_all_acknowledged(self) -> None:
        """Wait until the peer has acknowledged every byte sent (its checkpoints say so).

        Bound it with ``asyncio.timeout``: a peer that sends no checkpoints never does.
        """
        while self.positions.peer_acked < self.positions.sent:
            await self._wait_change(None)

    async def wait_received(self, position: int) -> None:
        """Wait until our reader has taken the peer's bytes up to ``position``.

        Bound it with ``asyncio.timeout``.
        """
        while self.positions.received < position:
            await self._wait_change(None)

    async def _wait_change(self, deadline: float | None) -> None:
        self._changed.clear()
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._changed.wait()

    async def _current_inner(self, *, for_write: bool = False) -> Stream:
        """The live inner stream, waiting through a resume if one is running."""
        while True:
            self._raise_if_lost()
            if self._inner is not None and not (for_write and self._flushing):
                return self._inner
            if self._inner is not None:
                await self._wait_change(None)
                continue
            assert self._broken_at is not None
            deadline = self._broken_at + self._window
            if time.monotonic() >= deadline:
                self.abandon(f"not resumed within {self._window:g}s ({self._broken_reason})")
                continue
            await self._wait_change(deadline)

    # -- Stream API ---------------------------------------------------------------------

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        if self._reading:
            raise BusyResourceError("another task is reading this stream")
        self._reading = True
        try:
            while True:
                if self._eof_received:
                    return b""
                inner = await self._current_inner()
                if self._prefix:
                    data, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
                    self.positions.on_received(len(data))
                    self._changed.set()
                    return data
                try:
                    data = await inner.receive_some(max_bytes)
                except TransportError as exc:
                    self._inner_failed(inner, exc, "read")
                    continue
                if inner is not self._inner:
                    continue  # swapped while we waited: those bytes are retransmitted
                if data:
                    self.positions.on_received(len(data))
                    self._changed.set()
                    return data
                if self.peer_sent > self.positions.received:
                    # EOF although the peer said it sent more: the relay turned
                    # the peer's connection loss into a FIN (reference relay).
                    self.mark_broken("EOF before the peer's checkpointed position")
                    continue
                self._eof_received = True
                return b""
        finally:
            self._reading = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._writing:
            raise BusyResourceError("another task is writing this stream")
        if self._eof_requested:
            raise ClosedResourceError("stream already closed for sending")
        self._writing = True
        try:
            view = memoryview(data).cast("B")
            while view:
                room = self.ring.max_size - (self.positions.sent - self.positions.peer_acked)
                if room <= 0 and self.checkpointed:
                    await self._wait_for_ack()
                    continue
                # Wait through a resume *before* the bytes enter the ring: bytes
                # written during a resume would otherwise be sent twice.
                inner = await self._current_inner(for_write=True)
                # With an acknowledging peer never evict unacknowledged bytes;
                # without one (the reference agent) the ring evicts the oldest.
                chunk = view[: min(room, WRITE_CHUNK) if self.checkpointed else WRITE_CHUNK]
                view = view[len(chunk) :]
                self.ring.write(chunk)
                self.positions.on_sent(len(chunk))
                try:
                    await inner.send_all(chunk)
                except TransportError as exc:
                    # The bytes are in the ring; a resume retransmits them.
                    self._inner_failed(inner, exc, "write")
        finally:
            self._writing = False

    async def _wait_for_ack(self) -> None:
        """Wait until the peer acknowledges something, at most ``ACK_WAIT``."""
        acked = self.positions.peer_acked
        deadline = time.monotonic() + ACK_WAIT
        while self.positions.peer_acked == acked and time.monotonic() < deadline:
            self._raise_if_lost()
            await self._wait_change(deadline)
        if self.positions.peer_acked == acked:
            log.debug(
                "peer stopped acknowledging; evicting", extra={"attrs": {"id": self.stream_id}}
            )
            self.checkpointed = False

    async def send_eof(self) -> None:
        if self._eof_requested or self._closed or self._lost is not None:
            return
        self._eof_requested = True
        inner = self._inner
        if inner is not None and not self._flushing:  # else retransmit() sends it
            with contextlib.suppress(TransportError):
                await inner.send_eof()

    def abort(self, error_code: int = 0) -> None:
        if self._closed:
            return
        self._closed = True
        inner, self._inner = self._inner, None
        if inner is not None:
            inner.abort(error_code)
        if self._lost is None:
            self._lost = ABORTED
        self._changed.set()

    def _lingering(self) -> bool:
        """Must :meth:`aclose` wait: an acknowledgement to come, or ours to go out?"""
        if not self.close_ack or self._lost is not None:
            return False
        unacked = self.checkpointed and self.positions.peer_acked < self.positions.sent
        return unacked or self.reported < self.positions.received

    async def aclose(self) -> None:
        """FIN, then stay resumable until the peer has acknowledged every byte.

        Without the linger, a relay dying just after both sides finished would
        take the last bytes with it: this side would have forgotten the stream
        while the peer still waits for them. Only where the relay forwards the
        last checkpoints (:attr:`close_ack`) and with a peer that sends them
        (else nobody would ever acknowledge), bounded by the window. The stream
        also stays until our own last checkpoint went out: the peer lingers for it.
        """
        if self._closed:
            return
        await self.send_eof()
        deadline = time.monotonic() + self._window
        while self._lingering() and time.monotonic() < deadline:
            await self._wait_change(deadline)
        if self._lingering():
            log.debug(
                "close: gave up waiting for the last checkpoints",
                extra={
                    "attrs": {
                        "id": self.stream_id,
                        "sent": self.positions.sent,
                        "peer_acked": self.positions.peer_acked,
                        "received": self.positions.received,
                        "reported": self.reported,
                    }
                },
            )
        self._closed = True
        inner, self._inner = self._inner, None
        if inner is not None:
            await inner.aclose()
        self._changed.set()
