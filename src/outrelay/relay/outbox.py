"""One agent's outbound control stream: a bounded queue and one writer task.

Spec 02 §6.6 notes that the reference writes STREAM_READY, ALLOC_GRANTED and
forwarded checkpoints straight onto the receiving agent's control stream, so
an agent that stops reading its control stream blocks whoever writes to it --
including another agent's control loop forwarding a checkpoint. Here nobody
but this module's writer task ever waits on an agent's control stream:

* :meth:`ControlOutbox.post` queues a whole frame and returns at once;
* *pending* bytes are the queue's plus what the transport holds unacknowledged
  for this stream (up to its own send buffer): together, what the agent has not
  taken yet;
* frames that a later one supersedes (STREAM_CHECKPOINT) are *droppable*: they
  are dropped, and counted, once :data:`DROP_ABOVE` bytes are pending (the
  first drop is logged through ``on_drop``);
* any frame that would take the pending bytes past :data:`QUEUE_MAX` closes
  that agent's connection with a reason (``on_overflow``): it is not reading,
  and it must not cost the relay memory or anyone else time;
* a write that stalls for ``write_timeout`` does the same.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from outrelay.orp import FrameType, Message, encode_message
from outrelay.transport import Stream, TransportError

__all__ = ["DROP_ABOVE", "QUEUE_MAX", "WRITE_TIMEOUT", "ControlOutbox", "OutboxStatistics"]

QUEUE_MAX: Final = 1 << 20
"""1 MiB of queued control frames per agent. A control frame is tens of bytes
(a checkpoint ~30, STREAM_READY ~15, a candidate offer a few hundred), so this
is tens of thousands of frames: only an agent that stopped reading gets there."""
DROP_ABOVE: Final = 64 << 10
"""Beyond 64 KiB pending (some 2,000 frames behind), droppable frames (checkpoints)
are dropped: the next checkpoint of the same stream carries newer positions anyway,
and an agent that reads its control stream is never this far behind."""
WRITE_TIMEOUT: Final = 10.0
"""A control-stream write that makes no progress for 10 s closes the agent's connection."""
SEND_WAIT: Final = 1.0
"""How long :meth:`ControlOutbox.send` waits for its frame to reach the transport."""


@dataclass(frozen=True)
class OutboxStatistics:
    queued_bytes: int
    queued_frames: int
    sent_frames: int
    dropped_frames: int


class ControlOutbox:
    """A bounded frame queue in front of one agent's control stream."""

    def __init__(
        self,
        stream: Stream,
        *,
        on_overflow: Callable[[str], None],
        on_drop: Callable[[str], None] | None = None,
        max_bytes: int = QUEUE_MAX,
        drop_above: int = DROP_ABOVE,
        write_timeout: float = WRITE_TIMEOUT,
    ) -> None:
        self.stream = stream
        self._on_overflow = on_overflow
        self._on_drop = on_drop
        self._max = max_bytes
        self._drop_above = drop_above
        self._write_timeout = write_timeout
        self._queue: deque[tuple[int, bytes]] = deque()
        self._bytes = 0
        self._posted = 0
        self._written = 0
        self._dropped = 0
        self._dead: str | None = None
        self._wakeup = asyncio.Event()
        self._progress = asyncio.Event()

    # -- posting (never blocks) -----------------------------------------------------------

    def post(
        self, frame_type: FrameType, message: Message | None = None, *, droppable: bool = False
    ) -> int | None:
        """Queue one frame. Returns its sequence number, or None if dropped or dead."""
        return self.post_raw(encode_message(frame_type, message), droppable=droppable)

    def post_raw(self, data: bytes, *, droppable: bool = False) -> int | None:
        """Queue pre-encoded frame bytes (see :meth:`post`)."""
        if self._dead is not None:
            return None
        pending = self._bytes + self.stream.unsent_bytes + len(data)
        if droppable and pending > self._drop_above:
            self._dropped += 1
            if self._dropped == 1 and self._on_drop is not None:
                self._on_drop(f"{pending - len(data)} bytes pending; dropping checkpoints")
            return None
        if pending > self._max:
            self._fail(f"control stream not read: {pending - len(data)} bytes pending")
            return None
        self._posted += 1
        self._queue.append((self._posted, data))
        self._bytes += len(data)
        self._wakeup.set()
        return self._posted

    async def send(self, frame_type: FrameType, message: Message | None = None) -> bool:
        """Queue one frame and wait (at most :data:`SEND_WAIT`) until it is written.

        For frames that should precede what the caller does next (STREAM_READY
        before a splice's first bytes). Returns whether it was written in time.
        """
        seq = self.post(frame_type, message)
        if seq is None:
            return False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SEND_WAIT):
                while self._written < seq and self._dead is None:
                    self._progress.clear()
                    await self._progress.wait()
        return self._written >= seq

    # -- the writer -------------------------------------------------------------------------

    async def run(self) -> None:
        """Write queued frames in order until the stream fails or :meth:`close`."""
        try:
            while self._dead is None:
                if not self._queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                seq, data = self._queue[0]
                try:
                    async with asyncio.timeout(self._write_timeout):
                        await self.stream.send_all(data)
                except TimeoutError:
                    self._fail(f"control stream write stalled for {self._write_timeout:g}s")
                    return
                except TransportError as exc:
                    # The control stream alone may fail (a reset, STOP_SENDING): without
                    # it the agent hears nothing more, so its connection goes too.
                    self._fail(f"control stream failed: {exc}")
                    return
                self._queue.popleft()
                self._bytes -= len(data)
                self._written = seq
                self._progress.set()
        finally:
            self._progress.set()

    def _fail(self, reason: str) -> None:
        if self._dead is not None:
            return
        self._dead = reason
        self._queue.clear()
        self._bytes = 0
        self.stream.abort()  # wakes a writer blocked on the stream
        self._wakeup.set()
        self._progress.set()
        self._on_overflow(reason)

    def close(self) -> None:
        """Stop the writer; later posts are ignored."""
        if self._dead is None:
            self._dead = "closed"
        self._wakeup.set()
        self._progress.set()

    @property
    def dead(self) -> str | None:
        """Why the outbox stopped, or None while it runs."""
        return self._dead

    def statistics(self) -> OutboxStatistics:
        return OutboxStatistics(
            queued_bytes=self._bytes,
            queued_frames=len(self._queue),
            sent_frames=self._written,
            dropped_frames=self._dropped,
        )
