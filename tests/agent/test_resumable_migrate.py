"""ResumableStream.detach / fail_migration: the P2P swap seam (spec 03 §7.7 [REC])."""

from __future__ import annotations

import asyncio

import pytest

from outrelay.agent.resumable import ResumableStream
from outrelay.transport.memory import memory_stream_pair


@pytest.mark.timeout(10)
async def test_detach_parks_and_keeps_the_old_stream_open_then_install_swaps() -> None:
    broken: list[ResumableStream] = []
    relay_near, relay_far = memory_stream_pair()
    s = ResumableStream(7, relay_near, on_broken=broken.append)
    await s.send_all(b"abc")
    assert await relay_far.receive_some() == b"abc"
    old = s.detach()
    assert old is relay_near
    assert s.detach() is None  # already migrating
    assert s.positions.sent == 3
    # Writers park (nothing new reaches the ring or a stream) ...
    writer = asyncio.create_task(s.send_all(b"def"))
    await asyncio.sleep(0.05)
    assert not writer.done() and s.positions.sent == 3
    # ... and the relay stream was not broken: the peer sees no reset.
    await relay_far.send_all(b"late")  # dropped after the swap; the peer retransmits it
    direct_near, direct_far = memory_stream_pair()
    s.install(direct_near, b"")
    await s.retransmit(direct_near, b"")
    await asyncio.wait_for(writer, 2)
    assert await direct_far.receive_some() == b"def"
    assert broken == []  # no relay resume was asked for


@pytest.mark.timeout(10)
async def test_fail_migration_falls_back_to_a_relay_resume() -> None:
    broken: list[ResumableStream] = []
    relay_near, _relay_far = memory_stream_pair()
    s = ResumableStream(9, relay_near, on_broken=broken.append)
    old = s.detach()
    s.fail_migration(old, "no echo")
    assert broken == [s]
    assert s.is_broken and "no echo" in s.broken_reason


async def test_nothing_to_detach_when_lost_or_broken() -> None:
    near, _far = memory_stream_pair()
    s = ResumableStream(1, near, on_broken=lambda _s: None)
    s.mark_broken("test")
    assert s.detach() is None
