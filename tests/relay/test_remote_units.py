"""Units of the inter-relay pieces: remote pair sides, peer control channels, the peer pool."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from outrelay.orp import FrameType, encode_message
from outrelay.relay.outbox import ControlOutbox
from outrelay.relay.peers import PeerPool, PeerUnreachable, split_endpoint
from outrelay.relay.remote import PeerControls, RemoteMember, RemoteSides
from outrelay.transport import BrokenResourceError, QuicTlsConfig
from outrelay.transport.memory import MemoryStream, memory_stream_pair

pytestmark = pytest.mark.timeout(10)


def test_remote_sides_live_then_closed_for_the_ttl() -> None:
    sides = RemoteSides(ttl_ms=100)
    sides.mark(7, "outrelay://acme/p", "r2")
    sides.mark(0, "outrelay://acme/x", "r2")  # stream id 0 is never recorded
    assert len(sides) == 1
    assert sides.get(7, 10**9) == RemoteMember("outrelay://acme/p", "r2")  # live: no expiry
    assert sides.relay_of(7, "outrelay://acme/p", 0) == "r2"
    assert sides.relay_of(7, "outrelay://acme/c", 0) is None  # the local member
    sides.unmark(7, 1000)
    assert len(sides) == 0
    assert sides.relay_of(7, "outrelay://acme/p", 1099) == "r2"  # close-acks still route
    assert sides.get(7, 1100) is None
    assert sides.get(0, 0) is None


def test_remote_sides_closed_marks_are_bounded() -> None:
    sides = RemoteSides(ttl_ms=10_000, capacity=2)
    for sid in (1, 2, 3):
        sides.mark(sid, "u", "r")
        sides.unmark(sid, 5)
    assert sides.get(1, 5) is None
    assert sides.get(2, 5) is not None and sides.get(3, 5) is not None


def test_remote_sides_a_new_mark_revives_a_closed_one() -> None:
    sides = RemoteSides(ttl_ms=100)
    sides.mark(5, "u", "r1")
    sides.unmark(5, 0)
    sides.mark(5, "u", "r2")
    assert sides.get(5, 10_000) == RemoteMember("u", "r2")


async def test_peer_controls_post_to_a_live_channel_newest_first() -> None:
    controls = PeerControls()
    assert not controls.post_raw("r2", b"x", droppable=False)
    old_local, _ = memory_stream_pair()
    new_local, _ = memory_stream_pair()
    old = ControlOutbox(old_local, on_overflow=lambda _: None)
    new = ControlOutbox(new_local, on_overflow=lambda _: None)
    controls.add("r2", old)
    controls.add("r2", new)
    assert controls.post_raw("r2", b"frame", droppable=False)
    assert new.statistics().queued_frames == 1 and old.statistics().queued_frames == 0
    new.close()  # a dead channel is skipped
    assert controls.post_raw("r2", b"frame", droppable=False)
    assert old.statistics().queued_frames == 1
    controls.remove("r2", old)
    controls.remove("r2", new)
    assert "r2" not in controls
    assert controls.posted == 2


class FakeConn:
    def __init__(self, control_fails: bool = False) -> None:
        self.is_closed = False
        self.control_fails = control_fails
        self.peer_side: list[MemoryStream] = []

    async def open_stream(self) -> MemoryStream:
        if self.control_fails:
            raise BrokenResourceError("connection lost")
        ours, theirs = memory_stream_pair()
        self.peer_side.append(theirs)
        return ours

    def close(self, code: int = 0, reason: str = "") -> None:
        self.is_closed = True


class FakeDialler:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.fail = False
        self.control_fails = False
        self.gate: asyncio.Event | None = None
        self.made: list[FakeConn] = []

    async def __call__(self, host: str, port: int, tls: Any, **kwargs: Any) -> FakeConn:
        self.calls.append((host, port))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise BrokenResourceError("handshake failed")
        conn = FakeConn(self.control_fails)
        self.made.append(conn)
        return conn


def _pool(dialler: FakeDialler, seen: list[str]) -> PeerPool:
    endpoints = {"r2": "127.0.0.1:7443", "bad": "nonsense"}
    return PeerPool(
        QuicTlsConfig("c", "k", "ca"),
        endpoints.get,
        lambda relay_id, conn, control: seen.append(relay_id),
        connect=dialler,
    )


async def test_pool_dials_once_and_shares_the_dial() -> None:
    dialler, seen = FakeDialler(), []
    pool = _pool(dialler, seen)
    dialler.gate = asyncio.Event()
    opens = [asyncio.create_task(pool.connection("r2")) for _ in range(3)]
    await asyncio.sleep(0)
    dialler.gate.set()
    conns = await asyncio.gather(*opens)
    assert conns[0] is conns[1] is conns[2]
    assert await pool.connection("r2") is conns[0]
    assert dialler.calls == [("127.0.0.1", 7443)] and seen == ["r2"] and pool.dials == 1
    # The dial opened the PEER_CONTROL stream before anyone could forward.
    control = await dialler.made[0].peer_side[0].receive_some(64)
    assert control == encode_message(FrameType.PEER_CONTROL)


async def test_pool_a_connection_without_its_control_stream_is_not_pooled() -> None:
    dialler, seen = FakeDialler(), []
    pool = _pool(dialler, seen)
    dialler.control_fails = True
    with pytest.raises(PeerUnreachable):
        await pool.connection("r2")
    assert dialler.made[0].is_closed and pool.pooled("r2") is None and not seen


async def test_pool_does_not_cache_failed_dials_and_redials_dead_connections() -> None:
    dialler, seen = FakeDialler(), []
    pool = _pool(dialler, seen)
    dialler.fail = True
    with pytest.raises(PeerUnreachable):
        await pool.connection("r2")
    dialler.fail = False
    first = await pool.connection("r2")
    first.close()
    second = await pool.connection("r2")
    assert second is not first and len(dialler.calls) == 3
    pool.drop("r2", second, "test")
    assert second.is_closed and pool.pooled("r2") is None
    with pytest.raises(PeerUnreachable):
        await pool.connection("r9")  # not in the registry
    with pytest.raises(PeerUnreachable):
        await pool.connection("bad")  # not host:port
    pool.close()
    with pytest.raises(PeerUnreachable):
        await pool.connection("r2")


def test_split_endpoint() -> None:
    assert split_endpoint("10.0.0.1:7443") == ("10.0.0.1", 7443)
    assert split_endpoint("[::1]:7443") == ("::1", 7443)
    for bad in ("host", ":7443", "host:port"):
        with pytest.raises(ValueError):
            split_endpoint(bad)
