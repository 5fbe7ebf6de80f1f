"""The shared UDP socket (spec 03 §2.3): client and server QUIC roles on one port.

Real sockets on 127.0.0.1: an agent's endpoint dials a relay *and* a peer's
endpoint from the same port, serves a direct dial from that peer at the same
time, drops punch bytes and garbage without disturbing any connection, and
refuses clients without an acceptable certificate.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from outrelay.pki import ClientVerifier, create_ca, issue_agent
from outrelay.transport import BrokenResourceError, Stream
from outrelay.transport.quic import QuicConn
from outrelay.transport.quic.shared_udp import (
    PUNCH,
    OtherFamily,
    SharedUdpEndpoint,
    is_quic_datagram,
    open_shared_udp,
)

from .listeners import listen_quic, read_all
from .tlspki import Pki

pytestmark = pytest.mark.timeout(60)


@dataclass
class Side:
    endpoint: SharedUdpEndpoint
    inbound: asyncio.Queue[QuicConn] = field(default_factory=asyncio.Queue)
    refused: list[str] = field(default_factory=list)


async def _endpoint(pki: Pki, name: str) -> Side:
    issued, _ = issue_agent(pki.ca, tenant="acme")
    tls = pki.client(name, issued)
    verifier = ClientVerifier([pki.ca.cert])
    inbound: asyncio.Queue[QuicConn] = asyncio.Queue()
    refused: list[str] = []
    endpoint = await open_shared_udp(
        "127.0.0.1",
        0,
        tls,
        verify_client=verifier.verify,
        on_connection=inbound.put_nowait,
        on_refused=lambda addr, why: refused.append(why),
    )
    return Side(endpoint, inbound, refused)


@pytest.fixture
async def sides(pki: Pki) -> AsyncIterator[tuple[Side, Side]]:
    a, b = await _endpoint(pki, "a"), await _endpoint(pki, "b")
    yield a, b
    a.endpoint.close()
    b.endpoint.close()
    await asyncio.sleep(0.15)


async def _echo_once(stream: Stream, payload: bytes) -> bytes:
    await stream.send_all(payload)
    await stream.send_eof()
    return await read_all(stream)


async def _serve_echo(conn: QuicConn) -> None:
    stream = await conn.accept_stream()
    data = bytearray()
    while chunk := await stream.receive_some():
        data += chunk
    await stream.send_all(bytes(data))
    await stream.send_eof()


def test_only_datagrams_with_the_fixed_bit_look_like_quic() -> None:
    assert not is_quic_datagram(PUNCH)
    assert not is_quic_datagram(b"\x00" * 1200)  # fixed bit clear
    assert not is_quic_datagram(b"\x40" * 5)  # too short for any packet of ours
    assert is_quic_datagram(b"\xc0" + b"\x00" * 1199)


async def test_relay_and_peer_connections_share_one_port(
    pki: Pki, sides: tuple[Side, Side]
) -> None:
    a, b = sides
    relay = await listen_quic(pki)
    try:
        to_relay = await a.endpoint.connect("127.0.0.1", relay.port, pki.agent)
        seen_by_relay = await relay.accepted()
        # The relay sees the shared port: that is the srflx mapping a peer must dial.
        assert seen_by_relay.peer.address == a.endpoint.address

        to_peer = await a.endpoint.connect(*b.endpoint.address)
        at_peer = await asyncio.wait_for(b.inbound.get(), 5)
        assert at_peer.peer.address == a.endpoint.address
        assert at_peer.identity.startswith("outrelay://acme/agent/")

        # Interleave traffic on both, with stray punches and garbage in between.
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for _ in range(20):
                raw.sendto(PUNCH, a.endpoint.address)
                raw.sendto(b"\x40" + b"\xff" * 1300, a.endpoint.address)  # unknown CID
            b.endpoint.send_raw(PUNCH, *a.endpoint.address)
            peer_echo = asyncio.create_task(_serve_echo(at_peer))
            relay_echo = asyncio.create_task(_serve_echo(seen_by_relay))
            payload = bytes(range(256)) * 4096  # 1 MiB
            got_peer, got_relay = await asyncio.gather(
                _echo_once(await to_peer.open_stream(), payload),
                _echo_once(await to_relay.open_stream(), payload[::-1]),
            )
            await asyncio.gather(peer_echo, relay_echo)
        finally:
            raw.close()
        assert got_peer == payload
        assert got_relay == payload[::-1]
        assert a.endpoint.dropped >= 21
    finally:
        await relay.close()


async def test_inbound_dial_needs_a_certificate_from_our_ca(
    pki: Pki, sides: tuple[Side, Side], tmp_path: object
) -> None:
    a, b = sides
    stranger_ca = create_ca()
    issued, _ = issue_agent(stranger_ca, tenant="acme")
    foreign = pki.client("stranger", issued)
    with pytest.raises(BrokenResourceError):
        conn = await b.endpoint.connect(*a.endpoint.address, foreign, handshake_timeout=3)
        # aioquic's client may complete before the server's verdict: then it is closed at once.
        await asyncio.wait_for(conn.wait_closed(), 3)
        raise BrokenResourceError(conn.close_reason)
    await asyncio.sleep(0.2)
    assert a.inbound.empty()
    assert a.refused


async def test_an_ipv6_address_from_an_ipv4_socket_is_told_apart(
    sides: tuple[Side, Side],
) -> None:
    """The session falls back to a socket of its own on OtherFamily (an IPv6 relay)."""
    a, _ = sides
    with pytest.raises(OtherFamily):
        await a.endpoint.connect("::1", 7443)


async def test_a_closed_endpoint_refuses_new_dials(pki: Pki, sides: tuple[Side, Side]) -> None:
    a, b = sides
    a.endpoint.close()
    with pytest.raises(BrokenResourceError):
        await a.endpoint.connect(*b.endpoint.address)
    with pytest.raises(OSError):
        a.endpoint.send_raw(PUNCH, *b.endpoint.address)


async def test_a_cancelled_dial_leaves_no_live_connection(
    pki: Pki, sides: tuple[Side, Side]
) -> None:
    """A losing connectivity check is cancelled mid-handshake: it must not finish later."""
    a, b = sides
    dial = asyncio.create_task(a.endpoint.connect(*b.endpoint.address))
    await asyncio.sleep(0)  # the dial has sent its Initial
    await asyncio.sleep(0.001)
    dial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await dial
    await asyncio.sleep(1.5)
    assert a.endpoint.routed_ids == 0  # every id of the dial is unrouted
    while not b.inbound.empty():  # the peer may have completed its side: it must be closed
        conn = b.inbound.get_nowait()
        await asyncio.wait_for(conn.wait_closed(), 5)
