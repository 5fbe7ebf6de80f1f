"""UDP over a relay stream, sans-IO: datagram framing and the consumer's flow table.

Issue 19 item 2. A UDP *flow* (one client source address at the consumer) rides one
ordinary relay stream (OPEN_STREAM / INCOMING_STREAM, spec 01 §4), so policy,
resolution, inter-relay forwarding and rejects apply unchanged. On the stream each
datagram is framed as a 2-byte big-endian length followed by the payload; the
provider knows a stream is UDP because its service was exposed with ``--expose-udp``.

Nothing here does I/O or reads a clock: callers pass ``now`` (seconds, monotonic).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = [
    "CONTROL",
    "CTRL_DATAGRAMS_REACH_ME",
    "DGRAM_HEADER",
    "KIND_DATA",
    "KIND_PROBE",
    "MAX_DATAGRAM",
    "DatagramDeframer",
    "FlowTable",
    "FramingError",
    "control_frame",
    "frame_datagram",
]

MAX_DATAGRAM = 65527
"""The largest UDP payload (65,535 minus the 8-byte UDP header)."""
CONTROL = 0xFFFF
"""A length no datagram has: a 1-byte control message follows (between our agents)."""
CTRL_DATAGRAMS_REACH_ME = 1
"""Control: "your QUIC DATAGRAM probes for this stream reach me" (send data that way)."""
DGRAM_HEADER = struct.Struct("!QB")
"""QUIC DATAGRAM frame payload: the relay stream id (the relay routes on it by its pair
table), a kind (:data:`KIND_DATA` or :data:`KIND_PROBE`), then the UDP payload."""
KIND_DATA = 0
KIND_PROBE = 1

_LEN = struct.Struct("!H")


class FramingError(ValueError):
    """A datagram too large to frame."""


def frame_datagram(payload: bytes | bytearray | memoryview) -> bytes:
    """Return ``payload`` with its 2-byte big-endian length in front.

    Raises:
        FramingError: ``payload`` is over :data:`MAX_DATAGRAM` bytes.
    """
    if len(payload) > MAX_DATAGRAM:
        raise FramingError(f"datagram of {len(payload)} bytes is over {MAX_DATAGRAM}")
    return _LEN.pack(len(payload)) + bytes(payload)


def control_frame(kind: int) -> bytes:
    """An in-band control message (:data:`CONTROL` then one byte)."""
    return _LEN.pack(CONTROL) + bytes([kind])


class DatagramDeframer:
    """Split a byte stream back into datagrams (the reverse of :func:`frame_datagram`).

    Holds at most one partial frame (< 64 KiB + 2 bytes) between calls.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.controls: list[int] = []
        """Control messages seen (:func:`control_frame`), oldest first; the caller empties it."""

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add stream bytes; return every datagram now complete, in order."""
        self._buf += data
        out: list[bytes] = []
        pos = 0
        buf = self._buf
        while len(buf) - pos >= 2:
            (size,) = _LEN.unpack_from(buf, pos)
            if size == CONTROL:
                if len(buf) - pos < 3:
                    break
                self.controls.append(buf[pos + 2])
                pos += 3
                continue
            if len(buf) - pos - 2 < size:
                break
            out.append(bytes(buf[pos + 2 : pos + 2 + size]))
            pos += 2 + size
        if pos:
            del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)


F = TypeVar("F")


@dataclass
class _Entry(Generic[F]):
    flow: F
    last_seen: float


@dataclass
class FlowTable(Generic[F]):
    """Client address -> flow, bounded in size, with idle expiry.

    ``F`` is whatever the shell keeps per flow (its stream task and queue).
    A flow is *seen* whenever a datagram passes either way; one unseen for
    ``idle_timeout`` seconds is returned by :meth:`expire`.
    """

    idle_timeout: float = 60.0
    max_flows: int = 1024
    _flows: OrderedDict[tuple[str, int], _Entry[F]] = field(default_factory=OrderedDict)

    def __len__(self) -> int:
        return len(self._flows)

    def get(self, addr: tuple[str, int]) -> F | None:
        entry = self._flows.get(addr)
        return entry.flow if entry is not None else None

    def full(self) -> bool:
        """True when a new flow must be refused (the table is at ``max_flows``)."""
        return len(self._flows) >= self.max_flows

    def add(self, addr: tuple[str, int], flow: F, now: float) -> None:
        """Add a flow for ``addr``.

        Raises:
            ValueError: ``addr`` already has a flow, or the table is full.
        """
        if addr in self._flows:
            raise ValueError(f"flow for {addr} exists")
        if self.full():
            raise ValueError(f"flow table full ({self.max_flows})")
        self._flows[addr] = _Entry(flow, now)

    def touch(self, addr: tuple[str, int], now: float) -> None:
        """Mark ``addr``'s flow as active (no-op if it has none)."""
        entry = self._flows.get(addr)
        if entry is not None:
            entry.last_seen = now
            self._flows.move_to_end(addr)

    def remove(self, addr: tuple[str, int]) -> F | None:
        entry = self._flows.pop(addr, None)
        return entry.flow if entry is not None else None

    def expire(self, now: float) -> list[tuple[tuple[str, int], F]]:
        """Remove and return every flow idle for at least ``idle_timeout``."""
        gone: list[tuple[tuple[str, int], F]] = []
        # Least recently seen first (touch moves to the end): stop at the first live one.
        for addr, entry in list(self._flows.items()):
            if now - entry.last_seen < self.idle_timeout:
                break
            del self._flows[addr]
            gone.append((addr, entry.flow))
        return gone

    def __iter__(self) -> Iterator[tuple[tuple[str, int], F]]:
        return ((a, e.flow) for a, e in self._flows.items())
