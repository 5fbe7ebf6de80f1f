"""Resuming broken relay streams (spec 03 §4.4-§4.6).

A :class:`~outrelay.agent.resumable.ResumableStream` whose relay (or direct)
path broke reports itself through :meth:`ResumeSupervisor.on_broken`. Once a
relay connection is up, the supervisor starts one resume task per broken
stream, concurrently ([REC] spec 03 §4.6): STREAM_RESUME on a fresh relay
stream, the echo's positions, the retransmission, the swap. A stream that
cannot be resumed within its window (plus :data:`RESUME_SLACK`) is abandoned;
one whose new connection died too waits for the next connection.

What makes a resume cheap runs here too: :func:`emit_checkpoints` tells the
peer, every 100 ms, how far we have read each stream, so it can drop those
bytes from its ring (spec 03 §4.3).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Final

from outrelay.agent.dial import Link
from outrelay.agent.resumable import ResumableStream, ResumeFailed, exchange_resume
from outrelay.agent.stats import StreamStats
from outrelay.observe import kv, ms
from outrelay.orp import CAP_CLOSE_ACK, FrameType, OrpError, StreamCheckpoint, is_final
from outrelay.resume import ResumeError
from outrelay.transport import BrokenResourceError, TransportError

__all__ = ["CHECKPOINT_PERIOD", "RESUME_SLACK", "ResumeSupervisor", "emit_checkpoints"]

log = logging.getLogger("outrelay.agent.session")

RESUME_SLACK: Final = 5.0
"""A resume gets the stream's window plus this (35 s in all, spec 03 §4.6 [REC])."""
CHECKPOINT_PERIOD: Final = 0.1  # spec 01 / spec 03 §4.3
RESUME_RETRY_DELAY: Final = 0.5
"""Pause before another resume attempt after a link-type failure of the exchange."""


class ResumeSupervisor:
    """Owns the resume tasks of one session; :meth:`run` until cancelled.

    Args:
        current_link: the live relay connection, or None while reconnecting.
    """

    def __init__(
        self, current_link: Callable[[], Link | None], stats: StreamStats | None = None
    ) -> None:
        self._current_link = current_link
        self._stats = stats
        """Where resume stalls and demotions are counted (``/metrics``)."""
        self._to_resume: set[ResumableStream] = set()
        self._wakeup = asyncio.Event()

    @property
    def pending(self) -> int:
        """Broken streams waiting to be resumed."""
        return len(self._to_resume)

    def on_broken(self, stream: ResumableStream) -> None:
        """``stream`` lost its path: resume it as soon as a relay connection is up."""
        self._to_resume.add(stream)
        self._wakeup.set()

    def forget(self, stream: ResumableStream) -> None:
        """The bridge is done with ``stream``: never resume it."""
        self._to_resume.discard(stream)

    def wake(self) -> None:
        """A relay connection came up: start what waits."""
        self._wakeup.set()

    async def run(self) -> None:
        """Start one resume task per broken stream, concurrently ([REC] spec 03 §4.6)."""
        running: dict[ResumableStream, asyncio.Task[None]] = {}
        async with asyncio.TaskGroup() as tg:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                link = self._current_link()
                if link is None or link.conn.is_closed:
                    continue
                for stream in list(self._to_resume):
                    if stream in running or stream.is_lost:
                        if stream.is_lost:
                            self._to_resume.discard(stream)
                        continue
                    running[stream] = tg.create_task(self._resume_task(link, stream, running))

    async def _resume_task(
        self,
        link: Link,
        stream: ResumableStream,
        running: dict[ResumableStream, asyncio.Task[None]],
    ) -> None:
        try:
            await self._resume_one(link, stream)
        finally:
            running.pop(stream, None)
            self._wakeup.set()  # the stream may need another try on a new link

    async def _resume_one(self, link: Link, stream: ResumableStream) -> None:
        """STREAM_RESUME on a fresh stream, retransmit, swap (spec 03 §4.4)."""
        sid = stream.stream_id
        broken_at = stream.broken_since or time.monotonic()
        remaining = broken_at + stream.window + RESUME_SLACK - time.monotonic()
        try:
            async with asyncio.timeout(max(remaining, 0.1)):
                new, leftover, gap = await exchange_resume(link.conn, stream)
        except TransportError as exc:
            if link.conn.is_closed:
                return  # the new connection died too; the next one retries
            code = exc.code if isinstance(exc, BrokenResourceError) else None
            if is_final(code):
                self._failed(stream, f"resume stream failed: {exc}", code)
                return
            # One more link failure (the peer's link died during the exchange):
            # try again, until the stream's window runs out.
            log.info("session: resume attempt failed; retrying", extra=kv(id=sid, err=str(exc)))
            await asyncio.sleep(RESUME_RETRY_DELAY)
            return
        except (TimeoutError, ResumeFailed, OrpError, ResumeError) as exc:
            reason = str(exc) or "no STREAM_RESUME echo within the resume window"
            self._failed(stream, reason)
            return
        self._to_resume.discard(stream)
        stream.close_ack = CAP_CLOSE_ACK in link.accepted  # the relay may have changed
        stream.install(new, leftover)
        demoted = stream.path != "relay"
        if self._stats is not None:
            self._stats.resumed(time.monotonic() - broken_at, demoted=demoted)
        if demoted:
            stream.path = "relay"
            log.info(
                "p2p: demoted to relay",
                extra=kv(
                    id=sid,
                    path=link.address,
                    rtt_ms=ms(link.conn.rtt),
                    reason=stream.broken_reason,
                ),
            )
        await stream.retransmit(new, gap)
        log.info(
            "session: stream resumed",
            extra=kv(
                id=sid,
                retransmitted=len(gap),
                stall_ms=int((time.monotonic() - broken_at) * 1000),
                relay=link.address,
            ),
        )

    def _failed(self, stream: ResumableStream, reason: str, code: int | None = None) -> None:
        self._to_resume.discard(stream)
        log.warning(
            "session: resume stream failed; dropping", extra=kv(id=stream.stream_id, err=reason)
        )
        stream.abandon(reason, code)


async def emit_checkpoints(
    streams: Mapping[int, ResumableStream], current_link: Callable[[], Link | None]
) -> None:
    """STREAM_CHECKPOINT every 100 ms for streams whose read position moved."""
    while True:
        await asyncio.sleep(CHECKPOINT_PERIOD)
        link = current_link()
        if link is None:
            continue
        for sid, stream in list(streams.items()):
            received = stream.positions.received
            if stream.is_broken or stream.reported == received:
                continue
            try:
                await link.ctrl.send(
                    FrameType.STREAM_CHECKPOINT,
                    StreamCheckpoint(
                        stream_id=sid,
                        my_position=stream.positions.sent,
                        peer_ack_position=received,
                    ),
                )
            except TransportError:
                break  # the link is going away; stop this tick
            stream.note_reported(received)
