"""The forward plane's core (spec 02 §8), without sockets, and its UDP shell on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket

import pytest

from outrelay.relay.plane import ForwardPlane, PlaneCore, format_endpoint

A = ("127.0.0.1", 4001)
B = ("127.0.0.1", 4002)


def reg(alloc: int) -> bytes:
    return b"\x00\x00\x00\x00" + alloc.to_bytes(4, "big")


def data(alloc: int, payload: bytes) -> bytes:
    return alloc.to_bytes(4, "big") + payload


def test_counter_starts_at_one_and_skips_zero_on_wrap() -> None:
    core = PlaneCore()
    assert [core.allocate() for _ in range(3)] == [1, 2, 3]
    core = PlaneCore(next_allocation=0xFFFFFFFF)
    assert core.allocate() == 0xFFFFFFFF
    assert core.allocate() == 1


def test_allocating_creates_no_entry() -> None:
    core = PlaneCore()
    a = core.allocate()
    assert core.lookup(a) is None
    assert core.datagram_received(data(a, b"x"), B, 0.0) is None
    assert core.statistics().dropped_datagrams == 1


def test_short_datagrams_are_dropped() -> None:
    core = PlaneCore()
    for raw in (b"", b"\x00", b"\x00\x00\x01"):
        assert core.datagram_received(raw, A, 0.0) is None
    # A registration shorter than 8 bytes is dropped too.
    assert core.datagram_received(b"\x00\x00\x00\x00\x00\x01", A, 0.0) is None
    assert core.statistics().registrations == 0
    assert core.statistics().dropped_datagrams == 4


def test_register_then_forward_strips_the_prefix() -> None:
    core = PlaneCore()
    assert core.datagram_received(reg(7) + b"ignored", A, 0.0) is None  # no reply
    assert core.lookup(7) == A
    assert core.datagram_received(data(7, b"payload"), B, 1.0) == (b"payload", A)
    # A 4-byte datagram forwards an empty one.
    assert core.datagram_received(data(7, b""), B, 1.0) == (b"", A)
    stats = core.statistics()
    assert (stats.forwarded_datagrams, stats.forwarded_bytes) == (2, 7)


def test_unknown_allocation_is_dropped_silently() -> None:
    core = PlaneCore()
    core.datagram_received(reg(1), A, 0.0)
    assert core.datagram_received(data(2, b"x"), A, 0.0) is None


def test_reregistration_from_a_new_address_replaces_the_old_one() -> None:
    core = PlaneCore()
    core.datagram_received(reg(5), A, 0.0)
    core.datagram_received(reg(5), B, 1.0)
    assert core.datagram_received(data(5, b"x"), A, 2.0) == (b"x", B)


def test_any_id_can_be_registered_even_zero() -> None:
    core = PlaneCore()
    core.datagram_received(reg(0), A, 0.0)
    assert core.lookup(0) == A


def test_release_forgets_both_and_a_later_registration_recreates() -> None:
    core = PlaneCore()
    a, b = core.allocate(), core.allocate()
    core.datagram_received(reg(a), A, 0.0)
    core.datagram_received(reg(b), B, 0.0)
    core.release(a, b, 999)
    assert core.lookup(a) is None and core.lookup(b) is None
    core.datagram_received(reg(a), A, 1.0)
    assert core.lookup(a) == A


def test_idle_registrations_expire_but_refreshes_and_traffic_keep_them() -> None:
    core = PlaneCore(idle_timeout=60.0)
    core.datagram_received(reg(1), A, 0.0)
    core.datagram_received(reg(2), B, 0.0)
    core.datagram_received(reg(3), ("127.0.0.1", 4003), 0.0)
    core.datagram_received(reg(1), A, 50.0)  # refresh
    core.datagram_received(data(1, b"x"), B, 55.0)  # B sends: its own entry (2) stays fresh
    assert core.expire(61.0) == [3]
    assert core.lookup(1) == A and core.lookup(2) == B
    assert sorted(core.expire(200.0)) == [1, 2]


def test_idle_expiry_disabled() -> None:
    core = PlaneCore(idle_timeout=0)
    core.datagram_received(reg(1), A, 0.0)
    assert core.expire(1e9) == []


def test_format_endpoint() -> None:
    assert format_endpoint(("127.0.0.1", 9443)) == "127.0.0.1:9443"
    assert format_endpoint(("::", 9443, 0, 0)) == "[::]:9443"


@pytest.mark.timeout(10)
async def test_shell_forwards_between_two_sockets() -> None:
    seen: list[bytes] = []
    plane = await ForwardPlane.bind("127.0.0.1", 0, observer=seen.append)
    try:
        host, port = plane.address
        assert plane.endpoint == f"127.0.0.1:{port}"
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for s in (a, b):
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            a.sendto(reg(1), (host, port))
            b.sendto(reg(2), (host, port))
            await asyncio.sleep(0.05)
            a.sendto(data(2, b"to-b"), (host, port))
            got, src = await asyncio.wait_for(loop.sock_recvfrom(b, 100), 5)
            assert got == b"to-b" and src == (host, port)
            b.sendto(data(1, b"to-a"), (host, port))
            got, _ = await asyncio.wait_for(loop.sock_recvfrom(a, 100), 5)
            assert got == b"to-a"
            assert seen == [b"to-b", b"to-a"]
        finally:
            a.close()
            b.close()
    finally:
        plane.close()
