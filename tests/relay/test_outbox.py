"""The relay's bounded control queue (relay/outbox.py)."""

from __future__ import annotations

import asyncio

import pytest

from outrelay.orp import FrameType, StreamCheckpoint, encode_message
from outrelay.relay.outbox import ControlOutbox
from outrelay.transport.memory import memory_stream_pair

pytestmark = pytest.mark.timeout(10)

CHECKPOINT = encode_message(
    FrameType.STREAM_CHECKPOINT, StreamCheckpoint(stream_id=1, my_position=2, peer_ack_position=3)
)


async def test_frames_are_written_in_order_and_send_waits_for_its_own() -> None:
    ours, theirs = memory_stream_pair(limit=1 << 20)
    box = ControlOutbox(ours, on_overflow=lambda reason: None)
    writer = asyncio.create_task(box.run())
    box.post(FrameType.PONG)
    assert await box.send(FrameType.PING)
    data = await theirs.receive_some()
    assert data == encode_message(FrameType.PONG) + encode_message(FrameType.PING)
    assert box.statistics().sent_frames == 2
    box.close()
    await writer


async def test_a_reader_that_stops_costs_bounded_memory_and_never_blocks_posting() -> None:
    ours, _theirs = memory_stream_pair(limit=1024)  # the agent reads nothing
    overflows: list[str] = []
    drops: list[str] = []
    box = ControlOutbox(
        ours, on_overflow=overflows.append, on_drop=drops.append, max_bytes=8192, drop_above=2048
    )
    writer = asyncio.create_task(box.run())
    for _ in range(1000):
        box.post_raw(CHECKPOINT, droppable=True)  # never blocks
    await asyncio.sleep(0)
    stats = box.statistics()
    assert stats.queued_bytes <= 2048 and stats.dropped_frames >= 800
    assert len(drops) == 1 and not overflows  # logged once; droppable frames close nothing
    while box.post(FrameType.PONG) is not None:
        pass
    assert overflows and "not read" in overflows[0]
    assert box.dead is not None and box.statistics().queued_bytes == 0
    assert box.post(FrameType.PONG) is None
    await asyncio.wait_for(writer, 1)


async def test_a_stalled_write_closes_the_agent() -> None:
    ours, _theirs = memory_stream_pair(limit=16)
    overflows: list[str] = []
    box = ControlOutbox(ours, on_overflow=overflows.append, write_timeout=0.1)
    writer = asyncio.create_task(box.run())
    box.post_raw(b"x" * 64)
    await asyncio.wait_for(writer, 2)
    assert overflows and "stalled" in overflows[0]


async def test_a_control_stream_that_fails_closes_the_agent() -> None:
    """A reset of the control stream alone must not leave a connected agent deaf."""
    ours, theirs = memory_stream_pair()
    overflows: list[str] = []
    box = ControlOutbox(ours, on_overflow=overflows.append)
    writer = asyncio.create_task(box.run())
    theirs.abort()
    box.post(FrameType.PONG)
    await asyncio.wait_for(writer, 2)
    assert overflows and "control stream failed" in overflows[0]
    assert box.post(FrameType.PONG) is None
