"""Spec-driven tests of the relay's P2P control frames, against a real in-process relay.

Written from ``/work/shared/spec/02-relay.md`` (§2.3, §3, §5, §7.1-§7.6, §15) and
``01-wire-and-transport.md``, not from the relay's code. The clients here are raw: they
speak mTLS QUIC (``connect_quic``) and build and parse frames and protobuf payloads by
hand (8-byte header, hand-rolled varints), so a relay that re-encodes, reorders or drops
bytes shows up as a byte difference.

Our deliberate deviations from the reference are tested as ours:

* p2p_mode FORBIDDEN: a CANDIDATE_OFFER is not forwarded; the offerer gets an empty
  CANDIDATE_ANSWER with the same stream_id at once (the reference forwards, §7.6);
* HELLO capability ``"p2p-mode"``: HELLO_ACK carries ``accepted_features=["p2p-mode"]``
  and that agent's STREAM_READY carries field 100 (``outrelay_p2p_mode``) = P2PMode + 1;
  an agent without it gets the reference's empty HELLO_ACK and plain STREAM_READY.

Three differences from the spec found by this file were fixed in the relay: the REQUIRED
timer now starts before the provider answers (§7.5), a P->C write after the REQUIRED FIN
no longer resets the provider's stream (§7.5), and a stranger's offer for a FORBIDDEN
stream id is dropped, not answered (§5).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import socket

import pytest

from .meshrelays import mesh_relays
from .rawagent import (
    CANDIDATE_ANSWER,
    CANDIDATE_OFFER,
    MIGRATE_TO_P2P,
    MODE_VALUE,
    OBSERVED_ADDR_QUERY,
    OBSERVED_ADDR_RESP,
    P2P_MODE_FIELD,
    STREAM_READY,
    WAIT,
    Pki,
    TransportError,
    frame,
    live_pair,
    new_sid,
    open_pair,
    pb_bytes,
    pb_int,
    policy_rules,
    running_relay,
)

pytestmark = pytest.mark.timeout(60)


def candidates_payload(sid: int) -> bytes:
    """A CANDIDATE_* payload the relay must not touch: odd kinds, a non-IP ip, an unknown
    field inside a candidate and at top level, and stream_id *after* the candidates (a
    protobuf re-encoder would move it first)."""
    cand1 = pb_bytes(1, "host") + pb_bytes(2, "10.1.2.3") + pb_int(3, 40001) + pb_int(4, 100)
    cand2 = (
        pb_bytes(1, "quantum-tunnel")
        + pb_bytes(2, "definitely not an ip")
        + pb_int(3, 70000)
        + pb_int(4, 2**32 - 1)
        + pb_bytes(15, b"\x00\xffextension")
    )
    cand3 = pb_bytes(1, "") + pb_bytes(2, "[fe80::1%eth0]") + pb_int(3, 0)
    return (
        pb_bytes(2, cand1)
        + pb_bytes(2, cand2)
        + pb_bytes(2, cand3)
        + pb_int(9, 12345)
        + pb_int(1, sid)
    )


# -- HELLO (§2.3) and the p2p-mode capability (ours) --------------------------------------


async def test_hello_without_capabilities_gets_reference_empty_ack(pki: Pki) -> None:
    async with running_relay(pki) as h:
        plain = await h.agent()
        assert plain.hello_ack is not None
        assert plain.hello_ack.raw == bytes.fromhex("20 02 00 00 00 00 00 00")
        # protocol_version and unknown capabilities are ignored (§2.3, §14).
        odd = await h.agent(["x-unknown", "p2p"], protocol_version="orp/99")
        assert odd.hello_ack is not None
        assert odd.hello_ack.raw == bytes.fromhex("20 02 00 00 00 00 00 00")
        await odd.ping_pong()


async def test_hello_p2p_mode_capability_is_accepted_alone(pki: Pki) -> None:
    async with running_relay(pki) as h:
        for caps in (["p2p-mode"], ["zz-first", "p2p-mode", "x-other"]):
            agent = await h.agent(caps)
            ack = agent.hello_ack
            assert ack is not None
            assert (ack.version, ack.reserved, ack.flags) == (1, 0, 0)
            # session_id "" and server_time 0 stay unset; only accepted_features (3).
            assert ack.fields() == [(3, b"p2p-mode")]
            await agent.ping_pong()


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        (None, "allowed"),  # no policy: every stream is p2p=allowed (§1 --tenant)
        (policy_rules("allowed"), "allowed"),
        (policy_rules("forbidden"), "forbidden"),
        (policy_rules("required"), "required"),
        # combine(): FORBIDDEN > REQUIRED > ALLOWED, symmetric (§6.2.4)
        (policy_rules("required", "forbidden"), "forbidden"),
        (policy_rules("allowed", "required"), "required"),
    ],
    ids=["no-policy", "allowed", "forbidden", "required", "req+forb", "allow+req"],
)
async def test_stream_ready_carries_p2p_mode_only_for_capable_agent(
    pki: Pki, rules: list[dict] | None, expected: str
) -> None:
    async with running_relay(pki, rules) as h:
        capable = await h.agent(["p2p-mode"])
        plain = await h.agent()
        sid = 0xFEEDFACE
        # capable consumer, plain provider
        await plain.register("svc-ready")
        pair = await open_pair(capable, plain, "svc-ready", sid)
        assert (pair.c_ready.version, pair.c_ready.flags) == (1, 0)
        assert pair.c_ready.fields() == [(1, sid), (P2P_MODE_FIELD, MODE_VALUE[expected])]
        # the plain agent's STREAM_READY is the reference's, byte for byte (spec 02 §0)
        assert pair.p_ready.raw == bytes.fromhex("21 52 00 00 00 00 00 06 08 ce f5 b7 f7 0f")
        await pair.exchange(b"one")
        # the other way round: plain consumer, capable provider
        await capable.register("svc-ready-2")
        sid2 = new_sid()
        pair2 = await open_pair(plain, capable, "svc-ready-2", sid2)
        assert pair2.c_ready.fields() == [(1, sid2)]
        assert pair2.p_ready.fields() == [(1, sid2), (P2P_MODE_FIELD, MODE_VALUE[expected])]
        await pair2.exchange(b"two")


# -- OBSERVED_ADDR (§7.1) -------------------------------------------------------------------


async def test_observed_addr_echoes_request_id_and_udp_source(pki: Pki) -> None:
    async with running_relay(pki) as h:
        agent = await h.agent()
        ids = [2**64 - 1, 7, 0, 0x0123456789ABCDEF]
        await agent.send(b"".join(frame(OBSERVED_ADDR_QUERY, pb_int(1, i)) for i in ids))
        for request_id in ids:
            resp = await agent.next_frame()
            assert resp.type == OBSERVED_ADDR_RESP
            got = dict(resp.fields())
            assert got.get(1, 0) == request_id
            assert got[2] == b"127.0.0.1"
            assert re.fullmatch(rb"\d{1,3}(\.\d{1,3}){3}", got[2])
            assert got[3] == agent.local_port()
        # Independent of registrations and pairs, and the connection stays usable.
        await agent.ping_pong()


def _ipv6_loopback_usable() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback_usable(), reason="no IPv6 loopback")
async def test_observed_addr_on_dual_stack_listener(pki: Pki) -> None:
    """IPv4 clients on a dual-stack socket are dotted quad; IPv6 has no brackets (§7.1)."""
    async with running_relay(pki, listen_host="::") as h:
        v4 = await h.agent(host="127.0.0.1")
        v6 = await h.agent(host="::1")
        for agent, expected in ((v4, "127.0.0.1"), (v6, "::1")):
            await agent.send(frame(OBSERVED_ADDR_QUERY, pb_int(1, 42)))
            got = dict((await agent.next_frame()).fields())
            assert got[1] == 42
            assert got[2].decode() == expected
            assert str(ipaddress.ip_address(got[2].decode())) == expected
            assert got[3] == agent.local_port()


# -- CANDIDATE_OFFER / CANDIDATE_ANSWER forwarding (§5, §7.2) -------------------------------


@pytest.mark.parametrize(
    "rules",
    [None, policy_rules("allowed"), policy_rules("required")],
    ids=["no-policy", "allowed", "required"],
)
async def test_candidates_forwarded_byte_for_byte_both_ways(
    pki: Pki, rules: list[dict] | None
) -> None:
    async with running_relay(pki, rules) as h:
        consumer, provider, pair = await live_pair(h)
        payload = candidates_payload(pair.sid)
        # consumer -> provider: OFFER; provider -> consumer: ANSWER
        offer = frame(CANDIDATE_OFFER, payload)
        await consumer.send(offer)
        assert (await provider.next_frame()).raw == offer
        answer = frame(CANDIDATE_ANSWER, payload + pb_bytes(2, pb_bytes(1, "srflx")))
        await provider.send(answer)
        assert (await consumer.next_frame()).raw == answer
        # and the other way round (either side may offer)
        await provider.send(offer)
        assert (await consumer.next_frame()).raw == offer
        await consumer.send(answer)
        assert (await provider.next_frame()).raw == answer
        # an offer with no candidates at all is forwarded too
        bare = frame(CANDIDATE_OFFER, pb_int(1, pair.sid))
        await consumer.send(bare)
        assert (await provider.next_frame()).raw == bare
        # no reply to the sender, the splice untouched
        await consumer.ping_pong()
        await provider.ping_pong()
        await pair.exchange(b"after-candidates")


async def test_forwarded_header_keeps_version_and_flags_clears_reserved(pki: Pki) -> None:
    """§0: the relay re-serialises: version, type, flags, payload kept; reserved bits 0."""
    async with running_relay(pki) as h:
        consumer, provider, pair = await live_pair(h)
        payload = candidates_payload(pair.sid)
        await consumer.send(frame(CANDIDATE_OFFER, payload, flags=0xBEEF, reserved=3))
        assert (await provider.next_frame()).raw == frame(CANDIDATE_OFFER, payload, flags=0xBEEF)
        await provider.send(frame(CANDIDATE_ANSWER, payload, version=2, flags=1))
        assert (await consumer.next_frame()).raw == frame(
            CANDIDATE_ANSWER, payload, version=2, flags=1
        )


async def test_candidates_for_unknown_stream_or_zero_id_dropped_silently(pki: Pki) -> None:
    async with running_relay(pki) as h:
        consumer, provider, pair = await live_pair(h)
        unknown = pair.sid ^ 0xFFFF
        await consumer.send(frame(CANDIDATE_OFFER, candidates_payload(unknown)))
        await consumer.send(frame(CANDIDATE_ANSWER, candidates_payload(unknown)))
        await consumer.ping_pong()  # nothing came back, connection up
        await provider.ping_pong()  # nothing was forwarded
        # stream_id 0: a live splice with id 0 is never in the pair table (§5)
        await provider.register("svc-zero")
        zero = await open_pair(consumer, provider, "svc-zero", 0)
        assert zero.c_ready.raw == frame(STREAM_READY)
        await consumer.send(frame(CANDIDATE_OFFER, candidates_payload(0)))
        await provider.send(frame(CANDIDATE_ANSWER, candidates_payload(0)))
        await consumer.ping_pong()
        await provider.ping_pong()
        await consumer.ping_pong()
        # an undecodable payload is dropped too (§5 step 1), the loop goes on
        await consumer.send(frame(CANDIDATE_OFFER, b"\x0a\xff\xff"))
        await consumer.ping_pong()
        await provider.ping_pong()
        await zero.exchange(b"zero")
        await pair.exchange(b"still")


async def test_candidates_from_agent_outside_pair_dropped_silently(pki: Pki) -> None:
    async with running_relay(pki) as h:
        consumer, provider, pair = await live_pair(h)
        stranger = await h.agent()
        await stranger.send(frame(CANDIDATE_OFFER, candidates_payload(pair.sid)))
        await stranger.send(frame(CANDIDATE_ANSWER, candidates_payload(pair.sid)))
        await stranger.ping_pong()
        await consumer.ping_pong()
        await provider.ping_pong()
        await pair.exchange(b"undisturbed")


# -- MIGRATE_TO_P2P (§7.3) ------------------------------------------------------------------


async def test_migrate_to_p2p_no_reply_and_splice_kept(pki: Pki) -> None:
    async with running_relay(pki) as h:
        consumer, provider, pair = await live_pair(h)
        selected = pb_bytes(1, "host") + pb_bytes(2, "127.0.0.1") + pb_int(3, 5555)
        migrate = pb_int(1, pair.sid) + pb_int(2, 4) + pb_int(3, 9) + pb_bytes(4, selected)
        await consumer.send(frame(MIGRATE_TO_P2P, migrate))
        await consumer.ping_pong()
        await provider.ping_pong()  # not forwarded either
        await provider.send(frame(MIGRATE_TO_P2P, migrate))  # a repeat, from the other side
        await provider.ping_pong()
        await consumer.ping_pong()
        await pair.c.assert_open()
        await pair.p.assert_open()
        for i in range(3):
            await pair.exchange(b"after-migrate-%d" % i)


# -- P2P_REQUIRED (§7.5) --------------------------------------------------------------------


async def test_required_fins_consumer_after_10s_unless_migrated(pki: Pki) -> None:
    """No MIGRATE_TO_P2P: C's data stream sees EOF ~10 s after the open. One sent early
    (by the provider after STREAM_READY, or by the consumer even before the open) keeps
    the stream alive past the deadline."""
    async with running_relay(pki, policy_rules("required")) as h:
        consumer = await h.agent()
        provider = await h.agent()
        await provider.register("svc-req")
        loop = asyncio.get_running_loop()

        early_sid = new_sid()  # migrated before the open: "predates this open" (§7.5)
        await consumer.send(frame(MIGRATE_TO_P2P, pb_int(1, early_sid)))
        await consumer.ping_pong()

        plain = await open_pair(consumer, provider, "svc-req", new_sid())
        migrated = await open_pair(consumer, provider, "svc-req", new_sid())
        early = await open_pair(consumer, provider, "svc-req", early_sid)
        for pair in (plain, migrated, early):
            assert pair.c_ready.fields() == [(1, pair.sid)]  # plain agents: no extension
        await provider.send(frame(MIGRATE_TO_P2P, pb_int(1, migrated.sid)))
        await provider.ping_pong()  # no reply
        # The stream works normally until the deadline (the open is not rejected).
        for pair in (plain, migrated, early):
            await pair.exchange(b"before")

        await plain.c.wait_eof(within=14.5 - (loop.time() - plain.opened_at))
        fin_after = loop.time() - plain.opened_at
        assert 9.0 <= fin_after <= 14.0, f"EOF {fin_after:.2f}s after the open"

        # Past every deadline (10 s + a few polls) the migrated streams are intact.
        await asyncio.sleep(max(0.0, migrated.opened_at + 11.0 - loop.time()))
        for pair in (migrated, early):
            await pair.c.assert_open(0.1)
            await pair.exchange(b"after")
        await consumer.ping_pong()
        await provider.ping_pong()


async def test_required_timer_starts_before_provider_accepts(pki: Pki) -> None:
    """With the timeout overridden to 3 s (spec: "overridable in tests") and the provider
    accepting after 2 s, C's FIN must come ~3 s after the open, not ~5 s."""
    async with running_relay(pki, policy_rules("required"), required_timeout=3.0) as h:
        consumer = await h.agent()
        provider = await h.agent()
        await provider.register("svc-slow")
        loop = asyncio.get_running_loop()
        pair = await open_pair(consumer, provider, "svc-slow", new_sid(), accept_delay=2.0)
        await pair.c.wait_eof(within=6.0)
        fin_after = loop.time() - pair.opened_at
        assert 2.5 <= fin_after <= 4.0, f"EOF {fin_after:.2f}s after the open"


async def test_required_timeout_fins_only_consumer_direction(pki: Pki) -> None:
    """§7.5 effect: C sees EOF; P->C then ends, but C->P keeps flowing until C closes,
    and P sees a FIN (not a reset) only after that. Timeout overridden to 2 s."""
    async with running_relay(pki, policy_rules("required"), required_timeout=2.0) as h:
        consumer = await h.agent()
        provider = await h.agent()
        await provider.register("svc-fin")
        pair = await open_pair(consumer, provider, "svc-fin", new_sid())
        await pair.c.wait_eof(within=6.0)
        await pair.p.assert_open(0.2)  # P has not been told anything yet
        with contextlib.suppress(TransportError):
            await pair.p.stream.send_all(b"too late")  # P->C: that direction ends
        await asyncio.sleep(0.3)
        await pair.c.stream.send_all(b"c2p still flowing")
        assert await pair.p.read_exact(17) == b"c2p still flowing"
        await pair.c.stream.send_eof()
        await pair.p.wait_eof(within=WAIT)


# -- P2P_FORBIDDEN (§7.6 and our deviation) -------------------------------------------------


async def test_forbidden_offer_answered_empty_not_forwarded(pki: Pki) -> None:
    async with running_relay(pki, policy_rules("forbidden")) as h:
        consumer, provider, pair = await live_pair(h)
        payload = candidates_payload(pair.sid)
        await consumer.send(frame(CANDIDATE_OFFER, payload))
        reply = await consumer.next_frame()
        assert reply.raw == frame(CANDIDATE_ANSWER, pb_int(1, pair.sid))  # empty, same id
        await consumer.ping_pong()
        await provider.ping_pong()  # the offer never reached the provider
        # The provider offering gets the same treatment.
        await provider.send(frame(CANDIDATE_OFFER, payload))
        assert (await provider.next_frame()).raw == frame(CANDIDATE_ANSWER, pb_int(1, pair.sid))
        await provider.ping_pong()
        await consumer.ping_pong()
        # Only offers are stopped: an ANSWER is still blind-forwarded (§7.2).
        answer = frame(CANDIDATE_ANSWER, payload)
        await provider.send(answer)
        assert (await consumer.next_frame()).raw == answer
        # MIGRATE_TO_P2P is still accepted silently and does not tear down (§7.3).
        await consumer.send(frame(MIGRATE_TO_P2P, pb_int(1, pair.sid)))
        await consumer.ping_pong()
        await provider.ping_pong()
        await pair.exchange(b"forbidden-still-spliced")


async def test_forbidden_offer_from_stranger_dropped_silently(pki: Pki) -> None:
    async with running_relay(pki, policy_rules("forbidden")) as h:
        consumer, provider, pair = await live_pair(h)
        stranger = await h.agent(tenant="globex")
        await stranger.send(frame(CANDIDATE_OFFER, candidates_payload(pair.sid)))
        await stranger.ping_pong()
        await consumer.ping_pong()
        await provider.ping_pong()


async def test_hello_mesh_capability_is_echoed_only_by_a_relay_in_a_mesh(pki: Pki) -> None:
    """``orp.CAP_MESH``: an agent may leave a dead relay for any other only in a mesh."""
    async with running_relay(pki) as h:
        alone = await h.agent(["mesh", "p2p-mode"])
        assert alone.hello_ack is not None
        assert alone.hello_ack.fields() == [(3, b"p2p-mode")]
    async with mesh_relays(pki, "r1") as mesh:
        meshed = await mesh.agent("r1", ("mesh", "p2p-mode"))
        assert meshed.hello_ack is not None
        assert sorted(meshed.hello_ack.fields()) == [(3, b"mesh"), (3, b"p2p-mode")]
