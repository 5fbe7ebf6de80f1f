"""Tests for outrelay.resume.positions (spec 03 §4.1, §4.3, §4.4)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outrelay.resume import (
    BeforeRingError,
    InvalidPeerAckError,
    ResumeError,
    RingBuffer,
    StreamPositions,
    retransmit_range,
)

from .strategies import byte_strings


def test_counters() -> None:
    positions = StreamPositions()
    assert (positions.sent, positions.received, positions.peer_acked) == (0, 0, 0)
    positions.on_sent(10)
    positions.on_sent(0)
    positions.on_received(7)
    assert (positions.sent, positions.received) == (10, 7)
    with pytest.raises(ValueError, match="negative"):
        positions.on_sent(-1)
    with pytest.raises(ValueError, match="negative"):
        positions.on_received(-1)
    assert (positions.sent, positions.received) == (10, 7)


def test_constructor_validates() -> None:
    assert StreamPositions(sent=5, received=3, peer_acked=5).peer_acked == 5
    with pytest.raises(ValueError, match="negative"):
        StreamPositions(received=-1)
    with pytest.raises(ValueError, match="must not exceed sent"):
        StreamPositions(sent=5, peer_acked=6)


def test_apply_peer_ack_is_monotonic() -> None:
    positions = StreamPositions(sent=100)
    assert positions.apply_peer_ack(30) is True
    assert positions.peer_acked == 30
    assert positions.apply_peer_ack(30) is False
    assert positions.apply_peer_ack(10) is False
    assert positions.peer_acked == 30
    assert positions.apply_peer_ack(100) is True
    assert positions.peer_acked == 100


def test_apply_peer_ack_beyond_sent_is_a_remote_error() -> None:
    positions = StreamPositions(sent=100, peer_acked=20)
    with pytest.raises(InvalidPeerAckError) as info:
        positions.apply_peer_ack(101)
    assert str(info.value) == (
        "peer acknowledged position 101, but only 100 bytes were sent on this stream"
    )
    assert (info.value.peer_ack_position, info.value.sent) == (101, 100)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, ResumeError)
    assert positions.peer_acked == 20
    with pytest.raises(InvalidPeerAckError):
        positions.apply_peer_ack(-1)


def test_checkpoint_flow_drains_the_ring() -> None:
    ring = RingBuffer(max_size=1024, min_size=16)
    positions = StreamPositions()
    for chunk in (b"a" * 100, b"b" * 100):
        ring.write(chunk)
        positions.on_sent(len(chunk))
    if positions.apply_peer_ack(150):
        ring.discard(positions.peer_acked)
    assert (ring.tail, ring.head) == (150, positions.sent)
    assert retransmit_range(150, ring) == b"b" * 50


def test_retransmit_example_from_spec() -> None:
    # spec 03 §4.4: we sent 100 bytes, the echo says peer_ack=30: retransmit bytes 30-99.
    ring = RingBuffer(max_size=1024, min_size=64)
    data = bytes(range(100))
    ring.write(data)
    assert retransmit_range(30, ring) == data[30:]
    assert len(retransmit_range(30, ring)) == 70
    assert retransmit_range(100, ring) == b""
    assert retransmit_range(0, ring) == data


def test_retransmit_beyond_head_sends_nothing() -> None:
    ring = RingBuffer(max_size=64, min_size=8)
    ring.write(b"abc")
    assert retransmit_range(4, ring) == b""
    assert retransmit_range(2**64 - 1, ring) == b""


def test_retransmit_before_ring() -> None:
    ring = RingBuffer(max_size=64, min_size=8)
    ring.write(bytes(100))
    with pytest.raises(BeforeRingError) as info:
        retransmit_range(35, ring)
    assert (info.value.position, info.value.tail) == (35, 36)
    with pytest.raises(ValueError, match="negative"):
        retransmit_range(-1, ring)


@given(
    chunks=st.lists(byte_strings(50), max_size=12),
    discard_at=st.integers(min_value=0, max_value=700),
    peer_ack=st.integers(min_value=0, max_value=700),
    sizes=st.sampled_from([(64, 8), (128, 128), (1000, 16)]),
)
def test_retransmit_range_matches_model(
    chunks: list[bytes], discard_at: int, peer_ack: int, sizes: tuple[int, int]
) -> None:
    max_size, min_size = sizes
    ring = RingBuffer(max_size=max_size, min_size=min_size)
    model = b""
    for chunk in chunks:
        ring.write(chunk)
        model += chunk
    ring.discard(discard_at)
    head = len(model)
    tail = max(head - max_size, min(discard_at, head), 0)
    if peer_ack > head:
        assert retransmit_range(peer_ack, ring) == b""
    elif peer_ack < tail:
        with pytest.raises(BeforeRingError):
            retransmit_range(peer_ack, ring)
    else:
        assert retransmit_range(peer_ack, ring) == model[peer_ack:]
