"""Per-stream resume positions and the retransmit rule (spec 01 "Resume primitives", spec 03 §4).

A resumable stream counts bytes in both directions:

* ``sent``: bytes this side has written to the stream; sent as ``my_position`` in
  STREAM_CHECKPOINT and STREAM_RESUME (the reference's *SentPos*);
* ``received``: bytes this side has consumed from the peer; sent as ``peer_ack_position``
  (the reference's *RecvPos*; spec 03 §4.4 stresses that STREAM_RESUME carries this one, not
  ``peer_acked``);
* ``peer_acked``: the highest ``peer_ack_position`` the peer has reported in its checkpoints
  (the reference's *PeerAckPos*); the ring may free everything before it.

On resume each side retransmits its bytes ``(peer's peer_ack_position, own my_position]`` in the
spec's 1-based wording, that is the 0-based positions ``[peer_ack_position, head)`` of its ring
(:func:`retransmit_range`). This module is sans-IO.
"""

from __future__ import annotations

from dataclasses import dataclass

from outrelay.resume.ring import ResumeError, RingBuffer

__all__ = ["InvalidPeerAckError", "StreamPositions", "retransmit_range"]


class InvalidPeerAckError(ResumeError, ValueError):
    """The peer acknowledged bytes we never sent: a remote protocol error.

    Attributes:
        peer_ack_position: The position the peer reported.
        sent: The bytes we have actually written.
    """

    def __init__(self, peer_ack_position: int, sent: int) -> None:
        super().__init__(
            f"peer acknowledged position {peer_ack_position}, "
            f"but only {sent} bytes were sent on this stream"
        )
        self.peer_ack_position = peer_ack_position
        self.sent = sent


def _check_count(name: str, n: int) -> None:
    if n < 0:
        raise ValueError(f"{name} must not be negative, got {n}")


@dataclass(slots=True)
class StreamPositions:
    """The byte counters of one resumable stream (spec 03 §4.1).

    All three start at 0 and only grow.
    """

    sent: int = 0
    """``my_position``: bytes written to the stream (SentPos)."""
    received: int = 0
    """``peer_ack_position`` we report: bytes consumed from the peer (RecvPos)."""
    peer_acked: int = 0
    """Highest ``peer_ack_position`` seen in the peer's STREAM_CHECKPOINTs (PeerAckPos)."""

    def __post_init__(self) -> None:
        _check_count("sent", self.sent)
        _check_count("received", self.received)
        _check_count("peer_acked", self.peer_acked)
        if self.peer_acked > self.sent:
            raise ValueError(f"peer_acked ({self.peer_acked}) must not exceed sent ({self.sent})")

    def on_sent(self, n: int) -> None:
        """Count ``n`` bytes the inner stream accepted (and that went into the ring).

        Raises:
            ValueError: ``n`` is negative.
        """
        _check_count("n", n)
        self.sent += n

    def on_received(self, n: int) -> None:
        """Count ``n`` bytes delivered to the reader.

        Raises:
            ValueError: ``n`` is negative.
        """
        _check_count("n", n)
        self.received += n

    def apply_peer_ack(self, pos: int) -> bool:
        """Apply the ``peer_ack_position`` of an inbound STREAM_CHECKPOINT (spec 03 §4.3).

        Acknowledgements are monotonic: an older (lower or equal) one changes nothing, as
        checkpoints may be reordered across a reconnect.

        Args:
            pos: The peer's ``peer_ack_position``.

        Returns:
            True if ``peer_acked`` advanced; the caller then calls ``ring.discard(pos)``.

        Raises:
            InvalidPeerAckError: ``pos`` exceeds ``sent`` (or is negative): the peer claims to
                have consumed bytes we never wrote. It is a :class:`ValueError` too. The
                reference applies such a value silently; we report it and change nothing.
        """
        if pos < 0 or pos > self.sent:
            raise InvalidPeerAckError(pos, self.sent)
        if pos <= self.peer_acked:
            return False
        self.peer_acked = pos
        return True


def retransmit_range(peer_ack_position: int, ring: RingBuffer) -> bytes:
    """Return the bytes to send again after a resume (spec 03 §4.4, step 4).

    These are the ring's bytes from the peer's ``peer_ack_position`` (taken from the peer's
    STREAM_RESUME echo) up to our head. The peer's ``my_position`` plays no part.

    Example: we sent 100 bytes and the echo says ``peer_ack_position=30``: bytes 30 to 99 (70
    bytes) are returned.

    Args:
        peer_ack_position: The ``peer_ack_position`` from the peer's STREAM_RESUME.
        ring: This stream's ring buffer.

    Returns:
        The bytes ``[peer_ack_position, head)``. Empty if ``peer_ack_position >= head``: when the
        peer claims more than we ever sent, the spec says nothing is sent (we do not raise).

    Raises:
        BeforeRingError: ``peer_ack_position < ring.tail``: the bytes were evicted; the stream
            cannot be resumed and is dropped (spec 03 §4.7).
        ValueError: ``peer_ack_position`` is negative.
    """
    if peer_ack_position > ring.head:
        return b""
    return ring.read_from(peer_ack_position)
