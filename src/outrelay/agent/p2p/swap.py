"""Moving a resumable stream onto a direct connection, and keeping it acknowledged there.

Spec 03 §7.7 and its [REC]. Two swaps:

* :func:`swap_symmetric`, between two of our agents: both send STREAM_RESUME
  on the direct stream and both retransmit what the other lacks -- nothing is
  lost or duplicated in either direction;
* :func:`swap_reference`, against a reference responder: the initiator sends
  STREAM_RESUME and reads no echo (the reference's wire), but only after the
  peer has acknowledged every byte we sent.

Once the relay's splice has ended the relay forgets the pair and drops our
STREAM_CHECKPOINTs, so after a symmetric swap each side sends its checkpoints on
a stream of its own on the direct connection (:func:`send_checkpoints`,
:func:`accept_checkpoints`); rings keep draining and writers never wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from outrelay.agent.resumable import ResumableStream, ResumeFailed, exchange_resume, resume_frame
from outrelay.agent.resume_supervisor import CHECKPOINT_PERIOD
from outrelay.observe import kv
from outrelay.orp import Frame, FrameType, OrpError, StreamCheckpoint, encode_message
from outrelay.resume import ResumeError
from outrelay.transport import Connection, Stream, TransportError
from outrelay.wire import FrameReader, expect_message

__all__ = [
    "ACK_WAIT",
    "SWAP_TIMEOUT",
    "accept_checkpoints",
    "apply_checkpoints",
    "close_quietly",
    "send_checkpoints",
    "swap_reference",
    "swap_symmetric",
]

log = logging.getLogger("outrelay.agent.p2p")

SWAP_TIMEOUT = 5.0
"""Ours: the STREAM_RESUME exchange on the direct stream."""
ACK_WAIT = 2.0
"""Against a reference responder: how long we wait for the peer to acknowledge
every byte we sent before swapping (its reference swap would lose them)."""


async def swap_symmetric(stream: ResumableStream, conn: Connection) -> bool:
    """Both ends are ours ([REC] spec 03 §7.7): exchange STREAM_RESUME, retransmit, swap.

    Detach the relay stream, send our positions on a new direct stream, read
    the peer's, install the direct stream, retransmit what the peer lacks and
    only then FIN the relay stream. On failure the stream resumes through the
    relay. Returns True if the stream now runs on ``conn``.
    """
    sid = stream.stream_id
    old = stream.detach()
    if old is None:
        return False
    try:
        async with asyncio.timeout(SWAP_TIMEOUT):
            direct, leftover, gap = await exchange_resume(conn, stream)
    except (TimeoutError, TransportError, OrpError, ResumeError, ResumeFailed) as exc:
        log.warning(
            "p2p: migration failed; back to the relay",
            extra=kv(id=sid, err=str(exc) or repr(exc)),
        )
        stream.fail_migration(old, str(exc) or repr(exc))
        return False
    stream.install(direct, leftover)
    stream.path = "direct"
    await stream.retransmit(direct, gap)
    await close_quietly(old)  # FIN the old relay stream after the swap ([REC] §7.7)
    return True


async def swap_reference(stream: ResumableStream, conn: Connection) -> Stream | None:
    """Spec 03 §7.7 initiator, as the reference does it: STREAM_RESUME, no echo, swap.

    The reference responder takes no retransmit from us, so first we stop
    writing (detach) and wait until the peer has acknowledged every byte
    we sent; then nothing of ours is lost. The peer retransmits what we
    lack from our ``peer_ack_position``. If the acknowledgement does not
    come, the stream resumes through the relay (a stall, no loss).

    Returns:
        The old relay stream, still open (the caller FINs it later), or
        None if the stream stayed on the relay.
    """
    sid = stream.stream_id
    old = stream.detach()
    if old is None:
        return None
    try:
        async with asyncio.timeout(ACK_WAIT):
            await stream.wait_all_acknowledged()
        async with asyncio.timeout(SWAP_TIMEOUT):
            direct = await conn.open_stream()
            await direct.send_all(resume_frame(stream))
    except (TimeoutError, TransportError) as exc:
        reason = str(exc) or "the peer did not acknowledge our bytes in time"
        log.warning("p2p: migration failed; back to the relay", extra=kv(id=sid, err=reason))
        stream.fail_migration(old, reason)
        return None
    stream.install(direct, b"")
    stream.path = "direct"
    await stream.retransmit(direct, b"")
    return old  # the caller FINs it once the peer has surely swapped


async def send_checkpoints(conn: Connection, stream: ResumableStream) -> None:
    """STREAM_CHECKPOINT for ``stream`` on its own direct stream, every 100 ms (spec 03 §4.3).

    Ends when the connection does, or when the stream has left the direct path.
    """
    try:
        out = await conn.open_stream()
        last: tuple[int, int] | None = None
        while stream.path == "direct" and not conn.is_closed and not stream.is_lost:
            now = (stream.positions.sent, stream.positions.received)
            if now != last:
                last = now
                await out.send_all(
                    encode_message(
                        FrameType.STREAM_CHECKPOINT,
                        StreamCheckpoint(
                            stream_id=stream.stream_id, my_position=now[0], peer_ack_position=now[1]
                        ),
                    )
                )
            await asyncio.sleep(CHECKPOINT_PERIOD)
        out.abort()
    except TransportError as exc:
        log.debug("p2p: direct checkpoints ended", extra=kv(err=str(exc) or repr(exc)))


async def apply_checkpoints(
    reader: FrameReader,
    lookup: Callable[[int], ResumableStream | None],
    first: Frame | None = None,
) -> None:
    """Apply the STREAM_CHECKPOINTs of one direct stream until it ends.

    ``lookup`` names the stream a checkpoint may move (None: ignore it), so
    a peer only ever acknowledges its own streams. ``first`` is a frame
    already read from ``reader``.

    Raises:
        OrpError: a frame that is not a well-formed STREAM_CHECKPOINT.
    """
    frame = first
    while True:
        if frame is None:
            try:
                frame = await reader.read_frame()
            except TransportError:
                return  # the direct path ended; demotion is the stream's business
            if frame is None:
                return
        checkpoint = expect_message(frame, FrameType.STREAM_CHECKPOINT, StreamCheckpoint)
        frame = None
        target = lookup(checkpoint.stream_id)
        if target is not None:
            target.apply_checkpoint(checkpoint.my_position, checkpoint.peer_ack_position)


async def accept_checkpoints(conn: Connection, stream: ResumableStream) -> None:
    """Initiator: the responder's checkpoint stream on the connection we dialled."""

    def lookup(sid: int) -> ResumableStream | None:
        return stream if sid == stream.stream_id else None

    try:
        while True:
            await apply_checkpoints(FrameReader(await conn.accept_stream()), lookup)
    except (TransportError, OrpError) as exc:
        log.debug("p2p: direct checkpoints ended", extra=kv(err=str(exc) or repr(exc)))


async def close_quietly(stream: Stream) -> None:
    with contextlib.suppress(TransportError):
        await stream.aclose()
