"""Larger QUIC datagrams where the path allows them (transport/quic/path_mtu.py)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator

import pytest
from quicbackends import HAVE_QH3

from outrelay.transport import Stream
from outrelay.transport.quic import QuicConn, path_mtu, settings

from .listeners import Listener, dial_quic, listen_quic, open_and_accept, read_all
from .tlspki import Pki

pytestmark = pytest.mark.timeout(60)

FLOOR = settings.MAX_DATAGRAM_SIZE


@pytest.mark.parametrize(
    ("path", "peer", "expected"),
    [
        (None, None, FLOOR),  # the kernel cannot tell: stay safe
        (1472, None, FLOOR),  # an ordinary 1,500-byte Ethernet path
        (path_mtu.JUMBO_PAYLOAD - 1, None, FLOOR),
        (8972, None, 8972),  # a 9,000-byte jumbo LAN
        (65508, None, 16384),  # loopback: the cap
        (65508, 1452, 1452),  # a quic-go peer announces 1,452
        (65508, 1200, FLOOR),  # never below the start size
        (8972, 20000, 8972),
    ],
)
def test_choose_datagram_size(path: int | None, peer: int | None, expected: int) -> None:
    assert path_mtu.choose_datagram_size(path, peer, cap=16384, floor=FLOOR) == expected


def test_kernel_path_payload_of_loopback() -> None:
    payload = path_mtu.kernel_path_payload(("127.0.0.1", 443))
    # lo's MTU is 65,536 on Linux; minus 20 (IPv4) and 8 (UDP).
    assert payload is not None and payload >= path_mtu.JUMBO_PAYLOAD
    assert path_mtu.kernel_path_payload(("not an address", 1)) is None


@pytest.fixture
async def server(pki: Pki) -> AsyncIterator[Listener[QuicConn]]:
    listener = await listen_quic(pki)
    yield listener
    await listener.close()


async def _transfer(sender: Stream, receiver: Stream, size: int) -> None:
    """``size`` random bytes one way, then FIN; sha256 equal at the far end."""
    payload = os.urandom(size)

    async def send() -> None:
        await sender.send_all(payload)
        await sender.send_eof()

    async with asyncio.timeout(30):
        _, got = await asyncio.gather(send(), read_all(receiver))
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


async def test_both_ends_of_a_loopback_connection_send_large_datagrams(
    pki: Pki, server: Listener[QuicConn]
) -> None:
    client = await dial_quic("aioquic", server.port, pki.agent)
    peer = await server.accepted()
    try:
        assert isinstance(client, QuicConn)
        assert client.datagram_size == settings.LARGE_DATAGRAM_MAX
        assert peer.datagram_size == settings.LARGE_DATAGRAM_MAX
        stream, remote = await open_and_accept(client, peer)
        assert await remote.receive_some() == b"x"
        await _transfer(stream, remote, 3 << 20)
        await _transfer(remote, stream, 3 << 20)
    finally:
        client.close()


async def test_the_cap_can_turn_large_datagrams_off(
    pki: Pki, server: Listener[QuicConn], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings, "LARGE_DATAGRAM_MAX", settings.MAX_DATAGRAM_SIZE)
    client = await dial_quic("aioquic", server.port, pki.agent)
    peer = await server.accepted()
    try:
        assert isinstance(client, QuicConn)
        assert client.datagram_size == peer.datagram_size == settings.MAX_DATAGRAM_SIZE
    finally:
        client.close()


@pytest.mark.skipif(not HAVE_QH3, reason="qh3 is not installed")
async def test_a_peer_announcing_a_smaller_payload_is_never_sent_more(
    pki: Pki, server: Listener[QuicConn]
) -> None:
    """qh3 announces max_udp_payload_size 1,472: our server sends at most that to it."""
    client = await dial_quic("qh3", server.port, pki.agent)
    peer = await server.accepted()
    try:
        assert FLOOR <= peer.datagram_size <= 1472
        stream, remote = await open_and_accept(client, peer)
        assert await remote.receive_some() == b"x"
        await _transfer(remote, stream, 2 << 20)
    finally:
        client.close()


def test_a_black_hole_host_stays_small_for_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(path_mtu, "_suspects", {})  # this test's own memory
    host = "198.51.100.7"
    assert not path_mtu.suspected(host, 1000.0)
    path_mtu.note_black_hole(host, 1000.0)
    assert path_mtu.suspected(host, 1000.0 + path_mtu.SUSPECT_FOR - 1)
    assert not path_mtu.suspected(host, 1000.0 + path_mtu.SUSPECT_FOR)
    assert not path_mtu.suspected(host, 1000.0)  # forgotten once expired
    for i in range(path_mtu.SUSPECTS_MAX + 1):
        path_mtu.note_black_hole(f"h{i}", 5.0)
    assert not path_mtu.suspected("h0", 5.0)  # the oldest went first
    assert path_mtu.suspected(f"h{path_mtu.SUSPECTS_MAX}", 5.0)


def test_black_hole_detector() -> None:
    detector = path_mtu.BlackHoleDetector(FLOOR)
    assert not detector.lost(FLOOR, 0.0)  # small packets never count
    assert not detector.lost(9000, 0.0)
    assert not detector.lost(9000, 0.5)
    assert not detector.lost(9000, 0.9)  # three, but not for long enough
    detector.acked(FLOOR)  # a small one acknowledged proves nothing
    assert detector.lost(9000, 1.0)
    detector.acked(9000)  # congestion: a later large packet got through
    assert not detector.lost(9000, 5.0)
    assert not detector.lost(9000, 5.2)
    assert not detector.lost(9000, 5.4)
    assert detector.lost(9000, 6.0)
