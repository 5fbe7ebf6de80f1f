"""The forward-mode packet-socket wrapper (spec 03 §8.2): framing, registration, watchdog.

The core runs without sockets; one test runs end-to-end QUIC (ALPN
outrelay-fwd/1) through a real plane on 127.0.0.1, including a server that
speaks first.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from outrelay.agent.forward import (
    InvalidGrant,
    PlaneSocket,
    PlaneWrapper,
    parse_forward_endpoint,
)
from outrelay.pki import ClientVerifier, create_ca, issue_agent, load_certificates, write_identity
from outrelay.relay.plane import ForwardPlane
from outrelay.transport import QuicTlsConfig, accept_quic_on, connect_quic_on


def test_framing_prefixes_peer_allocation() -> None:
    w = PlaneWrapper(1, 0x01020304)
    assert w.wrap(b"quic") == b"\x01\x02\x03\x04quic"
    assert w.wrap(b"") == b"\x01\x02\x03\x04"
    assert w.received(b"payload", 0.0) == b"payload"  # passed up unchanged


def test_registration_datagram() -> None:
    assert PlaneWrapper(0xA0B0C0D0, 9).registration == b"\x00\x00\x00\x00\xa0\xb0\xc0\xd0"


@pytest.mark.parametrize(("mine", "peer"), [(0, 1), (1, 0), (0, 0), (1 << 32, 1)])
def test_invalid_allocations(mine: int, peer: int) -> None:
    with pytest.raises(InvalidGrant):
        PlaneWrapper(mine, peer)


def test_registration_retried_every_second_until_first_inbound_then_every_15s() -> None:
    w = PlaneWrapper(7, 8)
    assert w.poll(0.0) == []  # not started
    w.start(100.0)
    assert w.poll(100.0) == [w.registration]  # at once
    assert w.poll(100.5) == []
    assert w.next_deadline() == 101.0
    assert w.poll(101.0) == [w.registration]  # lost? again 1 s later
    assert w.poll(102.0) == [w.registration]
    w.received(b"x", 102.3)  # the plane knows us
    assert w.poll(103.0) == []
    assert w.next_deadline() == pytest.approx(103.3)  # at least the retry period after
    assert w.poll(103.3) == [w.registration]
    assert w.next_deadline() == pytest.approx(118.3)  # then the NAT refresh
    assert w.poll(110.0) == []
    assert w.poll(118.3) == [w.registration]
    assert w.statistics().registrations_sent == 5


def test_idle_watchdog() -> None:
    w = PlaneWrapper(1, 2, idle_timeout=20.0)
    assert w.watchdog_period == 5.0
    w.start(0.0)
    assert not w.idle_expired(20.0)
    assert w.idle_expired(20.1)
    w.received(b"x", 15.0)
    assert not w.idle_expired(30.0)
    assert w.idle_expired(35.5)
    assert PlaneWrapper(1, 2, idle_timeout=2.0).watchdog_period == 1.0
    off = PlaneWrapper(1, 2, idle_timeout=0)
    off.start(0.0)
    assert not off.idle_expired(1e9)


@pytest.mark.parametrize(
    ("endpoint", "relay", "expected"),
    [
        ("10.0.0.5:9443", "192.0.2.1", ("10.0.0.5", 9443)),
        ("0.0.0.0:9443", "192.0.2.1", ("192.0.2.1", 9443)),
        ("[::]:9443", "192.0.2.1", ("192.0.2.1", 9443)),
        ("[2001:db8::1]:9443", "192.0.2.1", ("2001:db8::1", 9443)),
    ],
)
def test_parse_endpoint(endpoint: str, relay: str, expected: tuple[str, int]) -> None:
    assert parse_forward_endpoint(endpoint, relay) == expected


@pytest.mark.parametrize("endpoint", ["relay.example:9443", ":0", "1.2.3.4", "1.2.3.4:0", ""])
def test_parse_endpoint_rejects(endpoint: str) -> None:
    with pytest.raises(InvalidGrant):
        parse_forward_endpoint(endpoint, "127.0.0.1")


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[QuicTlsConfig, QuicTlsConfig]:
    d: Path = tmp_path_factory.mktemp("fwd-pki")
    ca = create_ca()
    ca_file, _ = write_identity(d, "ca", ca)
    configs = []
    for name in ("consumer", "provider"):
        issued, _ = issue_agent(ca, tenant="acme")
        crt, key = write_identity(d, name, issued)
        configs.append(QuicTlsConfig(str(crt), str(key), str(ca_file)))
    return configs[0], configs[1]


@pytest.mark.timeout(30)
async def test_quic_over_the_plane_server_speaks_first(
    tls: tuple[QuicTlsConfig, QuicTlsConfig],
) -> None:
    """Provider writes first; consumer never writes before reading (no first-byte dependency)."""
    seen: list[bytes] = []
    plane = await ForwardPlane.bind("127.0.0.1", 0, observer=seen.append)
    relay = plane.address
    a_c, a_p = plane.allocate_pair()
    c_sock = await PlaneSocket.open(PlaneWrapper(a_c, a_p), relay)
    p_sock = await PlaneSocket.open(PlaneWrapper(a_p, a_c), relay)
    verifier = ClientVerifier(load_certificates(tls[1].ca_file))
    marker = b"PLAINTEXT-MARKER-" * 8
    try:
        accept = asyncio.create_task(
            accept_quic_on(
                p_sock,
                tls[1],
                verify_client=verifier.verify,
                accept_timeout=10,
                idle_timeout=45,
                keepalive_interval=15,
                silence_timeout=20,
            )
        )
        client = await connect_quic_on(
            c_sock,
            tls[0],
            handshake_timeout=10,
            idle_timeout=45,
            keepalive_interval=15,
            silence_timeout=20,
        )
        server = await accept
        assert server.identity and server.identity.startswith("outrelay://acme/")
        c_stream = await client.open_stream()  # no byte written
        async with asyncio.timeout(5):
            p_stream = await server.accept_stream()  # announced by an empty STREAM frame
        await p_stream.send_all(b"220 " + marker)
        got = b""
        async with asyncio.timeout(5):
            while len(got) < 4 + len(marker):
                got += await c_stream.receive_some()
        assert got == b"220 " + marker
        await c_stream.send_all(marker)
        await c_stream.send_eof()
        echoed = b""
        async with asyncio.timeout(5):
            while chunk := await p_stream.receive_some():
                echoed += chunk
        assert echoed == marker
        assert seen and all(marker[:16] not in d for d in seen)  # ciphertext only
        assert c_sock.core.statistics().first_inbound
        client.close()
        server.close()
    finally:
        c_sock.close()
        p_sock.close()
        plane.close()


@pytest.mark.timeout(30)
async def test_accept_is_bounded(tls: tuple[QuicTlsConfig, QuicTlsConfig]) -> None:
    plane = await ForwardPlane.bind("127.0.0.1", 0)
    sock = await PlaneSocket.open(PlaneWrapper(1, 2), plane.address)
    verifier = ClientVerifier(load_certificates(tls[1].ca_file))
    try:
        from outrelay.transport import BrokenResourceError

        with pytest.raises(BrokenResourceError):
            await accept_quic_on(
                sock,
                tls[1],
                verify_client=verifier.verify,
                accept_timeout=0.3,
                idle_timeout=45,
                keepalive_interval=15,
                silence_timeout=20,
            )
    finally:
        sock.close()
        plane.close()
