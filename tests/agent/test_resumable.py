"""ResumableStream (spec 03 §4): positions, ring, break, resume, window, checkpoints.

The core test is a relay simulation without sockets: two ResumableStreams A and
B with the same stream id, each on an in-memory pair whose far end a tiny
in-test "relay" splices to the other. Both sides write random data with random
chunk sizes while the test breaks the connection at random points and then does
what ``ResumeSupervisor._resume_one`` does for each side (spec 03 §4.4): the echo is
applied as a checkpoint, ``retransmit_range(peer's received, ring)`` goes out on
a fresh stream before anything else, FIN is re-sent if it was requested, and the
fresh stream is installed (with any bytes already read from it as prefix).
Each side must then receive exactly the other's bytes: nothing lost, nothing
twice.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import pytest

from outrelay.agent.resumable import ResumableStream, StreamLost
from outrelay.orp import StreamEndCode
from outrelay.resume import BeforeRingError, RingBuffer, retransmit_range
from outrelay.splice import splice
from outrelay.transport.base import (
    BrokenResourceError,
    BusyResourceError,
    ClosedResourceError,
)
from outrelay.transport.memory import MemoryStream, memory_stream_pair

pytestmark = pytest.mark.timeout(30)

SID = 0x1234_5678
STEP = 5.0


async def _settle(rounds: int = 30) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


async def _drain(stream: MemoryStream | ResumableStream, max_bytes: int = 65536) -> bytes:
    out = bytearray()
    while chunk := await stream.receive_some(max_bytes):
        out += chunk
    return bytes(out)


def _check_ring(s: ResumableStream) -> None:
    """The ring holds at most the unacknowledged bytes, and its head is ``sent``."""
    assert s.ring.head == s.positions.sent
    assert len(s.ring) <= s.positions.sent - s.positions.peer_acked
    assert s.ring.tail <= s.positions.peer_acked  # no unacknowledged byte was evicted


class Broken:
    """An ``on_broken`` callback that records its calls."""

    def __init__(self) -> None:
        self.calls: list[ResumableStream] = []

    def __call__(self, stream: ResumableStream) -> None:
        self.calls.append(stream)


def _stream(
    inner: MemoryStream, *, window: float = STEP, prefix: bytes = b"", **kw: int
) -> tuple[ResumableStream, Broken]:
    cb = Broken()
    return ResumableStream(SID, inner, on_broken=cb, prefix=prefix, window=window, **kw), cb


# -- the relay simulation ---------------------------------------------------------------------


@dataclass
class Side:
    name: str
    data: bytes
    stream: ResumableStream
    inner: MemoryStream
    got: bytearray = field(default_factory=bytearray)
    done: bool = False


class RelaySim:
    """Two ResumableStreams spliced through an in-test relay that can die."""

    def __init__(self, rng: random.Random, a_data: bytes, b_data: bytes) -> None:
        self.rng = rng
        self.broken_calls: list[str] = []
        a_inner, ra = memory_stream_pair(self._limit(), SID)
        b_inner, rb = memory_stream_pair(self._limit(), SID)
        self.a = Side("A", a_data, self._wrap(a_inner), a_inner)
        self.b = Side("B", b_data, self._wrap(b_inner), b_inner)
        self.relay: asyncio.Task[object] = asyncio.create_task(splice(ra, rb))
        self.breaks = 0
        self.moved = asyncio.Event()  # a reader made progress
        self.natural_breaks = 0

    def _limit(self) -> int:
        return self.rng.choice([1, 13, 512, 4096, 65536])

    def _wrap(self, inner: MemoryStream) -> ResumableStream:
        def on_broken(s: ResumableStream) -> None:
            self.broken_calls.append("A" if s is self.a.stream else "B")

        return ResumableStream(SID, inner, on_broken=on_broken, window=STEP)

    def sides(self) -> tuple[tuple[Side, Side], tuple[Side, Side]]:
        return (self.a, self.b), (self.b, self.a)

    def check(self) -> None:
        for me, peer in self.sides():
            _check_ring(me.stream)
            assert me.stream.positions.received <= peer.stream.positions.sent
            assert bytes(me.got) == peer.data[: len(me.got)], f"{me.name} got wrong bytes"

    def checkpoint(self) -> None:
        """Both agents' STREAM_CHECKPOINTs, delivered through the (pair-table) relay."""
        for me, peer in self.sides():
            me.stream.apply_checkpoint(peer.stream.positions.sent, peer.stream.positions.received)
        self.check()

    async def writer(self, side: Side) -> None:
        view = memoryview(side.data)
        while view:
            n = self.rng.randint(1, 20_000)
            await side.stream.send_all(view[:n])
            view = view[n:]
        await side.stream.send_eof()

    async def reader(self, side: Side) -> None:
        while chunk := await side.stream.receive_some(self.rng.randint(1, 70_000)):
            side.got += chunk
            self.moved.set()
        side.done = True
        self.moved.set()

    async def checkpointer(self) -> None:
        while not (self.a.done and self.b.done):
            for _ in range(self.rng.randint(1, 40)):
                await asyncio.sleep(0)
            self.checkpoint()

    def progress(self) -> int:
        return len(self.a.got) + len(self.b.got)

    async def breaker(self, thresholds: list[int]) -> None:
        for threshold in thresholds:
            while self.progress() < threshold and not (self.a.done and self.b.done):
                self.moved.clear()
                await self.moved.wait()
            if self.a.done and self.b.done:
                return
            await self.break_and_resume()

    async def break_and_resume(self) -> None:
        self.breaks += 1
        # The relay dies: both agents' connections break at once (spec 03 §4.6: only a
        # relay-side failure, which breaks both, is resumable).
        self.a.inner.break_("relay died")
        self.b.inner.break_("relay died")
        await _settle(self.rng.randint(0, 10))
        for side in (self.a, self.b):
            if side.stream.is_broken:
                self.natural_breaks += 1
            else:  # idle side (reader done, writer done or between writes)
                side.stream.mark_broken("connection lost")
            assert side.stream.is_broken
        async with asyncio.timeout(STEP):
            await self.relay  # the old splice ends by itself
        self.check()

        # Each side's STREAM_RESUME carries (sent, received); the relay echoes the peer's.
        echo = {
            me.name: (peer.stream.positions.sent, peer.stream.positions.received)
            for me, peer in self.sides()
        }
        for me, _peer in self.sides():
            me.stream.apply_checkpoint(*echo[me.name])
        gaps = {
            me.name: retransmit_range(echo[me.name][1], me.stream.ring) for me, _ in self.sides()
        }

        new: dict[str, tuple[MemoryStream, MemoryStream]] = {}
        for me, _ in self.sides():
            # A bound at least the gap, so the retransmit never waits for the peer's
            # install (which itself waits for the peer's own retransmit).
            new[me.name] = memory_stream_pair(max(self._limit(), len(gaps[me.name])), SID)
        self.relay = asyncio.create_task(
            splice(new["A"][1], new["B"][1], abort_a_on_b_error=True, abort_b_on_a_error=True)
        )
        order = list(self.sides())
        self.rng.shuffle(order)
        # As the session does: install the fresh stream (reading resumes at
        # once), then retransmit the gap; both sides retransmit concurrently.
        for me, _ in order:
            me.inner = new[me.name][0]
            me.stream.install(me.inner, b"")
        async with asyncio.timeout(STEP):
            await asyncio.gather(
                *(me.stream.retransmit(new[me.name][0], gaps[me.name]) for me, _ in order)
            )
        self.check()

    async def run(self, thresholds: list[int]) -> None:
        async with asyncio.timeout(20), asyncio.TaskGroup() as tg:
            for side in (self.a, self.b):
                tg.create_task(self.writer(side))
                tg.create_task(self.reader(side))
            tg.create_task(self.checkpointer())
            tg.create_task(self.breaker(thresholds))
        self.check()
        await asyncio.wait_for(self.relay, STEP)
        await self.a.stream.aclose()
        await self.b.stream.aclose()


@pytest.mark.parametrize("seed", range(16))
async def test_relay_deaths_lose_and_duplicate_nothing(seed: int) -> None:
    rng = random.Random(seed)
    a_data = rng.randbytes(rng.choice([0, 1, 5_000, 60_000, 150_000]))
    b_data = rng.randbytes(rng.choice([1, 3_000, 90_000, 150_000]))
    sim = RelaySim(rng, a_data, b_data)
    total = len(a_data) + len(b_data)
    thresholds = sorted(rng.randint(0, total) for _ in range(rng.randint(1, 4)))
    await sim.run(thresholds)

    assert bytes(sim.b.got) == a_data
    assert bytes(sim.a.got) == b_data
    assert sim.a.stream.resumes == sim.b.stream.resumes == sim.breaks
    assert sim.broken_calls.count("A") == sim.broken_calls.count("B") == sim.breaks
    for side in (sim.a, sim.b):
        assert side.stream.positions.sent == len(side.data)
    assert sim.a.stream.positions.received == len(b_data)
    assert sim.b.stream.positions.received == len(a_data)


async def test_relay_simulation_really_breaks_mid_transfer() -> None:
    """Guard for the simulation itself: breaks land while bytes are in flight."""
    rng = random.Random(99)
    a_data, b_data = rng.randbytes(200_000), rng.randbytes(200_000)
    sim = RelaySim(rng, a_data, b_data)
    await sim.run([50_000, 150_000, 250_000])
    assert sim.breaks == 3
    assert sim.natural_breaks >= 2  # readers/writers saw the break themselves
    assert bytes(sim.b.got) == a_data and bytes(sim.a.got) == b_data


# -- break, window, abandon ---------------------------------------------------------------------


async def test_parked_reader_gets_stream_lost_after_the_window() -> None:
    inner, _peer = memory_stream_pair()
    s, cb = _stream(inner, window=0.2)
    async with asyncio.timeout(STEP):
        reader = asyncio.create_task(s.receive_some())
        await _settle()
        start = time.monotonic()
        s.mark_broken("relay died")
        assert cb.calls == [s] and s.is_broken
        with pytest.raises(StreamLost, match=r"not resumed within 0\.2s"):
            await reader
        elapsed = time.monotonic() - start
    assert 0.15 <= elapsed < 1.0
    assert s.is_lost
    with pytest.raises(StreamLost):
        await s.send_all(b"x")
    assert issubclass(StreamLost, BrokenResourceError)  # the bridge treats it as broken


async def test_window_runs_from_the_break_not_from_the_call() -> None:
    inner, _peer = memory_stream_pair()
    s, _ = _stream(inner, window=0.3)
    s.mark_broken("relay died")
    await asyncio.sleep(0.2)
    start = time.monotonic()
    with pytest.raises(StreamLost):
        async with asyncio.timeout(STEP):
            await s.send_all(b"late writer")
    assert time.monotonic() - start < 0.25  # only what is left of the window


async def test_abandon_wakes_parked_reader_and_writer() -> None:
    inner, _peer = memory_stream_pair()
    s, _ = _stream(inner, window=STEP)
    s.mark_broken("relay died")
    async with asyncio.timeout(1.0):
        reader = asyncio.create_task(s.receive_some())
        writer = asyncio.create_task(s.send_all(b"parked"))
        await _settle()
        assert not reader.done() and not writer.done()
        s.abandon("resume failed: ErrBeforeRing")
        with pytest.raises(StreamLost, match="ErrBeforeRing"):
            await reader
        with pytest.raises(StreamLost, match="ErrBeforeRing"):
            await writer
    assert s.positions.sent == 0  # the parked write never entered the ring


async def test_install_after_abandon_aborts_the_new_inner() -> None:
    inner, _ = memory_stream_pair()
    s, _ = _stream(inner)
    s.mark_broken("x")
    s.abandon("gave up")
    fresh, fresh_peer = memory_stream_pair()
    s.install(fresh, b"")
    assert s.is_lost and s.resumes == 0
    with pytest.raises(BrokenResourceError):
        async with asyncio.timeout(STEP):
            await fresh_peer.receive_some()


async def test_mark_broken_aborts_the_inner_and_calls_back_once() -> None:
    inner, peer = memory_stream_pair()
    s, cb = _stream(inner)
    s.mark_broken("first")
    s.mark_broken("second")
    assert cb.calls == [s]
    with pytest.raises(BrokenResourceError):
        async with asyncio.timeout(STEP):
            await peer.receive_some()  # the old inner was reset


async def test_read_error_marks_broken_and_install_resumes_the_reader() -> None:
    inner, peer = memory_stream_pair()
    s, cb = _stream(inner)
    async with asyncio.timeout(STEP):
        await peer.send_all(b"before")
        assert await s.receive_some() == b"before"
        reader = asyncio.create_task(s.receive_some())
        await _settle()
        peer.break_()
        await _settle()
        assert cb.calls == [s] and not reader.done()
        fresh, fresh_peer = memory_stream_pair()
        s.install(fresh, b"pre")
        assert await reader == b"pre"  # the prefix comes first
        await fresh_peer.send_all(b"after")
        await fresh_peer.send_eof()
        assert await _drain(s) == b"after"
    assert s.positions.received == len(b"beforepreafter")
    assert s.resumes == 1


@pytest.mark.parametrize("side", ["read", "write"])
async def test_a_final_end_code_ends_the_stream_instead_of_resuming(side: str) -> None:
    """The peer's application closed (orp.StreamEndCode): no resume, StreamLost with the code."""
    inner, peer = memory_stream_pair()
    s, cb = _stream(inner)
    async with asyncio.timeout(STEP):
        peer.abort(StreamEndCode.APPLICATION_CLOSED)
        with pytest.raises(StreamLost) as lost:
            if side == "read":
                await s.receive_some()
            else:
                await s.send_all(b"x" * 10)
                await s.send_all(b"y")  # the second write meets the ended stream
    assert lost.value.code == StreamEndCode.APPLICATION_CLOSED
    assert s.end_code == StreamEndCode.APPLICATION_CLOSED
    assert cb.calls == [] and not s.is_broken


async def test_link_codes_still_resume() -> None:
    inner, peer = memory_stream_pair()
    s, cb = _stream(inner)
    async with asyncio.timeout(STEP):
        reader = asyncio.create_task(s.receive_some())
        await _settle()
        peer.abort(StreamEndCode.LINK)
        await _settle()
        assert cb.calls == [s] and not reader.done()
        reader.cancel()


async def test_constructor_prefix_is_read_first_and_counted() -> None:
    inner, peer = memory_stream_pair()
    s, _ = _stream(inner, prefix=b"surplus")
    await peer.send_all(b"-stream")
    await peer.send_eof()
    async with asyncio.timeout(STEP):
        assert await s.receive_some(3) == b"sur"
        assert await _drain(s) == b"plus-stream"
    assert s.positions.received == 14


async def test_concurrent_reads_raise_busy() -> None:
    inner, _peer = memory_stream_pair()
    s, _ = _stream(inner)
    async with asyncio.timeout(STEP):
        reader = asyncio.create_task(s.receive_some())
        await _settle()
        with pytest.raises(BusyResourceError):
            await s.receive_some()
        s.abort()  # a local reset: parked calls fail at once
        with pytest.raises(StreamLost, match="aborted"):
            await reader


# -- EOF ----------------------------------------------------------------------------------------


async def test_normal_eof_is_sticky() -> None:
    inner, peer = memory_stream_pair()
    s, cb = _stream(inner)
    await peer.send_all(b"data")
    await peer.send_eof()
    async with asyncio.timeout(STEP):
        assert await s.receive_some() == b"data"
        assert await s.receive_some() == b""
        assert await s.receive_some() == b""
    assert cb.calls == []
    assert not s.is_broken


async def test_eof_before_the_peers_checkpointed_position_is_a_break() -> None:
    """The relay turned the peer's connection loss into a FIN (spec 02 §6.5)."""
    inner, peer = memory_stream_pair()
    s, cb = _stream(inner)
    s.apply_checkpoint(10, 0)  # the peer says it has sent 10 bytes
    await peer.send_all(b"12345")
    await peer.send_eof()
    async with asyncio.timeout(STEP):
        assert await s.receive_some() == b"12345"
        reader = asyncio.create_task(s.receive_some())
        await _settle()
        assert cb.calls == [s], "EOF with peer_sent > received must ask for a resume"
        assert s.is_broken and not reader.done()
        fresh, fresh_peer = memory_stream_pair()
        await fresh_peer.send_all(retransmit_range(5, _ring_of(b"1234567890")))
        await fresh_peer.send_eof()
        s.install(fresh, b"")
        assert await reader == b"67890"
        assert await s.receive_some() == b""
    assert s.positions.received == 10


def _ring_of(data: bytes) -> RingBuffer:
    ring = RingBuffer()
    ring.write(data)
    return ring


async def test_eof_at_the_peers_checkpointed_position_is_eof() -> None:
    inner, peer = memory_stream_pair()
    s, cb = _stream(inner)
    s.apply_checkpoint(5, 0)
    await peer.send_all(b"12345")
    await peer.send_eof()
    async with asyncio.timeout(STEP):
        assert await _drain(s) == b"12345"
    assert cb.calls == []


async def test_send_all_after_send_eof_raises_closed() -> None:
    inner, peer = memory_stream_pair()
    s, _ = _stream(inner)
    await s.send_all(b"x")
    await s.send_eof()
    await s.send_eof()  # idempotent
    assert s.eof_requested
    with pytest.raises(ClosedResourceError):
        await s.send_all(b"y")
    async with asyncio.timeout(STEP):
        assert await _drain(peer) == b"x"


async def test_send_eof_while_broken_is_remembered_for_the_resume() -> None:
    inner, _ = memory_stream_pair()
    s, _ = _stream(inner)
    s.mark_broken("x")
    await s.send_eof()  # no inner: nothing sent, but the session re-sends it
    assert s.eof_requested


async def test_is_finished() -> None:
    inner, peer = memory_stream_pair()
    s, _ = _stream(inner)
    await peer.send_eof()
    async with asyncio.timeout(STEP):
        assert await s.receive_some() == b""
    assert not s.is_finished
    await s.send_eof()
    assert s.is_finished


# -- checkpoints and the ring -------------------------------------------------------------------


async def test_checkpoint_discards_acknowledged_bytes() -> None:
    inner, _peer = memory_stream_pair()
    s, _ = _stream(inner)
    await s.send_all(b"a" * 100)
    assert (len(s.ring), s.positions.sent) == (100, 100)
    s.apply_checkpoint(7, 60)
    assert s.positions.peer_acked == 60 and s.ring.tail == 60 and len(s.ring) == 40
    assert s.peer_sent == 7 and s.checkpointed
    s.apply_checkpoint(3, 30)  # older checkpoint (reordered): no change
    assert s.positions.peer_acked == 60 and len(s.ring) == 40 and s.peer_sent == 7
    s.apply_checkpoint(9, 100)
    assert len(s.ring) == 0 and s.peer_sent == 9
    _check_ring(s)


async def test_checkpoint_acknowledging_unsent_bytes_is_ignored() -> None:
    inner, _peer = memory_stream_pair()
    s, _ = _stream(inner)
    await s.send_all(b"b" * 10)
    s.apply_checkpoint(0, 11)
    assert s.positions.peer_acked == 0
    assert len(s.ring) == 10
    assert not s.checkpointed
    assert retransmit_range(0, s.ring) == b"b" * 10


async def test_bytes_written_while_broken_are_sent_once() -> None:
    inner, peer = memory_stream_pair()
    s, _ = _stream(inner)
    async with asyncio.timeout(STEP):
        await s.send_all(b"one-")
        assert await peer.receive_some() == b"one-"  # the peer consumed 4 bytes
        await s.send_all(b"two-")  # in flight when the relay dies
        peer.break_()
        s.mark_broken("relay died")
        writer = asyncio.create_task(s.send_all(b"three"))
        await _settle()
        assert not writer.done(), "a write during a resume waits for the new stream"
        assert s.positions.sent == 8  # ... and did not enter the ring yet
        gap = retransmit_range(4, s.ring)  # the peer's echo: it consumed 4 bytes
        assert gap == b"two-"
        fresh, fresh_peer = memory_stream_pair()
        s.install(fresh, b"")
        await s.retransmit(fresh, gap)
        await writer
        await s.send_eof()
        assert await _drain(fresh_peer) == b"two-three"
    assert s.positions.sent == 13


async def test_write_error_marks_broken_and_keeps_the_bytes() -> None:
    inner, peer = memory_stream_pair(limit=4)
    s, cb = _stream(inner)
    async with asyncio.timeout(STEP):
        writer = asyncio.create_task(s.send_all(b"0123456789"))
        await _settle()
        assert not writer.done()
        peer.abort()  # e.g. STOP_SENDING / reset from the relay
        await writer  # returns: the bytes are in the ring for the resume
    assert cb.calls == [s]
    assert retransmit_range(0, s.ring) == b"0123456789"


async def test_ring_min_is_required() -> None:
    inner, _ = memory_stream_pair()
    with pytest.raises(ValueError):
        _stream(inner, ring_max=1024)  # below RingBuffer's 64 KiB minimum


async def test_checkpointed_writer_waits_instead_of_evicting_unacked_bytes() -> None:
    inner, _peer = memory_stream_pair(limit=1 << 20)
    s, _ = _stream(inner, ring_max=65536)
    async with asyncio.timeout(STEP):
        await s.send_all(b"x" * 100)
        s.apply_checkpoint(0, 100)  # the peer checkpoints: no more eviction
        assert s.checkpointed
        await s.send_all(b"y" * 60_000)  # fits: 60000 <= 65536 unacknowledged
        writer = asyncio.create_task(s.send_all(b"z" * 10_000))  # 5536 fit, 4464 do not
        await _settle()
        try:
            _check_ring(s)  # bytes 100..4564 were evicted while unacknowledged
            retransmit_range(100, s.ring)  # what a resume right now would need
            assert not writer.done(), "the writer must wait for the peer's ack"
            s.apply_checkpoint(0, 60_100)
            await writer
        except BeforeRingError as exc:
            raise AssertionError(str(exc)) from exc
        finally:
            writer.cancel()
    assert s.positions.sent == 70_100


# -- closing: the linger for the last checkpoints (orp.CAP_CLOSE_ACK) ---------------------------


async def _finished(close_ack: bool) -> tuple[ResumableStream, MemoryStream]:
    """A stream that sent and received 10 bytes, the peer acknowledged 4, and read EOF."""
    inner, peer = memory_stream_pair()
    s, _ = _stream(inner)
    s.close_ack = close_ack
    await s.send_all(b"x" * 10)
    s.apply_checkpoint(0, 4)
    await peer.send_all(b"y" * 10)
    await peer.send_eof()
    async with asyncio.timeout(STEP):
        assert await _drain(s) == b"y" * 10
    return s, peer


async def test_close_waits_for_the_peers_last_checkpoint_and_reports_its_own() -> None:
    s, _peer = await _finished(close_ack=True)
    closing = asyncio.create_task(s.aclose())
    await _settle()
    assert not closing.done(), "closed before the peer acknowledged the last 6 bytes"
    s.apply_checkpoint(10, 10)
    await _settle()
    assert not closing.done(), "closed before our own last checkpoint (received 10) went out"
    s.note_reported(10)
    async with asyncio.timeout(STEP):
        await closing
    assert s.positions.peer_acked == s.positions.sent == 10


async def test_close_does_not_wait_where_the_relay_drops_late_checkpoints() -> None:
    """A reference relay stops forwarding with the splice: nothing more can come."""
    s, _peer = await _finished(close_ack=False)
    async with asyncio.timeout(0.5):
        await s.aclose()
    assert s.positions.peer_acked == 4


async def test_close_gives_up_waiting_at_the_end_of_the_window() -> None:
    inner, _peer = memory_stream_pair()
    s, _ = _stream(inner, window=0.2)
    s.close_ack = True
    await s.send_all(b"x" * 10)
    s.apply_checkpoint(0, 4)
    started = time.monotonic()
    async with asyncio.timeout(STEP):
        await s.aclose()
    assert 0.15 < time.monotonic() - started < STEP
