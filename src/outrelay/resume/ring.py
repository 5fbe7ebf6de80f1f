"""The resume ring buffer: the most recent bytes written to a stream (spec 01 "Resume primitives").

Theory of operation
-------------------
Every byte a resumable stream writes is copied into its ring, so that after a relay failure the
bytes the peer never consumed can be sent again on the new stream (spec 03 §4.4). The peer tells
us what it has consumed through STREAM_CHECKPOINT; :meth:`RingBuffer.discard` then frees those
bytes (spec 03 §4.3).

Positions are *logical* byte offsets in the stream, counted from 0 and never reset:

* ``head``: total bytes ever written (the position of the next byte);
* ``tail``: the oldest position still held, ``head - len(ring)``.

So the ring holds exactly the bytes ``[tail, head)``.

Memory follows the adaptive policy of the reference library ([REC] in spec 03 §4.1, instead of
the reference agent's fixed 16 MiB ring):

* the capacity starts at ``min_size``;
* **grow**: a write that would overflow doubles the capacity, or raises it to what the write
  needs if that is more, never above ``max_size``;
* **evict**: once at ``max_size``, a write that still overflows drops the oldest bytes (``tail``
  moves up; those positions are gone for good);
* **shrink**: after a discard, while fewer than a quarter of the capacity is in use, the
  capacity halves, never below ``min_size`` nor below what is held.

Growing at "full" and shrinking at "under a quarter" leaves a gap between the two thresholds
(hysteresis), so a stream whose occupancy hovers around one size does not reallocate on every
write and checkpoint.

The storage is a circular ``bytearray`` of exactly ``capacity`` bytes: a write copies its bytes
once (O(len(data)), amortised over the doublings), and eviction only moves an index. The backing
array is allocated on the first write, so a stream that never writes costs nothing.

This module is sans-IO: no I/O, no clock, no tasks, no locking (the caller serialises access).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = [
    "RING_MAX",
    "RING_MIN",
    "AfterHeadError",
    "BeforeRingError",
    "ResumeError",
    "RingBuffer",
    "RingStatistics",
]

RING_MAX: Final = 16 * 1024 * 1024
"""Default maximum ring size, 16 MiB: the reference's per-stream ring (spec 01, spec 03 §4.1 and
§10). A peer that leaves more than this unacknowledged cannot be resumed (spec 03 §4.7). It bounds
the memory one busy stream can pin."""

RING_MIN: Final = 64 * 1024
"""Default minimum ring size, 64 KiB: the reference's adaptive minimum (spec 01, spec 03 §4.1
[REC]). An idle or fully acknowledged stream shrinks back to this; it is large enough that
checkpoints every 100 ms keep a typical interactive stream from reallocating."""


class ResumeError(Exception):
    """Base class of the errors raised by :mod:`outrelay.resume`."""


class BeforeRingError(ResumeError):
    """A position before the ring's tail was asked for: "before ring" (spec 03 §4.7).

    The bytes there were evicted (more than the ring's maximum went unacknowledged), so the gap
    cannot be recovered and the stream cannot be resumed; the caller drops it.

    Attributes:
        position: The position asked for.
        tail: The oldest position still held.
        head: The ring's head.
    """

    def __init__(self, position: int, tail: int, head: int) -> None:
        super().__init__(
            f"position {position} is before the ring (tail {tail}, head {head}): "
            f"{tail - position} bytes were evicted and cannot be retransmitted"
        )
        self.position = position
        self.tail = tail
        self.head = head


class AfterHeadError(ResumeError):
    """A position after the ring's head was asked for: bytes that were never written.

    Attributes:
        position: The position asked for.
        head: The ring's head.
    """

    def __init__(self, position: int, head: int) -> None:
        super().__init__(
            f"position {position} is after the head {head}: only {head} bytes were ever written"
        )
        self.position = position
        self.head = head


@dataclass(frozen=True, slots=True)
class RingStatistics:
    """A snapshot of a :class:`RingBuffer` (STYLE §5, ``statistics()``)."""

    head: int
    """Total bytes ever written."""
    tail: int
    """Oldest position still held (``head - buffered``)."""
    buffered: int
    """Bytes held, ``[tail, head)``."""
    capacity: int
    """Current capacity in bytes (``min_size`` ≤ capacity ≤ ``max_size``)."""


class RingBuffer:
    """The most recent bytes written to one stream, addressed by logical position.

    Args:
        max_size: The most bytes ever held; beyond it the oldest bytes are evicted.
        min_size: The initial capacity and the floor that shrinking stops at.

    Raises:
        ValueError: ``min_size`` is below 1 or above ``max_size``.
    """

    __slots__ = ("_buf", "_capacity", "_head", "_len", "_max", "_min", "_start")

    def __init__(self, max_size: int = RING_MAX, min_size: int = RING_MIN) -> None:
        if min_size < 1:
            raise ValueError(f"min_size must be at least 1, got {min_size}")
        if max_size < min_size:
            raise ValueError(f"max_size ({max_size}) must not be below min_size ({min_size})")
        self._max = max_size
        self._min = min_size
        self._capacity = min_size
        # Allocated lazily: empty until the first write, then exactly ``_capacity`` bytes.
        self._buf = bytearray()
        self._start = 0  # index in _buf of the byte at position ``tail``
        self._len = 0  # bytes held
        self._head = 0  # total bytes ever written

    # -- introspection ---------------------------------------------------------------------

    @property
    def head(self) -> int:
        """Total bytes ever written: the position of the next byte."""
        return self._head

    @property
    def tail(self) -> int:
        """The oldest position still held: ``head - len(self)``."""
        return self._head - self._len

    @property
    def capacity(self) -> int:
        """The current capacity in bytes, between ``min_size`` and ``max_size``."""
        return self._capacity

    @property
    def max_size(self) -> int:
        """The most bytes the ring ever holds."""
        return self._max

    @property
    def min_size(self) -> int:
        """The capacity the ring starts at and never shrinks below."""
        return self._min

    def __len__(self) -> int:
        """The number of bytes held."""
        return self._len

    def __repr__(self) -> str:
        return (
            f"<RingBuffer tail={self.tail} head={self._head} "
            f"capacity={self._capacity} max={self._max}>"
        )

    def statistics(self) -> RingStatistics:
        """Return a snapshot of the positions and the capacity."""
        return RingStatistics(
            head=self._head, tail=self.tail, buffered=self._len, capacity=self._capacity
        )

    # -- operations ------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``; ``head`` advances by its length.

        Grows the capacity if the data does not fit, and evicts the oldest bytes if it still does
        not fit at ``max_size`` (``tail`` moves up; a later :meth:`read_from` of those positions
        raises :class:`BeforeRingError`).

        Args:
            data: The bytes the stream just wrote (any C-contiguous buffer, read as bytes).
        """
        view = memoryview(data).cast("B")
        n = len(view)
        if n == 0:
            return
        self._head += n

        capacity = self._capacity
        needed = self._len + n
        if needed > capacity and capacity < self._max:
            capacity = min(max(capacity * 2, needed), self._max)
        if n >= capacity:
            # Only at max_size: the write alone fills the ring, keep its last ``capacity`` bytes.
            self._buf = bytearray(view[n - capacity :])
            self._capacity = capacity
            self._start = 0
            self._len = capacity
            return
        if capacity != len(self._buf):
            self._reallocate(capacity)

        overflow = self._len + n - capacity
        if overflow > 0:
            # At max_size: evict the oldest bytes.
            self._start = (self._start + overflow) % capacity
            self._len -= overflow

        end = (self._start + self._len) % capacity
        first = min(n, capacity - end)
        self._buf[end : end + first] = view[:first]
        if first < n:
            self._buf[: n - first] = view[first:]
        self._len += n

    def read_from(self, pos: int) -> bytes:
        """Return a copy of the bytes ``[pos, head)``.

        Args:
            pos: A logical position with ``tail <= pos <= head``.

        Returns:
            The bytes from ``pos`` to ``head``: empty when ``pos == head``.

        Raises:
            BeforeRingError: ``pos < tail``: those bytes were evicted (spec 03 §4.7).
            AfterHeadError: ``pos > head``: those bytes were never written.
            ValueError: ``pos`` is negative.
        """
        if pos < 0:
            raise ValueError(f"position must not be negative, got {pos}")
        tail = self.tail
        if pos < tail:
            raise BeforeRingError(pos, tail, self._head)
        if pos > self._head:
            raise AfterHeadError(pos, self._head)
        count = self._head - pos
        if count == 0:
            return b""
        capacity = self._capacity
        begin = (self._start + (pos - tail)) % capacity
        with memoryview(self._buf) as view:
            if begin + count <= capacity:
                return bytes(view[begin : begin + count])
            return b"".join((view[begin:], view[: count - (capacity - begin)]))

    def discard(self, pos: int) -> None:
        """Free the bytes before ``pos``: the peer has consumed them (spec 03 §4.3).

        A ``pos`` at or below ``tail`` changes nothing. A ``pos`` above ``head`` is clamped to
        ``head`` (everything is freed), as the reference does; whether a peer may acknowledge
        that much is for the caller to decide (see :meth:`StreamPositions.apply_peer_ack`).

        Afterwards, while fewer than a quarter of the capacity is in use, the capacity halves,
        never below ``min_size`` nor below the bytes still held.

        Args:
            pos: The first position to keep.
        """
        tail = self.tail
        if pos <= tail:
            return
        drop = min(pos, self._head) - tail
        self._len -= drop
        if self._len == 0:
            self._start = 0
        else:
            self._start = (self._start + drop) % len(self._buf)

        capacity = self._capacity
        while capacity > self._min and self._len * 4 < capacity:
            capacity = max(capacity // 2, self._min, self._len)
        if capacity != self._capacity:
            self._reallocate(capacity)

    # -- internals -------------------------------------------------------------------------

    def _reallocate(self, capacity: int) -> None:
        """Move the held bytes to a fresh array of ``capacity`` bytes, starting at index 0.

        Called on the first write (allocation), on growth and on shrinking; doubling keeps the
        copies amortised O(1) per byte written.
        """
        assert capacity >= self._len, "reallocation would lose bytes"
        buf = bytearray(capacity)
        if self._len:
            old = self._buf
            first = min(self._len, len(old) - self._start)
            buf[:first] = old[self._start : self._start + first]
            buf[first : self._len] = old[: self._len - first]
        self._buf = buf
        self._start = 0
        self._capacity = capacity
