"""Resume building blocks, sans-IO: stream ids, the ring buffer, position counters.

A resumable stream keeps its recent output in a :class:`RingBuffer`, counts bytes with
:class:`StreamPositions`, frees acknowledged bytes on STREAM_CHECKPOINT and, after a relay
failure, sends :func:`retransmit_range` on the new stream (spec 01 "Resume primitives",
spec 03 §4). Nothing here does I/O, reads a clock or starts a task.
"""

from __future__ import annotations

from outrelay.resume.ids import STREAM_ID_MAX, new_stream_id
from outrelay.resume.positions import InvalidPeerAckError, StreamPositions, retransmit_range
from outrelay.resume.ring import (
    RING_MAX,
    RING_MIN,
    AfterHeadError,
    BeforeRingError,
    ResumeError,
    RingBuffer,
    RingStatistics,
)

__all__ = [
    "RING_MAX",
    "RING_MIN",
    "STREAM_ID_MAX",
    "AfterHeadError",
    "BeforeRingError",
    "InvalidPeerAckError",
    "ResumeError",
    "RingBuffer",
    "RingStatistics",
    "StreamPositions",
    "new_stream_id",
    "retransmit_range",
]
