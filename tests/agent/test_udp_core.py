"""The sans-IO half of UDP services (:mod:`outrelay.agent.udp.core`) and the flow stream."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outrelay.agent.udp import (
    CTRL_DATAGRAMS_REACH_ME,
    MAX_DATAGRAM,
    DatagramDeframer,
    DatagramStream,
    FlowTable,
    FramingError,
    UdpDrops,
    control_frame,
    frame_datagram,
)
from outrelay.transport import ClosedResourceError


def test_frame_is_length_then_payload() -> None:
    assert frame_datagram(b"abc") == b"\x00\x03abc"
    assert frame_datagram(b"") == b"\x00\x00"
    assert len(frame_datagram(b"x" * MAX_DATAGRAM)) == MAX_DATAGRAM + 2
    with pytest.raises(FramingError):
        frame_datagram(b"x" * (MAX_DATAGRAM + 1))


@given(
    st.lists(st.binary(max_size=3000), max_size=20),
    st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=10),
)
def test_deframer_recovers_datagrams_across_any_split(
    datagrams: list[bytes], cuts: list[int]
) -> None:
    wire = b"".join(frame_datagram(d) for d in datagrams)
    deframer = DatagramDeframer()
    out: list[bytes] = []
    pos, i = 0, 0
    while pos < len(wire):
        step = cuts[i % len(cuts)]
        out += deframer.feed(wire[pos : pos + step])
        pos += step
        i += 1
    assert out == datagrams
    assert deframer.pending == 0


def test_deframer_holds_a_partial_frame() -> None:
    deframer = DatagramDeframer()
    assert deframer.feed(b"\x00\x05ab") == []
    assert deframer.pending == 4
    assert deframer.feed(b"cde\x00") == [b"abcde"]
    assert deframer.pending == 1


def test_flow_table_expires_idle_flows_only() -> None:
    table: FlowTable[str] = FlowTable(idle_timeout=10, max_flows=3)
    table.add(("a", 1), "A", now=0)
    table.add(("b", 2), "B", now=5)
    table.touch(("a", 1), now=8)
    assert table.expire(now=14) == []
    assert table.expire(now=15) == [(("b", 2), "B")]
    assert table.get(("b", 2)) is None
    assert table.expire(now=18) == [(("a", 1), "A")]
    assert len(table) == 0


def test_flow_table_is_bounded() -> None:
    table: FlowTable[int] = FlowTable(idle_timeout=1, max_flows=2)
    table.add(("a", 1), 1, now=0)
    table.add(("b", 1), 2, now=0)
    assert table.full()
    with pytest.raises(ValueError, match="full"):
        table.add(("c", 1), 3, now=0)
    assert table.remove(("a", 1)) == 1
    assert not table.full()
    with pytest.raises(ValueError, match="exists"):
        table.add(("b", 1), 3, now=0)


async def test_datagram_stream_frames_both_ways_and_drops_when_full() -> None:
    sent: list[bytes] = []
    drops = UdpDrops()
    stream = DatagramStream(sent.append, drops, queue_max=2)
    stream.deliver(b"one")
    stream.deliver(b"two")
    stream.deliver(b"three")  # over the bound: dropped, counted
    assert drops.by_reason["queue_full"] == 1
    assert await stream.receive_some() == frame_datagram(b"one") + frame_datagram(b"two")
    await stream.send_all(frame_datagram(b"x") + frame_datagram(b"yz")[:2])
    await stream.send_all(b"yz")
    assert sent == [b"x", b"yz"]
    # A read waits for the next datagram; the flow's end is EOF.
    reader = asyncio.ensure_future(stream.receive_some())
    await asyncio.sleep(0)
    assert not reader.done()
    stream.deliver(b"late")
    assert await reader == frame_datagram(b"late")
    await stream.send_eof()  # no half-close in UDP: ends the input too
    assert await stream.receive_some() == b""
    stream.abort()
    with pytest.raises(ClosedResourceError):
        await stream.send_all(b"\x00\x00")


async def test_datagram_stream_queue_is_bounded_in_bytes_too() -> None:
    drops = UdpDrops()
    stream = DatagramStream(lambda _: None, drops, queue_max=1000)
    for _ in range(10):
        stream.deliver(b"x" * 60_000)
    assert drops.by_reason["queue_full"] == 6  # 4 x 60,000 fit in 256 KiB
    got = await stream.receive_some(10 * 65536)
    assert len(got) == 4 * 60_002
    stream.deliver(b"x" * 60_000)  # room again once drained
    assert drops.by_reason["queue_full"] == 6


def test_deframer_separates_control_messages() -> None:
    deframer = DatagramDeframer()
    wire = frame_datagram(b"a") + control_frame(CTRL_DATAGRAMS_REACH_ME) + frame_datagram(b"b")
    assert deframer.feed(wire[:4]) == [b"a"]  # the control frame is incomplete
    assert deframer.controls == []
    assert deframer.feed(wire[4:]) == [b"b"]
    assert deframer.controls == [CTRL_DATAGRAMS_REACH_ME]
