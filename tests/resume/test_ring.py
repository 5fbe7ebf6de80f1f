"""Tests for outrelay.resume.ring (spec 01 "Resume primitives", spec 03 §4.1, §4.7)."""

from __future__ import annotations

import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import outrelay.resume as resume_module
from outrelay.resume import (
    RING_MAX,
    RING_MIN,
    AfterHeadError,
    BeforeRingError,
    ResumeError,
    RingBuffer,
    RingStatistics,
)

from .strategies import byte_strings


def pattern(start: int, n: int) -> bytes:
    """Bytes whose value at logical position p is p % 251, so a misplaced byte shows."""
    return bytes((start + i) % 251 for i in range(n))


def test_exports() -> None:
    for name in resume_module.__all__:
        assert hasattr(resume_module, name), name


def test_defaults() -> None:
    assert RING_MAX == 16 * 1024 * 1024
    assert RING_MIN == 64 * 1024
    ring = RingBuffer()
    assert (ring.max_size, ring.min_size, ring.capacity) == (RING_MAX, RING_MIN, RING_MIN)
    assert ring.statistics() == RingStatistics(head=0, tail=0, buffered=0, capacity=RING_MIN)
    assert len(ring) == 0
    assert ring.read_from(0) == b""


@pytest.mark.parametrize(("max_size", "min_size"), [(64, 0), (64, -1), (63, 64)])
def test_bad_sizes(max_size: int, min_size: int) -> None:
    with pytest.raises(ValueError):
        RingBuffer(max_size, min_size)


def test_fixed_ring_when_min_equals_max() -> None:
    ring = RingBuffer(16, 16)
    ring.write(pattern(0, 40))
    assert ring.capacity == 16
    assert (ring.tail, ring.head) == (24, 40)
    assert ring.read_from(24) == pattern(24, 16)


# -- growth ----------------------------------------------------------------------------------


def test_grow_by_doubling() -> None:
    ring = RingBuffer(max_size=1024, min_size=64)
    seen = []
    for i in range(20):
        ring.write(pattern(i * 50, 50))
        seen.append(ring.capacity)
    # 50 -> 64, 100 -> 128, 150..250 -> 256, 300..500 -> 512, 550..1000 -> 1024.
    assert seen == [64, 128, 256, 256, 256, 512, 512, 512, 512, 512] + [1024] * 10
    assert (ring.tail, ring.head, len(ring)) == (0, 1000, 1000)
    assert ring.read_from(0) == pattern(0, 1000)


def test_grow_to_what_a_big_write_needs() -> None:
    ring = RingBuffer(max_size=4096, min_size=64)
    ring.write(pattern(0, 10))
    ring.write(pattern(10, 1000))  # needs 1010 > 2 * 64
    assert ring.capacity == 1010
    ring.write(pattern(1010, 1))  # doubles
    assert ring.capacity == 2020
    assert ring.read_from(0) == pattern(0, 1011)


def test_grow_is_capped_at_max() -> None:
    ring = RingBuffer(max_size=300, min_size=64)
    ring.write(pattern(0, 200))
    assert ring.capacity == 200
    ring.write(pattern(200, 50))
    assert ring.capacity == 300
    assert (ring.tail, ring.head) == (0, 250)


# -- eviction --------------------------------------------------------------------------------


def test_eviction_at_max() -> None:
    ring = RingBuffer(max_size=256, min_size=64)
    for i in range(0, 300, 30):
        ring.write(pattern(i, 30))
    assert ring.capacity == 256
    assert (ring.head, ring.tail, len(ring)) == (300, 44, 256)
    assert ring.read_from(44) == pattern(44, 256)
    assert ring.read_from(299) == pattern(299, 1)
    with pytest.raises(BeforeRingError) as info:
        ring.read_from(43)
    assert (info.value.position, info.value.tail, info.value.head) == (43, 44, 300)
    assert "position 43 is before the ring (tail 44, head 300)" in str(info.value)
    assert isinstance(info.value, ResumeError)
    with pytest.raises(BeforeRingError):
        ring.read_from(0)


def test_single_write_larger_than_max_keeps_its_end() -> None:
    ring = RingBuffer(max_size=100, min_size=10)
    ring.write(pattern(0, 5))
    ring.write(pattern(5, 250))
    assert ring.capacity == 100
    assert (ring.head, ring.tail) == (255, 155)
    assert ring.read_from(155) == pattern(155, 100)
    ring.write(pattern(255, 7))
    assert ring.read_from(162) == pattern(162, 100)


# -- read_from edges -------------------------------------------------------------------------


def test_read_from_edges() -> None:
    ring = RingBuffer(max_size=64, min_size=8)
    ring.write(pattern(0, 40))
    ring.discard(10)
    assert ring.read_from(ring.head) == b""
    assert ring.read_from(ring.tail) == pattern(10, 30)
    assert ring.read_from(25) == pattern(25, 15)
    with pytest.raises(AfterHeadError) as info:
        ring.read_from(41)
    assert (info.value.position, info.value.head) == (41, 40)
    assert "position 41 is after the head 40" in str(info.value)
    with pytest.raises(BeforeRingError):
        ring.read_from(9)
    with pytest.raises(ValueError, match="negative"):
        ring.read_from(-1)


def test_read_from_returns_a_copy() -> None:
    ring = RingBuffer(max_size=64, min_size=8)
    ring.write(b"abcd")
    data = ring.read_from(0)
    ring.discard(4)
    ring.write(b"wxyz")
    assert data == b"abcd"


def test_wrap_around() -> None:
    ring = RingBuffer(max_size=16, min_size=16)
    ring.write(pattern(0, 12))
    ring.discard(10)
    ring.write(pattern(12, 10))  # wraps: indices 12..15 then 0..5
    assert (ring.tail, ring.head, ring.capacity) == (10, 22, 16)
    assert ring.read_from(10) == pattern(10, 12)
    assert ring.read_from(17) == pattern(17, 5)
    ring.write(pattern(22, 6))  # evicts 2 bytes, still wrapped
    assert (ring.tail, ring.head) == (12, 28)
    assert ring.read_from(12) == pattern(12, 16)


def test_write_accepts_buffers() -> None:
    ring = RingBuffer(max_size=64, min_size=8)
    ring.write(bytearray(b"ab"))
    ring.write(memoryview(b"xcdx")[1:3])
    ring.write(memoryview(array.array("H", [0x0101])))
    ring.write(b"")
    assert ring.read_from(0) == b"abcd\x01\x01"
    assert ring.head == 6


# -- discard and shrink ----------------------------------------------------------------------


def test_discard_noop_and_clamp() -> None:
    ring = RingBuffer(max_size=64, min_size=8)
    ring.write(pattern(0, 20))
    ring.discard(5)
    ring.discard(5)
    ring.discard(2)
    ring.discard(-3)
    assert (ring.tail, ring.head) == (5, 20)
    ring.discard(1000)  # clamped to head: everything is freed, head does not move
    assert (ring.tail, ring.head, len(ring)) == (20, 20, 0)
    assert ring.read_from(20) == b""
    ring.write(b"z")
    assert (ring.tail, ring.head) == (20, 21)
    assert ring.read_from(20) == b"z"


def test_shrink_hysteresis() -> None:
    ring = RingBuffer(max_size=1024, min_size=64)
    ring.write(pattern(0, 512))
    assert ring.capacity == 512
    ring.write(pattern(512, 1))
    assert ring.capacity == 1024
    ring.discard(513 - 256)  # 256 held: exactly a quarter, not below it
    assert (ring.capacity, len(ring)) == (1024, 256)
    ring.discard(513 - 255)  # 255 held: below a quarter, halves once (255 >= 512 / 4)
    assert (ring.capacity, len(ring)) == (512, 255)
    assert ring.read_from(ring.tail) == pattern(258, 255)
    ring.discard(513 - 100)  # 100 held: 512 -> 256 (100 >= 64), stops
    assert (ring.capacity, len(ring)) == (256, 100)
    assert ring.read_from(ring.tail) == pattern(413, 100)
    ring.discard(513)  # empty: halves down to the minimum, not below
    assert (ring.capacity, len(ring)) == (64, 0)
    ring.discard(513)
    assert ring.capacity == 64


def test_shrink_stops_at_min() -> None:
    ring = RingBuffer(max_size=4096, min_size=1000)
    ring.write(pattern(0, 4000))
    assert ring.capacity == 4000
    ring.discard(3990)
    assert (ring.capacity, len(ring)) == (1000, 10)
    assert ring.read_from(3990) == pattern(3990, 10)


def test_growth_after_shrink_and_wrapped_content_survives_reallocation() -> None:
    ring = RingBuffer(max_size=64, min_size=8)
    ring.write(pattern(0, 8))
    ring.discard(6)
    ring.write(pattern(8, 5))  # wraps in the 8-byte array, then grows to 16
    assert ring.capacity == 8
    ring.write(pattern(13, 2))
    assert ring.capacity == 16
    assert ring.read_from(6) == pattern(6, 9)


# -- model-based ---------------------------------------------------------------------------


class RingMachine(RuleBasedStateMachine):
    """RingBuffer against a naive model that keeps every byte ever written."""

    @initialize(sizes=st.sampled_from([(64, 8), (64, 64), (50, 7), (1, 1), (96, 4)]))
    def setup(self, sizes: tuple[int, int]) -> None:
        self.max_size, self.min_size = sizes
        self.ring = RingBuffer(max_size=self.max_size, min_size=self.min_size)
        self.model = b""
        self.tail = 0

    @rule(data=byte_strings(100))
    def write(self, data: bytes) -> None:
        held, capacity = len(self.ring), self.ring.capacity
        self.ring.write(data)
        self.model += data
        # Eviction happens only beyond max_size.
        self.tail = max(self.tail, len(self.model) - self.max_size)
        if held + len(data) <= capacity:
            assert self.ring.capacity == capacity
        else:
            assert self.ring.capacity == min(max(2 * capacity, held + len(data)), self.max_size)

    @rule(offset=st.integers(min_value=-10, max_value=110))
    def discard(self, offset: int) -> None:
        capacity = self.ring.capacity
        pos = self.ring.tail + offset
        self.ring.discard(pos)
        self.tail = max(self.tail, min(pos, len(self.model)))
        after = self.ring.capacity
        assert after == self.min_size or len(self.ring) * 4 >= after
        # Only halvings (floored at min_size) happened.
        assert after in {max(capacity >> k, self.min_size) for k in range(capacity.bit_length())}

    @precondition(lambda self: len(self.model) > 0)
    @rule(data=st.data())
    def read_anywhere(self, data: st.DataObject) -> None:
        pos = data.draw(st.integers(min_value=0, max_value=len(self.model) + 5))
        if pos < self.tail:
            with pytest.raises(BeforeRingError):
                self.ring.read_from(pos)
        elif pos > len(self.model):
            with pytest.raises(AfterHeadError):
                self.ring.read_from(pos)
        else:
            assert self.ring.read_from(pos) == self.model[pos:]

    @invariant()
    def matches_model(self) -> None:
        ring = self.ring
        assert ring.head == len(self.model)
        assert ring.tail == self.tail
        assert len(ring) == ring.head - ring.tail
        assert ring.read_from(ring.tail) == self.model[self.tail :]
        assert self.min_size <= ring.capacity <= self.max_size
        assert len(ring) <= ring.capacity
        stats = ring.statistics()
        assert (stats.head, stats.tail, stats.buffered, stats.capacity) == (
            ring.head,
            ring.tail,
            len(ring),
            ring.capacity,
        )


RingMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestRingMachine = RingMachine.TestCase


@given(
    chunks=st.lists(byte_strings(40), max_size=20),
    sizes=st.sampled_from([(64, 8), (32, 32), (100, 3)]),
)
def test_writes_only_keep_the_last_max_size_bytes(
    chunks: list[bytes], sizes: tuple[int, int]
) -> None:
    ring = RingBuffer(*sizes)
    for chunk in chunks:
        ring.write(chunk)
    everything = b"".join(chunks)
    assert ring.head == len(everything)
    assert ring.read_from(ring.tail) == everything[-sizes[0] :]
    assert len(ring) == min(len(everything), sizes[0])
